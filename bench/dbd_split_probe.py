"""Why DBD's split fails at short schedules: DBD's split rule on different frozen backbones.

DBD (Huang et al., ICLR 2022) keeps labelled the half of the training set with the lowest SCE loss
under a linear head trained on a frozen self-supervised backbone. Its premise: the backbone groups
images by content, so a poisoned image (content of class y, label t) cannot be fitted by a linear
head and keeps a high loss. This script checks the premise on one attack's cached poisoned set by
running DBD's own stages 1-2 (`pretrain_backbone`, `warm_up_head`) and the ranking DBD's first
MixMatch epoch uses, on these backbones:

- `simclr-E`: DBD's SimCLR for E epochs (cosine length 10 E, the shape of every shortened preset);
  E = the preset's `simclr_epochs` is exactly what DBD runs, and shares DBD's cache entry;
- `supervised-public`: the preset's architecture trained with labels, on the preset's victim
  schedule, on the public split (training images held out of the victim's pool; never poisoned): a
  backbone that knows the classes and has never seen the trigger;
- `victim` (`--victim`): the backdoored model's own backbone, which has learnt the trigger.

Each gets a fresh linear head trained exactly as DBD's warm-up, once per `--warmup-epochs` length
(default: the preset's; the paper's is 10). Reported per backbone and warm-up:
- `split_auroc`: AUROC of the SCE loss for "poisoned" (DBD needs it far above 0.5);
- `kept_poison_rate`: poison rate of the labelled half DBD keeps (the attack's rate when random);
- `head_val_acc`: the head's accuracy on the clean images of the validation split (their true labels):
  what the backbone knows about the classes; `head_val_says_target`: how often it answers the target;
- `target_label_share_kept` against `target_label_share_all`: how much the kept half favours samples
  labelled with the target class (dirty-label poisoning makes it the most frequent label, and a head
  that has learnt little beyond label frequencies ranks all of them, poisons included, lowest);
- `trigger_probe_auroc`: a logistic regression on the frozen features, poisoned vs not, fitted on one
  half of the training set and scored on the other: whether the backbone encodes the trigger.

    python bench/dbd_split_probe.py --data-root ~/data/cifar10 --attack badnets --simclr-epochs 4
    python bench/dbd_split_probe.py --data-root ../shared/data/cifar10-mini --preset smoke --simclr-epochs 0.5

Prints a table, writes bench/results/dbd_split_probe_<attack>_<preset>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from cgd_defense.harness.script_args import add_run_arguments, run_config

RESULTS = Path(__file__).resolve().parent / "results"


def probe(net, data, params, preset, seed: int, device) -> dict:
    """DBD's warm-up (`params.warmup_epochs`) and first ranking on `net`'s frozen backbone, with the
    metrics of the module docstring."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from cgd_defense.defenses.dbd import warm_up_head
    from cgd_defense.defenses.semisup import lowest_fraction, per_sample_sce
    from cgd_defense.harness.trainer import TrainConfig, make_optimizer, predict

    torch.manual_seed(seed)
    net.classifier.reset_parameters()  # a fresh head, as DBD's
    images, labels, poisoned = data.train.images, data.train.labels, data.train.poison_mask
    t0 = time.perf_counter()
    optimizer = make_optimizer(net, TrainConfig(optimizer="adam", lr=params.lr, weight_decay=0.0))
    warm_up_head(net, images, labels, params, optimizer, preset=preset, seed=seed, device=device)
    losses = per_sample_sce(net, images, labels, alpha=params.sce_alpha, beta=params.sce_beta, device=device,
                            precision=preset.train.precision)
    kept = lowest_fraction(losses, params.epsilon)
    val_clean = ~data.val.modified_mask
    val_logits = predict(net, data.val.images[val_clean], device=device, precision=preset.train.precision)
    head_val_acc = float((val_logits.argmax(1) == data.val.original_labels[val_clean]).float().mean())
    target = data.attack.poisoning.target

    feats = predict(net, images, device=device, precision=preset.train.precision, features=True).numpy()
    y = poisoned.numpy().astype(int)
    fit_idx, score_idx = train_test_split(np.arange(len(y)), test_size=0.5, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(feats[fit_idx])
    logreg = LogisticRegression(max_iter=2000).fit(scaler.transform(feats[fit_idx]), y[fit_idx])
    trigger_auroc = roc_auc_score(y[score_idx], logreg.decision_function(scaler.transform(feats[score_idx])))
    return {"split_auroc": round(float(roc_auc_score(y, losses.numpy())), 4),
            "kept_poison_rate": round(float(poisoned[kept].float().mean()), 4),
            "poison_rate": round(float(poisoned.float().mean()), 4),
            "mean_sce_clean": round(float(losses[~poisoned].mean()), 4),
            "mean_sce_poisoned": round(float(losses[poisoned].mean()), 4),
            "head_val_acc": round(head_val_acc, 4),
            "head_val_says_target": round(float((val_logits.argmax(1) == target).float().mean()), 4),
            "target_label_share_kept": round(float((labels[kept] == target).float().mean()), 4),
            "target_label_share_all": round(float((labels == target).float().mean()), 4),
            "trigger_probe_auroc": round(float(trigger_auroc), 4),
            "probe_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, preset="quick")
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--simclr-epochs", type=float, nargs="*", default=None,
                        help="SimCLR lengths to probe (default: the preset's)")
    parser.add_argument("--warmup-epochs", type=float, nargs="*", default=None,
                        help="head warm-up lengths to probe each backbone with (default: the preset's)")
    parser.add_argument("--no-supervised", action="store_true", help="skip the supervised-public backbone")
    parser.add_argument("--victim", action="store_true", help="also probe the backdoored model's backbone")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: bench/results/dbd_split_probe_<attack>_<preset>.json)")
    args = parser.parse_args(argv)

    import torch

    from cgd_defense.config import default_cache_dir
    from cgd_defense.data.datasets import load_split
    from cgd_defense.defenses.dbd import pretrain_backbone
    from cgd_defense.harness.cache import Cache, atomic_write_text
    from cgd_defense.harness.pipeline import backdoored_model, build_model, prepare_data
    from cgd_defense.harness.presets import get_preset
    from cgd_defense.harness.provenance import git_commit, machine, package_versions
    from cgd_defense.harness.trainer import train
    from cgd_defense.registry import create_attack, create_defense

    args.cache_dir = args.cache_dir or str(default_cache_dir())
    cfg = run_config(args, attack=args.attack, defense="dbd")
    preset = get_preset(cfg.preset)
    cache = Cache(cfg.cache_dir)
    data = prepare_data(cfg, preset, create_attack(cfg.attack), cache)
    params = create_defense("dbd", preset=cfg.preset).params
    n_classes = len(data.train.classes)
    out = Path(args.out) if args.out else RESULTS / f"dbd_split_probe_{args.attack}_{args.preset}.json"
    rows: list[dict] = []

    warmups = args.warmup_epochs if args.warmup_epochs is not None else [params.warmup_epochs]

    def record(name: str, net, stage_s: float, **extra) -> None:
        for warmup in warmups:
            rows.append({"backbone": name, "backbone_s": round(stage_s, 1), "warmup_epochs": warmup, **extra,
                         **probe(net, data, params.model_copy(update={"warmup_epochs": warmup}), preset, cfg.seed,
                                 cfg.device)})
            print(f"  {name}, warm-up {warmup:g}: " + json.dumps(rows[-1]), flush=True)
            report = {"attack": args.attack, "preset": args.preset, "dataset": args.dataset, "seed": args.seed,
                      "n_train": len(data.train), "rows": rows, "machine": machine(),
                      "platform": platform.platform(), "versions": package_versions(), "git_commit": git_commit()}
            atomic_write_text(out, json.dumps(report, indent=2))  # after each probe: a cut-short run keeps them

    for epochs in args.simclr_epochs if args.simclr_epochs is not None else [params.simclr_epochs]:
        p = params.model_copy(update={"simclr_epochs": epochs, "simclr_cosine_epochs": 10 * epochs})
        torch.manual_seed(cfg.seed)
        net = build_model(preset, cfg.dataset, n_classes)
        t0 = time.perf_counter()
        history = pretrain_backbone(net, data.train.images, p, preset=preset, seed=cfg.seed, cache=cache,
                                    device=cfg.device)
        record(f"simclr-{epochs:g}", net, time.perf_counter() - t0, simclr_final_loss=round(history[-1], 4))
    if not args.no_supervised:
        if len(data.public_indices) == 0:
            parser.error(f"preset {args.preset} holds out no public split; pass --no-supervised")
        full = load_split(cfg.dataset, cfg.data_root, True, cache=cache)
        public = full.subset(data.public_indices)
        torch.manual_seed(cfg.seed)
        net = build_model(preset, cfg.dataset, n_classes)
        t0 = time.perf_counter()
        train(net, public.images, public.labels, preset.train, seed=cfg.seed, device=cfg.device,
              desc="supervised backbone on the public split")
        record("supervised-public", net, time.perf_counter() - t0, n_public=len(public))
    if args.victim:
        t0 = time.perf_counter()
        net, _ = backdoored_model(cfg, preset, data, cache)
        record("victim", net, time.perf_counter() - t0)

    print()
    head = (f"{'backbone':<18} {'warm-up':>7} {'AUROC':>6} {'kept poison':>11} {'kept target':>11} "
            f"{'head val acc':>12} {'says target':>11} {'trigger probe':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backbone']:<18} {r['warmup_epochs']:>7g} {r['split_auroc']:>6.3f} {r['kept_poison_rate']:>11.3f} "
              f"{r['target_label_share_kept']:>11.3f} {r['head_val_acc']:>12.3f} {r['head_val_says_target']:>11.3f} "
              f"{r['trigger_probe_auroc']:>13.3f}")
    if rows:
        print(f"(training set: poison rate {rows[0]['poison_rate']:.3f}, target-label share "
              f"{rows[0]['target_label_share_all']:.3f}; wrote {out})")


if __name__ == "__main__":
    main()
