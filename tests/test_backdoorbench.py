"""BackdoorBench plugin: records built from our own smoke run in the documented layouts (main-branch
relative paths, absolute paths from another machine, numpy-1 pickles, v1 inline), round trips,
defense output, index files, and refusal of malicious or incomplete records."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cgd_defense.backdoorbench import (UnsafeRecordError, defend_record, export_run, load_pickled, read_record,
                                       write_index_file)
from cgd_defense.backdoorbench.defend import clean_indices
from cgd_defense.backdoorbench.entry_point import main as entry_main
from cgd_defense.backdoorbench.export import _pool
from cgd_defense.config import PROJECT_ROOT
from cgd_defense.defenses.base import Split
from cgd_defense.errors import CGDError
from cgd_defense.harness.cache import Cache
from cgd_defense.harness.pipeline import RunConfig, backdoored_model, prepare_data, run
from cgd_defense.harness.presets import get_preset
from cgd_defense.models import create_model
from cgd_defense.registry import create_attack


@pytest.fixture(scope="module")
def smoke(mini_root, session_cache_dir, tmp_path_factory):
    """A smoke BadNets run (shared with the CLI test through the session cache), its exported
    record, and the run's own data and model to compare against."""
    cfg = RunConfig(attack="badnets", defense="none", dataset="cifar10", data_root=str(mini_root), preset="smoke",
                    cache_dir=str(session_cache_dir))
    base = tmp_path_factory.mktemp("bb")
    run(cfg, base / "run")
    report = export_run(base / "run", base / "badnets_smoke")
    cache = Cache(session_cache_dir)
    data = prepare_data(cfg, get_preset("smoke"), create_attack("badnets"), cache)
    model, _ = backdoored_model(cfg, get_preset("smoke"), data, cache)
    return {"record": base / "badnets_smoke", "report": report, "data": data, "model": model, "base": base,
            "cache": cache}


def _raw(record: Path) -> dict:
    return load_pickled(record / "attack_result.pt")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "defense", ignore_errors=True)
    return dst


def _logits(model, images):
    with torch.no_grad():
        return model.float().eval()(images)


def _assert_same_as_run(record, smoke):
    pool, positions = _pool(smoke["data"])
    assert torch.equal(record.train_indices, positions)
    for field in ("images", "labels", "original_labels", "poison_mask", "cross_mask"):
        assert torch.equal(getattr(record.train, field), getattr(pool, field)), field
    triggered = smoke["data"].triggered
    assert torch.equal(record.triggered.images, triggered.images)
    assert torch.equal(record.triggered.attack_labels, triggered.attack_labels)
    assert torch.equal(record.triggered.true_labels, triggered.true_labels)
    probe = torch.cat([record.test.images[:64], triggered.images[:64]])
    assert torch.equal(_logits(record.model, probe), _logits(smoke["model"], probe))


# ------------------------------------------------------------------------------------------ formats


def test_export_writes_main_branch_layout(smoke):
    rec = smoke["record"]
    raw = _raw(rec)
    for key in ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test"):
        assert key in raw
    assert raw["data_path"] == "./data/cifar10" and raw["img_size"] == (32, 32, 3) and raw["clean_data"] == "cifar10"
    state = raw["bd_train"]
    assert state["original_index_array"].dtype == np.int64 and state["poison_indicator"].dtype == np.float64
    assert len(state["poison_indicator"]) == 5000  # indexed into the full training split
    entries = state["bd_data_container"]["data_dict"]
    assert len(entries) == int(state["poison_indicator"].sum()) == smoke["report"].n_modified > 0
    pos, entry = next(iter(entries.items()))
    bd, orig = entry["other_info"]
    assert entry["path"] == f"./record/badnets_smoke/bd_train_dataset/{orig}/{pos}.png"
    assert (rec / "bd_train_dataset" / str(orig) / f"{pos}.png").is_file()
    assert bd == 0 != orig  # BadNets: target 0, poisons drawn from the other classes
    # key order kept: BackdoorBench's loader renames keys by position
    assert list(raw["model"]) == list(smoke["model"].net.state_dict())
    info = load_pickled(rec / "info.pickle")
    assert info["attack"] == "badnets" and info["attack_target"] == 0 and info["pratio"] == 0.1


def test_round_trip_export_import(smoke):
    record = read_record(smoke["record"], cache=smoke["cache"])
    assert record.format == "v2" and record.attack == "badnets" and record.target == 0
    assert record.arch == "fastnet_small"
    _assert_same_as_run(record, smoke)
    assert "badnets" in record.summary() and "fastnet_small" in record.summary()


def test_absolute_paths_from_another_machine_and_numpy1_pickles(smoke, tmp_path, mini_root):
    """A v2-branch style record: absolute paths of the machine that wrote it, numpy.int64 keys,
    numpy 1.x global names; moved into a checkout whose data/cifar10 is our dataset."""
    bb = tmp_path / "BackdoorBench"
    rec = _copy(smoke["record"], bb / "record" / "badnets_smoke")
    (bb / "data").mkdir()
    (bb / "data" / "cifar10").symlink_to(mini_root)
    raw = _raw(rec)
    foreign = "/home/someone/BackdoorBench/record/badnets_smoke"
    raw["data_path"] = "/home/someone/BackdoorBench/data/cifar10"
    for split, folder in (("bd_train", "bd_train_dataset"), ("bd_test", "bd_test_dataset")):
        state = raw[split]
        container = state["bd_data_container"]
        container["save_folder_path"] = state["save_folder_path"] = f"{foreign}/{folder}"
        container["data_dict"] = {np.int64(k): {**v, "path": v["path"].replace("./record/badnets_smoke", foreign)}
                                  for k, v in container["data_dict"].items()}
    raw["cgd_bench"]["data_root"] = "/home/someone/elsewhere"
    torch.save(raw, rec / "attack_result.pt")
    _rename_numpy_globals(rec / "attack_result.pt")
    with zipfile.ZipFile(rec / "attack_result.pt") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray" in pkl and b"numpy._core" not in pkl

    record = read_record(rec, cache=smoke["cache"])
    assert record.data_root == (bb / "data" / "cifar10").resolve()  # rebuilt from the record folder
    _assert_same_as_run(record, smoke)


def _rename_numpy_globals(path: Path) -> None:
    """Rewrite a torch file as numpy 1.x would have pickled it (numpy.core instead of numpy._core)."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    tmp.replace(path)


def test_v1_record_with_inline_images(smoke, tmp_path):
    """v1: poisoned images as PIL images inside attack_result.pt, bd_train over the whole training split."""
    raw = _raw(smoke["record"])
    pool, positions = _pool(smoke["data"])
    modified = torch.nonzero(pool.modified_mask).flatten()
    pil = lambda img: Image.fromarray(img.permute(1, 2, 0).numpy())  # noqa: E731
    triggered = smoke["data"].triggered
    test_positions = smoke["data"].test_indices[triggered.indices]
    v1 = {k: raw[k] for k in ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data",
                              "cgd_bench")}
    v1["bd_train"] = {"x": [pil(pool.images[i]) for i in modified], "y": pool.labels[modified].numpy(),
                      "original_index": positions[modified].numpy()}
    v1["bd_test"] = {"x": [pil(img) for img in triggered.images], "y": triggered.attack_labels.numpy(),
                     "original_index": test_positions.numpy(), "original_targets": triggered.true_labels.numpy()}
    rec = tmp_path / "v1_record"
    rec.mkdir()
    torch.save(v1, rec / "attack_result.pt")
    shutil.copy(smoke["record"] / "info.pickle", rec / "info.pickle")

    record = read_record(rec, cache=smoke["cache"])
    assert record.format == "v1" and len(record.train) == 5000  # v1 bd_train is the whole training split
    sub = record.train.subset(positions)
    for field in ("images", "labels", "original_labels", "poison_mask", "cross_mask"):
        assert torch.equal(getattr(sub, field), getattr(pool, field)), field
    assert int(record.train.modified_mask.sum()) == len(modified)
    assert torch.equal(record.triggered.images, triggered.images)
    assert torch.equal(record.triggered.true_labels, triggered.true_labels)


def _edited(smoke, tmp_path, name: str, edit) -> Path:
    rec = _copy(smoke["record"], tmp_path / name)
    raw = _raw(rec)
    edit(raw, rec)
    torch.save(raw, rec / "attack_result.pt")
    return rec


def _store_clean_samples_as_poisoned(smoke, raw, rec, n=5) -> list[int]:
    """Stores n clean samples as poisoned with their original label (WaNet's cross samples)."""
    pool, positions = _pool(smoke["data"])
    state = raw["bd_train"]
    chosen = torch.nonzero(~pool.modified_mask).flatten()[:n].tolist()
    for i in chosen:
        pos, label = int(positions[i]), int(pool.labels[i])
        rel = f"bd_train_dataset/{label}/{pos}.png"
        (rec / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(pool.images[i].permute(1, 2, 0).numpy()).save(rec / rel)
        state["bd_data_container"]["data_dict"][pos] = {"path": f"./record/{rec.name}/{rel}",
                                                        "other_info": [label, label]}
        state["poison_indicator"][pos] = 1.0
    return [int(positions[i]) for i in chosen]


@pytest.mark.parametrize("attack,is_cross", [("wanet", True), ("sig", False)])
def test_cross_samples_split_by_label_only_for_wanet_like_attacks(smoke, tmp_path, attack, is_cross):
    added = []

    def edit(raw, rec):
        added.extend(_store_clean_samples_as_poisoned(smoke, raw, rec))
        info = load_pickled(rec / "info.pickle")
        info["attack"] = attack
        torch.save(info, rec / "info.pickle")

    rec = _edited(smoke, tmp_path, f"{attack}_like", edit)
    record = read_record(rec, cache=smoke["cache"])
    where = torch.isin(record.train_indices, torch.as_tensor(added))
    assert int(where.sum()) == len(added) == 5
    assert bool(record.train.cross_mask[where].all()) is is_cross
    assert bool(record.train.poison_mask[where].any()) is not is_cross
    # the label-changed backdoor samples are poisons either way; clean-label attacks' kept-label ones too
    n_backdoor = int(_pool(smoke["data"])[0].poison_mask.sum())
    assert int(record.train.poison_mask.sum()) == n_backdoor + (0 if is_cross else 5)


# ------------------------------------------------------------------------------------------ refusals


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload,global_name", [(_RunsShell, "system"), (_RunsExec, "builtins.exec")])
def test_malicious_attack_result_is_refused_without_running(smoke, tmp_path, payload, global_name):
    marker = tmp_path / "pwned"
    rec = _edited(smoke, tmp_path, "evil", lambda raw, rec: raw.update(model_name=payload(marker)))
    with pytest.raises(UnsafeRecordError, match=global_name):
        read_record(rec, cache=smoke["cache"])
    assert not marker.exists()


@pytest.mark.parametrize("write", ["zip", "legacy", "plain"])
def test_every_file_format_loads_genuine_content_and_refuses_code(tmp_path, write):
    """torch.save (zip), torch.save legacy (pre-1.6) and plain pickle: numpy arrays, numpy.int64
    keys, tuples load; a payload that runs code is refused and never runs."""
    def save(obj, path):
        if write == "zip":
            torch.save(obj, path)
        elif write == "legacy":
            torch.save(obj, path, _use_new_zipfile_serialization=False)
        else:
            path.write_bytes(pickle.dumps(obj, protocol=2))

    genuine = {"original_index_array": np.arange(4, dtype=np.int64), "poison_indicator": np.zeros(4),
               "data_dict": {np.int64(2): {"path": "./record/x/bd_train_dataset/1/2.png", "other_info": [0, 1]}},
               "img_size": (32, 32, 3)}
    save(genuine, tmp_path / "genuine")
    loaded = load_pickled(tmp_path / "genuine")
    assert loaded["original_index_array"].tolist() == [0, 1, 2, 3] and loaded["img_size"] == (32, 32, 3)
    assert loaded["data_dict"][2]["other_info"] == [0, 1]
    marker = tmp_path / "pwned"
    save({"attack": _RunsShell(marker)}, tmp_path / "evil")
    with pytest.raises(UnsafeRecordError, match="system"):
        load_pickled(tmp_path / "evil")
    assert not marker.exists()


def test_malicious_plain_pickle_info_is_refused_without_running(smoke, tmp_path):
    marker = tmp_path / "pwned"
    rec = _copy(smoke["record"], tmp_path / "evil_info")
    (rec / "info.pickle").write_bytes(pickle.dumps({"attack": _RunsShell(marker)}, protocol=2))
    with pytest.raises(UnsafeRecordError, match=r"posix\.system|os\.system"):
        read_record(rec, cache=smoke["cache"])
    assert not marker.exists()


def test_unlisted_harmless_global_needs_trust(smoke, tmp_path):
    def edit(raw, rec):
        info = load_pickled(rec / "info.pickle")
        info["lr"] = Fraction(1, 100)
        torch.save(info, rec / "info.pickle")

    rec = _edited(smoke, tmp_path, "fraction", edit)
    with pytest.raises(UnsafeRecordError, match="fractions.Fraction.*--trust-record"):
        read_record(rec, cache=smoke["cache"])
    assert read_record(rec, trust=True, cache=smoke["cache"]).info["lr"] == Fraction(1, 100)


@pytest.mark.parametrize("edit,message", [
    (lambda raw, rec: raw.pop("bd_test"), "missing key(s) bd_test"),
    (lambda raw, rec: raw["bd_train"].pop("original_index_array"), "missing key(s) bd_train.original_index_array"),
    (lambda raw, rec: raw["bd_train"]["bd_data_container"]["data_dict"].pop(
        next(iter(raw["bd_train"]["bd_data_container"]["data_dict"]))), "has no entry for it"),
])
def test_incomplete_record_names_what_is_missing(smoke, tmp_path, edit, message):
    rec = _edited(smoke, tmp_path, "incomplete", edit)
    with pytest.raises(CGDError) as err:
        read_record(rec, cache=smoke["cache"])
    assert message in str(err.value)


def test_missing_png_is_named(smoke, tmp_path):
    rec = _copy(smoke["record"], tmp_path / "no_png")
    png = sorted((rec / "bd_train_dataset").rglob("*.png"))[3]
    png.unlink()
    with pytest.raises(CGDError, match=f"missing PNG for bd_train index {png.stem}: {png}"):
        read_record(rec, cache=smoke["cache"])


def test_wrong_clean_data_order_is_caught_by_original_labels(smoke, tmp_path):
    def edit(raw, rec):
        entries = raw["bd_test"]["bd_data_container"]["data_dict"]
        first = next(iter(entries))
        bd, orig = entries[first]["other_info"]
        entries[first]["other_info"] = [bd, (orig + 1) % 10]
        raw.pop("cgd_bench")  # a genuine record: only the labels can tell

    rec = _edited(smoke, tmp_path, "bad_order", edit)
    with pytest.raises(CGDError, match="original label that differs from the clean data"):
        read_record(rec, data_root=_data_root(smoke), cache=smoke["cache"])


def _data_root(smoke) -> str:
    return _raw(smoke["record"])["cgd_bench"]["data_root"]


def test_genuine_preactresnet18_record_maps_to_our_model_with_backdoorbench_normalisation(smoke, tmp_path):
    reference = create_model("preactresnet18", 10)

    def edit(raw, rec):
        raw.pop("cgd_bench")
        raw["model_name"] = "preactresnet18"
        raw["model"] = {f"module.{k}": v for k, v in reference.state_dict().items()}  # DataParallel prefix

    rec = _edited(smoke, tmp_path, "preact", edit)
    record = read_record(rec, data_root=_data_root(smoke), cache=smoke["cache"])
    assert record.arch == "preactresnet18" and len(record.model.net.state_dict()) == 102
    assert torch.allclose(record.model.std.flatten(), torch.tensor([0.247, 0.243, 0.261]))
    for key, value in reference.state_dict().items():
        assert torch.equal(record.model.net.state_dict()[key], value)


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "mynet"])
def test_architecture_without_counterpart_is_named(smoke, tmp_path, name):
    def edit(raw, rec):
        raw.pop("cgd_bench")
        raw["model_name"] = name

    rec = _edited(smoke, tmp_path, name, edit)
    with pytest.raises(CGDError, match=f"model '{name}' .*no counterpart in cgd-bench's model registry.*preactresnet"):
        read_record(rec, data_root=_data_root(smoke), cache=smoke["cache"])


# ------------------------------------------------------------------------------------------ defend, split


def test_defend_writes_backdoorbench_defense_files(smoke, tmp_path):
    rec = _copy(smoke["record"], tmp_path / "defended")
    result = defend_record(rec, "none", cache_dir=str(smoke["cache"].root))
    out = rec / "defense" / "none"
    payload = torch.load(out / "defense_result.pt", weights_only=True)  # plain: no allow-list needed
    assert set(payload) == {"model_name", "num_classes", "model"}
    assert payload["model_name"] == "fastnet_small" and payload["num_classes"] == 10
    assert list(payload["model"]) == list(smoke["model"].net.state_dict())
    for key, value in smoke["model"].net.state_dict().items():
        assert torch.equal(payload["model"][key], value.cpu())
    summary = pd.read_csv(out / "none_df_summary.csv", index_col=0)
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
    last = summary.loc["last"].astype(float)
    assert last["test_acc"] == pytest.approx(result["clean_acc"]) and 0 < last["test_acc"] < 1
    assert last["test_asr"] == pytest.approx(result["asr"]) and last["test_asr"] > 0.5
    assert last["test_ra"] == pytest.approx(result["ra"])
    saved = json.loads((out / "result.json").read_text())
    assert saved["record"]["format"] == "v2" and saved["data"]["n_victim_pool"] == 4000
    assert "evaluate: done in" in (out / "run.log").read_text()
    # bd_test is the run's triggered set, so ASR matches the run's own evaluation
    run_result = json.loads((smoke["base"] / "run" / "result.json").read_text())
    assert result["asr"] == pytest.approx(run_result["asr"])


def test_installed_entry_point_defends_a_record_in_a_checkout(smoke, tmp_path, mini_root):
    bb = tmp_path / "BackdoorBench"
    _copy(smoke["record"], bb / "record" / "badnets_smoke")
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"preset: smoke\ndata_root: {mini_root}\ncache_dir: {smoke['cache'].root}\n")
    assert entry_main(["--result_file", "badnets_smoke", "--yaml_path", str(settings)], bb, defense="none") == 0
    assert (bb / "record" / "badnets_smoke" / "defense" / "none" / "defense_result.pt").is_file()
    assert entry_main(["--result_file", "nothing_here", "--yaml_path", str(settings)], bb, defense="none") == 2


def test_index_file_from_a_split(tmp_path):
    train_indices = torch.tensor([4, 9, 0, 7, 3])  # bd_train positions in the clean training set
    split = Split(clean=torch.tensor([True, False, True, True, False]),
                  suspect=torch.tensor([False, True, False, False, False]))
    path = write_index_file(clean_indices(split, train_indices), tmp_path / "cgd_index.txt")
    assert path.read_text() == "0\n4\n7\n"
    assert np.loadtxt(path, dtype=int).tolist() == [0, 4, 7]  # how BackdoorBench's choose_index reads it
    with pytest.raises(CGDError, match="at least 2"):
        write_index_file(torch.tensor([5]), tmp_path / "one.txt")


def test_cgd_split_end_to_end(smoke, tmp_path, monkeypatch):
    """CGD's split of the record's bd_train, written as an index file. The CLIP is faked (uniform
    zero-shot scores) to keep this a plumbing test; CGD's own tests cover what it finds."""
    from types import SimpleNamespace

    from cgd_defense.backdoorbench import split_record
    from cgd_defense.defenses import cgd as cgd_module

    def zero_shot_logits(clip, images, dataset, classes, templates="reference", cache=None):
        return torch.full((len(images), len(classes)), 0.25)

    monkeypatch.setattr(cgd_module, "_clip_api", lambda: SimpleNamespace(
        load_clip=lambda spec, **kw: SimpleNamespace(logit_scale=60.0, source={"label": "uniform"},
                                                     identity="uniform-weights"),
        zero_shot_logits=zero_shot_logits))
    report = split_record(smoke["record"], tmp_path / "cgd_index.txt",
                          {"variant": "reference", "suspicious_epochs": 1, "suspicious_repeats": 1},
                          preset="smoke", cache_dir=str(smoke["cache"].root))
    indices = np.loadtxt(report.path, dtype=int).tolist()
    assert len(indices) == report.n_indices > 1 and indices == sorted(set(indices))
    pool, positions = _pool(smoke["data"])
    assert set(indices) <= set(positions.tolist())  # positions in the clean training set, inside bd_train
    in_index = torch.isin(positions, torch.as_tensor(indices))
    assert report.n_modified_included == int(pool.modified_mask[in_index].sum())
    assert "--index" in report.summary()


# ------------------------------------------------------------------------------------------ CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cgd_defense.cli", *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env={**os.environ, "CGD_PROGRESS": "0"}, timeout=600)


def test_cli_import_and_refusal(smoke, tmp_path):
    proc = _cli("backdoorbench", "import", str(smoke["record"]), "--cache-dir", str(smoke["cache"].root))
    assert proc.returncode == 0, proc.stderr
    assert "attack     badnets  target 0  ratio 0.1" in proc.stdout and "400 poisoned" in proc.stdout
    marker = tmp_path / "pwned"
    rec = _edited(smoke, tmp_path, "evil_cli", lambda raw, rec: raw.update(model_name=_RunsShell(marker)))
    proc = _cli("backdoorbench", "import", str(rec))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "refusing to unpickle global" in proc.stderr and not marker.exists()
