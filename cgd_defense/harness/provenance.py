"""What produced a result: package versions, git commit, machine."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata

from ..config import PROJECT_ROOT

_PACKAGES = ("cgd-bench", "torch", "torchvision", "open_clip_torch", "numpy", "scikit-learn", "pydantic")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), so that wall times from two hosts with the same
    core count and platform string (a 2-core AMX host and a 2-core AMD EPYC) are told apart."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    import os

    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cpus": str(os.cpu_count()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
