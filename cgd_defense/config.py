"""Loading and validating YAML configuration with errors that name file, field and allowed values.

Every YAML file in the project (attacks, presets, registry, grids) goes through `load_yaml` and a
pydantic model; `validate_model` turns pydantic's errors into sentences shaped like scikit-learn's:
"<file>: field 'poisoning.ratio' must be a number in the range (0, 1). Got 1.5 instead."
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config schema: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def load_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None


def _describe_error(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    ctx = err.get("ctx") or {}
    received = err.get("input")
    if kind == "extra_forbidden":
        return f"unknown field '{loc}'"
    if kind == "missing":
        return f"missing required field '{loc}'"
    if kind in ("literal_error", "enum"):
        expected = ctx.get("expected", "")
        return f"field '{loc}' must be one of {expected}. Got {received!r} instead"
    if kind.startswith(("greater_than", "less_than")):
        return f"field '{loc}' {err['msg'].lower()}. Got {received!r} instead"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"field '{loc}': {msg}. Got {received!r} instead"


def validate_model(model: type[M], data: Any, source: str) -> M:
    """Validate `data` against `model`; raise one ConfigError naming `source` and every bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe_error(e) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def unknown_name_error(kind: str, name: str, known: Iterable[str], hint: str = "") -> ConfigError:
    """An error for an unknown registry name that lists what exists and the closest match."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    suggestion = f" Did you mean '{close[0]}'?" if close else ""
    extra = f" {hint}" if hint else ""
    return ConfigError(f"unknown {kind} '{name}'.{suggestion} Known: {', '.join(known)}.{extra}")


CACHE_DIR_HELP = "cache folder; default: $CGD_CACHE_DIR, else $XDG_CACHE_HOME/cgd-bench, else ~/.cache/cgd-bench"


def default_cache_dir() -> Path:
    """The cache folder when none is given: see CACHE_DIR_HELP."""
    env = os.environ.get("CGD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cgd-bench"
