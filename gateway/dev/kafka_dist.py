"""Fetch the pinned Apache Kafka jars from Maven Central and verify them against a lock file.

The jars come from Maven Central by coordinates (there is no other download channel here):
``mvn -C`` checks every file against Central's published checksums, and on top of that every
jar's SHA-256 must match ``kafka-<version>.sha256`` next to this module, committed in the
repository. So a cache that was tampered with, or a resolution that drifted (a dependency
range resolving differently), is refused instead of run.

Cache layout (``TIDEGATE_CACHE`` replaces ``~/.cache/tidegate``)::

    kafka/<version>/libs/*.jar     the broker's runtime classpath
    kafka/<version>/complete       marker: libs/ was fetched and verified; skip mvn
    kafka/<version>/.lock          flock, so two runs never fetch into the same place
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from gateway.dev.kafka_props import render_pom
from gateway.errors import LocalKafkaError

__all__ = [
    "cache_root",
    "ensure_kafka_libs",
    "hash_libs",
    "lock_file",
    "parse_lock",
    "render_lock",
]

_log = logging.getLogger(__name__)

_MVN_TIMEOUT_S = 900.0


def cache_root() -> Path:
    """``$TIDEGATE_CACHE`` or ``~/.cache/tidegate``."""
    env = os.environ.get("TIDEGATE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tidegate"


def lock_file(version: str) -> Path:
    """The committed checksum list for ``version``."""
    return Path(__file__).with_name(f"kafka-{version}.sha256")


def hash_libs(libs: Path) -> dict[str, str]:
    """``{jar name: sha256 hex}`` of every jar directly in ``libs``."""
    digests: dict[str, str] = {}
    for jar in sorted(libs.glob("*.jar")):
        digest = hashlib.sha256()
        with jar.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digests[jar.name] = digest.hexdigest()
    return digests


def render_lock(version: str, digests: Mapping[str, str]) -> str:
    """Lock file text, ``sha256sum`` format so ``sha256sum -c`` can check it by hand too."""
    lines = [
        f"# org.apache.kafka:kafka_2.13:{version} runtime classpath (+ log4j slf4j binding),",
        "# fetched from Maven Central with `mvn -C` by gateway/dev/kafka_dist.py.",
    ]
    lines += [f"{digests[name]}  {name}" for name in sorted(digests)]
    return "\n".join(lines) + "\n"


def parse_lock(text: str) -> dict[str, str]:
    """Inverse of :func:`render_lock`; ignores comments and blank lines."""
    digests: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name.endswith(".jar"):
            raise LocalKafkaError(f"lock file line {number}: not '<sha256>  <jar>': {raw!r}")
        digests[name] = digest
    return digests


def _mismatches(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    problems = [f"missing {name}" for name in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected {name}" for name in sorted(actual.keys() - expected.keys())]
    problems += [
        f"checksum mismatch {name}"
        for name in sorted(expected.keys() & actual.keys())
        if expected[name] != actual[name]
    ]
    return problems


def ensure_kafka_libs(version: str, *, update_lock: bool = False) -> Path:
    """Return a verified ``libs`` directory for ``version``, fetching it with mvn if needed.

    Warm path: the marker exists and every jar matches the lock file; mvn is not run.
    If the cache does not match, it is logged, thrown away and fetched again; a fresh fetch
    that still does not match the lock raises :class:`LocalKafkaError`. With no lock file
    for ``version`` (a new pin), or with ``update_lock``, the lock file is written from the
    fetched jars, to be reviewed and committed.
    """
    lock = lock_file(version)
    expected = None if update_lock or not lock.is_file() else parse_lock(lock.read_text())
    version_dir = cache_root() / "kafka" / version
    libs, marker = version_dir / "libs", version_dir / "complete"
    try:
        version_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalKafkaError(f"{version_dir}: cannot create cache: {exc.strerror}") from exc

    with _flock(version_dir / ".lock"):
        if marker.is_file() and libs.is_dir() and expected is not None:
            problems = _mismatches(expected, hash_libs(libs))
            if not problems:
                return libs
            _log.warning(
                "kafka %s cache %s does not match %s (%s); fetching again",
                version,
                libs,
                lock.name,
                "; ".join(problems[:5]),
            )
        marker.unlink(missing_ok=True)
        shutil.rmtree(libs, ignore_errors=True)

        fetched = _mvn_fetch(version, version_dir)
        actual = hash_libs(fetched)
        if expected is None:
            lock.write_text(render_lock(version, actual))
            _log.warning("wrote %s from a fresh fetch; review and commit it", lock)
        else:
            problems = _mismatches(expected, actual)
            if problems:
                shutil.rmtree(fetched, ignore_errors=True)
                raise LocalKafkaError(
                    f"kafka {version}: jars fetched from Maven Central do not match {lock}: "
                    + "; ".join(problems)
                )
        fetched.rename(libs)
        marker.write_text(f"{version}\n")
        return libs


def _mvn_fetch(version: str, version_dir: Path) -> Path:
    """Run mvn into a temp dir inside ``version_dir`` (so the final rename is atomic)."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError("mvn not found on PATH; install Maven to fetch Kafka")
    out = Path(tempfile.mkdtemp(prefix="libs.", dir=version_dir))
    with tempfile.TemporaryDirectory(prefix="tidegate-kafka-pom.") as pom_dir:
        pom = Path(pom_dir) / "pom.xml"
        pom.write_text(render_pom(version))
        cmd = [
            mvn,
            "-q",
            "-B",
            "-C",  # strict checksums: a file whose checksum does not match Central fails
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={out}",
        ]
        _log.info("fetching kafka %s with mvn into %s", version, out)
        try:
            result = subprocess.run(
                cmd,
                cwd=pom_dir,
                capture_output=True,
                text=True,
                timeout=_MVN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(out, ignore_errors=True)
            raise LocalKafkaError(f"mvn did not finish within {_MVN_TIMEOUT_S:.0f}s") from exc
    if result.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise LocalKafkaError(
            f"mvn failed to fetch kafka {version} (exit {result.returncode}):\n{tail}"
        )
    if not any(out.glob("kafka_2.13-*.jar")):
        shutil.rmtree(out, ignore_errors=True)
        raise LocalKafkaError(f"mvn finished but no kafka_2.13 jar is in {out}")
    return out


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock held for the block (released when the fd closes)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
