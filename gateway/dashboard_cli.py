"""``tidegate dashboard -c CONFIG``: print (or open) the running gateway's dashboard URL.

The URL carries the admin token in its fragment (``#token=...``): a browser never sends a
fragment to the server, and the page uses it only for the guarded lists (drops, dead
letters). Only whoever can read the data directory (the token file is 0600) gets it.
"""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Annotated

import typer

from gateway.config import load_config
from gateway.errors import ConfigError

__all__ = ["dashboard_command", "dashboard_url"]


def dashboard_url(host: str, port: int, token: str | None) -> str:
    """The page's URL; a wildcard bind address is reached through loopback."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    fragment = "" if token is None else f"#token={token}"
    return f"http://{host}:{port}/dashboard/{fragment}"


def dashboard_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway config file (TOML).")] = (
        Path("configs/dev.toml")
    ),
    open_browser: Annotated[
        bool, typer.Option("--open", help="Also open it in the default browser.")
    ] = False,
    with_token: Annotated[
        bool,
        typer.Option(
            "--token/--no-token", help="Put the admin token in the URL (drops, dead letters)."
        ),
    ] = True,
) -> None:
    """Print the URL of the running gateway's live dashboard."""
    from gateway.admin import read_token  # here: the CLI's other commands stay light
    from gateway.app import read_runtime

    try:
        cfg = load_config(config, check_files=False)
    except ConfigError as exc:
        typer.echo(f"tidegate: {exc}", err=True)
        raise typer.Exit(2) from None
    runtime = read_runtime(cfg.gateway.data_dir)
    admin = (runtime or {}).get("admin")
    if not admin:
        typer.echo(
            f"tidegate: no running gateway found (no runtime file in {cfg.gateway.data_dir})",
            err=True,
        )
        raise typer.Exit(1)
    token = read_token(cfg.gateway.data_dir) if with_token else None
    if with_token and token is None:
        typer.echo(
            f"tidegate: cannot read the admin token in {cfg.gateway.data_dir}; "
            "the page will show counts but not the drop and dead-letter lists",
            err=True,
        )
    url = dashboard_url(str(admin["host"]), int(admin["port"]), token)
    typer.echo(url)
    if open_browser:
        webbrowser.open(url)
