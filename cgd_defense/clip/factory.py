"""One factory for every CLIP the project uses, in open_clip's style.

    load_clip("ViT-B-32:laion2b_s34b_b79k")            open_clip architecture + pretrained tag (downloads when online)
    load_clip("ViT-B-32:/path/open_clip_pytorch_model.bin")   open_clip architecture + local checkpoint
    load_clip("cgd-standin:/path/standin.pt")          stand-in architecture + a file from `cgd-bench clip train --out`
    load_clip("standin:cifar10")                       the dataset's stand-in, trained on first use and cached
    load_clip("standin:cifar10:weak-30")               a weak stand-in (30 public images per class)
    load_clip("standin:cifar10:backdoored-badnets")    a stand-in trained on a pool poisoned by an attack
    load_clip("ViT-B-32", require_pretrained=False)    randomly initialised (timing only)

Every `ClipModel` records where its weights came from (`source`) and a weights `identity` that keys
the feature caches. Randomly initialised weights are refused unless `require_pretrained=False`.
Checkpoints load with `weights_only=True`.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import default_cache_dir, unknown_name_error
from ..errors import CGDError, ConfigError
from ..harness.cache import Cache, file_sha256, tensor_digest
from ..harness.precision import resolve_device, use_bf16
from ..harness.trainer import progress_enabled
from ..models.fusion import fold_conv_batchnorm
from . import model as standin_model

STANDIN_PREFIX = "standin"
_WEAK = re.compile(r"^weak-(\d+)$")
_BACKDOORED = re.compile(r"^backdoored-(.+)$")
OPENAI_CHECKPOINT_NAME = "open_clip_pytorch_model.bin"


@dataclass(frozen=True)
class ClipSpec:
    """A parsed CLIP name. kind: 'pretrained' (open_clip tag), 'local' (file), 'random', 'stand-in'."""

    kind: str
    arch: str | None = None
    tag: str | None = None
    path: str | None = None
    dataset: str | None = None
    variant: str | None = None  # stand-in: None | 'weak-N' | 'backdoored-ATTACK'

    @property
    def weak_per_class(self) -> int | None:
        m = _WEAK.match(self.variant or "")
        return int(m.group(1)) if m else None

    @property
    def backdoor_attack(self) -> str | None:
        m = _BACKDOORED.match(self.variant or "")
        return m.group(1) if m else None


_FORMS = ("ARCH:TAG (e.g. ViT-B-32:laion2b_s34b_b79k), ARCH:/path/to/checkpoint, standin:DATASET, "
          "standin:DATASET:weak-N, standin:DATASET:backdoored-ATTACK")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.startswith("~") or \
        value.endswith((".bin", ".pt", ".pth", ".safetensors")) or os.path.isfile(value)


def parse_clip_spec(spec: str) -> ClipSpec:
    """Parse a CLIP name; raise ConfigError naming the accepted forms and what exists."""
    import open_clip

    from ..data.datasets import get_dataset_info

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty CLIP name; expected one of: {_FORMS}")
    spec = spec.strip()
    if spec == STANDIN_PREFIX or spec.startswith(STANDIN_PREFIX + ":"):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise ConfigError(f"CLIP name '{spec}': a stand-in is standin:DATASET or standin:DATASET:VARIANT "
                              f"(variants: weak-N, backdoored-ATTACK)")
        dataset = get_dataset_info(parts[1]).name
        variant = parts[2] if len(parts) == 3 else None
        if variant is not None:
            weak, backdoor = _WEAK.match(variant), _BACKDOORED.match(variant)
            if weak and int(weak.group(1)) < 1:
                raise ConfigError(f"CLIP name '{spec}': weak-N needs N >= 1 public images per class")
            if backdoor:
                from ..registry import list_attacks

                if backdoor.group(1) not in list_attacks():
                    raise unknown_name_error("attack", backdoor.group(1), list_attacks(),
                                             hint=f"(in CLIP name '{spec}')")
            if not (weak or backdoor):
                raise ConfigError(f"CLIP name '{spec}': unknown stand-in variant '{variant}'; "
                                  f"expected weak-N (N public images per class) or backdoored-ATTACK")
        return ClipSpec("stand-in", arch=None, dataset=dataset, variant=variant)
    arch, _, pretrained = spec.partition(":")
    known = set(open_clip.list_models()) | set(standin_model.list_models())
    if arch not in known:
        raise unknown_name_error("CLIP architecture", arch, known, hint=f"Accepted forms: {_FORMS}.")
    if not pretrained:
        return ClipSpec("random", arch=arch)
    if _looks_like_path(pretrained):
        return ClipSpec("local", arch=arch, path=str(Path(pretrained).expanduser()))
    if standin_model.is_model(arch):
        raise ConfigError(f"CLIP name '{spec}': stand-in architecture '{arch}' has no pretrained tags; "
                          f"give a checkpoint path from `cgd-bench clip train --out FILE`")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise unknown_name_error(f"pretrained tag for {arch}", pretrained, tags,
                                 hint="Or give a local checkpoint path: ARCH:/path/to/open_clip_pytorch_model.bin.")
    return ClipSpec("pretrained", arch=arch, tag=pretrained)


# --------------------------------------------------------------------------------------------- ClipModel


CPU_SCORING_BATCH = 64


def scoring_batch_size(device: torch.device, gpu_batch: int) -> int:
    """Images per forward pass when scoring. On a CPU small batches are faster: a layer's activations
    stay in cache (2-core EPYC, bf16, stand-in 1 thread: 623 img/s at 64 against 539 at 256 and 462 at
    1,024; ViT-B-32 2 threads: 34 against 33 img/s, 1 thread 20 against 17). On a GPU, `gpu_batch`."""
    return gpu_batch if device.type == "cuda" else CPU_SCORING_BATCH


@dataclass(eq=False)
class ClipModel:
    """A CLIP ready for zero-shot scoring: the network, its tokenizer, its own preprocessing, where its
    weights came from (`source`) and a weights `identity` that keys every feature cache."""

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    identity: str
    source: dict
    spec: str
    device: torch.device
    batch_size: int
    precision: str = "auto"
    channels_last: bool = True
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def logit_scale(self) -> float:
        """The model's own learned logit scale, exponentiated (about 100 for real CLIP)."""
        return float(self.model.logit_scale.detach().float().exp())

    @property
    def uses_bf16(self) -> bool:
        return use_bf16(self.precision, self.device)

    def preprocess_cfg(self) -> dict:
        return {"size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "antialias": True, "bf16_weights": self.uses_bf16,
                "conv_batchnorm_folded": self.uses_bf16, "channels_last": self.channels_last}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> the model's input: resized to its size on the whole batch (antialiased,
        the interpolation of its pretrained config), normalised with its own mean and std."""
        x = images.to(self.device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode=self.interpolation,
                              antialias=True, align_corners=False if self.interpolation != "nearest" else None)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _image_tower(self) -> nn.Module:
        """The image tower that scores: in bf16 mode a bf16 copy of the weights (made once), with every
        convolution's BatchNorm folded into it. On CPU, bf16 weights run ViT-B-32 4.6x faster than fp32
        and autocast only 1.2x, as autocast re-casts every weight at every call (measured with 1 thread
        on this AMX CPU; bench/clip_throughput.py). Folding before the cast keeps the fold in fp32."""
        if not self.uses_bf16:
            return self.model.visual
        if self._memo.get("bf16_visual") is None:
            tower = fold_conv_batchnorm(copy.deepcopy(self.model.visual).eval())
            self._memo["bf16_visual"] = tower.to(torch.bfloat16)
        return self._memo["bf16_visual"]

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, *, batch_size: int | None = None, desc: str = "CLIP image features",
                      progress: bool | None = None) -> torch.Tensor:
        """L2-normalised image features, fp32 on the CPU, (N, D)."""
        self.model.eval()
        tower = self._image_tower()
        dtype = torch.bfloat16 if self.uses_bf16 else torch.float32
        bs = batch_size or self.batch_size
        show = progress_enabled() if progress is None else progress
        outs = []
        with tqdm(total=len(images), desc=desc, disable=not show or len(images) <= bs, leave=False,
                  unit="img", mininterval=1.0) as bar:
            for start in range(0, len(images), bs):
                x = self.preprocess(images[start:start + bs]).to(dtype)
                outs.append(F.normalize(tower(x).float(), dim=-1).cpu())
                bar.update(len(x))
        if not outs:
            return torch.empty(0, 0)
        return torch.cat(outs)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text features, fp32 on the CPU, (T, D); text is encoded in fp32."""
        self.model.eval()
        tokens = self.tokenizer(list(texts)).to(self.device)
        outs = [F.normalize(self.model.encode_text(tokens[i:i + 512]).float(), dim=-1).cpu()
                for i in range(0, len(tokens), 512)]
        return torch.cat(outs)


# --------------------------------------------------------------------------------------------- loading


def local_weights_path(arch: str, tag: str) -> Path:
    """Where a pretrained tag's checkpoint is looked for before any download: users without internet
    put the file here (or pass ARCH:/path/to/file)."""
    root = Path(os.environ.get("CGD_CLIP_WEIGHTS", default_cache_dir() / "clip-weights")).expanduser()
    return root / arch / tag / OPENAI_CHECKPOINT_NAME


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick reachability probe, so an offline machine fails in seconds rather than after the hub
    client's retries (about 50 s)."""
    if os.environ.get("CGD_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached_file(pcfg: dict) -> str | None:
    hub = pcfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id = "/".join(hub.strip("/").split("/")[:2])
    for name in (OPENAI_CHECKPOINT_NAME, "open_clip_model.safetensors"):
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def _file_identity(path: str) -> str:
    st = os.stat(path)
    return _sha256_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def state_dict_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_digest(t).encode())
    return h.hexdigest()


def _from_open_clip(spec: str, parsed: ClipSpec, device: torch.device, require_pretrained: bool) -> ClipModel:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if parsed.kind == "random":
        if require_pretrained:
            raise CGDError(f"CLIP '{spec}' names no weights, so it would be randomly initialised; give a pretrained "
                           f"tag or file ({parsed.arch}:TAG or {parsed.arch}:/path/to/{OPENAI_CHECKPOINT_NAME}), or pass "
                           f"require_pretrained=False to use random weights knowingly")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # deterministic random init, so its features cache by name
            net = open_clip.create_model(parsed.arch, pretrained=None, device=device)
        identity = f"random-init:{parsed.arch}:seed0:torch{torch.__version__}"
        source = {"kind": "random", "label": "random-init CLIP", "arch": parsed.arch}
    elif parsed.kind == "local":
        if not os.path.isfile(parsed.path):
            raise CGDError(f"CLIP checkpoint for {parsed.arch} not found: {parsed.path}")
        try:
            net = open_clip.create_model(parsed.arch, pretrained=parsed.path, device=device, require_pretrained=True,
                                         weights_only=True)
        except Exception as exc:  # open_clip raises RuntimeError/KeyError on a mismatching file
            raise CGDError(f"cannot load {parsed.path} as {parsed.arch} weights: {exc}") from None
        identity = _file_identity(parsed.path)
        source = {"kind": "local", "label": "pretrained CLIP", "arch": parsed.arch, "path": parsed.path,
                  "sha256": identity}
    else:
        pcfg = get_pretrained_cfg(parsed.arch, parsed.tag)
        local = local_weights_path(parsed.arch, parsed.tag)
        path = str(local) if local.is_file() else _hub_cached_file(pcfg)
        if path is None and not _online():
            raise CGDError(
                f"CLIP {parsed.arch} with pretrained tag '{parsed.tag}' is not available offline. Download "
                f"{OPENAI_CHECKPOINT_NAME} from https://huggingface.co/{pcfg.get('hf_hub', '').strip('/')} and either "
                f"place it at {local} or pass --clip {parsed.arch}:/path/to/{OPENAI_CHECKPOINT_NAME}")
        try:
            net = open_clip.create_model(parsed.arch, pretrained=path or parsed.tag, device=device,
                                         require_pretrained=True, weights_only=True,
                                         force_preprocess_cfg={k: pcfg[k] for k in ("mean", "std", "interpolation")
                                                               if k in pcfg})
        except Exception as exc:
            raise CGDError(f"cannot load CLIP {parsed.arch}:{parsed.tag}: {exc}. Place {OPENAI_CHECKPOINT_NAME} at "
                           f"{local} or pass --clip {parsed.arch}:/path/to/{OPENAI_CHECKPOINT_NAME}") from None
        identity = f"open_clip:{parsed.arch}:{parsed.tag}"
        source = {"kind": "pretrained", "label": "pretrained CLIP", "arch": parsed.arch, "tag": parsed.tag}
    pp = open_clip.get_model_preprocess_cfg(net)
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    return ClipModel(model=net.eval(), tokenizer=open_clip.get_tokenizer(parsed.arch), image_size=int(size),
                     mean=tuple(pp["mean"]), std=tuple(pp["std"]), interpolation=pp.get("interpolation", "bicubic"),
                     identity=identity, source=source, spec=spec, device=device,
                     batch_size=scoring_batch_size(device, gpu_batch=256))


def clip_from_standin_payload(payload: dict, spec: str, device: torch.device, source: dict) -> ClipModel:
    """Build a ClipModel from a stand-in checkpoint dict (what `clip train` saves and the cache holds)."""
    arch = payload["arch"]
    if not standin_model.is_model(arch):
        raise unknown_name_error("stand-in CLIP architecture", arch, standin_model.list_models(),
                                 hint="Register its config with cgd_defense.clip.model.add_model_config(PATH).")
    net = standin_model.create_standin_model(arch)
    net.load_state_dict(payload["state_dict"])
    net.to(device).eval()
    pp = payload["preprocess"]
    identity = state_dict_digest(net)
    return ClipModel(model=net, tokenizer=standin_model.standin_tokenizer(arch), image_size=int(pp["size"]),
                     mean=tuple(pp["mean"]), std=tuple(pp["std"]), interpolation=pp.get("interpolation", "bilinear"),
                     identity=identity, source={**source, "weights_sha256": identity}, spec=spec, device=device,
                     batch_size=scoring_batch_size(device, gpu_batch=1024))


def load_standin_file(path: str | os.PathLike) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CGDError(f"cannot read stand-in CLIP checkpoint {path}: {exc}") from None
    if not isinstance(payload, dict) or not {"arch", "state_dict", "preprocess"} <= set(payload):
        raise CGDError(f"{path} is not a stand-in CLIP checkpoint (expected keys arch, state_dict, preprocess)")
    return payload


def load_clip(spec: str, *, dataset: str | None = None, data_root: str | os.PathLike | None = None,
              cache: Cache | None = None, device=None, require_pretrained: bool = True,
              extra_data: str | os.PathLike | None = None) -> ClipModel:
    """The CLIP named by `spec` (see the module docstring). `dataset` must match a stand-in's dataset;
    `data_root` is where a stand-in's public pool is read from when it has to be trained."""
    parsed = parse_clip_spec(spec)
    device = resolve_device(device)
    if parsed.kind == "stand-in":
        from .standin import get_standin

        if dataset is not None and dataset != parsed.dataset:
            raise ConfigError(f"CLIP '{spec}' is the stand-in of {parsed.dataset}, but the data are {dataset}; "
                              f"use standin:{dataset}")
        payload = get_standin(parsed, data_root=data_root, cache=cache, extra_data=extra_data)
        return clip_from_standin_payload(payload, spec, device, dict(payload["source"]))
    if standin_model.is_model(parsed.arch):
        if parsed.kind != "local":
            raise CGDError(f"CLIP '{spec}': a stand-in architecture needs a checkpoint: {parsed.arch}:/path/to/file.pt")
        if not os.path.isfile(parsed.path):
            raise CGDError(f"stand-in CLIP checkpoint not found: {parsed.path}")
        payload = load_standin_file(parsed.path)
        source = {**payload.get("source", {}), "kind": "local", "label": "stand-in CLIP", "arch": parsed.arch,
                  "path": parsed.path, "sha256": _file_identity(parsed.path)}
        return clip_from_standin_payload(payload, spec, device, source)
    return _from_open_clip(spec, parsed, device, require_pretrained)
