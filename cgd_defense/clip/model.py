"""The stand-in CLIP architecture and its config registry.

Configs are JSON files in `model_configs/`, keyed by file stem, the way open_clip registers its
architectures (`open_clip/factory.py:_rescan_model_configs`): a folder scanned once, natural sort,
`add_model_config(path)` for user files, `get_model_config(name)` handing out a deep copy. Stricter
than open_clip: a file missing a required key is an error naming file and key, never skipped. The
configs live in our own registry, not open_clip's, because the image tower is our FastNet, which
open_clip's `create_model` cannot build.

`StandinCLIP` has open_clip's CLIP interface (`encode_image`, `encode_text`, `logit_scale`,
`forward -> (image_features, text_features, logit_scale.exp())`): a FastNet image tower whose
bias-free head is the projection into the joint space, and open_clip's own `TextTransformer` over
open_clip's BPE tokenizer. A conv tower, not a ViT: on 32x32 images and a few thousand public
images it reaches far higher zero-shot accuracy per CPU-minute (measured in the README section
"CLIP and the stand-in CLIP").
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer

from ..config import unknown_name_error
from ..errors import ConfigError
from ..models.fastnet import FastNet, WhitenedFastNet

REQUIRED_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
VISION_TOWERS = ("fastnet", "fastnet_whitened")
_MODEL_CONFIG_PATHS: list[Path] = [Path(__file__).parent / "model_configs"]
_MODEL_CONFIGS: dict[str, dict] = {}


def _natural_key(name: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def _rescan_model_configs() -> None:
    global _MODEL_CONFIGS
    files: list[Path] = []
    for path in _MODEL_CONFIG_PATHS:
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    configs = {}
    for f in files:
        try:
            cfg = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{f}: cannot read the CLIP model config: {exc}") from None
        missing = [k for k in REQUIRED_KEYS if k not in cfg]
        if missing:
            raise ConfigError(f"{f}: CLIP model config is missing required key(s) {missing}")
        if cfg["vision_cfg"].get("tower") not in VISION_TOWERS:
            raise ConfigError(f"{f}: vision_cfg.tower must be one of {list(VISION_TOWERS)}. "
                              f"Got {cfg['vision_cfg'].get('tower')!r} instead")
        configs[f.stem] = cfg
    _MODEL_CONFIGS = dict(sorted(configs.items(), key=lambda kv: _natural_key(kv[0])))


def list_models() -> list[str]:
    """The registered stand-in architectures."""
    return list(_MODEL_CONFIGS)


def is_model(name: str) -> bool:
    return name in _MODEL_CONFIGS


def add_model_config(path: str | os.PathLike) -> None:
    """Register a user config file, or every *.json in a folder."""
    _MODEL_CONFIG_PATHS.append(Path(path).expanduser())
    _rescan_model_configs()


def get_model_config(name: str) -> dict:
    if name not in _MODEL_CONFIGS:
        raise unknown_name_error("stand-in CLIP architecture", name, _MODEL_CONFIGS)
    return copy.deepcopy(_MODEL_CONFIGS[name])


_rescan_model_configs()


class StandinCLIP(nn.Module):
    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict, init_logit_scale: float = 2.6593):
        super().__init__()
        self.image_size = vision_cfg.get("image_size", 32)
        # The tower's bias-free head is the image projection into the joint space (its fixed output
        # scale vanishes in the normalisation of the features).
        if vision_cfg["tower"] == "fastnet_whitened":
            self.visual = WhitenedFastNet(embed_dim, widths=tuple(vision_cfg["widths"]))
        else:
            self.visual = FastNet(embed_dim, widths=tuple(vision_cfg["widths"]), stem_width=vision_cfg["stem_width"],
                                  logit_scale=1.0)
        self.text = TextTransformer(context_length=text_cfg["context_length"], vocab_size=text_cfg["vocab_size"],
                                    width=text_cfg["width"], heads=text_cfg["heads"], layers=text_cfg["layers"],
                                    output_dim=embed_dim)
        self.context_length = text_cfg["context_length"]
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    @property
    def needs_data_init(self) -> bool:
        """Whether the image tower still needs its data-dependent initialisation (a whitening stem)."""
        return getattr(self.visual, "needs_data_init", False)

    def init_from_data(self, images: torch.Tensor) -> None:
        """`images`: preprocessed (normalised) images, as `encode_image` takes them."""
        self.visual.init_from_data(images)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


def create_standin_model(arch: str) -> StandinCLIP:
    cfg = get_model_config(arch)
    return StandinCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"],
                       cfg.get("init_logit_scale", 2.6593))


def standin_tokenizer(arch: str) -> SimpleTokenizer:
    """open_clip's BPE tokenizer (offline: its vocabulary ships with open_clip) at the config's context length."""
    return SimpleTokenizer(context_length=get_model_config(arch)["text_cfg"]["context_length"])
