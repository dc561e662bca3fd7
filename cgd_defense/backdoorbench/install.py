"""Installing CGD into a BackdoorBench checkout, and removing it again.

`install` writes exactly these files, in BackdoorBench's defense layout:
- `defense/cgd.py`: a thin entry point that imports cgd-bench (`entry_point.main`);
- `config/defense/cgd/<dataset>.yaml` for cifar10, cifar100, gtsrb and tiny: its settings;
- `config/defense/cgd/.cgd-bench-manifest.json`: the SHA-256 of each file written and the folders
  created, so that `uninstall` removes exactly those and nothing a user changed or added.
A file that already exists is overwritten only if it is byte-identical to what the manifest says
we wrote; anything else is refused, naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import PROJECT_ROOT
from ..errors import CGDError
from ..harness.cache import atomic_write_bytes
from ..harness.provenance import package_versions
from .entry_point import CONFIG_FOLDER
from .formats import DATASET_FROM_BB

ENTRY_FILE = Path("defense") / "cgd.py"
MANIFEST_FILE = CONFIG_FOLDER / ".cgd-bench-manifest.json"

_ENTRY_TEMPLATE = '''"""CGD (CLIP-Guided backdoor Defense, Xu et al., ACM MM 2025) as a BackdoorBench defense.

Written by `cgd-bench backdoorbench install` (cgd-bench {version}); `cgd-bench backdoorbench uninstall`
removes it. Usage, from the BackdoorBench root:
    python defense/cgd.py --result_file <record folder name> [--yaml_path {config}/<dataset>.yaml]
Settings: {config}/<dataset>.yaml. Output: record/<name>/defense/cgd/.
"""
import sys
from pathlib import Path

try:
    from cgd_defense.backdoorbench.entry_point import main
except ImportError as exc:
    sys.exit(f"defense/cgd.py needs the cgd-bench package in this Python environment ({{exc}}); "
             "install it with: {install_hint}")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], bb_root=Path(__file__).resolve().parent.parent))
'''

_CONFIG_TEMPLATE = """# CGD on BackdoorBench {dataset} records; written by `cgd-bench backdoorbench install`.
# CGD's own parameters come from cgd-bench's registry (`cgd-bench defenses show cgd --preset paper`);
# put changes under `params`. Relative paths are relative to the BackdoorBench root.
preset: paper        # cgd-bench preset: schedules of CGD's training stages
seed: 0
clip: null           # CLIP weights, e.g. ViT-B-32:/path/to/open_clip_model.bin; null: cgd-bench's default
data_root: null      # clean {dataset} data; null: the record's data_path (./data/{dataset})
device: null         # cpu | cuda | cuda:N; null: cuda when available
cache_dir: null      # null: $CGD_CACHE_DIR, else $XDG_CACHE_HOME/cgd-bench, else ~/.cache/cgd-bench
trust_record: false  # true unpickles records without the allow-list: only for records you trust
params: {{}}
"""


@dataclass
class InstallReport:
    bb_root: Path
    written: list[str]
    unchanged: list[str]

    def summary(self) -> str:
        lines = [f"installed CGD into {self.bb_root}"]
        lines += [f"  wrote     {f}" for f in self.written] + [f"  unchanged {f}" for f in self.unchanged]
        lines.append("run it there: python defense/cgd.py --result_file <record folder name>")
        return "\n".join(lines)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def planned_files() -> dict[str, bytes]:
    """Relative path (POSIX) -> content of every file `install` writes, manifest excluded."""
    hint = f"pip install -e {PROJECT_ROOT}" if (PROJECT_ROOT / "pyproject.toml").is_file() else "pip install cgd-bench"
    files = {ENTRY_FILE.as_posix(): _ENTRY_TEMPLATE.format(version=package_versions()["cgd-bench"],
                                                           config=CONFIG_FOLDER.as_posix(), install_hint=hint)}
    for dataset in DATASET_FROM_BB:
        files[(CONFIG_FOLDER / f"{dataset}.yaml").as_posix()] = _CONFIG_TEMPLATE.format(dataset=dataset)
    return {path: text.encode() for path, text in files.items()}


def _checkout(bb_root: str | os.PathLike) -> Path:
    root = Path(bb_root).expanduser().resolve()
    if not (root / "defense").is_dir() or not (root / "config" / "defense").is_dir():
        raise CGDError(f"{root}: does not look like a BackdoorBench checkout (expected its defense/ and "
                       f"config/defense/ folders)")
    return root


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("tool") != "cgd-bench" or not isinstance(manifest.get("files"), dict):
            raise ValueError("not a cgd-bench manifest")
        return manifest
    except (ValueError, json.JSONDecodeError) as exc:
        raise CGDError(f"{path}: unreadable install manifest ({exc}); remove the files by hand") from None


def install(bb_root: str | os.PathLike) -> InstallReport:
    root = _checkout(bb_root)
    manifest = _read_manifest(root) or {"files": {}, "created_dirs": []}
    files = planned_files()
    conflicts, written, unchanged = [], [], []
    manifest_path = root / MANIFEST_FILE
    for rel, content in files.items():
        target = root / rel
        if not target.exists():
            continue
        current = _sha256(target.read_bytes()) if target.is_file() else None
        if current == _sha256(content):
            unchanged.append(rel)
        elif current is None or manifest["files"].get(rel) != current:
            conflicts.append(rel)
    if conflicts:
        raise CGDError(f"{root}: refusing to overwrite {', '.join(conflicts)}: not written by cgd-bench, or changed "
                       f"since; move them away first")
    created = list(manifest.get("created_dirs", []))
    for rel in list(files) + [MANIFEST_FILE.as_posix()]:
        missing = []
        parent = (root / rel).parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder.relative_to(root).as_posix())
    for rel, content in files.items():
        if rel not in unchanged:
            atomic_write_bytes(root / rel, content)
            written.append(rel)
    record = {"tool": "cgd-bench", "version": package_versions()["cgd-bench"],
              "files": {rel: _sha256(content) for rel, content in files.items()}, "created_dirs": created}
    atomic_write_bytes(manifest_path, (json.dumps(record, indent=2) + "\n").encode())
    return InstallReport(root, written, unchanged)


def uninstall(bb_root: str | os.PathLike) -> list[str]:
    """Remove what `install` wrote (files unchanged since) and the folders it created; returns the
    removed paths. Refuses, naming them, if any of its files was changed."""
    root = _checkout(bb_root)
    manifest = _read_manifest(root)
    if manifest is None:
        raise CGDError(f"{root}: no cgd-bench installation found ({MANIFEST_FILE} is missing)")
    changed = [rel for rel, sha in manifest["files"].items()
               if (root / rel).exists() and (not (root / rel).is_file() or _sha256((root / rel).read_bytes()) != sha)]
    if changed:
        raise CGDError(f"{root}: {', '.join(changed)} changed since cgd-bench installed them; not removing anything "
                       f"(restore or delete them by hand)")
    removed = []
    for rel in list(manifest["files"]) + [MANIFEST_FILE.as_posix()]:
        if (root / rel).is_file():
            (root / rel).unlink()
            removed.append(rel)
    for rel in sorted(manifest.get("created_dirs", []), key=lambda p: p.count("/"), reverse=True):
        folder = root / rel
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            removed.append(rel + "/")
    return removed
