"""I-BAU's cost per outer step: one implicit hypergradient (outer gradient, inner gradient with its
graph, K fixed-point Hessian-vector products, the indirect term) on random inputs, per model, with
PyTorch's BatchNorm and with eval-mode BatchNorm as a plain affine map (`batchnorm_as_affine`, what
`ibau` uses). The two give the same gradients (tests/test_models_trainer.py); only the time differs.

    python bench/ibau_step.py                       # fastnet (quick) and fastnet_whitened (cpu), bf16
    python bench/ibau_step.py --models preactresnet18 --batch-size 128

Prints a table and writes bench/results/ibau_step.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from cgd_defense.defenses.ibau import implicit_hypergradient
from cgd_defense.harness.precision import cpu_has_native_bf16
from cgd_defense.harness.provenance import machine
from cgd_defense.models import create_model
from cgd_defense.models.fusion import batchnorm_as_affine

RESULTS = Path(__file__).resolve().parent / "results"


def step_seconds(model_name: str, *, affine: bool, batch_size: int, iterations: int, bf16: bool,
                 repeats: int) -> float:
    """Median wall time of one hypergradient, after one warm-up call."""
    torch.manual_seed(0)
    net = create_model(model_name, 10).eval()
    params = [p for p in net.parameters() if p.requires_grad]
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    delta = 0.1 * torch.randn(1, 3, 32, 32)
    rows = (torch.rand(batch_size, 1, 1, 1) < 0.01).float()
    times = []
    with batchnorm_as_affine(net) if affine else contextlib.nullcontext():
        for i in range(repeats + 1):
            start = time.perf_counter()
            implicit_hypergradient(net, params, x, y, delta, rows, iterations=iterations, bf16=bf16,
                                   device=torch.device("cpu"))
            if i:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fastnet", "fastnet_whitened"])
    ap.add_argument("--batch-size", type=int, default=256, help="I-BAU's outer batch (BackdoorBench: 256)")
    ap.add_argument("--iterations", type=int, default=5, help="fixed-point iterations K (paper: 5)")
    ap.add_argument("--fp32", action="store_true", help="time in fp32 (default: bf16 autocast, as the presets)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "ibau_step.json")
    args = ap.parse_args()
    bf16 = not args.fp32
    rows = []
    print(f"{'model':<18} {'BatchNorm s/step':>17} {'affine s/step':>14} {'speed-up':>9}")
    for name in args.models:
        kw = dict(batch_size=args.batch_size, iterations=args.iterations, bf16=bf16, repeats=args.repeats)
        plain, affine = step_seconds(name, affine=False, **kw), step_seconds(name, affine=True, **kw)
        rows.append({"model": name, "batchnorm_s": round(plain, 2), "affine_s": round(affine, 2)})
        print(f"{name:<18} {plain:>17.2f} {affine:>14.2f} {plain / affine:>8.2f}x", flush=True)
    out = {"batch_size": args.batch_size, "iterations": args.iterations, "bf16": bf16,
           "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(), "machine": machine(),
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
