"""The naive MQTT → Kafka bridge the suite compares tidegate with (a peer, not a product).

``python -m bench.naive_bridge --mqtt-port P --kafka-state STATE.json --topic T --stats OUT.json``

What people write first: a paho subscriber on a broker (Mosquitto here) whose ``on_message``
callback sends each message to Kafka with aiokafka and waits for the ack before taking the
next one. No buffer, no batching beyond aiokafka's own linger. Behind Mosquitto's default
queue limit (``max_queued_messages 1000`` per session) messages the bridge cannot take fast
enough are dropped by Mosquitto, silently: the suite measures that loss by counting what
reached Kafka. Runs until SIGTERM/SIGINT, then writes its counters to ``--stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from paho.mqtt.enums import CallbackAPIVersion

from gateway.dev.kafka import read_state
from gateway.dev.kafka_admin import client_ssl_context

__all__ = ["main"]

_SEND_TIMEOUT_S = 30.0


class _Counters:
    def __init__(self) -> None:
        self.received = 0
        self.produced = 0
        self.failed = 0
        self.first_wall: float | None = None
        self.last_produced_wall: float | None = None


async def _run(args: argparse.Namespace) -> _Counters:
    state = read_state(args.kafka_state)
    producer = AIOKafkaProducer(
        bootstrap_servers=state.bootstrap_servers,
        security_protocol="SSL",
        ssl_context=client_ssl_context(state),
        # aiokafka's defaults (linger 0) except acks=all: the same durability in Kafka as
        # tidegate asks for, so the comparison is of the bridging, not of the ack level.
        acks="all",
    )
    await producer.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counters = _Counters()
    lock = threading.Lock()

    def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        # The naive part: one Kafka round trip per message, in paho's network thread, so
        # nothing else is read from the broker meanwhile.
        with lock:
            counters.received += 1
            if counters.first_wall is None:
                counters.first_wall = time.time()
        future: Future[Any] = asyncio.run_coroutine_threadsafe(
            producer.send_and_wait(args.topic, message.payload, key=message.topic.encode()), loop
        )
        try:
            future.result(timeout=_SEND_TIMEOUT_S)
        except Exception:
            with lock:
                counters.failed += 1
            return
        with lock:
            counters.produced += 1
            counters.last_produced_wall = time.time()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="naive-bridge", clean_session=True)
    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect("127.0.0.1", args.mqtt_port)
    client.subscribe(args.filter, qos=1)
    client.loop_start()
    try:
        # The suite starts its load only once the subscription is in place.
        await asyncio.to_thread(subscribed.wait, 30)
        args.stats.with_suffix(".ready").write_text("ready\n")
        await stop.wait()
    finally:
        client.disconnect()
        client.loop_stop()
        async with asyncio.timeout(15):
            await producer.stop()
    return counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mqtt-port", type=int, required=True)
    parser.add_argument("--kafka-state", type=Path, required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--filter", default="d/+/up/#")
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args()
    counters = asyncio.run(_run(args))
    args.stats.write_text(json.dumps(vars(counters)) + "\n")


if __name__ == "__main__":
    main()
