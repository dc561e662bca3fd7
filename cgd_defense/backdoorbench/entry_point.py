"""What `python defense/cgd.py --result_file NAME` runs inside a BackdoorBench checkout.

`cgd-bench backdoorbench install` writes a thin `defense/cgd.py` that imports this module and calls
`main` with the checkout's root. Arguments follow BackdoorBench's defense scripts (`--result_file`,
`--yaml_path`, `--dataset`); every setting lives in one place, the YAML file
(`config/defense/cgd/<dataset>.yaml` by default), validated by `EntryConfig`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from ..config import StrictModel, load_yaml, validate_model
from ..errors import CGDError
from .formats import DATASET_FROM_BB
from .record import load_attack_result, record_folder

CONFIG_FOLDER = Path("config") / "defense" / "cgd"


class EntryConfig(StrictModel):
    preset: str = Field("paper", description="cgd-bench preset: the schedules of the defense's training stages")
    seed: int = 0
    clip: str | None = Field(None, description="CLIP weights, e.g. ViT-B-32:/path/model.bin; null: cgd-bench's default")
    data_root: str | None = Field(None, description="clean dataset folder; null: the record's data_path")
    device: str | None = None
    cache_dir: str | None = None
    trust_record: bool = Field(False, description="unpickle the record without the allow-list (trusted records only)")
    params: dict[str, Any] = Field(default_factory=dict, description="defense parameters, over the registry's")


def _under_root(path: str | None, bb_root: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else bb_root / p)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defense/cgd.py", description=(
        "CGD (CLIP-Guided backdoor Defense, Xu et al., ACM MM 2025) on a BackdoorBench record, via cgd-bench. "
        "Writes record/<result_file>/defense/cgd/."))
    parser.add_argument("--result_file", required=True, help="the record's folder name under record/")
    parser.add_argument("--yaml_path", default=None, help=f"settings; default: {CONFIG_FOLDER}/<dataset>.yaml")
    parser.add_argument("--dataset", default=None, help="the record's dataset (read from the record when omitted)")
    return parser


def main(argv: list[str], bb_root: Path, defense: str = "cgd") -> int:
    """Parse BackdoorBench-style arguments, run `defense` on record/<result_file>; exit status."""
    from .defend import defend_record

    args = _parser().parse_args(argv)
    try:
        record_dir = record_folder(bb_root / "record" / args.result_file)
        if args.yaml_path:
            yaml_path = Path(args.yaml_path)
            yaml_path = yaml_path if yaml_path.is_absolute() or yaml_path.is_file() else bb_root / yaml_path
        else:
            dataset = args.dataset or str(load_attack_result(record_dir)["clean_data"])
            if dataset not in DATASET_FROM_BB:
                raise CGDError(f"dataset '{dataset}' is not one cgd-bench reads ({', '.join(DATASET_FROM_BB)})")
            yaml_path = bb_root / CONFIG_FOLDER / f"{dataset}.yaml"
        cfg = validate_model(EntryConfig, load_yaml(yaml_path), str(yaml_path))
        result = defend_record(record_dir, defense, cfg.params, preset=cfg.preset, seed=cfg.seed,
                               data_root=_under_root(cfg.data_root, bb_root), clip=cfg.clip, device=cfg.device,
                               cache_dir=_under_root(cfg.cache_dir, bb_root), trust=cfg.trust_record)
    except CGDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    print(f"{result['attack']} / {defense}: ACC {fmt(result['clean_acc'])}  ASR {fmt(result['asr'])}  "
          f"RA {fmt(result['ra'])}  (no defense: ACC {fmt(result['no_defense']['clean_acc'])}, "
          f"ASR {fmt(result['no_defense']['asr'])})")
    print(f"wrote {record_dir / 'defense' / defense}")
    return 0
