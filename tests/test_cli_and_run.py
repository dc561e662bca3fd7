"""End to end: the smoke preset through the CLI, and the one-line errors for bad input."""
import json
import logging
import os
import subprocess
import sys

import pytest

from cgd_defense.config import PROJECT_ROOT
from cgd_defense.harness.stages import run_log, timed_stage


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cgd_defense.cli", *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env={**os.environ, "CGD_PROGRESS": "0", **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(mini_root, session_cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "badnets-none"
    proc = cli("run", "--attack", "badnets", "--defense", "none", "--dataset", "cifar10", "--preset", "smoke",
               "--out", str(out), "--cache-dir", str(session_cache_dir), env={"CGD_DATA_ROOT": str(mini_root)})
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_smoke_run_writes_complete_result(smoke_run):
    out, proc = smoke_run
    result = json.loads((out / "result.json").read_text())
    for key in ("clean_acc", "asr", "ra", "der", "stage_times", "config", "seed", "versions", "git_commit"):
        assert key in result
    assert result["asr"] > 0.5, "the smoke preset must learn the BadNets backdoor"
    assert result["clean_acc"] > 0.25  # well above chance after a few seconds of training
    assert result["der"] == 0.5  # no defense: nothing changes
    assert result["data"]["n_poisoned_train"] == pytest.approx(0.1 * result["data"]["n_victim_pool"], rel=0.1)
    assert result["stage_times"]["backdoor_training"] > 0
    assert "ASR" in proc.stdout


def test_second_run_reuses_cached_stages(smoke_run, mini_root, session_cache_dir, tmp_path):
    proc = cli("run", "--attack", "badnets", "--data-root", str(mini_root), "--preset", "smoke",
               "--out", str(tmp_path / "again"), "--cache-dir", str(session_cache_dir))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "again" / "result.json").read_text())
    first = json.loads((smoke_run[0] / "result.json").read_text())
    assert not any(m.startswith(("poisoned", "backdoored")) for m in result["cache"]["misses"])
    assert result["clean_acc"] == first["clean_acc"] and result["asr"] == first["asr"]


def test_the_commit_recorded_is_the_one_the_run_started_from(smoke_run, mini_root, session_cache_dir, tmp_path,
                                                            monkeypatch):
    from cgd_defense.harness import pipeline

    commits = iter(["commit-at-start", "commit-after-an-edit"])
    monkeypatch.setattr(pipeline, "git_commit", lambda: next(commits))
    cfg = pipeline.RunConfig(attack="badnets", data_root=str(mini_root), preset="smoke",
                             cache_dir=str(session_cache_dir))
    assert pipeline.run(cfg, tmp_path / "out")["git_commit"] == "commit-at-start"


@pytest.mark.parametrize("args,message", [
    (["run", "--attack", "badnetz", "--out", "X"], "unknown attack 'badnetz'. Did you mean 'badnets'?"),
    (["run", "--defense", "nope", "--out", "X"], "unknown defense 'nope'"),
    (["run", "--preset", "huge", "--out", "X"], "unknown preset 'huge'"),
    (["run", "--dataset", "mnist", "--out", "X"], "unknown dataset 'mnist'"),
    (["run", "--out", "X", "--data-root", "/nonexistent/dir"], "no CIFAR-10 data found under /nonexistent/dir"),
    (["run", "--attack-opt", "poisoning.ratio=2", "--out", "X"], "poisoning.ratio"),
])
def test_bad_input_gives_one_line_and_nonzero_exit_and_no_output(args, message, tmp_path, session_cache_dir):
    args = [a if a != "X" else str(tmp_path / "out") for a in args]
    proc = cli(*args, "--cache-dir", str(session_cache_dir), env={"CGD_DATA_ROOT": str(tmp_path / "none")})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_data_root_everywhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CGD_DATA_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "cgd_defense.cli", "run", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
    assert proc.returncode == 2 and "pass --data-root DIR or set CGD_DATA_ROOT" in proc.stderr


def test_lists(tmp_path):
    proc = cli("attacks", "list")
    assert proc.returncode == 0 and "badnets" in proc.stdout and "dirty-label" in proc.stdout
    proc = cli("defenses", "list")
    assert proc.returncode == 0 and "none" in proc.stdout
    proc = cli("attacks", "list", "b*", "--exclude", "blend*")
    assert proc.stdout.split() [0] == "badnets" and "blended" not in proc.stdout


def test_stages_are_timed_summed_when_they_recur_and_logged_to_the_run_log(tmp_path):
    times: dict[str, float] = {}
    path = tmp_path / "job" / "run.log"
    path.parent.mkdir()
    path.write_text("a line of an earlier attempt\n")
    with run_log(path):
        for _ in range(2):
            with timed_stage(times, "split", label="defense.split"):
                pass
        with pytest.raises(RuntimeError), timed_stage(times, "evaluate"):
            raise RuntimeError("boom")
    logging.getLogger("cgd_defense.stages").info("after the block")
    messages = [line.split(" ", 2)[2] for line in path.read_text().splitlines()]  # after the date and time
    assert [m.rsplit(" ", 2)[0] if " in " in m or " after " in m else m for m in messages] == [
        "defense.split: started", "defense.split: done in", "defense.split: started", "defense.split: done in",
        "evaluate: started", "evaluate: failed after"]
    assert set(times) == {"split", "evaluate"} and all(t >= 0 for t in times.values())
    assert logging.getLogger("cgd_defense").level == logging.NOTSET  # the package logger is as it was
