"""``tidegate devices add | remove | list``: the device password file (salted scrypt hashes).

The file is named with ``--file``, or taken from ``broker.password_file`` of ``--config``.
A running gateway re-reads the file when it changes, so no restart is needed.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Annotated

import typer

from edge.passwords import PasswordFileError, hash_password, read_entries, write_entries
from gateway.config import load_config
from gateway.errors import ConfigError, PkiError
from gateway.pki import validate_device_id

__all__ = ["devices_app"]

devices_app = typer.Typer(
    help="Device credentials: the password file (salted scrypt hashes only).",
    no_args_is_help=True,
)

FileOption = Annotated[
    Path | None, typer.Option("--file", "-f", help="Password file (default: from --config).")
]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Gateway config naming the password file.")
]
MIN_PASSWORD_LENGTH = 8


def _fail(message: str) -> typer.Exit:
    typer.echo(f"tidegate: {message}", err=True)
    return typer.Exit(2)


def _password_file(file: Path | None, config: Path | None) -> Path:
    if file is not None:
        return file
    if config is None:
        raise _fail("give --file or --config")
    try:
        cfg = load_config(config, check_files=False)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if cfg.broker.password_file is None:
        raise _fail(f"{config}: broker.password_file is not set")
    return cfg.broker.password_file


def _entries(path: Path) -> dict[str, str]:
    try:
        return read_entries(path)
    except PasswordFileError as exc:
        raise _fail(str(exc)) from None


@devices_app.command("add")
def devices_add(
    device_id: Annotated[str, typer.Argument(help="Device id (= MQTT client id and user name).")],
    file: FileOption = None,
    config: ConfigOption = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin (one line).")
    ] = False,
) -> None:
    """Add a device or replace its password."""
    try:
        validate_device_id(device_id)
    except PkiError as exc:
        raise _fail(str(exc)) from None
    path = _password_file(file, config)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {device_id}: ")
        if getpass.getpass("again: ") != password:
            raise _fail("passwords differ")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise _fail(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    entries = _entries(path)
    replaced = device_id in entries
    entries[device_id] = hash_password(password)
    try:
        write_entries(path, entries)
    except OSError as exc:
        raise _fail(f"{path}: cannot write: {exc}") from None
    typer.echo(f"{'updated' if replaced else 'added'} {device_id} in {path}")


@devices_app.command("remove")
def devices_remove(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    file: FileOption = None,
    config: ConfigOption = None,
) -> None:
    """Remove a device (it can no longer connect with a password)."""
    path = _password_file(file, config)
    entries = _entries(path)
    if entries.pop(device_id, None) is None:
        raise _fail(f"{device_id}: not in {path}")
    try:
        write_entries(path, entries)
    except OSError as exc:
        raise _fail(f"{path}: cannot write: {exc}") from None
    typer.echo(f"removed {device_id} from {path}")


@devices_app.command("list")
def devices_list(file: FileOption = None, config: ConfigOption = None) -> None:
    """Device ids in the password file, one per line."""
    for device_id in sorted(_entries(_password_file(file, config))):
        typer.echo(device_id)
