"""Training speed benchmark: throughput per model (fp32 vs bf16 + channels_last) on this machine, and
the `cpu` preset's clean accuracy on the full CIFAR-10 test set against wall time.

    python bench/train_speed.py --data-root ~/data/cifar10            # both parts
    python bench/train_speed.py --skip-preset                          # throughput only
    python bench/train_speed.py --skip-throughput --epochs 12          # the preset with another schedule
    python bench/train_speed.py --skip-throughput --seed 1 --out bench/results/train_speed_seed1.json

Prints a table and writes bench/results/train_speed.json. The per-epoch curve is measured on the
validation split (the preset's hold-out); the test set is evaluated once, at the end.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cgd_defense.data import get_dataset_info, load_split, stratified_holdout
from cgd_defense.harness.cache import Cache
from cgd_defense.harness.precision import autocast, cpu_has_native_bf16, keep_freed_memory
from cgd_defense.harness.presets import get_preset
from cgd_defense.harness.trainer import predict, train
from cgd_defense.models import Classifier, create_model

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def throughput(model_name: str, bf16: bool, batch_size: int = 256, steps: int = 6) -> float:
    torch.manual_seed(0)
    net = create_model(model_name, 10)
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    net = net.to(memory_format=fmt).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,))
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        with autocast(bf16, torch.device("cpu")):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch_size * steps / (time.perf_counter() - t0)


def preset_curve(preset_name: str, data_root: str, cache: Cache, epochs: float | None = None, seed: int = 0) -> dict:
    preset = get_preset(preset_name)
    train_cfg = preset.train if epochs is None else preset.train.model_copy(update={"epochs": epochs})
    info = get_dataset_info("cifar10")
    t_start = time.perf_counter()
    full = load_split("cifar10", data_root, True, cache=cache)
    test = load_split("cifar10", data_root, False, cache=cache)
    train_idx, val_idx = stratified_holdout(full.labels, preset.val_fraction, 0)
    torch.manual_seed(seed)
    model = Classifier(create_model(preset.model, 10), info.mean, info.std)
    curve = []

    def on_epoch_end(epoch, m):
        val_acc = float((predict(m, full.images[val_idx]).argmax(1) == full.labels[val_idx]).float().mean())
        curve.append({"epoch": epoch, "wall_s": round(time.perf_counter() - t_start, 1), "val_acc": val_acc})
        print(f"  epoch {epoch}: val acc {100 * val_acc:.2f}%  at {curve[-1]['wall_s']:.0f}s", flush=True)
        return False

    train(model, full.images, full.labels, train_cfg, indices=train_idx, seed=seed, on_epoch_end=on_epoch_end,
          desc=f"{preset_name} preset")
    test_acc = float((predict(model, test.images).argmax(1) == test.labels).float().mean())
    return {"preset": preset_name, "model": preset.model, "epochs": train_cfg.epochs, "seed": seed, "n_train": len(train_idx),
            "curve": curve, "test_acc": test_acc, "wall_s": round(time.perf_counter() - t_start, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--models", nargs="+", default=["fastnet", "fastnet_small", "fastnet_whitened", "preactresnet18", "resnet18"])
    ap.add_argument("--skip-preset", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--epochs", type=float, default=None, help="override the preset's epochs (to explore a schedule)")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and batch order (the validation split stays)")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_speed.json")
    args = ap.parse_args()
    # as every training in the package does (the trainer calls it); CGD_MALLOC_TUNING=0 measures without
    malloc_tuned = keep_freed_memory()
    out = {"machine": {"platform": platform.platform(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
                       "native_bf16": cpu_has_native_bf16(), "malloc_tuned": malloc_tuned},
           "throughput": []}
    if not args.skip_throughput:
        print(f"{'model':<16} {'fp32 img/s':>11} {'bf16+CL img/s':>14} {'speed-up':>9}")
        for name in args.models:
            fp32, bf16 = throughput(name, False), throughput(name, True)
            out["throughput"].append({"model": name, "fp32": round(fp32, 1), "bf16_channels_last": round(bf16, 1)})
            print(f"{name:<16} {fp32:>11.0f} {bf16:>14.0f} {bf16 / fp32:>8.2f}x", flush=True)
    if not args.skip_preset:
        print(f"\n{args.preset} preset on full CIFAR-10 (no attack):")
        res = preset_curve(args.preset, args.data_root, Cache(args.cache_dir), args.epochs, args.seed)
        out["preset"] = res
        print(f"  test accuracy {100 * res['test_acc']:.2f}% after {res['wall_s']:.0f}s "
              f"(data loading included, {res['n_train']} training images)")
    path = args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    # A part skipped this time keeps its earlier measurement.
    previous = json.loads(path.read_text()) if path.exists() else {}
    if args.skip_throughput:
        out["throughput"] = previous.get("throughput", [])
    if args.skip_preset and "preset" in previous:
        out["preset"] = previous["preset"]
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
