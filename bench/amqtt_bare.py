"""A bare amqtt 0.12.1 broker for the benchmarks: one TCP listener, no persistence, no Kafka.

``python -m bench.amqtt_bare --port P [--plugins default|anonymous]``

``default`` is amqtt's own default plugin set (event and packet loggers, anonymous auth,
$SYS every 20 s) — what ``amqtt`` gives out of the box. ``anonymous`` keeps only the
anonymous-auth plugin, the set tidegate's embedded broker loads. Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import default_broker_plugins

__all__ = ["main", "serve"]

PLUGIN_SETS = ("default", "anonymous")
_ANONYMOUS = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def broker_config(port: int, plugins: str) -> dict[str, Any]:
    """amqtt config dict: the ``default`` listener bound to 127.0.0.1:``port``."""
    chosen = (
        default_broker_plugins()
        if plugins == "default"
        else {_ANONYMOUS: {"allow_anonymous": True}}
    )
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": chosen,
    }


async def serve(port: int, plugins: str) -> None:
    """Run the broker until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = Broker(broker_config(port, plugins))
    await broker.start()
    try:
        await stop.wait()
    finally:
        # Bounded: a broker stuck in shutdown must not keep the benchmark waiting.
        async with asyncio.timeout(10):
            await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plugins", choices=PLUGIN_SETS, default="default")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.plugins))


if __name__ == "__main__":
    main()
