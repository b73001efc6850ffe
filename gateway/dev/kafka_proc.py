"""Process and port plumbing for the local Kafka: the JVMs (storage format, broker launch),
free ports, liveness, and process-group termination.

Brokers run detached, each in its own session (process group = its pid), so stopping one
stops the JVM and anything it spawned, and a Ctrl-C in the terminal that ran ``up`` does
not reach them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from gateway.dev.kafka_props import NodeLayout
from gateway.errors import LocalKafkaError

__all__ = [
    "adopt",
    "format_storage",
    "launch_node",
    "log_tail",
    "is_alive",
    "looks_like_our_broker",
    "pick_free_ports",
    "port_open",
    "terminate_groups",
]

# Popen objects of brokers this Python process started. Keeping them referenced means the
# children are reaped (no zombie that still "exists" for kill(pid, 0)) and no ResourceWarning
# is raised when a Popen is collected while its broker keeps running on purpose.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}

_JVM_HEAP = "-Xmx512m"


def adopt(proc: subprocess.Popen[bytes]) -> None:
    """Remember a broker started by this process (see ``_CHILDREN``)."""
    _CHILDREN[proc.pid] = proc


def pick_free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago.

    All sockets stay bound until every port is chosen so the kernel cannot hand out the
    same port twice; another process can still take one before the broker binds it, which
    the caller handles by retrying with new ports.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int, *, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def is_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie; reaps it if it is our own exited child."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rpartition(")")[2].split()[0] != "Z"


def looks_like_our_broker(pid: int, properties: Path) -> bool:
    """True if ``pid`` is a ``kafka.Kafka`` JVM running ``properties``.

    Guards against pid reuse: a stale state file must never make us signal an unrelated
    process group.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"kafka.Kafka" in argv and str(properties).encode() in argv


def terminate_groups(pids: Iterable[int], *, timeout: float) -> list[int]:
    """SIGTERM each pid's process group, wait up to ``timeout``, SIGKILL the rest.

    All groups are signalled first and waited on together: the nodes of one cluster shut
    down in parallel. Returns the pids that needed SIGKILL.
    """
    pending = [pid for pid in pids if is_alive(pid)]
    for pid in pending:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [pid for pid in pending if is_alive(pid)]
        if pending:
            time.sleep(0.1)  # polling a condition with a deadline, not waiting for luck
    killed = list(pending)
    for pid in killed:
        _signal_group(pid, signal.SIGKILL)
    kill_deadline = time.monotonic() + 10.0
    while pending and time.monotonic() < kill_deadline:
        pending = [pid for pid in pending if is_alive(pid)]
        if pending:
            time.sleep(0.05)
    return killed


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        # Not a group leader (or not ours to signal as a group): signal the process alone.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _java_base(libs: Path, log4j: Path, heap: str) -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError("java not found on PATH; Kafka 4.x needs Java 17 or newer")
    return [
        java,
        heap,
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        f"{libs}/*",
    ]


def format_storage(
    libs: Path,
    log4j: Path,
    nodes: Sequence[NodeLayout],
    cluster_id: str,
    extra_args: Sequence[str] = (),
) -> None:
    """Run ``kafka.tools.StorageTool format`` for every node, in parallel (one JVM each).

    ``extra_args`` go to every node's format (``--add-scram ...``: bootstrap metadata records
    must be the same on every node).
    """
    base = _java_base(libs, log4j, "-Xmx256m")
    procs = [
        subprocess.Popen(
            [
                *base,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(node.properties_path),
                *extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for node in nodes
    ]
    errors = []
    for node, proc in zip(nodes, procs, strict=True):
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if proc.returncode != 0:
            text = output.decode(errors="replace").strip()
            errors.append(f"node {node.node_id}: {text[-2000:]}")
    if errors:
        raise LocalKafkaError("formatting Kafka storage failed:\n" + "\n".join(errors))


def launch_node(libs: Path, log4j: Path, node: NodeLayout) -> subprocess.Popen[bytes]:
    """Start one node detached, logging to ``node.log_path``; it stays adopted (reaped)."""
    cmd = [
        *_java_base(libs, log4j, _JVM_HEAP),
        "-XX:+ExitOnOutOfMemoryError",
        "kafka.Kafka",
        str(node.properties_path),
    ]
    with node.log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=node.node_dir,
            # Own session and process group: stop signals the whole group, and a Ctrl-C in
            # the terminal that ran `up` does not reach the broker.
            start_new_session=True,
        )
    adopt(proc)
    return proc


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` of a node's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
