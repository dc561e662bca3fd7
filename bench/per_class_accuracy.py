"""Where an attack costs clean accuracy: per-class clean test accuracy of each attack's undefended
(backdoored) model next to the model trained on unpoisoned data, and where the attack's target class
goes wrong (which classes its clean test images are taken for, and how many clean images of other
classes are called the target).

    python bench/per_class_accuracy.py --data-root ~/data/cifar10 --preset cpu --attacks sig badnets
    python bench/per_class_accuracy.py --data-root ../shared/data/cifar10-mini --preset smoke --attacks sig

Backdoored models come from the cache when earlier runs (e.g. the `cpu-attacks` grid) made them;
otherwise they are trained here. Only clean test images are scored. Prints a table, writes
bench/results/per_class_accuracy_<preset>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cgd_defense.harness.cache import Cache, atomic_write_text
from cgd_defense.harness.pipeline import backdoored_model, prepare_data
from cgd_defense.harness.presets import get_preset
from cgd_defense.harness.script_args import add_run_arguments, run_config
from cgd_defense.harness.trainer import predict
from cgd_defense.registry import create_attack

RESULTS = Path(__file__).resolve().parent / "results"


def per_class_report(predictions: torch.Tensor, labels: torch.Tensor, classes: list[str], target: int | None) -> dict:
    """Clean accuracy overall and per class; for `target`, the share of each class's clean test images
    predicted as the target and where the target class's own images go."""
    num_classes = len(classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    report = {"clean_acc": float(confusion.diag().sum() / confusion.sum()),
              "per_class_acc": {c: round(float(a), 4) for c, a in zip(classes, per_class)}}
    if target is not None:
        others = torch.arange(num_classes) != target
        report["target"] = classes[target]
        report["others_called_target"] = float(confusion[others, target].sum() / confusion[others].sum())
        row = confusion[target].double() / confusion[target].sum().clamp(min=1)
        report["target_images_predicted_as"] = {c: round(float(s), 4) for c, s in zip(classes, row) if s > 0}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["sig"])
    add_run_arguments(ap, preset="cpu")
    ap.add_argument("--json", default=None, help="default: bench/results/per_class_accuracy_<preset>.json")
    args = ap.parse_args()
    attacks = {name: create_attack(name) for name in ["clean", *dict.fromkeys(args.attacks)]}  # fail before work

    cache = Cache(args.cache_dir)
    preset = get_preset(args.preset)
    report = {"preset": args.preset, "dataset": args.dataset, "seed": args.seed, "command": " ".join(sys.argv),
              "models": {}}
    for name, attack in attacks.items():
        cfg = run_config(args, attack=name)
        data = prepare_data(cfg, preset, attack, cache)
        model, _ = backdoored_model(cfg, preset, data, cache)
        logits = predict(model, data.test.images, batch_size=preset.eval_batch_size, device=args.device,
                         precision=preset.train.precision)
        target = None if attack.family == "no-attack" else attack.poisoning.target
        report["models"][name] = per_class_report(logits.argmax(1).cpu(), data.test.labels, data.test.classes, target)
        report["classes"] = data.test.classes

    classes = report["classes"]
    clean = report["models"]["clean"]
    print(f"per-class clean test accuracy (%), preset {args.preset}, {args.dataset}, seed {args.seed}; "
          "in brackets: change against the model trained on unpoisoned data")
    print(f"{'class':<12}" + "".join(f"{n:>16}" for n in report["models"]))
    for c in classes + ["all"]:
        cells = []
        for name, r in report["models"].items():
            acc = r["clean_acc"] if c == "all" else r["per_class_acc"][c]
            ref = clean["clean_acc"] if c == "all" else clean["per_class_acc"][c]
            cells.append(f"{100 * acc:.1f}" + ("" if name == "clean" else f" ({100 * (acc - ref):+.1f})"))
        print(f"{c:<12}" + "".join(f"{cell:>16}" for cell in cells))
    for name, r in report["models"].items():
        if "target" in r:
            goes = ", ".join(f"{c} {100 * s:.1f}" for c, s in sorted(r["target_images_predicted_as"].items(),
                                                                      key=lambda kv: -kv[1]))
            print(f"{name}: target '{r['target']}' test images predicted as: {goes}; "
                  f"other classes' images called '{r['target']}': {100 * r['others_called_target']:.1f}%")
    out = Path(args.json or RESULTS / f"per_class_accuracy_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
