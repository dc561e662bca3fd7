"""CLIP zero-shot scoring throughput: the reference-style path against ours, and a cached rerun.

- reference path: what the usual open_clip loop (and the CGD authors' code, in spirit) does: each
  image through PIL and open_clip's own eval transform (resize, centre crop, to tensor, normalise),
  batches of 256, fp32, `torch.no_grad`.
- ours: `ClipModel.encode_images`: the resize and normalisation on whole uint8 batches,
  inference_mode, bf16 autocast and channels_last where the CPU computes bf16 natively (AMX or AVX512-BF16, `harness.precision`).
- cached rerun: `zero_shot_logits` over the dataset's whole training set once its image features are
  in the cache (a fresh process reads them from disk: we clear the in-process memo first).

Both paths score the same images with the same weights: a randomly initialised ViT-B-32 (timing needs
no pretrained weights; `require_pretrained=False`) and the dataset's stand-in CLIP.

    python bench/clip_throughput.py --data-root ~/data/cifar10 --images 2000 --vit-images 256

Prints a table and writes bench/results/clip_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cgd_defense.clip import load_clip, zero_shot_logits
from cgd_defense.clip.factory import ClipModel
from cgd_defense.clip.zeroshot import clear_memo, image_features
from cgd_defense.data import load_split
from cgd_defense.harness.cache import Cache

RESULTS = Path(__file__).resolve().parent / "results"


def open_clip_eval_transform(clip: ClipModel):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(size=clip.image_size, mean=clip.mean, std=clip.std, interpolation=clip.interpolation)
    return image_transform_v2(cfg, is_train=False)


@torch.no_grad()
def reference_features(clip: ClipModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    transform = open_clip_eval_transform(clip)
    model = clip.model.float().eval()
    arrays = images.permute(0, 2, 3, 1).numpy()
    outs = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(Image.fromarray(np.ascontiguousarray(a))) for a in arrays[start:start + batch_size]])
        outs.append(F.normalize(model.encode_image(batch), dim=-1))
    return torch.cat(outs)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def compare(clip: ClipModel, images: torch.Tensor, label: str) -> dict:
    ref, t_ref = timed(lambda: reference_features(clip, images))
    ours, t_ours = timed(lambda: clip.encode_images(images, progress=False))
    agreement = float((F.cosine_similarity(ref, ours, dim=1)).mean())
    return {"clip": label, "images": len(images), "reference_img_per_s": len(images) / t_ref,
            "ours_img_per_s": len(images) / t_ours, "speedup": t_ref / t_ours,
            "mean_cosine_ours_vs_reference": agreement, "ours_bf16": clip.uses_bf16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--images", type=int, default=2000, help="images per path for the stand-in")
    parser.add_argument("--vit-images", type=int, default=2000, help="images per path for ViT-B-32 (slow in fp32)")
    parser.add_argument("--standin", default=None,
                        help="the second CLIP (default: standin:DATASET, trained on first use), e.g. cgd-standin:FILE")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    cache = Cache(args.cache_dir)
    train = load_split(args.dataset, args.data_root, True, cache=cache)
    rows = []

    vit = load_clip("ViT-B-32", require_pretrained=False, device="cpu")
    rows.append(compare(vit, train.images[:args.vit_images], "ViT-B-32 (random init)"))
    standin_name = args.standin or f"standin:{args.dataset}"
    standin = load_clip(standin_name, dataset=args.dataset, data_root=args.data_root, cache=cache, device="cpu")
    rows.append(compare(standin, train.images[:args.images], "stand-in (" + standin.source["arch"] + ")"))

    image_features(standin, train.images, cache)  # fill the cache (or hit it)
    clear_memo()
    _, t_cached = timed(lambda: zero_shot_logits(standin, train.images, args.dataset, train.classes, cache=cache))
    _, t_memo = timed(lambda: zero_shot_logits(standin, train.images, args.dataset, train.classes, cache=cache))
    cached = {"clip": standin_name, "images": len(train), "cached_rerun_s": t_cached,
              "same_process_rerun_s": t_memo}

    print(f"{'CLIP':<26} {'images':>6} {'reference img/s':>16} {'ours img/s':>11} {'speed-up':>9} {'cos(ours, ref)':>15}")
    for r in rows:
        print(f"{r['clip']:<26} {r['images']:>6} {r['reference_img_per_s']:>16.1f} {r['ours_img_per_s']:>11.1f} "
              f"{r['speedup']:>8.1f}x {r['mean_cosine_ours_vs_reference']:>15.4f}")
    print(f"cached rerun over {cached['images']} training images: {cached['cached_rerun_s']:.3f} s from disk, "
          f"{cached['same_process_rerun_s'] * 1000:.1f} ms in the same process")
    RESULTS.mkdir(exist_ok=True)
    out = {"rows": rows, "cached": cached, "threads": torch.get_num_threads(), "machine": platform.processor() or
           platform.machine(), "torch": torch.__version__}
    (RESULTS / "clip_throughput.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'clip_throughput.json'}")


if __name__ == "__main__":
    main()
