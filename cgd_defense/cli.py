"""`cgd-bench` command line: thin noun-verb commands over the Python API; no logic lives here.

Every user-facing error (CGDError) is printed as one line on stderr with exit status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import yaml

from .errors import CGDError, ConfigError


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
@click.option("--cache-dir", type=click.Path(), default=None, help="cache folder; default: $CGD_CACHE_DIR or ~/.cache/cgd-bench")
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
        click.echo(f"{name:<18} {spec.family:<16} {spec.citation.split('.')[0]}")


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


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="cgd-bench", standalone_mode=False)
    except CGDError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
