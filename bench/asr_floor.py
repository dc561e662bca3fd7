"""The ASR floor: how often a model that never saw a backdoor already sends triggered test images to
the attack's target. ASR counts triggered non-target images classified as the target, so a model
with clean accuracy well below 100% scores above zero through its ordinary mistakes (and through
triggers that resemble the target class); an ASR near this floor is as low as a defense can go.

    python bench/asr_floor.py --data-root ~/data/cifar10 --attacks badnets blended sig wanet lc
    python bench/asr_floor.py --data-root ../shared/data/cifar10-mini --preset smoke --attacks badnets

For each model in --models (`none`: the preset's model trained on the unpoisoned training set, the
`clean` attack; `cgd-reference` / `cgd`: that model after CGD's retraining on clean data, so with
CGD's schedule and its CLIP teacher but no backdoor to remove), it reports clean accuracy and, for
every attack in --attacks, the ASR and RA on that attack's triggered test set. Models, poisoned sets
and defended models come from the cache when earlier runs (e.g. the `quick-cgd` grid) made them.
Prints a table, writes bench/results/asr_floor_<preset>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cgd_defense.harness.cache import Cache, atomic_write_text
from cgd_defense.harness.metrics import attack_success_rate, clean_accuracy, robust_accuracy
from cgd_defense.harness.pipeline import RunConfig, backdoored_model, defend_and_evaluate, prepare_data
from cgd_defense.harness.stages import StageTimer
from cgd_defense.harness.presets import get_preset
from cgd_defense.harness.script_args import add_run_arguments, run_config
from cgd_defense.harness.trainer import predict
from cgd_defense.registry import create_attack

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"none": ("none", {}), "cgd-reference": ("cgd", {"variant": "reference"}), "cgd": ("cgd", {})}


def clean_trained_model(name: str, cfg: RunConfig, data, cache: Cache):
    """The preset's model trained on unpoisoned data (`cfg`, `data`: the `clean` attack), then put
    through defense `name`."""
    defense, params = MODELS[name]
    model, key = backdoored_model(cfg, get_preset(cfg.preset), data, cache)
    if defense == "none":
        return model
    cfg = cfg.model_copy(update={"defense": defense, "defense_params": params})
    return defend_and_evaluate(cfg, data, model, key, cache, None, StageTimer())[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blended", "sig", "wanet"])
    ap.add_argument("--models", nargs="+", default=["none", "cgd-reference", "cgd"], choices=sorted(MODELS))
    add_run_arguments(ap, preset="quick")
    ap.add_argument("--json", default=None, help="default: bench/results/asr_floor_<preset>.json")
    args = ap.parse_args()
    for attack in args.attacks:
        create_attack(attack)  # unknown names fail before any work

    cache = Cache(args.cache_dir)
    preset = get_preset(args.preset)
    triggered = {}
    for attack in args.attacks:
        cfg = run_config(args, attack=attack)
        triggered[attack] = prepare_data(cfg, preset, create_attack(attack), cache).triggered

    clean_cfg = run_config(args, attack="clean")
    clean_data = prepare_data(clean_cfg, preset, create_attack("clean"), cache)
    report = {"preset": args.preset, "dataset": args.dataset, "seed": args.seed, "command": " ".join(sys.argv),
              "clip": f"standin:{args.dataset} (stand-in CLIP) for the cgd models", "models": {}}
    for name in args.models:
        t0 = time.perf_counter()
        model = clean_trained_model(name, clean_cfg, clean_data, cache)
        run = lambda images: predict(model, images, batch_size=preset.eval_batch_size,  # noqa: E731
                                     device=args.device, precision=preset.train.precision)
        row = {"clean_acc": clean_accuracy(run(clean_data.test.images), clean_data.test.labels), "attacks": {}}
        for attack, trig in triggered.items():
            logits = run(trig.images)
            row["attacks"][attack] = {"asr": attack_success_rate(logits, trig.attack_labels),
                                      "ra": robust_accuracy(logits, trig.true_labels),
                                      "n_triggered": len(trig.true_labels)}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        report["models"][name] = row

    out = Path(args.json or RESULTS / f"asr_floor_{args.preset}.json")
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"ASR floor, preset {args.preset}: models trained on unpoisoned data (percent; ASR / RA per attack)")
    print(f"{'model':15} {'CA':>6} " + " ".join(f"{a:>15}" for a in args.attacks))
    for name, row in report["models"].items():
        cells = " ".join(f"{100 * r['asr']:6.2f} / {100 * r['ra']:5.1f}" for r in row["attacks"].values())
        print(f"{name:15} {100 * row['clean_acc']:6.2f} {cells}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
