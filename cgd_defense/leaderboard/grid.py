"""Grids: a declared product of datasets x attacks x defenses x defense options x CLIP variants x
seeds at one preset, with exclusions, expanded into jobs and checked before anything runs.

A grid file (`leaderboard/grids/NAME.yaml`) is validated like every YAML file of the project. The
names it lists are resolved against the registry at expansion time, because attacks and defenses
are added over time: a name that is not registered is reported as such (never skipped silently),
and the runner either refuses the grid or, when asked to, records those jobs as `skipped`.

A combination that cannot produce a meaningful row is refused with its reason: a defense option the
defense does not have, a CLIP variant for a defense that never reads a CLIP, an attack target that
is not a class of the dataset, a stand-in CLIP of another dataset. The grid author excludes such
combinations explicitly (`exclude:`), so the table never holds a row that means nothing.

Job identity: the key of a job is the hash of its *resolved* configuration (the preset's full
contents, the attack's full validated spec, the defense's effective parameters with defaults
filled in, seed, CLIP, public hold-out). Changing any of them makes a new job; changing where the
data or cache live does not.
"""
from __future__ import annotations

import fnmatch
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from ..config import PROJECT_ROOT, ConfigError, StrictModel, load_yaml, unknown_name_error, validate_model
from ..errors import CGDError
from ..harness.cache import spec_hash

GRIDS_DIR = PROJECT_ROOT / "leaderboard" / "grids"

NO_ATTACK_FAMILY = "no-attack"


class GridError(CGDError):
    """A grid that cannot run as declared; the message lists every problem found."""


def _name_or_mapping(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class AttackItem(StrictModel):
    name: str
    label: str | None = Field(None, description="row name in the tables; default: the attack name")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted attack fields, e.g. poisoning.ratio")


class DefenseItem(StrictModel):
    name: str
    label: str | None = Field(None, description="row name in the tables; default: the defense name")
    params: dict[str, Any] = Field(default_factory=dict, description="fixed defense parameters")
    options: dict[str, list[Any]] = Field(default_factory=dict,
                                          description="defense parameters to vary: one job per combination")
    clips: list[str | None] | None = Field(None, description="this entry's CLIP variants; default: the grid's")

    @field_validator("options")
    @classmethod
    def _options_not_empty(cls, options: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, v in options.items() if not v]
        if empty:
            raise ValueError(f"option(s) {', '.join(empty)} list no value")
        return options


class Exclusion(StrictModel):
    """Jobs matching every given field (fnmatch patterns on strings) are left out of the grid."""

    dataset: str | None = None
    attack: str | None = None
    family: str | None = None
    defense: str | None = Field(None, description="matches the defense name or its table label")
    clip: str | None = None
    seed: int | None = None
    reason: str = ""

    @model_validator(mode="after")
    def _not_empty(self) -> "Exclusion":
        if all(getattr(self, f) is None for f in ("dataset", "attack", "family", "defense", "clip", "seed")):
            raise ValueError("an exclusion must name at least one of dataset, attack, family, defense, clip, seed")
        return self


class Resources(StrictModel):
    """What one job asks a Ray cluster for (the local backend runs `--workers` jobs at a time)."""

    cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)


class GridSpec(StrictModel):
    name: str
    description: str = ""
    preset: str
    datasets: list[str] = Field(min_length=1)
    attacks: list[AttackItem] = Field(min_length=1)
    defenses: list[DefenseItem] = Field(min_length=1)
    clips: list[str | None] = Field(default_factory=lambda: [None],
                                    description="CLIP variants; None = the dataset's default (its stand-in); "
                                                "{dataset} and {attack} are replaced per job")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    exclude: list[Exclusion] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)

    @field_validator("attacks", "defenses", mode="before")
    @classmethod
    def _names_are_items(cls, value: Any) -> Any:
        return [_name_or_mapping(v) for v in value] if isinstance(value, list) else value

    @field_validator("seeds", "datasets")
    @classmethod
    def _unique(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError("values must be unique")
        return values


@dataclass
class Job:
    """One (dataset, attack, defense + options, CLIP, seed) run of a grid."""

    grid: str
    position: int
    dataset: str
    preset: str
    attack: str
    attack_label: str
    attack_overrides: dict[str, Any]
    defense: str
    defense_label: str
    defense_params: dict[str, Any]
    clip: str | None
    seed: int
    attack_family: str | None = None
    threat_model: str | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    unregistered: list[str] = field(default_factory=list)  # "attack 'x'", "defense 'y'"
    clip_from_entry: bool = False  # listed by the defense entry itself, not the grid-wide CLIP axis

    @property
    def stage_group(self) -> tuple:
        """Jobs of one group share the poisoned set and the backdoored model (the pipeline caches both)."""
        return (self.dataset, self.preset, self.attack, spec_hash(self.attack_overrides), self.seed,
                bool(self.resolved.get("public_holdout", True)))

    def describe(self) -> str:
        clip = f" clip={self.clip}" if self.clip and self.threat_model != "model-only" else ""
        return f"{self.dataset}/{self.attack_label}/{self.defense_label}{clip} seed={self.seed}"

    def run_config(self, data_root: str | None = None, cache_dir: str | None = None, device: str | None = None):
        from ..harness.pipeline import RunConfig

        return RunConfig(dataset=self.dataset, data_root=data_root, attack=self.attack,
                         attack_overrides=self.attack_overrides, defense=self.defense,
                         defense_params=self.defense_params, preset=self.preset, seed=self.seed, clip=self.clip,
                         device=device, cache_dir=cache_dir)


@dataclass
class GridPlan:
    spec: GridSpec
    source: str
    jobs: list[Job]

    @property
    def unregistered_names(self) -> list[str]:
        return sorted({name for job in self.jobs for name in job.unregistered})

    @property
    def runnable(self) -> list[Job]:
        return [j for j in self.jobs if not j.unregistered]


def list_grids(directory: str | os.PathLike = GRIDS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def grid_path(name_or_path: str | os.PathLike) -> Path:
    """A grid file given by path, or by name in `leaderboard/grids/`."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{path}: grid file not found")
        return path
    candidate = GRIDS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise unknown_name_error("grid", str(name_or_path), list_grids(),
                                 hint=f"Grids live in {GRIDS_DIR}, or pass a path to a YAML file.")
    return candidate


def load_grid(name_or_path: str | os.PathLike) -> tuple[GridSpec, str]:
    path = grid_path(name_or_path)
    data = load_yaml(path)
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return validate_model(GridSpec, data, str(path)), str(path)


def _fill_clip(clip: str | None, dataset: str, attack: str) -> str | None:
    if clip is None:
        return None
    return clip.replace("{dataset}", dataset).replace("{attack}", attack)


def _defense_label(item: DefenseItem, options: dict[str, Any]) -> str:
    base = item.label or item.name
    if not options:
        return base
    return base + "[" + ",".join(f"{k}={v}" for k, v in options.items()) + "]"


def _expand(spec: GridSpec) -> list[Job]:
    """The product in run order: all defenses of one (dataset, seed, attack) after each other, so the
    poisoned set and backdoored model computed by the first are reused from the cache by the rest;
    seeds outermost after datasets, so a partly run grid holds complete boards for its first seeds."""
    jobs = []
    for dataset, seed, attack in itertools.product(spec.datasets, spec.seeds, spec.attacks):
        for item in spec.defenses:
            keys = list(item.options)
            for values in itertools.product(*(item.options[k] for k in keys)):
                options = dict(zip(keys, values))
                clips = item.clips if item.clips is not None else spec.clips
                for clip in clips:
                    jobs.append(Job(grid=spec.name, position=len(jobs), dataset=dataset, preset=spec.preset,
                                    attack=attack.name, attack_label=attack.label or attack.name,
                                    attack_overrides=dict(attack.overrides), defense=item.name,
                                    defense_label=_defense_label(item, options),
                                    defense_params={**item.params, **options},
                                    clip=_fill_clip(clip, dataset, attack.name), seed=seed,
                                    clip_from_entry=item.clips is not None))
    return jobs


def _excluded(job: Job, rule: Exclusion) -> bool:
    def match(pattern: str | None, *values: str | None) -> bool:
        return pattern is None or any(v is not None and fnmatch.fnmatchcase(v, pattern) for v in values)

    return (match(rule.dataset, job.dataset) and match(rule.attack, job.attack, job.attack_label)
            and match(rule.family, job.attack_family) and match(rule.defense, job.defense, job.defense_label)
            and match(rule.clip, job.clip or "default") and (rule.seed is None or rule.seed == job.seed))


def _resolve(job: Job, preset_dump: dict) -> str | None:
    """Fill the job's resolved configuration and key; return why it cannot run, or None."""
    from ..data.datasets import get_dataset_info
    from ..registry import create_attack, create_defense

    try:
        attack = create_attack(job.attack, **job.attack_overrides)
    except ConfigError as exc:
        return str(exc)
    num_classes = get_dataset_info(job.dataset).num_classes
    if attack.poisoning.target >= num_classes:
        return (f"attack '{job.attack_label}' targets class {attack.poisoning.target}, but {job.dataset} has "
                f"{num_classes} classes")
    if job.threat_model == "model-only" and job.clip_from_entry and job.clip is not None:
        return (f"defense '{job.defense}' is model-only (it reads only the model, never a CLIP), so CLIP variant "
                f"'{job.clip}' would repeat the same row; give this entry `clips: [null]`")
    if job.clip and job.clip.startswith("standin:") and job.clip.split(":")[1] != job.dataset:
        return f"CLIP '{job.clip}' is the stand-in of another dataset than {job.dataset}"
    try:
        defense = create_defense(job.defense, preset=job.preset, **job.defense_params)
        params = defense.get_params()
    except ConfigError as exc:
        return str(exc)
    cfg = job.run_config()
    job.resolved = {
        "dataset": job.dataset, "preset": preset_dump, "attack": attack.model_dump(mode="json"),
        "defense": job.defense, "defense_params": params, "seed": job.seed,
        **({"clip": None} if job.threat_model == "model-only" else cfg.clip_key(defense)),
        "public_holdout": cfg.holds_out_public(),
    }
    job.key = spec_hash(job.resolved)
    return None


def plan_grid(spec: GridSpec, source: str = "<grid>") -> GridPlan:
    """Expand and check a grid. Raises GridError listing every refused combination, unknown
    preset/dataset, missing no-attack case or exclusion that matches nothing. Names that are not
    (yet) registered do not raise here: they are listed on the jobs (`Job.unregistered`) for the
    runner to refuse or record as skipped."""
    from ..data.datasets import get_dataset_info
    from ..harness.presets import get_preset
    from ..registry import defense_entry, get_attack, is_attack, is_defense

    problems: list[str] = []
    try:
        preset_dump = get_preset(spec.preset).model_dump(mode="json")
    except ConfigError as exc:
        raise GridError(f"{source}: {exc}") from None
    for dataset in spec.datasets:
        try:
            get_dataset_info(dataset)
        except ConfigError as exc:
            problems.append(str(exc))
    families = {a.name: get_attack(a.name).family for a in spec.attacks if is_attack(a.name)}
    if NO_ATTACK_FAMILY not in families.values():
        problems.append("every grid must include the no-attack case (attack 'clean'), so each defense's cost on "
                        "clean data is on the board")
    if problems:
        raise GridError(f"{source}: " + "; ".join(problems))

    jobs = _expand(spec)
    for job in jobs:
        if job.attack in families:
            job.attack_family = families[job.attack]
        else:
            job.unregistered.append(f"attack '{job.attack}'")
        if is_defense(job.defense):
            job.threat_model = defense_entry(job.defense).threat_model
        else:
            job.unregistered.append(f"defense '{job.defense}'")

    used = [False] * len(spec.exclude)
    kept = []
    for job in jobs:
        hits = [i for i, rule in enumerate(spec.exclude) if _excluded(job, rule)]
        for i in hits:
            used[i] = True
        if not hits:
            kept.append(job)
    for i, was_used in enumerate(used):
        if not was_used:
            problems.append(f"exclusion #{i + 1} ({spec.exclude[i].model_dump(exclude_none=True)}) matches no job: "
                            f"fix or remove it")

    # The grid-wide CLIP axis does not apply to defenses that never read a CLIP: one job each, run
    # with the grid's first CLIP, which fixes the data split (a stand-in CLIP holds out its public
    # split), so these jobs share the backdoored model of the CLIP-guided jobs.
    for job in kept:
        if job.threat_model == "model-only" and not job.clip_from_entry:
            job.clip = _fill_clip(spec.clips[0], job.dataset, job.attack)
    kept = _dedupe(kept)

    for job in kept:
        if job.unregistered:
            job.key = spec_hash({"unregistered": job.unregistered, "job": job.describe(), "preset": spec.preset,
                                 "overrides": job.attack_overrides, "params": job.defense_params})
            continue
        reason = _resolve(job, preset_dump)
        if reason:
            problems.append(f"{job.describe()}: {reason}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise GridError(f"{source}: {len(problems)} problem(s); refused combinations can be left out with the "
                        f"grid's `exclude:` list:\n  " + "\n  ".join(shown))
    keys = {}
    for job in kept:
        if job.key in keys:
            raise GridError(f"{source}: jobs '{keys[job.key]}' and '{job.describe()}' resolve to the same "
                            f"configuration; remove one")
        keys[job.key] = job.describe()
    for position, job in enumerate(kept):
        job.position = position
    return GridPlan(spec, source, kept)


def _dedupe(jobs: list[Job]) -> list[Job]:
    seen, out = set(), []
    for job in jobs:
        ident = (job.dataset, job.attack_label, job.defense_label, job.clip, job.seed)
        if ident not in seen:
            seen.add(ident)
            out.append(job)
    return out


def load_plan(name_or_path: str | os.PathLike) -> GridPlan:
    spec, source = load_grid(name_or_path)
    return plan_grid(spec, source)
