"""What else a reload (SIGHUP, ``tidegate reload``) applies, beyond security (gateway/reload.py).

Applied at runtime:

* ``logging.level``: the root logger's level, at once;
* routes: ``classes.<name>.kafka_topic``: the topic of the rows forwarded from then on
  (rows already handed to the producer keep the topic they were built with);
* limits: ``buffer.max_rows`` and ``buffer.max_bytes``: the bounds of the next commits (a
  lower bound than the rows already held makes the buffer full: acknowledgements of
  ``block`` classes wait, lossy classes drop by their policy, nothing stored is removed);
  ``[quotas]``: the broker's security settings are rebuilt with them (each device's token
  buckets start full again).

Everything else that changed (a class added or removed, a class's policy, priority or
content type, the buffer's path, other Kafka settings, listeners ...) is reported as
"needs restart" and kept as it was. Deciding is pure (:func:`split_changes`); applying is
:func:`apply_runtime`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from gateway.config import GatewayConfig
from gateway.logging_setup import set_level

__all__ = ["RuntimeChanges", "apply_runtime", "split_changes"]

log = logging.getLogger(__name__)

_BUFFER_LIMITS = ("max_rows", "max_bytes")


@dataclass
class RuntimeChanges:
    """The non-security part of a reload."""

    config: GatewayConfig
    """The old config with the runtime-reloadable settings of the new one."""
    changed: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)


def split_changes(old: GatewayConfig, new: GatewayConfig) -> RuntimeChanges:
    """Which changes outside ``broker`` apply now and which need a restart. Pure."""
    changed: list[str] = []
    restart: list[str] = []
    update: dict[str, Any] = {}
    old_dump, new_dump = old.model_dump(), new.model_dump()
    for key in old_dump:
        if key == "broker" or old_dump[key] == new_dump[key]:
            continue
        if key == "logging":
            others = [
                k for k in old_dump[key] if k != "level" and old_dump[key][k] != new_dump[key][k]
            ]
            restart += [f"logging.{k}" for k in others]
            if old.logging.level != new.logging.level:
                changed.append("logging.level")
                update["logging"] = old.logging.model_copy(update={"level": new.logging.level})
        elif key == "buffer":
            limits = {k: getattr(new.buffer, k) for k in _BUFFER_LIMITS}
            changed += [f"buffer.{k}" for k, v in limits.items() if getattr(old.buffer, k) != v]
            restart += [
                f"buffer.{k}"
                for k in old_dump[key]
                if k not in _BUFFER_LIMITS and old_dump[key][k] != new_dump[key][k]
            ]
            update["buffer"] = old.buffer.model_copy(update=limits)
        elif key == "quotas":
            # Quotas are part of the broker's security settings, which a reload rebuilds from
            # the merged config and swaps in (gateway/reload.py): per-device buckets restart.
            changed.append("quotas")
            update["quotas"] = new.quotas
        elif key == "classes" and old.classes.keys() == new.classes.keys():
            classes = dict(old.classes)
            for name, before in old.classes.items():
                after = new.classes[name]
                if before.kafka_topic != after.kafka_topic:
                    changed.append(f"classes.{name}.kafka_topic")
                    classes[name] = before.model_copy(update={"kafka_topic": after.kafka_topic})
                rest = {
                    k
                    for k, v in before.model_dump().items()
                    if k != "kafka_topic" and after.model_dump()[k] != v
                }
                restart += [f"classes.{name}.{k}" for k in sorted(rest)]
            update["classes"] = classes
        else:
            restart.append(key)
    return RuntimeChanges(old.model_copy(update=update), changed, restart)


def apply_runtime(target: Any, changes: RuntimeChanges) -> None:
    """Put the applied settings in force on a running gateway (its buffer's bounds, its
    forwarder's record builder, the log level). Call only with a validated config."""
    config = changes.config
    if "logging.level" in changes.changed:
        set_level(config.logging.level)
    if any(c.startswith("buffer.") for c in changes.changed):
        target.buffer.update_limits(config.buffer)
    routes = {
        name: c.kafka_topic
        for name, c in config.classes.items()
        if f"classes.{name}.kafka_topic" in changes.changed
    }
    if routes:
        target.forwarder.update_routes(routes)
    if changes.changed:
        log.info("reload: applied %s", ", ".join(changes.changed))
