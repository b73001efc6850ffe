"""Config loading: every shipped config is valid; broken ones fail naming the field path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config, parse_config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


@pytest.fixture
def pki_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-in PEM files and an empty device password file: check-config only checks that
    the files exist."""
    for name in ("ca.pem", "gateway.pem", "gateway-key.pem"):
        (tmp_path / name).write_text("placeholder\n")
    (tmp_path / "devices.passwd").write_text("")
    monkeypatch.setenv("TIDEGATE_PKI_DIR", str(tmp_path))
    monkeypatch.setenv("TIDEGATE_PASSWORD_FILE", str(tmp_path / "devices.passwd"))
    return tmp_path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_configs_folder_is_not_empty() -> None:
    assert {p.name for p in CONFIGS} >= {"dev.toml", "edge-example.toml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_check_config_accepts_shipped_configs(config: Path, pki_dir: Path) -> None:
    result = _cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def _write(tmp_path: Path, pki_dir: Path, body: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        body
        + f"""
[kafka]
bootstrap_servers = ["127.0.0.1:9093"]
[kafka.tls]
cafile = "{pki_dir}/ca.pem"
certfile = "{pki_dir}/gateway.pem"
keyfile = "{pki_dir}/gateway-key.pem"
"""
    )
    return path


@pytest.mark.parametrize(
    ("body", "field_path", "message"),
    [
        ("[buffer]\nmax_rowz = 5\n", "buffer.max_rowz", "Extra inputs are not permitted"),
        ('[buffer]\nmax_rows = "many"\n', "buffer.max_rows", "valid integer"),
        ("[[broker.listeners]]\nport = 70000\n", "broker.listeners[0].port", "less than"),
        (
            '[classes.event]\nkafka_topic = "e"\non_full = "drop_oldest"\n',
            "classes.event",
            "lossy",
        ),
        ('[routing]\nuplink_pattern = "d/{class}"\n', "routing.uplink_pattern", "{device_id}"),
    ],
)
def test_check_config_names_the_field_path(
    tmp_path: Path, pki_dir: Path, body: str, field_path: str, message: str
) -> None:
    path = _write(tmp_path, pki_dir, body)
    result = _cli("check-config", str(path))
    assert result.returncode == 2
    assert f"{field_path}: " in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_certificate_file_is_named(tmp_path: Path, pki_dir: Path) -> None:
    (pki_dir / "gateway-key.pem").unlink()
    result = _cli("check-config", str(_write(tmp_path, pki_dir, "")))
    assert result.returncode == 2
    assert "kafka.tls.keyfile: file not found:" in result.stderr
    assert "kafka.tls.cafile" not in result.stderr


def test_unset_environment_variable_is_an_error(
    tmp_path: Path, pki_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIDEGATE_NOT_SET", raising=False)
    path = _write(tmp_path, pki_dir, '[gateway]\nid = "${TIDEGATE_NOT_SET}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [("gateway.id", "environment variable TIDEGATE_NOT_SET is not set")]


def test_syntax_error_and_missing_file_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\n")
    assert _cli("check-config", str(bad)).returncode == 2
    missing = _cli("check-config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert "nope.toml" in missing.stderr


def test_relative_paths_resolve_from_the_config_file(tmp_path: Path, pki_dir: Path) -> None:
    config = load_config(_write(tmp_path, pki_dir, '[gateway]\ndata_dir = "state"\n'))
    assert config.gateway.data_dir == tmp_path / "state"
    assert config.buffer_path == tmp_path / "state" / "buffer.sqlite3"


def test_models_are_frozen(pki_dir: Path) -> None:
    config = parse_config(
        {
            "kafka": {
                "bootstrap_servers": ["127.0.0.1:1"],
                "tls": {
                    "cafile": str(pki_dir / "ca.pem"),
                    "certfile": str(pki_dir / "gateway.pem"),
                    "keyfile": str(pki_dir / "gateway-key.pem"),
                },
            }
        }
    )
    with pytest.raises(ValueError, match="frozen"):
        config.gateway.id = "other"  # type: ignore[misc]
    assert set(config.classes) == {"event", "telemetry", "bulk"}
