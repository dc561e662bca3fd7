"""Content-addressed, atomic, verified cache for expensive stages.

An entry is keyed by the SHA-256 of a canonical JSON of everything that determines it (the `spec`).
It is written to a temporary file, fsynced and renamed, so a killed process never leaves a
half-written entry; a sidecar records the payload's SHA-256, checked on every read. A corrupted or
truncated entry is reported, deleted and recomputed.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import default_cache_dir

log = logging.getLogger(__name__)


def canonical_json(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return tensor_digest(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    raise TypeError(f"cannot hash object of type {type(obj).__name__} in a cache spec")


def spec_hash(spec: Any) -> str:
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: identifies exact image content."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


class Cache:
    """`Cache(root).get_or_compute(kind, spec, compute)` returns the cached payload for `spec`, or
    runs `compute()` (which returns a dict of tensors / plain data) and stores its result."""

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.enabled = enabled
        self.hits: list[str] = []
        self.misses: list[str] = []

    def key(self, kind: str, spec: Any) -> str:
        return spec_hash({"kind": kind, "spec": spec})

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.pt"

    def load(self, kind: str, key: str) -> Any | None:
        path = self.path(kind, key)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise ValueError("checksum mismatch")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable entry is recomputed, never trusted
            log.warning("cache entry %s/%s is corrupted (%s); recomputing", kind, key[:12], exc)
            for p in (path, meta_path):
                p.unlink(missing_ok=True)
            return None

    def save(self, kind: str, key: str, payload: Any, spec: Any = None) -> Path:
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        path = self.path(kind, key)
        atomic_write_bytes(path, data)
        meta = {"kind": kind, "key": key, "sha256": hashlib.sha256(data).hexdigest(), "spec": spec}
        atomic_write_text(path.with_suffix(".json"), canonical_json(meta))
        return path

    def get_or_compute(self, kind: str, spec: Any, compute: Callable[[], Any]) -> Any:
        key = self.key(kind, spec)
        if self.enabled:
            cached = self.load(kind, key)
            if cached is not None:
                self.hits.append(f"{kind}/{key[:12]}")
                return cached
        self.misses.append(f"{kind}/{key[:12]}")
        payload = compute()
        if self.enabled:
            self.save(kind, key, payload, spec=json.loads(canonical_json(spec)))
        return payload
