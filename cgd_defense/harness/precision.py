"""Device and numeric-precision choices, measured rather than assumed (see bench/train_speed.py).

On CPUs with AMX (Intel Sapphire Rapids and later) bf16 autocast with channels_last runs convnets
3-4x faster than fp32; elsewhere on CPU it can be slower, so `auto` enables it only with AMX.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return default_device()
    return torch.device(device)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_amx() and os.environ.get("CGD_DISABLE_BF16") != "1"


def autocast(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
