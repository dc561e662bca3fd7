"""Loading BackdoorBench's pickled files without running code from them.

`attack_result.pt`, `info.pickle` and friends are pickles, and unpickling a crafted file runs any
code its author chose. Every file is therefore read by a restricted unpickler that resolves only
the globals on `RECORD_ALLOWLIST`: the numpy array/scalar/dtype constructors a genuine record holds
(under both numpy 2's `numpy._core` and numpy 1.x's `numpy.core` names, since real 2022-2024 records
were written with numpy 1.x), PIL's `Image` (v1 records pickle PIL images) and a few harmless
builtins. Torch files go through `torch.load(weights_only=True)` with that list as
`torch.serialization.safe_globals`; plain pickles through `RestrictedUnpickler`. Anything else is
refused with an error naming the global, unless the caller trusts the file
(docs/reference/backdoorbench.md section 9).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import CGDError

TRUST_HINT = "pass --trust-record (trust_record=True) only if you trust where the file came from"


class UnsafeRecordError(CGDError):
    """A record file asks for a global outside the allow-list: loading it could run code."""


def _numpy_globals() -> dict[str, Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    allowed: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed[f"{module}._reconstruct"] = core.multiarray._reconstruct
        allowed[f"{module}.scalar"] = core.multiarray.scalar
    # numpy >= 1.25 pickles a dtype's class (Int64DType, ...) and BUILDs it on load
    dtypes = getattr(np, "dtypes", None)
    for name in ("BoolDType", "Int8DType", "UInt8DType", "Int16DType", "UInt16DType", "Int32DType", "UInt32DType",
                 "Int64DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType", "LongDType",
                 "ULongDType", "LongLongDType", "ULongLongDType"):
        if dtypes is not None and hasattr(dtypes, name):
            allowed[f"numpy.dtypes.{name}"] = getattr(dtypes, name)
    return allowed


RECORD_ALLOWLIST: dict[str, Any] = {
    **_numpy_globals(),
    "PIL.Image.Image": Image.Image,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "_codecs.encode": __import__("_codecs").encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the globals on `RECORD_ALLOWLIST`."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified not in RECORD_ALLOWLIST:
            raise UnsafeRecordError(_refusal(self.source, [qualified]))
        return RECORD_ALLOWLIST[qualified]


def _refusal(source: str, names: list[str]) -> str:
    listed = ", ".join(f"'{n}'" for n in names)
    return (f"{source}: refusing to unpickle global {listed}: not on the allow-list of types a "
            f"BackdoorBench record needs, and unpickling it could run code; {TRUST_HINT}")


def _torch_allowlist() -> list[tuple[Any, str]]:
    # the (object, "qualified.name") form matches numpy 1.x names that differ from numpy 2's __module__
    return [(obj, name) for name, obj in RECORD_ALLOWLIST.items()]


# torch.save's pre-1.6 format starts with this pickled magic number (protocol 2, torch's default)
_LEGACY_TORCH_PREFIX = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def load_pickled(path: str | os.PathLike, trust: bool = False) -> Any:
    """Load a torch.save file (zip or legacy) or a plain pickle from a BackdoorBench record.

    Untrusted (the default): only allow-listed globals; an UnsafeRecordError names the others.
    `trust=True` unpickles without restriction: only for files from a trusted source."""
    path = Path(path)
    if not path.is_file():
        raise CGDError(f"{path}: file not found")
    source = str(path)
    if zipfile.is_zipfile(path):
        if not trust:  # listed from the pickle's opcodes, nothing executed
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                      if g not in RECORD_ALLOWLIST]
            if unsafe:
                raise UnsafeRecordError(_refusal(source, unsafe))
        return _torch_load(path, trust)
    data = path.read_bytes()
    if trust:
        if data.startswith(_LEGACY_TORCH_PREFIX):
            return _torch_load(path, trust)
        return pickle.loads(data, encoding="latin1")
    # the first pickle in the file: a legacy torch file's magic number, or a plain pickle's content;
    # read restricted either way (probing with an unrestricted unpickler would run a crafted file)
    try:
        first = RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafeRecordError:
        raise
    except Exception as exc:
        raise CGDError(f"{source}: not a readable pickle or torch file ({type(exc).__name__}: {exc})") from None
    if isinstance(first, int) and first == torch.serialization.MAGIC_NUMBER:
        return _torch_load(path, trust)
    return first


def _torch_load(path: Path, trust: bool) -> Any:
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_torch_allowlist()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the first refused global as "GLOBAL module.name"
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise UnsafeRecordError(_refusal(str(path), [found.group(1)])) from None
        raise CGDError(f"{path}: cannot be loaded safely: {str(exc).splitlines()[0]}; {TRUST_HINT}") from None
    except (RuntimeError, EOFError) as exc:
        raise CGDError(f"{path}: not a readable torch file ({exc})") from None
