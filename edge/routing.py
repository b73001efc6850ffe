"""Which class an MQTT topic belongs to. Pure code: no I/O, unit-tested on its own."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["UNROUTED_CLASS", "Route", "TopicRouter"]

UNROUTED_CLASS = "!unrouted"
"""Stored class of a publish that matched no class: it is kept and forwarded to the
dead-letter topic, never dropped. ``!`` cannot appear in a configured class name."""


# Not frozen: a frozen dataclass's __init__ costs ~4x more (object.__setattr__ per
# field), and this one is built for every message on the hot path. Treat it as immutable.
@dataclass(slots=True, unsafe_hash=True)
class Route:
    """Where a publish goes."""

    class_name: str
    reason: str | None = None
    """Why it went to the dead-letter class (None when routed normally)."""


class TopicRouter:
    """Maps ``d/{device_id}/up/{class}[/...]`` (configurable) to a configured class.

    The device id comes from the session (client id), not from the topic; the topic's
    ``{device_id}`` level must match it, so a device cannot file data under another id.
    """

    def __init__(self, pattern: str, classes: Collection[str]) -> None:
        self._levels = pattern.split("/")
        self._device_level = self._levels.index("{device_id}")
        self._class_level = self._levels.index("{class}")
        self._classes = frozenset(classes)

    def route(self, device_id: str, topic: str) -> Route:
        """The class for a publish on ``topic`` by ``device_id``."""
        levels = topic.split("/")
        if len(levels) < len(self._levels):
            return Route(UNROUTED_CLASS, "topic does not match the uplink pattern")
        for index, expected in enumerate(self._levels):
            if index in (self._device_level, self._class_level):
                continue
            if levels[index] != expected:
                return Route(UNROUTED_CLASS, "topic does not match the uplink pattern")
        if levels[self._device_level] != device_id:
            return Route(UNROUTED_CLASS, "topic names another device id")
        class_name = levels[self._class_level]
        if class_name not in self._classes:
            return Route(UNROUTED_CLASS, f"unknown class {class_name!r}")
        return Route(class_name)

    def device_topic_prefix(self) -> str:
        """The literal topic prefix before ``{device_id}`` (e.g. ``d/``)."""
        return "/".join(self._levels[: self._device_level]) + ("/" if self._device_level else "")
