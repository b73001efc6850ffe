"""``python -m device_sim sim|verify``: the simulator CLI without the gateway's main CLI."""

from __future__ import annotations

import typer

from device_sim.cli import sim, verify

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=True)
app.command("sim")(sim)
app.command("verify")(verify)

if __name__ == "__main__":
    app()
