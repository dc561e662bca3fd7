"""`cgd-bench` command line: thin noun-verb commands over the Python API; no logic lives here.

Every user-facing error (CGDError) is printed as one line on stderr with exit status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import yaml

from .config import CACHE_DIR_HELP
from .errors import CGDError, ConfigError, Terminated


def _parse_opts(opts: tuple[str, ...], what: str) -> dict:
    out = {}
    for opt in opts:
        if "=" not in opt:
            raise ConfigError(f"{what} '{opt}' must look like KEY=VALUE")
        key, value = opt.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{what} '{opt}': cannot parse the value '{value}'") from None
    return out


def _register_attack_files(files: tuple[str, ...]) -> None:
    from .registry import add_attack_config

    for f in files:
        add_attack_config(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cgd-bench")
def cli():
    """cgd-bench: CLIP-Guided backdoor Defense and its benchmark."""
    from .harness.precision import keep_freed_memory

    keep_freed_memory()  # every command's CPU work (training loops, fits, scoring) allocates per step


# ---------------------------------------------------------------------------------------------- run

@cli.command()
@click.option("--attack", default="badnets", show_default=True, help="registered attack name (see `attacks list`)")
@click.option("--defense", default="none", show_default=True, help="registered defense name (see `defenses list`)")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--data-root", type=click.Path(), default=None, help="dataset folder; default: $CGD_DATA_ROOT")
@click.option("--download", is_flag=True, help="download the dataset through torchvision if missing (online)")
@click.option("--preset", default="smoke", show_default=True, help="smoke | quick | quick-small | cpu | paper")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--clip", default=None, help="CLIP for CLIP-guided defenses, e.g. standin:cifar10 or ViT-B-32:/path/model.bin")
@click.option("--defense-opt", "defense_opts", multiple=True, metavar="KEY=VALUE", help="defense parameter (repeatable)")
@click.option("--attack-opt", "attack_opts", multiple=True, metavar="KEY=VALUE",
              help="attack override as a dotted key, e.g. poisoning.ratio=0.05 (repeatable)")
@click.option("--attack-file", "attack_files", multiple=True, type=click.Path(),
              help="register a user attack YAML file or folder (repeatable)")
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
@click.option("--cache-dir", type=click.Path(), default=None, help=CACHE_DIR_HELP)
@click.option("--out", "out_dir", type=click.Path(), default=None, help="run folder for result.json")
@click.option("--print-config", is_flag=True, help="print the fully resolved config and exit")
def run(attack, defense, dataset, data_root, download, preset, seed, clip, defense_opts, attack_opts, attack_files,
        device, cache_dir, out_dir, print_config):
    """Poison, train, defend, evaluate; write OUT/result.json."""
    from .harness.pipeline import RunConfig, run as run_job
    from .harness.presets import get_preset
    from .registry import create_attack, create_defense

    _register_attack_files(attack_files)
    cfg = RunConfig(dataset=dataset, data_root=data_root, download=download, attack=attack,
                    attack_overrides=_parse_opts(attack_opts, "--attack-opt"), defense=defense,
                    defense_params=_parse_opts(defense_opts, "--defense-opt"), preset=preset, seed=seed,
                    clip=clip, device=device, cache_dir=cache_dir)
    if print_config:
        resolved = {"run": cfg.model_dump(mode="json"),
                    "preset": get_preset(preset).model_dump(mode="json"),
                    "attack": create_attack(attack, **cfg.attack_overrides).model_dump(mode="json"),
                    "defense": {"name": defense, "params": create_defense(defense, preset=preset,
                                                                          **cfg.defense_params).get_params()}}
        click.echo(yaml.safe_dump(resolved, sort_keys=False))
        return
    if out_dir is None:
        raise ConfigError("--out DIR is required (the run folder for result.json)")
    result = run_job(cfg, out_dir)
    ca, asr, ra = result["clean_acc"], result["asr"], result["ra"]
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    click.echo(f"{attack} / {defense} [{preset}]: CA {fmt(ca)}  ASR {fmt(asr)}  RA {fmt(ra)}  "
               f"(no defense: CA {fmt(result['no_defense']['clean_acc'])}, ASR {fmt(result['no_defense']['asr'])})")
    click.echo(f"wrote {Path(out_dir) / 'result.json'}")


# ---------------------------------------------------------------------------------------------- attacks

@cli.group()
def attacks():
    """The attack library (attacks/*.yaml, registered in registry.yaml)."""


@attacks.command("list")
@click.argument("pattern", required=False, default="")
@click.option("--exclude", default="", help="fnmatch pattern of names to leave out")
@click.option("--attack-file", "attack_files", multiple=True, type=click.Path())
def attacks_list(pattern, exclude, attack_files):
    """Every attack with its family and source."""
    from .registry import get_attack, list_attacks

    _register_attack_files(attack_files)
    for name in list_attacks(pattern, exclude):
        spec = get_attack(name)
        source = spec.source.split(":")[0] if spec.source else "-"
        click.echo(f"{name:<16} {spec.family:<15} {spec.short_citation:<22} defaults: {source}")


@attacks.command("show")
@click.argument("name")
def attacks_show(name):
    """The validated definition of one attack."""
    from .registry import get_attack

    click.echo(yaml.safe_dump(get_attack(name).model_dump(mode="json"), sort_keys=False))


@attacks.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def attacks_validate(files):
    """Validate attack YAML files; one line per file."""
    from .attacks.spec import load_attack_file

    failed = 0
    for f in files:
        try:
            spec = load_attack_file(f)
            click.echo(f"ok      {f} ({spec.name}, {spec.family}, {len(spec.trigger)} component(s))")
        except CGDError as exc:
            failed += 1
            click.echo(f"invalid {exc}")
    if failed:
        sys.exit(2)


@attacks.command("preview")
@click.argument("name")
@click.option("--out", "out_dir", type=click.Path(), required=True, help="folder for preview.png and preview.json")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--data-root", type=click.Path(), default=None, help="dataset folder; default: $CGD_DATA_ROOT")
@click.option("--per-class", default=2, show_default=True, type=click.IntRange(1, 20), help="images of each class in the grid")
@click.option("--attack-opt", "attack_opts", multiple=True, metavar="KEY=VALUE", help="attack override (repeatable)")
@click.option("--attack-file", "attack_files", multiple=True, type=click.Path())
@click.option("--cache-dir", type=click.Path(), default=None, help=CACHE_DIR_HELP)
@click.option("--preset", default="smoke", show_default=True,
              help="sizes the fit of learned triggers (lc, inputaware, lf, ssba, trojannn, narcissus); cached")
def attacks_preview(name, out_dir, dataset, data_root, per_class, attack_opts, attack_files, cache_dir, preset):
    """Poison the whole training split; print the poison count, ratio and the triggers' mean
    L_inf / L_2 / SSIM distortion; write a PNG grid of clean vs triggered images and residuals."""
    from .attacks.preview import preview_attack, preview_fit_context
    from .data.datasets import load_split
    from .harness.cache import Cache
    from .harness.presets import get_preset
    from .registry import create_attack

    _register_attack_files(attack_files)
    spec = create_attack(name, **_parse_opts(attack_opts, "--attack-opt"))
    cache = Cache(cache_dir)
    train, test = (load_split(dataset, data_root, split, cache=cache) for split in (True, False))
    fit = preview_fit_context(train, get_preset(preset), cache)
    report = preview_attack(spec, train, test, out_dir, per_class=per_class, fit=fit)
    for line in report.lines():
        click.echo(line)
    click.echo(f"wrote {report.grid} and {Path(out_dir) / 'preview.json'}")


# ---------------------------------------------------------------------------------------------- defenses

@cli.group()
def defenses():
    """The defenses registered in registry.yaml."""


@defenses.command("list")
@click.argument("pattern", required=False, default="")
@click.option("--exclude", default="")
def defenses_list(pattern, exclude):
    from .registry import defense_entry, list_defenses

    for name in list_defenses(pattern, exclude):
        e = defense_entry(name)
        click.echo(f"{name:<10} {e.threat_model:<14} {e.description}")


@defenses.command("show")
@click.argument("name")
@click.option("--preset", default=None)
def defenses_show(name, preset):
    """A defense's parameters (registry defaults, merged with a preset's changes)."""
    from .registry import create_defense, defense_entry

    e = defense_entry(name)
    click.echo(yaml.safe_dump({"name": name, "module": e.module, "threat_model": e.threat_model,
                               "description": e.description,
                               "params": create_defense(name, preset=preset).get_params(),
                               "preset_changes": e.presets}, sort_keys=False))


# ---------------------------------------------------------------------------------------------- cgd

@cli.group()
def cgd():
    """CGD's split and entropy map (the defense itself runs through `run --defense cgd`)."""


@cgd.command("map")
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out_file", type=click.Path(), default=None, help="PNG path; default: RUN_DIR/entropy_map.png")
def cgd_map(run_dir, out_file):
    """Redraw the entropy map of a CGD run from RUN_DIR/split.pt."""
    from .defenses.entropy_map import draw_from_split_file

    click.echo(f"wrote {draw_from_split_file(Path(run_dir) / 'split.pt', out_file)}")


@cgd.command("split")
@click.option("--attack", default="badnets", show_default=True, help="registered attack name (see `attacks list`)")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--data-root", type=click.Path(), default=None, help="dataset folder; default: $CGD_DATA_ROOT")
@click.option("--preset", default="smoke", show_default=True, help="smoke | quick | quick-small | cpu | paper")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--clip", default=None, help="CLIP, e.g. standin:cifar10 or ViT-B-32:/path/model.bin")
@click.option("--defense-opt", "defense_opts", multiple=True, metavar="KEY=VALUE", help="CGD parameter (repeatable)")
@click.option("--attack-opt", "attack_opts", multiple=True, metavar="KEY=VALUE", help="attack override (repeatable)")
@click.option("--attack-file", "attack_files", multiple=True, type=click.Path())
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
@click.option("--cache-dir", type=click.Path(), default=None, help=CACHE_DIR_HELP)
@click.option("--out", "out_file", type=click.Path(), required=True,
              help="split file: .json (plain lists) or .pt (torch); indices + scores + info")
def cgd_split(attack, dataset, data_root, preset, seed, clip, defense_opts, attack_opts, attack_files, device,
              cache_dir, out_file):
    """Compute CGD's clean / suspect / rest split of a run's training set, without retraining."""
    from .defenses.cgd import split_for_run, write_split_file
    from .harness.pipeline import RunConfig

    _register_attack_files(attack_files)
    cfg = RunConfig(dataset=dataset, data_root=data_root, attack=attack,
                    attack_overrides=_parse_opts(attack_opts, "--attack-opt"), defense="cgd",
                    defense_params=_parse_opts(defense_opts, "--defense-opt"), preset=preset, seed=seed, clip=clip,
                    device=device, cache_dir=cache_dir)
    payload = split_for_run(cfg)
    info = payload["info"]
    click.echo(f"clean {info['n_clean']}  suspect {info['n_suspect']}  rest {info['n_rest']}  of {info['n']}  "
               f"(sigma1 {info['thresholds']['sigma1']:.3g}, sigma2 {info['thresholds']['sigma2']:.3g}, "
               f"{info['clip_source']})")
    click.echo(f"wrote {write_split_file(payload, out_file)}")


# ---------------------------------------------------------------------------------------------- grid

@cli.group()
def grid():
    """Grids of jobs (leaderboard/grids/*.yaml) run into a resumable results database."""


@grid.command("list")
def grid_list():
    """The grids in leaderboard/grids/, with their job counts."""
    from .leaderboard.grid import list_grids, load_grid, plan_grid

    for name in list_grids():
        spec, source = load_grid(name)
        plan = plan_grid(spec, source)
        missing = f"  ({len(plan.jobs) - len(plan.runnable)} wait for unregistered names)" if plan.unregistered_names else ""
        click.echo(f"{name:<26} {spec.preset:<8} {len(plan.jobs):>5} jobs{missing}  {spec.description}")


@grid.command("show")
@click.argument("grid_name", metavar="GRID")
@click.option("--db", "db_path", type=click.Path(), default=None, help="results database; default: leaderboard/results.sqlite")
@click.option("--runs-dir", type=click.Path(), default=None, help="run folders; default: runs/ beside the database")
def grid_show(grid_name, db_path, runs_dir):
    """Every job of GRID in run order, with its status in the database; a running job also shows
    the newest line of its run.log (the stage or epoch it is in)."""
    from .leaderboard.db import ResultsDB
    from .leaderboard.grid import load_plan
    from .leaderboard.runner import job_run_dir, last_log_line, runs_root_of

    plan = load_plan(grid_name)
    db = ResultsDB(db_path)
    status = db.statuses(j.key for j in plan.jobs)
    runs_root = runs_root_of(db, runs_dir)
    for job in plan.jobs:
        state = "unregistered" if job.unregistered else status.get(job.key, "new")
        line = f"{job.position:>5} {job.key[:10]} {state:<12} {job.describe()}"
        if state == "running" and (latest := last_log_line(job_run_dir(runs_root, plan.spec.name, job))):
            line += f"  | {latest}"
        click.echo(line)
    if plan.unregistered_names:
        click.echo(f"not registered: {', '.join(plan.unregistered_names)}")


@grid.command("run")
@click.argument("grid_name", metavar="GRID")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="local: jobs at once (torch threads are split among them); ray: most jobs in flight")
@click.option("--db", "db_path", type=click.Path(), default=None, help="results database; default: leaderboard/results.sqlite")
@click.option("--retry-failed", is_flag=True, help="run again the jobs recorded as failed")
@click.option("--skip-unregistered", is_flag=True, help="record jobs naming unregistered attacks/defenses as skipped")
@click.option("--data-root", type=click.Path(), default=None, help="dataset folder; default: $CGD_DATA_ROOT")
@click.option("--cache-dir", type=click.Path(), default=None, help=CACHE_DIR_HELP)
@click.option("--runs-dir", type=click.Path(), default=None, help="run folders; default: runs/ beside the database")
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
@click.option("--address", default=None, help="ray: cluster address (e.g. auto); default: start a local instance")
@click.option("--cpus-per-job", type=float, default=None, help="ray: CPUs per job (default: the grid's resources)")
@click.option("--gpus-per-job", type=float, default=None, help="ray: GPUs per job (default: the grid's resources)")
@click.option("--only", "only", multiple=True, metavar="PATTERN",
              help="run only the unfinished jobs whose description as `grid show` prints it matches this shell "
                   "pattern, e.g. 'cifar10/*/asd*' (repeatable); the rest stay unfinished")
@click.option("--rerun-done", is_flag=True,
              help="also run again the finished jobs that --only selects (e.g. after a fix); each row is replaced "
                   "when its job finishes")
@click.option("--print-config", is_flag=True, help="print the resolved configuration of every job and exit")
def grid_run(grid_name, backend, workers, db_path, retry_failed, skip_unregistered, data_root, cache_dir, runs_dir,
             device, address, cpus_per_job, gpus_per_job, only, rerun_done, print_config):
    """Run the unfinished jobs of GRID; finished jobs are skipped, so a stopped run resumes."""
    from .leaderboard.db import ResultsDB
    from .leaderboard.grid import load_plan
    from .leaderboard.runner import run_grid, sigterm_stops_like_ctrl_c, unregistered_error

    plan = load_plan(grid_name)
    if print_config:
        if plan.unregistered_names and not skip_unregistered:
            raise unregistered_error(plan)
        jobs = [{"job": j.describe(), "key": j.key, "resolved": j.resolved} for j in plan.runnable]
        click.echo(yaml.safe_dump(json.loads(json.dumps(jobs)), sort_keys=False))  # plain copies: no YAML anchors
        return
    db = ResultsDB(db_path)
    with sigterm_stops_like_ctrl_c():
        summary = run_grid(plan, db, backend=backend, workers=workers, retry_failed=retry_failed,
                           skip_unregistered=skip_unregistered, data_root=data_root, cache_dir=cache_dir,
                           device=device, runs_dir=runs_dir, address=address, cpus_per_job=cpus_per_job,
                           gpus_per_job=gpus_per_job, only=list(only) or None, rerun_done=rerun_done)
    for line in summary.lines():
        click.echo(line)
    click.echo(f"results: {db.path}")
    if summary.failed:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- leaderboard

@cli.group()
def leaderboard():
    """The published leaderboard, built from the results database."""


@leaderboard.command("build")
@click.option("--db", "db_path", type=click.Path(), default=None, help="results database; default: leaderboard/results.sqlite")
@click.option("--out", "out_dir", type=click.Path(), required=True, help="folder for results.csv, README.md, index.html, plots/")
@click.option("--grid", "grids", multiple=True, help="only these grids (repeatable); default: every grid in the database")
def leaderboard_build(db_path, out_dir, grids):
    """Write results.csv, README.md (tables), index.html (one self-contained page) and PNG plots."""
    from .leaderboard.build import build_leaderboard
    from .leaderboard.db import ResultsDB

    written = build_leaderboard(ResultsDB(db_path), out_dir, grids=list(grids) or None)
    for path in written:
        click.echo(f"wrote {path}")


@leaderboard.command("import")
@click.argument("csv_path", metavar="RESULTS_CSV", type=click.Path(exists=True, dir_okay=False))
@click.option("--db", "db_path", type=click.Path(), default=None, help="results database; default: leaderboard/results.sqlite")
def leaderboard_import(csv_path, db_path):
    """Add the jobs of a results.csv (e.g. the committed leaderboard/results.csv) to the database:
    finished ones, so that `grid run` skips them and `leaderboard build` shows them again, and
    unfinished ones as pending, so that the rebuilt leaderboard still lists the work left."""
    from .leaderboard.build import read_results_csv
    from .leaderboard.db import ResultsDB

    db = ResultsDB(db_path)
    added, kept, pending = db.import_rows(read_results_csv(csv_path))
    click.echo(f"imported {added} finished jobs into {db.path}" + (f" ({kept} already there kept)" if kept else "")
               + (f"; {pending} unfinished jobs registered as pending" if pending else ""))


# ---------------------------------------------------------------------------------------------- backdoorbench

@cli.group()
def backdoorbench():
    """BackdoorBench (SCLBD) records: import, defend, split, export; install CGD into a checkout."""


_record_options = [
    click.option("--data-root", type=click.Path(), default=None,
                 help="clean dataset folder; default: the record's data_path under its checkout, else $CGD_DATA_ROOT"),
    click.option("--trust-record", is_flag=True,
                 help="unpickle the record without the allow-list (runs any code it holds: trusted records only)"),
    click.option("--cache-dir", type=click.Path(), default=None, help=CACHE_DIR_HELP),
]
_defense_options = [
    click.option("--defense-opt", "defense_opts", multiple=True, metavar="KEY=VALUE", help="defense parameter (repeatable)"),
    click.option("--preset", default=None, help="cgd-bench preset for the defense's schedules (default: the record's "
                                                "when we exported it, else paper)"),
    click.option("--seed", default=0, show_default=True, type=int),
    click.option("--clip", default=None, help="CLIP for CLIP-guided defenses, e.g. ViT-B-32:/path/model.bin"),
    click.option("--device", default=None, help="cpu | cuda | cuda:N"),
]


def _with(options):
    def deco(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return deco


@backdoorbench.command("import")
@click.argument("record_dir", type=click.Path())
@_with(_record_options)
def backdoorbench_import(record_dir, data_root, trust_record, cache_dir):
    """Read a BackdoorBench attack record (v2 main branch or v1) and print what it holds."""
    from .backdoorbench import read_record
    from .harness.cache import Cache

    click.echo(read_record(record_dir, data_root=data_root, trust=trust_record, cache=Cache(cache_dir)).summary())


@backdoorbench.command("defend")
@click.argument("record_dir", type=click.Path())
@click.option("--defense", default="cgd", show_default=True, help="registered defense name (see `defenses list`)")
@_with(_defense_options + _record_options)
def backdoorbench_defend(record_dir, defense, defense_opts, preset, seed, clip, device, data_root, trust_record,
                         cache_dir):
    """Run a defense on a record; write RECORD_DIR/defense/<defense>/ (defense_result.pt, CSVs, result.json)."""
    from .backdoorbench import defend_record

    result = defend_record(record_dir, defense, _parse_opts(defense_opts, "--defense-opt"), preset=preset, seed=seed,
                           data_root=data_root, clip=clip, device=device, cache_dir=cache_dir, trust=trust_record)
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    click.echo(f"{result['attack']} / {defense} [{result['preset']}]: CA {fmt(result['clean_acc'])}  "
               f"ASR {fmt(result['asr'])}  RA {fmt(result['ra'])}  (no defense: CA "
               f"{fmt(result['no_defense']['clean_acc'])}, ASR {fmt(result['no_defense']['asr'])})")
    click.echo(f"wrote {Path(result['record']['path']) / 'defense' / defense}")


@backdoorbench.command("split")
@click.argument("record_dir", type=click.Path())
@click.option("--out", "out_file", type=click.Path(), required=True, help="index file to write")
@_with(_defense_options + _record_options)
def backdoorbench_split(record_dir, out_file, defense_opts, preset, seed, clip, device, data_root, trust_record,
                        cache_dir):
    """CGD's clean split of the record's bd_train as an index file for BackdoorBench's --index."""
    from .backdoorbench import split_record

    click.echo(split_record(record_dir, out_file, _parse_opts(defense_opts, "--defense-opt"), preset=preset,
                            seed=seed, data_root=data_root, clip=clip, device=device, cache_dir=cache_dir,
                            trust=trust_record).summary())


@backdoorbench.command("export")
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(), required=True, help="record folder to create")
@click.option("--data-root", type=click.Path(), default=None, help="override the run's dataset folder")
@click.option("--cache-dir", type=click.Path(), default=None, help="override the run's cache folder")
def backdoorbench_export(run_dir, out_dir, data_root, cache_dir):
    """Write a run's poisoned training set and backdoored model as a BackdoorBench v2 record."""
    from .backdoorbench import export_run

    click.echo(export_run(run_dir, out_dir, cache_dir=cache_dir, data_root=data_root).summary())


@backdoorbench.command("install")
@click.option("--bb-root", type=click.Path(), required=True, help="the BackdoorBench checkout")
def backdoorbench_install(bb_root):
    """Add defense/cgd.py and config/defense/cgd/*.yaml to a BackdoorBench checkout."""
    from .backdoorbench import install

    click.echo(install(bb_root).summary())


@backdoorbench.command("uninstall")
@click.option("--bb-root", type=click.Path(), required=True, help="the BackdoorBench checkout")
def backdoorbench_uninstall(bb_root):
    """Remove exactly what `install` wrote (refuses if any of it was changed)."""
    from .backdoorbench import uninstall

    for path in uninstall(bb_root):
        click.echo(f"removed {path}")


# ---------------------------------------------------------------------------------------------- misc

@cli.group()
def presets():
    """Size/schedule presets (cgd_defense/presets.yaml)."""


@presets.command("list")
def presets_list():
    from .harness.presets import load_presets

    for name, p in load_presets().items():
        click.echo(f"{name:<12} {p.model:<16} {p.train.epochs:>5g} epochs  {p.description}")


@cli.group()
def datasets():
    """Registered datasets."""


@datasets.command("list")
def datasets_list():
    from .data import get_dataset_info, list_datasets

    for name in list_datasets():
        info = get_dataset_info(name)
        click.echo(f"{name:<13} {info.num_classes:>4} classes  {info.image_size}x{info.image_size}  {info.layouts_help}")


# ---------------------------------------------------------------------------------------------- clip

@cli.group()
def clip():
    """CLIPs: real open_clip models and the stand-in CLIPs trained on public data."""


@clip.command("train")
@click.argument("name", default="standin:cifar10")
@click.option("--data-root", type=click.Path(), default=None, help="dataset folder; default: $CGD_DATA_ROOT")
@click.option("--extra-data", type=click.Path(), default=None,
              help="Tiny-ImageNet-200 folder whose images widen the public pool")
@click.option("--out", "out_file", type=click.Path(), default=None,
              help="also write the checkpoint here; load it with --clip cgd-standin:FILE")
@click.option("--device", default=None)
@click.option("--cache-dir", type=click.Path(), default=None, help=CACHE_DIR_HELP)
def clip_train(name, data_root, extra_data, out_file, device, cache_dir):
    """Train a stand-in CLIP (standin:DATASET[:weak-N|:backdoored-ATTACK]), or reuse the cached one."""
    from .clip.factory import parse_clip_spec
    from .clip.standin import get_standin, save_standin
    from .harness.cache import Cache

    parsed = parse_clip_spec(name)
    if parsed.kind != "stand-in":
        raise ConfigError(f"'{name}' is not a stand-in; only standin:DATASET[:VARIANT] CLIPs are trained here")
    cache = Cache(cache_dir)
    payload = get_standin(parsed, data_root=data_root, cache=cache, extra_data=extra_data, device=device)
    reused = "reused from the cache" if any(h.startswith("clip_standin/") for h in cache.hits) else "trained"
    pool = payload["pool"]
    click.echo(f"{name}: {reused}; {payload['train']['seconds']:.0f} s of training, {payload['train']['steps']} steps "
               f"on {pool['n_pool']} public images ({payload['arch']})")
    if out_file:
        save_standin(payload, out_file)
        click.echo(f"wrote {out_file} (load with --clip {payload['arch']}:{out_file})")


@clip.command("eval")
@click.argument("name")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--data-root", type=click.Path(), default=None, help="dataset folder; default: $CGD_DATA_ROOT")
@click.option("--templates", type=click.Choice(["reference", "ensemble"]), default="reference", show_default=True)
@click.option("--attack", default=None, help="also report the zero-shot ASR of this attack's triggered test images")
@click.option("--extra-data", type=click.Path(), default=None, help="as given to `clip train`")
@click.option("--device", default=None)
@click.option("--cache-dir", type=click.Path(), default=None, help=CACHE_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the metrics as JSON")
def clip_eval(name, dataset, data_root, templates, attack, extra_data, device, cache_dir, as_json):
    """Zero-shot accuracy, per-class accuracy and ECE on the test set (and ASR for a backdoored CLIP)."""
    from .clip import load_clip
    from .clip.evaluate import evaluate_clip
    from .harness.cache import Cache

    cache = Cache(cache_dir)
    model = load_clip(name, dataset=dataset, data_root=data_root, cache=cache, device=device, extra_data=extra_data)
    metrics = evaluate_clip(model, dataset, data_root, cache=cache, templates=templates, attack=attack)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    click.echo(f"{name} [{model.source['label']}] on {dataset} test ({metrics['n_test']} images, {templates} template"
               f"{'s' if templates == 'ensemble' else ''}):")
    click.echo(f"  zero-shot accuracy {100 * metrics['zero_shot_acc']:.2f}%   ECE {metrics['ece']:.4f}   "
               f"logit scale {metrics['logit_scale']:.1f}")
    if "zero_shot_asr" in metrics:
        click.echo(f"  {metrics['attack']}: zero-shot ASR {100 * metrics['zero_shot_asr']:.2f}%   "
                   f"accuracy on triggered images {100 * metrics['triggered_acc']:.2f}%")
    click.echo("  per class: " + ", ".join(f"{c} {100 * a:.1f}%" for c, a in metrics["per_class_acc"].items()))


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="cgd-bench", standalone_mode=False)
    except CGDError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort as exc:  # click's wrapper of KeyboardInterrupt
        if isinstance(exc.__cause__ or exc.__context__, Terminated):
            click.echo("terminated", err=True)
            sys.exit(143)
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
