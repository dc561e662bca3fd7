"""The attack YAML language: schema, validation, and discovery of `attacks/*.yaml`.

A file declares name, citation, family, trigger (one component or an ordered list, composed in
order), poisoning policy and test-time behaviour. Each trigger component is validated against its
kind's own parameter schema, so an unknown kind or field, or a value out of range, fails naming the
file, the field (e.g. `trigger[1].alpha`) and what is allowed.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import PROJECT_ROOT, StrictModel, load_yaml, validate_model
from ..errors import ConfigError
from .triggers import TriggerKind, get_trigger_kind, list_trigger_kinds


class TriggerComponent(StrictModel):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)

    def build(self, image_size: int, attack_seed: int) -> TriggerKind:
        cls = get_trigger_kind(self.kind)
        return cls(cls.Params.model_validate(self.params), image_size, attack_seed)


class PoisoningPolicy(StrictModel):
    ratio: float = Field(0.1, ge=0, lt=1, description="fraction of the whole training set that is poisoned")
    target: int = Field(0, ge=0)
    label_mode: Literal["all-to-one", "all-to-all", "keep"] = "all-to-one"
    label_shift: int = Field(1, ge=1, description="all-to-all: y -> (y + label_shift) mod C")
    clean_label: bool = False
    eligible: Literal["non-target", "target", "all"] | None = Field(
        None, description="which samples may be poisoned; default: non-target (dirty-label), target (clean-label)")
    cross_ratio: float = Field(0.0, ge=0, le=20, description="extra trigger-noise samples kept at their label, "
                                                            "as a multiple of the poison count (WaNet's 'cross' mode)")
    select: Literal["random", "natural-feature"] = Field(
        "random", description="random: a seeded draw from the eligible samples; natural-feature: only eligible "
                              "samples that already carry the trigger's natural feature, strongest first")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.clean_label and self.label_mode != "keep":
            self.label_mode = "keep"
        return self

    @property
    def eligible_set(self) -> str:
        if self.eligible:
            return self.eligible
        if self.clean_label:
            return "target"
        return "all" if self.label_mode == "all-to-all" else "non-target"


class TestBehaviour(StrictModel):
    strength: float = Field(1.0, gt=0, description="trigger strength multiplier at test time")
    params: list[dict[str, Any]] | None = Field(
        None, description="per-component parameter overrides at test time (same order as trigger)")


class AttackSpec(StrictModel):
    name: str
    title: str | None = None
    citation: str
    family: Literal["dirty-label", "clean-label", "clean-image", "sample-specific", "no-attack"]
    source: str | None = Field(None, description="where the defaults come from")
    notes: str | None = None
    trigger: list[TriggerComponent]
    poisoning: PoisoningPolicy = Field(default_factory=PoisoningPolicy)
    test: TestBehaviour = Field(default_factory=TestBehaviour)

    @property
    def short_citation(self) -> str:
        """'Gu et al. 2017' from 'Gu, Dolan-Gavitt & Garg. BadNets: ... arXiv:1708.06733, 2017'."""
        authors = [a.strip() for a in re.split(r",|&| and ", self.citation.split(".")[0]) if a.strip()]
        if not authors:
            return self.citation
        who = authors[0] if len(authors) == 1 else (" & ".join(authors) if len(authors) == 2 else f"{authors[0]} et al.")
        years = re.findall(r"(?<![\d.:])(?:19|20)\d\d(?![\d.])", self.citation)
        return f"{who} {years[-1]}" if years else who

    def components(self, image_size: int, train: bool = True) -> list[TriggerKind]:
        comps = []
        for i, comp in enumerate(self.trigger):
            if not train and self.test.params and i < len(self.test.params) and self.test.params[i]:
                comp = TriggerComponent(kind=comp.kind, params={**comp.params, **self.test.params[i]})
            comps.append(comp.build(image_size, self.poisoning.seed))
        return comps


def _normalise_trigger(raw: Any) -> list[dict]:
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        if not isinstance(item, dict) or "kind" not in item:
            out.append(item)
            continue
        params = {k: v for k, v in item.items() if k != "kind"}
        out.append({"kind": item["kind"], "params": params})
    return out


def _resolve_paths(params: dict, base: Path) -> dict:
    params = dict(params)
    for key in ("image",):
        if isinstance(params.get(key), str) and not os.path.isabs(params[key]):
            params[key] = str((base / params[key]).resolve())
    return params


def parse_attack(data: Any, source: str, base_dir: Path | None = None) -> AttackSpec:
    """Validate a parsed attack YAML document; `source` names the file in every error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    data = copy.deepcopy(data)
    if "trigger" not in data:
        raise ConfigError(f"{source}: missing required field 'trigger' (one component or a list; kinds: "
                          f"{', '.join(list_trigger_kinds())})")
    data["trigger"] = _normalise_trigger(data["trigger"])
    spec = validate_model(AttackSpec, data, source)
    base_dir = base_dir or PROJECT_ROOT
    checked = []
    for i, comp in enumerate(spec.trigger):
        where = f"{source}: trigger[{i}]"
        try:
            cls = get_trigger_kind(comp.kind)
        except ConfigError:
            raise ConfigError(f"{where}: unknown kind '{comp.kind}'; allowed kinds: {', '.join(list_trigger_kinds())}") from None
        params = _resolve_paths(comp.params, base_dir)
        validate_model(cls.Params, params, where)
        for key in ("image",):
            if params.get(key) and not Path(params[key]).is_file():
                raise ConfigError(f"{where}: field '{key}': image file not found: {params[key]}")
        checked.append(TriggerComponent(kind=comp.kind, params=params))
    spec.trigger = checked
    if spec.poisoning.select == "natural-feature" and not any(
            hasattr(get_trigger_kind(c.kind), "feature_value") for c in spec.trigger):
        natural_kinds = [k for k in list_trigger_kinds() if hasattr(get_trigger_kind(k), "feature_value")]
        raise ConfigError(f"{source}: field 'poisoning.select' is 'natural-feature', which needs a trigger component "
                          f"with a natural feature (kinds: {', '.join(natural_kinds)}); got kinds: "
                          f"{', '.join(c.kind for c in spec.trigger)}")
    if spec.test.params is not None and len(spec.test.params) > len(spec.trigger):
        raise ConfigError(f"{source}: field 'test.params' has {len(spec.test.params)} entries for "
                          f"{len(spec.trigger)} trigger components")
    return spec


def load_attack_file(path: str | os.PathLike) -> AttackSpec:
    path = Path(path)
    spec = parse_attack(load_yaml(path), str(path), base_dir=path.parent)
    if spec.name != path.stem:
        raise ConfigError(f"{path}: field 'name' is '{spec.name}' but the file is named '{path.stem}.yaml'; "
                          "they must match")
    return spec


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]
