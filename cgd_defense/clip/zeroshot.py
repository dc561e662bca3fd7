"""Zero-shot scoring with cached features.

`zero_shot_logits` returns what the CGD reference stores as `logits_clip` (binyxu/CGD
`utils/models.py:226-241`): raw cosine similarities between L2-normalised image and class-text
embeddings, with no logit_scale applied. Image features are cached by a content hash of (CLIP
weights identity, the exact images, the preprocessing), text embeddings by (weights identity,
prompts): logits from cached features are one matrix product. An in-process memo of the last few
feature sets makes repeated calls within a run cost milliseconds.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from ..errors import CGDError
from ..harness.cache import Cache, spec_hash, tensor_digest
from .classnames import (GTSRB_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, REFERENCE_TEMPLATES, TemplateSet,
                         _GTSRB_ENSEMBLE, tiny_imagenet_name)
from .factory import ClipModel

FEATURES_FORMAT = 1
_MEMO: "OrderedDict[str, torch.Tensor]" = OrderedDict()
_MEMO_SIZE = 4
_DIGESTS: dict[int, tuple[weakref.ref, int, str]] = {}


def images_digest(images: torch.Tensor) -> str:
    """`tensor_digest`, remembered for a tensor object until it (or a tensor it views) changes in
    place: hashing 50,000 CIFAR images takes ~0.3 s, which a same-process rerun should not pay."""
    entry = _DIGESTS.get(id(images))
    if entry is not None and entry[0]() is images and entry[1] == images._version:
        return entry[2]
    digest = tensor_digest(images)
    for key in [k for k, (ref, _, _) in _DIGESTS.items() if ref() is None]:
        del _DIGESTS[key]
    _DIGESTS[id(images)] = (weakref.ref(images), images._version, digest)
    return digest


def _remember(key: str, value: torch.Tensor) -> torch.Tensor:
    _MEMO[key] = value
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return value


def clear_memo() -> None:
    """Forget the in-process feature memo (the on-disk cache is untouched)."""
    _MEMO.clear()
    _DIGESTS.clear()


def class_prompt_names(dataset: str, classes: list[str], templates: TemplateSet = "reference") -> list[str]:
    """The name each class is called by in prompts. GTSRB folder names (00000..00042) become the
    descriptive sign names; Tiny-ImageNet WordNet ids become cleaned WordNet names."""
    if dataset == "gtsrb":
        names = [GTSRB_CLASSNAMES[int(c)] if c.isdigit() and int(c) < len(GTSRB_CLASSNAMES) else c for c in classes]
    elif dataset == "tinyimagenet":
        names = [tiny_imagenet_name(c) for c in classes]
    else:
        names = list(classes)
    if templates == "ensemble":
        names = [n.replace("_", " ") for n in names]
    return names


def prompts_for(dataset: str, classes: list[str], templates: TemplateSet = "reference") -> list[list[str]]:
    """Per class, the prompts whose mean embedding is that class's zero-shot weight."""
    names = class_prompt_names(dataset, classes, templates)
    if templates == "reference":
        template = REFERENCE_TEMPLATES.get(dataset, "a photo of a {}")
        return [[template.format(n)] for n in names]
    if templates == "ensemble":
        if dataset == "gtsrb":
            return [[t.format(n) for t in _GTSRB_ENSEMBLE] for n in names]
        return [[t(n) for t in OPENAI_IMAGENET_TEMPLATES] for n in names]
    raise CGDError(f"templates must be 'reference' or 'ensemble'. Got {templates!r} instead")


def text_classifier(clip: ClipModel, dataset: str, classes: list[str], templates: TemplateSet = "reference",
                    cache: Cache | None = None) -> torch.Tensor:
    """(C, D) L2-normalised class embeddings: each class's prompt embeddings averaged, renormalised
    (CLIP's prompt ensembling; a single prompt for `reference`)."""
    prompts = prompts_for(dataset, classes, templates)

    def compute():
        flat = [p for group in prompts for p in group]
        emb = clip.encode_texts(flat)
        weights, start = [], 0
        for group in prompts:
            weights.append(torch.nn.functional.normalize(emb[start:start + len(group)].mean(0), dim=-1))
            start += len(group)
        return {"weights": torch.stack(weights)}

    spec = {"clip": clip.identity, "prompts": prompts, "format": FEATURES_FORMAT}
    key = spec_hash({"kind": "clip_text", "spec": spec})
    if key in _MEMO:
        return _MEMO[key]
    weights = compute()["weights"] if cache is None else cache.get_or_compute("clip_text", spec, compute)["weights"]
    return _remember(key, weights)


def image_features(clip: ClipModel, images_u8: torch.Tensor, cache: Cache | None = None,
                   desc: str = "CLIP image features") -> torch.Tensor:
    """(N, D) L2-normalised image features, fp32, cached by (weights, exact images, preprocessing)."""
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 3:
        raise CGDError(f"images must be uint8 (N, 3, H, W), got {images_u8.dtype} {tuple(images_u8.shape)}")
    spec = {"clip": clip.identity, "images": images_digest(images_u8), "preprocess": clip.preprocess_cfg(),
            "format": FEATURES_FORMAT}
    key = spec_hash({"kind": "clip_image", "spec": spec})
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]

    def compute():
        return {"features": clip.encode_images(images_u8, desc=desc)}

    feats = compute()["features"] if cache is None else cache.get_or_compute("clip_image", spec, compute)["features"]
    return _remember(key, feats)


def zero_shot_logits(clip: ClipModel, images_u8: torch.Tensor, dataset: str, classes: list[str], *,
                     templates: TemplateSet = "reference", cache: Cache | None = None) -> torch.Tensor:
    """(N, C) raw cosine similarities (no logit_scale), fp32: the CGD reference's `logits_clip`."""
    text = text_classifier(clip, dataset, classes, templates, cache)
    return image_features(clip, images_u8, cache) @ text.T
