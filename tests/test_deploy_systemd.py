"""The systemd unit (deploy/systemd/): `systemd-analyze verify` and `security` accept it, and it
agrees with the gateway it starts (CLI, example config, shutdown deadline, data directory).

`systemd-analyze verify` runs here without a running systemd, but it checks that every
Exec*= binary exists. The unit names /opt/tidegate/.venv/bin/tidegate, which does not exist on
a development machine, so the unit is verified unchanged inside a throw-away root (``--root``)
holding the unit, systemd's own unit files, /usr/bin/kill and that one binary path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import typer.main

from gateway.cli import app as cli_app
from gateway.config import load_config
from gateway.pki import init_pki
from tests.harness import (
    REPO,
    KafkaTls,
    provision_devices,
    publish_qos1,
    wait_for,
    write_gateway_config,
)

UNIT = REPO / "deploy" / "systemd" / "tidegate.service"
ENV_FILE = REPO / "deploy" / "systemd" / "tidegate.env"
EXAMPLE = REPO / "configs" / "edge-example.toml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 2.0
"""`systemd-analyze security` scale: 0 (locked down) .. 10 (unprotected); the unit scores 1.4."""

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (Debian package `systemd`; scripts/bootstrap adds it)",
)


def unit_entries(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (systemd keys may repeat), comments dropped."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def one(entries: dict[str, list[str]], key: str) -> str:
    values = entries.get(key)
    assert values is not None, f"{key}: missing"
    assert len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


def fake_root(directory: Path, unit_text: str) -> Path:
    """A root with just what `systemd-analyze --root` needs to verify the unit."""
    root = directory / "root"
    system_units = next(
        p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()
    )
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/kill", root / "usr/bin/kill")
    # Relative links: --root resolves absolute links inside the root.
    os.symlink("usr/bin", root / "bin")
    os.symlink("usr/lib", root / "lib")
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/tidegate.service").write_text(unit_text)
    exec_start = one(unit_entries(unit_text), "Service.ExecStart").split()[0]
    binary = root / exec_start.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gateway.cli "$@"\n')
    binary.chmod(0o755)
    return root


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, f"--root={root}", *args, "tidegate.service"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    root = fake_root(tmp_path, UNIT.read_text())
    result = analyze(root, "verify")
    # verify exits 0 on unknown keys and bad values too (it only warns): any output fails.
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    assert result.returncode == 0


@needs_systemd_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive and a missing binary are reported."""
    broken = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    result = analyze(fake_root(tmp_path / "typo", broken), "verify")
    assert "Unknown key 'NoNewPrivilege'" in result.stderr
    root = fake_root(tmp_path / "nobin", UNIT.read_text())
    (root / "opt/tidegate/.venv/bin/tidegate").unlink()
    result = analyze(root, "verify")
    assert result.returncode != 0
    assert "is not executable" in result.stderr


@needs_systemd_analyze
def test_unit_hardening_exposure(tmp_path: Path) -> None:
    result = analyze(fake_root(tmp_path, UNIT.read_text()), "security", "--offline=yes")
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for tidegate\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_matches_the_gateway(tmp_path: Path) -> None:
    """What the unit promises holds for the gateway and the example config it documents."""
    entries = unit_entries(UNIT.read_text())
    env_names = re.findall(r"^#?(TIDEGATE_[A-Z_]+)=", ENV_FILE.read_text(), re.MULTILINE)
    assert env_names, "tidegate.env documents no variable"
    # Every variable of the env file is one the example config reads.
    example_text = EXAMPLE.read_text()
    for name in env_names:
        assert f"${{{name}" in example_text, f"{name} is not used by {EXAMPLE.name}"

    # ExecStartPre and ExecStart work on the example config with the env file's variables.
    pki = init_pki(tmp_path / "pki")
    passwords = tmp_path / "devices.passwd"
    provision_devices(passwords, ["dev-1"])
    env = {
        **os.environ,
        "TIDEGATE_DATA_DIR": str(tmp_path / "data"),
        "TIDEGATE_PASSWORD_FILE": str(passwords),
        "TIDEGATE_PKI_DIR": str(pki.directory),
    }
    config_path = "/etc/tidegate/gateway.toml"
    pre = one(entries, "Service.ExecStartPre").split()
    assert pre[1:] == ["check-config", config_path]
    checked = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(EXAMPLE)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    start = one(entries, "Service.ExecStart").split()
    assert start[1:] == ["run", "-c", config_path]
    run_command = typer.main.get_command(cli_app).commands["run"]  # type: ignore[attr-defined]
    assert any("-c" in p.opts for p in run_command.params), "tidegate run has no -c option"

    # systemd must not SIGKILL a shutdown that is on schedule: the gateway's own watchdog
    # fires at shutdown_deadline_s + 1 s (gateway/cli.py).
    example = load_config(EXAMPLE, check_files=False)
    stop_timeout = float(one(entries, "Service.TimeoutStopSec"))
    assert stop_timeout > example.gateway.shutdown_deadline_s + 1
    assert one(entries, "Service.KillSignal") == "SIGTERM"
    assert one(entries, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"

    # The state directory is the example's default data_dir (its ${TIDEGATE_DATA_DIR:-...}).
    state_dir = "/var/lib/" + one(entries, "Service.StateDirectory")
    assert "${TIDEGATE_DATA_DIR:-" + state_dir + "}" in example_text
    assert state_dir in one(entries, "Service.ReadWritePaths").split()
    assert int(one(entries, "Service.LimitNOFILE")) >= 20_000  # 10,000 devices and more


_MDWE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE (65), PR_MDWE_REFUSE_EXEC_GAIN (1): Linux >= 6.3, kept across execve.
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_gateway_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    """`MemoryDenyWriteExecute=yes` holds for the gateway: run it under the kernel's same rule
    (prctl PR_SET_MDWE: no W+X mapping, no exec added to a writable one), publish, stop."""
    probe = subprocess.run(
        [sys.executable, "-c", _MDWE, "/bin/true"], check=False, capture_output=True, timeout=30
    )
    if probe.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    pki = init_pki(tmp_path / "pki")
    config = write_gateway_config(
        tmp_path,
        bootstrap="127.0.0.1:9",  # Kafka down: the forwarder keeps trying (TLS, aiokafka)
        tls=KafkaTls(pki.ca_cert, pki.gateway_cert, pki.gateway_key),
        topics={"event": "deploy.events"},
        devices=["dev-1"],
    )
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _MDWE,
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "-c",
            str(config),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    log.close()
    try:
        runtime_file = tmp_path / "data" / "runtime.json"

        def started() -> dict[str, Any] | None:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            if not runtime_file.exists():
                return None
            runtime: dict[str, Any] = json.loads(runtime_file.read_text())
            return runtime if runtime.get("pid") == proc.pid else None

        runtime = wait_for(started, 30, "the gateway under MDWE to listen")
        port = int(runtime["mqtt"][0]["port"])
        publish_qos1(port, "dev-1", [("d/dev-1/up/event", b"m%d" % i) for i in range(20)])
        admin = runtime["admin"]
        with urllib.request.urlopen(f"http://127.0.0.1:{admin['port']}/status", timeout=10) as r:
            assert json.loads(r.read())["buffer"]["rows"] == 20
        proc.terminate()
        assert proc.wait(timeout=30) == 0, (tmp_path / "gateway.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
