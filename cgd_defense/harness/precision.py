"""Device, numeric-precision and CPU-memory choices, measured rather than assumed (see
bench/train_speed.py).

bf16 autocast with channels_last runs convnets 3-4x faster than fp32 on CPUs with AMX (Intel
Sapphire Rapids and later) and about 2x faster on CPUs with AVX512-BF16 (measured on an AMD EPYC:
FastNet 307 -> 641 img/s, PreActResNet-18 98 -> 192 img/s, batch 256, 2 threads); on CPUs with
neither, bf16 is emulated and can be slower, so `auto` enables it only with one of the two.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys

import torch


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return not {"amx_bf16", "avx512_bf16"}.isdisjoint(line.split())
    except OSError:
        pass
    return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A CPU training step allocates and frees activations of tens of MB. glibc serves blocks that
    large with mmap and unmaps them when freed, so each step faults its memory in again. With both
    thresholds raised the blocks stay in the heap and are reused: FastNet at batch 512 (bf16)
    trains at about 700 instead of 585 img/s on a 2-core AMD EPYC. The cost is that the process
    keeps its peak memory. Process-wide and idempotent; a no-op off glibc; CGD_MALLOC_TUNING=0
    turns it off."""
    if os.environ.get("CGD_MALLOC_TUNING") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    limit = ctypes.c_int(2**31 - 1)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))


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
    return cpu_has_native_bf16() and os.environ.get("CGD_DISABLE_BF16") != "1"


def autocast(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
