"""Per-device topic ACL: pure decisions, no I/O.

Rules are MQTT topic filters with a ``{device_id}`` placeholder (a whole topic level or part
of one) and, with tenants configured, a ``{tenant}`` placeholder (the device's tenant; a rule
that names ``{tenant}`` gives a device without a tenant nothing).

A device may PUBLISH on a topic matched by one of its publish rules, and SUBSCRIBE to
a filter that is entirely covered by one of its subscribe rules (``d/a/fw/+`` is covered by
``d/a/fw/#``; ``d/+/cmd`` is not covered by ``d/a/cmd``). Defaults: publish under
``d/{device_id}/#`` (uplink, command results, firmware status), subscribe to
``d/{device_id}/cmd`` and ``d/{device_id}/fw/#``.

A device id that contains ``/``, ``+`` or ``#`` (or is empty) matches no rule: substituting it
would let it reach into another device's topics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_PUBLISH_RULES",
    "DEFAULT_SUBSCRIBE_RULES",
    "AclPolicy",
    "filter_covers",
    "topic_matches",
    "validate_rule",
]

DEFAULT_PUBLISH_RULES: Final = ("d/{device_id}/#",)
DEFAULT_SUBSCRIBE_RULES: Final = ("d/{device_id}/cmd", "d/{device_id}/fw/#")
_CACHE_LIMIT: Final = 65_536


def validate_rule(rule: str) -> str:
    """Return ``rule`` if it is a valid topic filter template; raise ValueError otherwise."""
    if not rule:
        raise ValueError("empty rule")
    rest = rule.replace("{device_id}", "x").replace("{tenant}", "x")
    if "{" in rest or "}" in rest:
        raise ValueError(f"{rule!r}: the only placeholders are {{device_id}} and {{tenant}}")
    levels = rest.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"{rule!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"{rule!r}: '+' must be a whole level")
    return rule


def topic_matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 matching of a concrete topic against a filter."""
    t_levels = topic.split("/")
    f_levels = topic_filter.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            # [MQTT-4.7.2-1]: wildcards at the first level do not match "$" topics.
            return not (index == 0 and topic.startswith("$"))
        if index >= len(t_levels):
            return False
        if level == "+":
            if index == 0 and topic.startswith("$"):
                return False
            continue
        if level != t_levels[index]:
            return False
    return len(t_levels) == len(f_levels)


def filter_covers(rule: str, requested: str) -> bool:
    """True if every topic ``requested`` can match is also matched by ``rule``."""
    r_levels = rule.split("/")
    q_levels = requested.split("/")
    for index, level in enumerate(r_levels):
        if level == "#":
            return True
        if index >= len(q_levels):
            return False
        wanted = q_levels[index]
        if wanted == "#":
            return False  # the request reaches deeper than a non-'#' rule allows
        if level == "+":
            continue
        if level != wanted:  # a '+' in the request is broader than a literal rule level
            return False
    return len(q_levels) == len(r_levels)


def _valid_identity(device_id: str) -> bool:
    return bool(device_id) and not any(c in device_id for c in "/+#")


@dataclass(frozen=True)
class AclPolicy:
    """What each device may publish to and subscribe to (module docstring)."""

    publish: Sequence[str] = DEFAULT_PUBLISH_RULES
    subscribe: Sequence[str] = DEFAULT_SUBSCRIBE_RULES
    tenant_of: Callable[[str], str | None] | None = None
    """Device id -> tenant, for ``{tenant}`` (:meth:`edge.tenants.TenantMap.tenant_of`)."""

    def __post_init__(self) -> None:
        for rule in (*self.publish, *self.subscribe):
            validate_rule(rule)

    @classmethod
    def with_extra(
        cls,
        publish: Sequence[str] = (),
        subscribe: Sequence[str] = (),
        tenant_of: Callable[[str], str | None] | None = None,
    ) -> AclPolicy:
        """The default rules plus ``publish`` / ``subscribe`` extras."""
        return cls(
            publish=(*DEFAULT_PUBLISH_RULES, *publish),
            subscribe=(*DEFAULT_SUBSCRIBE_RULES, *subscribe),
            tenant_of=tenant_of,
        )

    def _rules(self, rules: Sequence[str], device_id: str) -> list[str]:
        """``rules`` with the placeholders filled in for ``device_id``."""
        tenant = self.tenant_of(device_id) if self.tenant_of is not None else None
        out = []
        for rule in rules:
            filled = rule
            if "{tenant}" in rule:
                if tenant is None or not _valid_identity(tenant):
                    continue
                filled = rule.replace("{tenant}", tenant)  # tenant names have no braces
            out.append(filled.replace("{device_id}", device_id))
        return out

    def may_publish(self, device_id: str, topic: str) -> bool:
        if not _valid_identity(device_id):
            return False
        return any(topic_matches(topic, rule) for rule in self._rules(self.publish, device_id))

    def may_subscribe(self, device_id: str, topic_filter: str) -> bool:
        if not _valid_identity(device_id):
            return False
        return any(
            filter_covers(rule, topic_filter) for rule in self._rules(self.subscribe, device_id)
        )
