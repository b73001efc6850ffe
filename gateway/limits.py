"""Process limits the gateway needs at scale: one file descriptor per connected device.

A default soft ``RLIMIT_NOFILE`` of 1,024 caps a gateway at about a thousand devices (amqtt
then fails every accept with EMFILE). At start-up the soft limit is raised to the hard limit
(capped at :data:`WANTED_FDS`); if even the hard limit is low, the log says how many devices
fit and how to raise it (``ulimit -Hn`` / systemd ``LimitNOFILE``).
"""

from __future__ import annotations

import logging
import resource

__all__ = ["WANTED_FDS", "raise_fd_limit"]

log = logging.getLogger(__name__)

WANTED_FDS = 65_536
"""Enough for tens of thousands of devices plus the buffer, Kafka and admin sockets."""
_RESERVED_FDS = 256
"""Descriptors kept for everything that is not a device connection."""
_WARN_BELOW = 10_000 + _RESERVED_FDS
"""Below this (fewer than 10,000 devices fit) the limit is a warning, above it a note."""


def raise_fd_limit(wanted: int = WANTED_FDS) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit); return
    the soft limit now in force. Never raises: a limit we cannot change is logged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    if soft < wanted:
        log.log(
            logging.WARNING if soft < _WARN_BELOW else logging.INFO,
            "open-file limit %d (hard %s): at most about %d devices can connect; raise it "
            "with ulimit -Hn or systemd LimitNOFILE",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            max(0, soft - _RESERVED_FDS),
        )
    return soft
