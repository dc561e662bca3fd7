"""The benchmark's registry (`registry.yaml` at the project root): which attacks and defenses exist,
where their definitions live, their defaults, and their per-preset changes.

Mirrors open_clip's config registry: attack YAML files are data, keyed by file stem; user files and
folders join through `add_attack_config`. Defenses are Python modules that register a class with
`@register_defense`; the registry imports them by name and checks that they did.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from .attacks.spec import AttackSpec, _natural_key, load_attack_file
from .config import PROJECT_ROOT, StrictModel, load_yaml, unknown_name_error, validate_model
from .defenses.base import Defense, ThreatModel, get_defense_class, registered_defenses
from .errors import ConfigError

REGISTRY_FILE = Path(os.environ.get("CGD_REGISTRY", PROJECT_ROOT / "registry.yaml"))


class AttackEntry(StrictModel):
    file: str


class DefenseEntry(StrictModel):
    module: str
    threat_model: ThreatModel
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)


class RegistryFile(StrictModel):
    attacks: dict[str, AttackEntry]
    defenses: dict[str, DefenseEntry]


_EXTRA_ATTACK_FILES: dict[str, Path] = {}


@functools.lru_cache(maxsize=1)
def _registry() -> RegistryFile:
    reg = validate_model(RegistryFile, load_yaml(REGISTRY_FILE), str(REGISTRY_FILE))
    for name, entry in reg.defenses.items():
        try:
            importlib.import_module(entry.module)
        except ImportError as exc:
            raise ConfigError(f"{REGISTRY_FILE}: defense '{name}': cannot import module '{entry.module}': {exc}") from None
        if name not in registered_defenses():
            raise ConfigError(f"{REGISTRY_FILE}: defense '{name}': module '{entry.module}' does not register it "
                              f"(@register_defense('{name}'))")
    return reg


def _attack_files() -> dict[str, Path]:
    files = {name: (REGISTRY_FILE.parent / e.file) for name, e in _registry().attacks.items()}
    files.update(_EXTRA_ATTACK_FILES)
    return files


def add_attack_config(path: str | os.PathLike) -> list[str]:
    """Register a user attack YAML file, or every *.yaml in a folder; returns the names added."""
    path = Path(path).expanduser()
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"{path}: no attack YAML file found")
    names = []
    for f in files:
        spec = load_attack_file(f)  # validate now: a malformed file is an error, never skipped
        _EXTRA_ATTACK_FILES[spec.name] = f.resolve()
        names.append(spec.name)
    get_attack.cache_clear()
    return names


def list_attacks(filter: str = "", exclude: str = "") -> list[str]:
    names = sorted(_attack_files(), key=_natural_key)
    return [n for n in names if (not filter or fnmatch.fnmatch(n, filter)) and not (exclude and fnmatch.fnmatch(n, exclude))]


def is_attack(name: str) -> bool:
    return name in _attack_files()


@functools.lru_cache(maxsize=None)
def get_attack(name: str) -> AttackSpec:
    files = _attack_files()
    if name not in files:
        raise unknown_name_error("attack", name, files, hint="Register a file with --attack-file PATH.")
    return load_attack_file(files[name])


def _set_dotted(data: dict, key: str, value: Any, where: str) -> None:
    """Set `key` (levels joined by dots) in nested dicts and lists. A list level takes an index
    (`trigger.1.alpha`); a one-item list, such as a single trigger component, may skip it
    (`trigger.alpha`)."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        path = ".".join(parts[:i])
        if isinstance(node, list) and not part.isdigit():
            if len(node) != 1:
                raise ConfigError(f"{where}: override '{key}': '{path}' holds {len(node)} items; name one by its "
                                  f"index, e.g. '{path}.0.{part}'")
            node = node[0]
        step: str | int = part
        if isinstance(node, list):
            step = int(part)
            if step >= len(node):
                raise ConfigError(f"{where}: override '{key}': '{path}' holds {len(node)} items (indices 0-{len(node) - 1})")
        elif not isinstance(node, dict):
            raise ConfigError(f"{where}: override '{key}': '{path}' is a value, not a section")
        if i == len(parts) - 1:
            node[step] = value
        else:
            node = node[step] if isinstance(node, list) else node.setdefault(step, {})


def create_attack(name: str, **overrides) -> AttackSpec:
    """The registered attack with overrides given as dotted keys, e.g. `poisoning.ratio=0.05`
    (keys with None values are ignored, so unset CLI options never clobber the file). A relative
    image path given as an override is relative to the current directory, as on a command line;
    the file's own paths are already absolute."""
    spec = get_attack(name)
    overrides = {k.replace("__", "."): v for k, v in overrides.items() if v is not None}
    if not overrides:
        return spec.model_copy(deep=True)
    data = spec.model_dump()
    data["trigger"] = [{"kind": c["kind"], **c["params"]} for c in data["trigger"]]
    for key, value in overrides.items():
        _set_dotted(data, key, value, f"attack '{name}'")
    from .attacks.spec import parse_attack

    return parse_attack(data, f"{_attack_files()[name]} (with overrides {overrides})", base_dir=Path.cwd())


def list_defenses(filter: str = "", exclude: str = "") -> list[str]:
    names = list(_registry().defenses)
    return [n for n in names if (not filter or fnmatch.fnmatch(n, filter)) and not (exclude and fnmatch.fnmatch(n, exclude))]


def is_defense(name: str) -> bool:
    return name in _registry().defenses


def defense_entry(name: str) -> DefenseEntry:
    reg = _registry()
    if name not in reg.defenses:
        raise unknown_name_error("defense", name, reg.defenses)
    return reg.defenses[name]


def defense_params(name: str, preset: str | None = None, **params) -> dict:
    """Merged parameters: registry defaults < registry per-preset changes < given (None = not given)."""
    entry = defense_entry(name)
    merged = copy.deepcopy(entry.params)
    if preset and preset in entry.presets:
        merged.update(copy.deepcopy(entry.presets[preset]))
    merged.update({k: v for k, v in params.items() if v is not None})
    return merged


def create_defense(name: str, preset: str | None = None, **params) -> Defense:
    merged = defense_params(name, preset, **params)
    if merged.get("clean_source") == "cgd":
        # Resolve the CGD split a clean-data defense draws from now, for this preset, so that every CGD
        # setting is one of the defense's parameters: cache keys and grid job keys then change when a
        # CGD default does, instead of reusing a model defended with another split.
        merged["cgd_params"] = create_defense("cgd", preset, **(merged.get("cgd_params") or {})).get_params()
    defense = get_defense_class(name)(**merged)
    defense.params  # validate now, naming the defense and the field
    return defense
