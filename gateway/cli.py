"""The ``tidegate`` command line.

Exit codes: 0 success, 1 the operation failed (e.g. verification found losses), 2 bad
input (arguments, configuration). Errors are one clear message, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from device_sim.chaos_cli import chaos as chaos_command
from device_sim.cli import sim as sim_command
from device_sim.cli import verify as verify_command
from gateway.buffer_cli import buffer_app
from gateway.commands_cli import cmd_app
from gateway.config import load_config
from gateway.dashboard_cli import dashboard_command
from gateway.dev.cli import certs_app, dev_app
from gateway.devices_cli import devices_app
from gateway.errors import ConfigError, TidegateError
from gateway.firmware_cli import fw_app
from gateway.reload_cli import reload_command
from gateway.sizing import sizing_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="tidegate",
    help="Edge MQTT → Kafka gateway with a durable store-and-forward buffer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.add_typer(certs_app, name="certs")
app.add_typer(dev_app, name="dev")
app.add_typer(cmd_app, name="cmd")
app.add_typer(devices_app, name="devices")
app.add_typer(fw_app, name="fw")
app.add_typer(buffer_app, name="buffer")
app.command("sim")(sim_command)
app.command("verify")(verify_command)
app.command("chaos")(chaos_command)
app.command("reload")(reload_command)
app.command("dashboard")(dashboard_command)
app.command("sizing")(sizing_command)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Gateway config file (TOML).", show_default=True)
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"tidegate: {message}", err=True)
    return typer.Exit(code)


def _load(path: Path) -> Any:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


@app.command("check-config")
def check_config(
    file: Annotated[Path, typer.Argument(help="Config file to validate.")],
) -> None:
    """Validate a config file: exit 0, or 2 with each error and its field path."""
    try:
        config = load_config(file)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"{file}: ok (gateway {config.gateway.id}, {len(config.classes)} classes, "
        f"kafka {','.join(config.kafka.bootstrap_servers)})"
    )


@app.command("run")
def run(
    config: ConfigOption = Path("configs/dev.toml"),
    log_level: Annotated[
        str | None,
        typer.Option(help="DEBUG, INFO, WARNING, ERROR (default: [logging] level)"),
    ] = None,
) -> None:
    """Run the gateway in the foreground until SIGTERM or Ctrl-C."""
    if log_level is not None and log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise _fail(f"--log-level: unknown level {log_level!r}")
    cfg = _load(config)
    from gateway.logging_setup import configure_logging

    configure_logging(cfg.logging, None if log_level is None else log_level.upper())
    # Imported here so `check-config` and `status` stay fast and light.
    from gateway.app import Gateway

    async def main() -> None:
        gateway = Gateway(cfg, config_path=config)
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if gateway_stop_requested.is_set():
                return
            gateway_stop_requested.set()
            gateway.request_stop()
            # Watchdog: whatever hangs (aiokafka's stop() can, while Kafka is down), the
            # process exits by the deadline. Everything acknowledged is already on disk.
            loop.call_later(cfg.gateway.shutdown_deadline_s + 1.0, _hard_exit)

        gateway_stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await gateway.run()

    try:
        tls = any(listener.tls for listener in cfg.broker.listeners)
        with _runner(cfg.gateway.event_loop, tls_listeners=tls) as runner:
            runner.run(main())
    except TidegateError as exc:
        raise _fail(str(exc), code=1) from None


def _runner(choice: str, *, tls_listeners: bool) -> asyncio.Runner:
    """An asyncio runner on the configured event loop (gateway.event_loop)."""
    if choice == "asyncio" or (choice == "auto" and tls_listeners):
        return asyncio.Runner()
    if tls_listeners:
        raise _fail(
            "gateway.event_loop = 'uvloop' cannot serve TLS listeners (their start_tls upgrade"
            " hangs under uvloop); use 'auto' or 'asyncio'"
        )
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise _fail("gateway.event_loop = 'uvloop' but uvloop is not installed") from None
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _hard_exit() -> None:
    logging.getLogger("tidegate").error("shutdown deadline passed; exiting now")
    logging.shutdown()
    os._exit(3)


@app.command("status")
def status(
    config: ConfigOption = Path("configs/dev.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
    sample: Annotated[
        float,
        typer.Option(min=0, max=60, help="Seconds between two samples for the drain estimate."),
    ] = 1.0,
) -> None:
    """Show a running gateway's health, buffer (depth, age, drain estimate), drops, Kafka
    and breaker state, devices, commands and firmware."""
    cfg = _load(config)
    from gateway.app import read_runtime

    runtime = read_runtime(cfg.gateway.data_dir)
    admin = (runtime or {}).get("admin") or {"host": cfg.admin.host, "port": cfg.admin.port}
    base = f"http://{admin['host']}:{admin['port']}"

    from gateway.admin import read_token

    # A non-loopback admin API guards /status and /devices too: send the token if readable.
    token = read_token(cfg.gateway.data_dir)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}

    def fetch(path: str = "/status") -> Any:
        request = urllib.request.Request(base + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # the admin API
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise _fail(f"no running gateway answers at {base + path}: {exc}", code=1) from None

    data = fetch()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from gateway.status_view import drain_estimate, render_status

    drain = None
    if sample > 0 and data["buffer"]["rows"]:
        started = time.monotonic()
        time.sleep(sample)  # a rate needs two samples
        later = fetch()
        drain = drain_estimate(data, later, time.monotonic() - started)
        data = later
    limits = {"max_rows": cfg.buffer.max_rows, "max_bytes": cfg.buffer.max_bytes}
    registry = fetch("/devices")["devices"]
    devices = (sum(1 for d in registry if d.get("connected")), len(registry))
    render_status(data, drain=drain, limits=limits, devices=devices)


def _admin_call(cfg: Any, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request to the running gateway's admin API (loopback), with its token."""
    from gateway.admin import read_token
    from gateway.app import read_runtime

    runtime = read_runtime(cfg.gateway.data_dir)
    if runtime is None or not runtime.get("admin"):
        raise _fail(f"no running gateway found (no runtime file in {cfg.gateway.data_dir})", 1)
    token = read_token(cfg.gateway.data_dir)
    if token is None:
        raise _fail(f"cannot read the admin token in {cfg.gateway.data_dir}", 1)
    admin = runtime["admin"]
    url = f"http://{admin['host']}:{admin['port']}{path}"
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # loopback admin API
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise _fail(f"{method} {url}: HTTP {exc.code}: {detail}", 1) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _fail(f"no running gateway answers at {url}: {exc}", 1) from None


dlq_app = typer.Typer(
    help="Dead letters: messages Kafka can never take. Goes through the running gateway.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")
drops_app = typer.Typer(help="The drop ledger (drops by policy).", no_args_is_help=True)
app.add_typer(drops_app, name="drops")

IdsArgument = Annotated[
    list[int] | None, typer.Argument(help="Dead-letter ids.", show_default=False)
]
AllOption = Annotated[bool, typer.Option("--all", help="Every dead letter.")]


def _ids_body(ids: list[int] | None, all_: bool) -> dict[str, Any]:
    if all_ == bool(ids):
        raise _fail("give dead-letter ids or --all (not both)")
    return {"all": True} if all_ else {"ids": list(ids or [])}


@dlq_app.command("list")
def dlq_list(
    config: ConfigOption = Path("configs/dev.toml"),
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    after: Annotated[int, typer.Option(min=0, help="Only ids above this.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, payloads base64.")] = False,
) -> None:
    """List dead letters: id, device, class, size, reason, whether Kafka's DLQ topic has it."""
    cfg = _load(config)
    items = _admin_call(cfg, "GET", f"/dead-letters?limit={limit}&after={after}")["dead_letters"]
    if as_json:
        for item in items:
            typer.echo(json.dumps(item))
        return
    if not items:
        typer.echo("no dead letters")
        return
    for item in items:
        forwarded = "in DLQ topic" if item["forwarded_ms"] else "not yet in DLQ topic"
        typer.echo(
            f"{item['row_id']}  {item['device_id']}  {item['class_name']}  "
            f"{item['payload_bytes']} B  {forwarded}  {item['reason']}"
        )


@dlq_app.command("replay")
def dlq_replay(
    ids: IdsArgument = None,
    all_: AllOption = False,
    config: ConfigOption = Path("configs/dev.toml"),
) -> None:
    """Put dead letters back into the uplink queue (same message ids) to be sent again."""
    cfg = _load(config)
    result = _admin_call(cfg, "POST", "/dead-letters/replay", _ids_body(ids, all_))
    typer.echo(f"replayed {result['replayed']} dead letters")


@dlq_app.command("purge")
def dlq_purge(
    ids: IdsArgument = None,
    all_: AllOption = False,
    config: ConfigOption = Path("configs/dev.toml"),
) -> None:
    """Delete dead letters from the gateway for good."""
    cfg = _load(config)
    result = _admin_call(cfg, "POST", "/dead-letters/purge", _ids_body(ids, all_))
    typer.echo(f"purged {result['purged']} dead letters")


@drops_app.command("export")
def drops_export(
    out: Annotated[Path, typer.Option("--out", help="JSON lines file to write ('-': stdout).")],
    config: ConfigOption = Path("configs/dev.toml"),
) -> None:
    """Write the drop ledger as JSON lines in the verifier's format (``verify --drops``)."""
    cfg = _load(config)
    lines: list[str] = []
    after = 0
    while True:
        page = _admin_call(cfg, "GET", f"/drops?after={after}&limit=10000")["drops"]
        if not page:
            break
        lines.extend(json.dumps(d) for d in page)
        after = int(page[-1]["id"])
    text = "".join(line + "\n" for line in lines)
    if str(out) == "-":
        sys.stdout.write(text)
        return
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    typer.echo(f"{len(lines)} drops written to {out}", err=True)


@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its files.")] = Path(
        "var/demo"
    ),
    devices: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    count: Annotated[int, typer.Option(min=1, max=1_000_000, help="Messages per device.")] = 100,
    kafka_state: Annotated[
        Path | None, typer.Option(help="Reuse a running local Kafka (its state.json).")
    ] = None,
) -> None:
    """Everything in one go: certificates, local Kafka, gateway, simulated fleet, verifier."""
    from gateway.demo import DemoOptions, run_demo

    try:
        code = run_demo(
            DemoOptions(workdir=workdir, devices=devices, count=count, kafka_state=kafka_state)
        )
    except TidegateError as exc:
        raise _fail(str(exc), code=1) from None
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
