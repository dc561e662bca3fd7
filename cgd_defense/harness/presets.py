"""Presets: named size/schedule settings in one YAML file (`cgd_defense/presets.yaml`)."""
from __future__ import annotations

from pydantic import Field

from ..config import PACKAGE_DIR, StrictModel, load_yaml, unknown_name_error, validate_model
from .trainer import TrainConfig

PRESETS_FILE = PACKAGE_DIR / "presets.yaml"


class Preset(StrictModel):
    name: str = ""
    description: str = ""
    model: str
    train: TrainConfig
    val_fraction: float = Field(0.05, ge=0, lt=0.5)
    public_fraction: float = Field(0.2, ge=0, lt=0.9, description="training share held out to train a stand-in CLIP")
    max_train: int | None = Field(None, ge=1)
    max_test: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(1024, ge=1)


def load_presets() -> dict[str, Preset]:
    raw = load_yaml(PRESETS_FILE) or {}
    return {name: validate_model(Preset, {**body, "name": name}, f"{PRESETS_FILE} [{name}]")
            for name, body in raw.items()}


def get_preset(name: str) -> Preset:
    presets = load_presets()
    if name not in presets:
        raise unknown_name_error("preset", name, presets, hint=f"Presets are defined in {PRESETS_FILE}.")
    return presets[name]
