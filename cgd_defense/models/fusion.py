"""Inference-only rewrites of a network that leave its function unchanged."""
from __future__ import annotations

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_conv_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution inside an `nn.Sequential` into that
    convolution's weights and bias, in place, and return `module`. Only for eval mode: the folded
    convolution applies the BatchNorm's running statistics. Saves one pass over every activation map
    (the stand-in CLIP in bf16, one thread of a 2-core EPYC: 388 -> 439 img/s; bench/clip_throughput.py)."""
    if module.training:
        raise ValueError("fold_conv_batchnorm needs a module in eval mode: folding applies the running statistics")
    for child in module.modules():
        if not isinstance(child, nn.Sequential):
            continue
        for i in range(len(child) - 1):
            conv, norm = child[i], child[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                child[i] = fuse_conv_bn_eval(conv, norm)
                child[i + 1] = nn.Identity()
    return module
