"""Typer apps for development: ``dev kafka up|down|status`` and ``certs init|device``.

Mounted into the main ``tidegate`` CLI by gateway/cli.py. Every expected failure is a
:class:`TidegateError` turned into one clear line on stderr and exit code 1; bad arguments
exit 2 (typer's usage error), never with a traceback.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gateway.dev.kafka import kafka_status, start_kafka, state_path, stop_kafka
from gateway.errors import TidegateError
from gateway.pki import init_pki, issue_device_cert

__all__ = ["certs_app", "dev_app", "kafka_app"]

_out = Console()
_err = Console(stderr=True)

dev_app = typer.Typer(help="Development helpers (local Kafka).", no_args_is_help=True)
kafka_app = typer.Typer(
    help="The project's local Apache Kafka (KRaft, mutual TLS, loopback only).",
    no_args_is_help=True,
)
dev_app.add_typer(kafka_app, name="kafka")
certs_app = typer.Typer(
    help="The development PKI (CA, broker, gateway, devices).", no_args_is_help=True
)

_DirOption = Annotated[
    Path, typer.Option("--dir", help="Data directory of the local Kafka (holds state.json).")
]


def _fail(exc: TidegateError) -> typer.Exit:
    _err.print(f"[red]error:[/red] {exc}", highlight=False, markup=True)
    return typer.Exit(code=1)


@kafka_app.command("up")
def kafka_up(
    data_dir: _DirOption = Path("var/kafka"),
    pki_dir: Annotated[
        Path, typer.Option("--pki", help="PKI directory; created if missing (CA kept if present).")
    ] = Path("var/pki"),
    brokers: Annotated[
        int, typer.Option("--brokers", help="Number of nodes: 1, or 3 for a replicated cluster.")
    ] = 1,
) -> None:
    """Start Kafka in the background and print its bootstrap address."""
    if brokers not in (1, 3):
        raise typer.BadParameter("must be 1 or 3", param_hint="--brokers")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        status = kafka_status(data_dir)
        if status.running and status.state is not None:
            _out.print(f"already running: {status.state.bootstrap}", highlight=False)
            _out.print(f"state file: {status.state.state_file}", highlight=False)
            return
        began = time.monotonic()
        state = start_kafka(data_dir, pki_dir, brokers=brokers)
    except TidegateError as exc:
        raise _fail(exc) from None
    _out.print(
        f"kafka {state.version} up in {time.monotonic() - began:.1f}s, "
        f"{len(state.brokers)} broker(s)",
        highlight=False,
    )
    _out.print(f"bootstrap: {state.bootstrap}", highlight=False)
    if state.sasl_bootstrap is not None:
        _out.print(f"sasl_ssl bootstrap: {state.sasl_bootstrap}", highlight=False)
    _out.print(f"state file: {state.state_file}", highlight=False)


@kafka_app.command("down")
def kafka_down(data_dir: _DirOption = Path("var/kafka")) -> None:
    """Stop the local Kafka in ``--dir`` (SIGTERM, SIGKILL after a deadline)."""
    try:
        stopped = stop_kafka(state_path(data_dir))
    except TidegateError as exc:
        raise _fail(exc) from None
    _out.print("stopped" if stopped else f"not running (no {state_path(data_dir)})")


@kafka_app.command("status")
def kafka_status_cmd(data_dir: _DirOption = Path("var/kafka")) -> None:
    """Show whether the local Kafka in ``--dir`` runs; exit 1 if it does not."""
    try:
        status = kafka_status(data_dir)
    except TidegateError as exc:
        raise _fail(exc) from None
    if status.state is None:
        _out.print(f"not running (no {state_path(data_dir)})", highlight=False)
        raise typer.Exit(code=1)
    state = status.state
    _out.print(f"kafka {state.version}  bootstrap {state.bootstrap}", highlight=False)
    if state.sasl is not None and state.sasl_bootstrap is not None:
        _out.print(
            f"sasl_ssl {state.sasl_bootstrap}  user {state.sasl.username}  "
            f"password file {state.sasl.password_file}  ({', '.join(state.sasl.mechanisms)})",
            highlight=False,
        )
    sasl_ports = {b.node_id: b.sasl_port for b in state.brokers}
    for broker in status.brokers:
        alive = "alive" if broker.alive else "DEAD"
        port = "open" if broker.port_open else "CLOSED"
        sasl_port = sasl_ports.get(broker.node_id)
        sasl = f", sasl_ssl port {sasl_port}" if sasl_port is not None else ""
        _out.print(
            f"  node {broker.node_id}: pid {broker.pid} {alive}, port {port}{sasl}",
            highlight=False,
        )
    if not status.running:
        raise typer.Exit(code=1)


@certs_app.command("init")
def certs_init(
    directory: Annotated[Path, typer.Argument(help="PKI directory to create or complete.")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace the CA (invalidates every issued cert).")
    ] = False,
) -> None:
    """Create the dev CA, broker and gateway certificates (keeps an existing CA)."""
    try:
        paths = init_pki(directory, force=force)
    except TidegateError as exc:
        raise _fail(exc) from None
    _out.print(f"CA: {paths.ca_cert}", highlight=False)
    _out.print(f"broker: {paths.broker_cert}", highlight=False)
    _out.print(f"gateway: {paths.gateway_cert}", highlight=False)


@certs_app.command("device")
def certs_device(
    device_id: Annotated[str, typer.Argument(help="Device id; becomes the certificate CN.")],
    directory: Annotated[Path, typer.Option("--dir", help="PKI directory holding the CA.")] = Path(
        "var/pki"
    ),
) -> None:
    """Issue a client certificate for one device, signed by the dev CA."""
    try:
        cert, key = issue_device_cert(directory, device_id)
    except TidegateError as exc:
        raise _fail(exc) from None
    _out.print(f"cert: {cert}", highlight=False)
    _out.print(f"key: {key}", highlight=False)
