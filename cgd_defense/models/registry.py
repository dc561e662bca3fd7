"""timm-style model registry: `@register_model` on small entrypoint functions, one `create_model`."""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

from ..config import unknown_name_error

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _MODEL_ENTRYPOINTS:
        raise ValueError(f"model '{name}' is already registered")
    _MODEL_ENTRYPOINTS[name] = fn
    return fn


def list_models(filter: str = "") -> list[str]:
    names = sorted(_MODEL_ENTRYPOINTS)
    return [n for n in names if not filter or fnmatch.fnmatch(n, filter)]


def is_model(name: str) -> bool:
    return name in _MODEL_ENTRYPOINTS


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered architecture; keyword arguments that are None keep the model's defaults."""
    if name not in _MODEL_ENTRYPOINTS:
        raise unknown_name_error("model", name, _MODEL_ENTRYPOINTS)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _MODEL_ENTRYPOINTS[name](num_classes=num_classes, **kwargs)
