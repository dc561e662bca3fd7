"""Grid files: schema, expansion order, refused combinations, unregistered names, job keys, and the
shipped grids (no training here)."""
import textwrap

import pytest

from cgd_defense.config import ConfigError
from cgd_defense.leaderboard.db import ResultsDB
from cgd_defense.leaderboard.grid import GridError, list_grids, load_grid, load_plan
from cgd_defense.leaderboard.runner import _Scheduler, run_grid
from cgd_defense.registry import get_attack, is_attack, is_defense

# Every attack and defense the issues name: what the quick and cpu grids must list.
ISSUE_ATTACKS = {"clean", "badnets", "blended", "sig", "wanet", "cleanimage", "adaptive-blend", "badnets-all2all",
                 "lc", "inputaware", "lf", "ssba", "trojannn", "narcissus"}
ISSUE_DEFENSES = {"none", "cgd", "abl", "dbd", "asd", "fp", "nad", "anp", "ibau"}


def write_grid(tmp_path, body: str, name: str = "g"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


BASE = """
preset: smoke
datasets: [cifar10]
attacks: [clean, badnets]
"""


def test_expansion_order_groups_one_attack_and_seed_and_labels_options(tmp_path):
    path = write_grid(tmp_path, """
        preset: smoke
        datasets: [cifar10]
        seeds: [0, 1]
        attacks: [clean, badnets]
        defenses:
          - none
          - {name: fp, options: {clean_source: [oracle, random]}}
    """)
    plan = load_plan(path)
    assert plan.spec.name == "g"  # from the file stem
    order = [(j.seed, j.attack, j.defense_label) for j in plan.jobs]
    assert order[:3] == [(0, "clean", "none"), (0, "clean", "fp[clean_source=oracle]"),
                         (0, "clean", "fp[clean_source=random]")]
    assert [o[:2] for o in order] == [(s, a) for s in (0, 1) for a in ("clean", "badnets") for _ in range(3)]
    assert [j.position for j in plan.jobs] == list(range(12))
    fp = plan.jobs[1]
    assert fp.defense_params == {"clean_source": "oracle"} and fp.clip is None
    assert fp.resolved["defense_params"]["clean_source"] == "oracle"
    assert fp.resolved["clip"] == "standin:cifar10"  # a clean-subset defense runs with the default stand-in
    assert plan.jobs[0].resolved["clip"] is None  # `none` is model-only


def test_job_key_is_the_resolved_configuration(tmp_path):
    a = load_plan(write_grid(tmp_path, BASE + "defenses: [none, {name: fp, params: {fraction: 0.05}}]\n", "a"))
    b = load_plan(write_grid(tmp_path, BASE + "defenses: [none, {name: fp, params: {fraction: 0.1}}]\n", "b"))
    c = load_plan(write_grid(tmp_path, BASE + "defenses: [none, fp]\n", "c"))
    assert [j.key for j in a.jobs] == [j.key for j in load_plan(tmp_path / "a.yaml").jobs]  # stable
    assert a.jobs[0].key == b.jobs[0].key  # `none` jobs identical across grids: run once, shared
    assert a.jobs[1].key != b.jobs[1].key  # a different parameter is a different job
    assert a.jobs[1].key == c.jobs[1].key  # fraction 0.05 is fp's default: the same resolved job
    assert a.jobs[1].run_config(data_root="/x").data_root == "/x"  # where the data lives is not identity


def test_only_jobs_that_load_a_stand_in_are_keyed_on_its_recipe(tmp_path, monkeypatch):
    """A change of the stand-in recipe re-keys exactly the jobs that load the stand-in (CGD, and
    clean-data defenses fed CGD's split), and no job of a real CLIP or of a defense without CLIP."""
    from cgd_defense.clip import standin

    body = BASE + "defenses: [none, abl, cgd, {name: fp, options: {clean_source: [oracle, cgd]}}]\n"
    before = load_plan(write_grid(tmp_path, body, "a"))
    real = load_plan(write_grid(tmp_path, body + "clips: ['ViT-B-32:/w.bin']\n", "real"))
    longer = standin.StandinRecipe(train=standin.StandinRecipe().train.model_copy(update={"epochs": 99}))
    monkeypatch.setattr(standin, "recipe_for", lambda n: longer)
    after = load_plan(write_grid(tmp_path, body, "b"))
    real_after = load_plan(write_grid(tmp_path, body + "clips: ['ViT-B-32:/w.bin']\n", "real2"))
    rekeyed = {j.defense_label for j, k in zip(after.jobs, before.jobs) if j.key != k.key}
    assert rekeyed == {"cgd", "fp[clean_source=cgd]"}
    assert [j.key for j in real.jobs] == [j.key for j in real_after.jobs]
    assert all("standin_recipe" not in j.resolved for j in real.jobs)


@pytest.mark.parametrize("body,message", [
    ("preset: smoke\ndatasets: [cifar10]\nattacks: [clean]\ndefenses: [none]\nbogus: 1\n", "unknown field 'bogus'"),
    ("preset: smoke\ndatasets: [cifar10]\nattacks: [clean]\ndefenses: [{name: fp, options: {fraction: []}}]\n",
     "option(s) fraction list no value"),
    ("preset: smoke\ndatasets: [cifar10]\nattacks: [clean]\ndefenses: [none]\nexclude: [{reason: x}]\n",
     "an exclusion must name at least one"),
    ("preset: smoke\ndatasets: [cifar10]\nattacks: []\ndefenses: [none]\n", "attacks"),
])
def test_schema_errors_name_the_file_and_field(tmp_path, body, message):
    with pytest.raises(ConfigError) as exc:
        load_grid(write_grid(tmp_path, body))
    assert message in str(exc.value) and "g.yaml" in str(exc.value)


@pytest.mark.parametrize("body,message", [
    ("preset: smoke\ndatasets: [cifar10]\nattacks: [badnets]\ndefenses: [none]\n", "no-attack case"),
    (BASE + "defenses: [{name: none, params: {clean_source: cgd}}]\n", "unknown field 'clean_source'"),
    (BASE + "defenses: [{name: none, clips: ['standin:cifar10']}]\n", "is model-only"),
    (BASE + "defenses: [fp]\nclips: ['standin:gtsrb']\n", "stand-in of another dataset"),
    ("preset: smoke\ndatasets: [cifar10]\nattacks: [clean, {name: badnets, label: b12, overrides: "
     "{poisoning.target: 12}}]\ndefenses: [none]\n", "targets class 12, but cifar10 has 10 classes"),
    (BASE + "defenses: [none]\nexclude: [{attack: blendd}]\n", "matches no job"),
    ("preset: tiny\ndatasets: [cifar10]\nattacks: [clean]\ndefenses: [none]\n", "unknown preset 'tiny'"),
    ("preset: smoke\ndatasets: [mnist]\nattacks: [clean]\ndefenses: [none]\n", "unknown dataset 'mnist'"),
])
def test_refused_combinations_say_why(tmp_path, body, message):
    with pytest.raises(GridError) as exc:
        load_plan(write_grid(tmp_path, body))
    assert message in str(exc.value)


def test_refusal_lifted_by_an_explicit_exclusion(tmp_path):
    plan = load_plan(write_grid(tmp_path, BASE + """
        defenses: [none, {name: fp, params: {fraction: 0.05}}]
        clips: ['standin:{dataset}', 'standin:{dataset}:weak-{attack}']
        exclude: [{attack: clean, clip: '*weak-clean', reason: no trigger}]
    """.replace("        ", "")))
    rows = [(j.attack, j.defense, j.resolved["clip"]) for j in plan.jobs]
    # the grid-wide CLIP axis skips the model-only `none`; {dataset}/{attack} are filled per job
    assert rows == [("clean", "none", None), ("clean", "fp", "standin:cifar10"),
                    ("badnets", "none", None), ("badnets", "fp", "standin:cifar10"),
                    ("badnets", "fp", "standin:cifar10:weak-badnets")]


def test_model_only_jobs_share_the_data_split_of_the_grids_clip(tmp_path):
    real = load_plan(write_grid(tmp_path, BASE + "defenses: [none, fp]\nclips: ['ViT-B-32:/w.bin']\n", "real"))
    stand_in = load_plan(write_grid(tmp_path, BASE + "defenses: [none, fp]\n", "standin"))
    # with a real CLIP no public split is held out, for `none` as for the CLIP-guided jobs
    assert {j.resolved["public_holdout"] for j in real.jobs} == {False}
    assert {j.resolved["public_holdout"] for j in stand_in.jobs} == {True}
    assert real.jobs[0].stage_group == real.jobs[1].stage_group and real.jobs[0].resolved["clip"] is None


def test_unregistered_names_are_listed_and_skipped_only_on_request(tmp_path):
    plan = load_plan(write_grid(tmp_path, BASE + "defenses: [none, notyet-defense]\n"))
    assert plan.unregistered_names == ["defense 'notyet-defense'"]
    assert [j.defense for j in plan.runnable] == ["none", "none"]
    db = ResultsDB(tmp_path / "r.sqlite")
    with pytest.raises(GridError) as exc:
        run_grid(plan, db)
    assert "not registered: defense 'notyet-defense'" in str(exc.value) and "--skip-unregistered" in str(exc.value)
    assert db.grids() == []  # refused before anything was recorded


def test_scheduler_runs_each_groups_first_job_alone(tmp_path):
    plan = load_plan(write_grid(tmp_path, BASE + "defenses: [none, fp]\n"))
    sched = _Scheduler(plan.jobs)  # groups: clean (2 jobs), badnets (2 jobs)
    first, second = sched.next(), sched.next()
    assert (first.attack, second.attack) == ("clean", "badnets")  # the two leaders
    assert sched.next() is None  # followers wait for their leader's cached stages
    sched.finished(second)
    follower = sched.next()
    assert (follower.attack, follower.defense) == ("badnets", "fp")
    assert sched.next() is None
    sched.finished(first)
    assert sched.next().attack == "clean" and sched.next() is None and not sched.queue


def test_shipped_grids_validate_and_wait_only_for_names_the_issues_announce():
    assert {"smoke", "quick", "cpu", "paper", "ablation-weak-clip", "ablation-backdoored-clip"} <= set(list_grids())
    for name in list_grids():
        plan = load_plan(name)  # raises on any refused combination
        assert any(j.attack == "clean" for j in plan.jobs), name
        for missing in plan.unregistered_names:
            kind, quoted = missing.split(" ", 1)
            assert quoted.strip("'") in (ISSUE_ATTACKS if kind == "attack" else ISSUE_DEFENSES), missing
    for name in ("quick", "cpu"):
        spec, _ = load_grid(name)
        assert {a.name for a in spec.attacks} == ISSUE_ATTACKS
        assert {d.name for d in spec.defenses} == ISSUE_DEFENSES
        sources = {d.name: d.options.get("clean_source") for d in spec.defenses if d.options}
        assert sources == {n: ["oracle", "cgd", "random"] for n in ("fp", "nad", "anp", "ibau")}
        assert {d.params.get("variant") for d in spec.defenses if d.name == "cgd"} == {None, "reference"}
    families = {get_attack(a).family for a in ISSUE_ATTACKS if is_attack(a)}
    assert "no-attack" in families and is_defense("none")
