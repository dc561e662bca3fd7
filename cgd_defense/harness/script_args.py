"""The run options every benchmark script in `bench/` shares, spelled as `cgd-bench run` spells them.

Light on purpose (no torch import), so a script's `--help` and argument errors come back at once."""
from __future__ import annotations

import argparse
import os

from ..config import CACHE_DIR_HELP


def add_run_arguments(parser: argparse.ArgumentParser, *, preset: str = "quick") -> None:
    """--data-root, --dataset, --preset, --seed, --device and --cache-dir."""
    parser.add_argument("--data-root", default=os.environ.get("CGD_DATA_ROOT"),
                        help="dataset folder (default: $CGD_DATA_ROOT)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--preset", default=preset)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)


def run_config(args: argparse.Namespace, **fields):
    """The `RunConfig` of parsed `args` (from `add_run_arguments`), with `fields` (attack, defense, ...) set."""
    from .pipeline import RunConfig  # deferred: the pipeline imports torch

    return RunConfig(dataset=args.dataset, data_root=args.data_root, preset=args.preset, seed=args.seed,
                     device=args.device, cache_dir=args.cache_dir, **fields)
