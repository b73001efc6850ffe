"""Shared pieces of the config models: the frozen base model, name patterns, path types."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

__all__ = ["IDENT_PATTERN", "TOPIC_PATTERN", "ConfigModel", "ConfigPath", "ExistingFile"]

IDENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TOPIC_PATTERN = r"^([A-Za-z0-9._-]|\{tenant\}){1,249}$"
"""A Kafka topic name, optionally with ``{tenant}`` placeholders (see ``[tenants]``)."""


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value


def _existing_file(value: Path, info: ValidationInfo) -> Path:
    value = _resolve_path(value, info)
    if (info.context or {}).get("check_files", True) and not value.is_file():
        raise ValueError(f"file not found: {value}")
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
"""A path; relative ones are taken from the config file's directory."""

ExistingFile = Annotated[Path, AfterValidator(_existing_file)]
"""A path that must name an existing file when the config is loaded."""


class ConfigModel(BaseModel):
    """Frozen, no unknown keys, defaults validated too."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
