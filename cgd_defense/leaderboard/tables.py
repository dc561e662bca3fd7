"""Aggregating result rows into the leaderboard's tables (definitions: leaderboard/METRICS.md).

A *board* is the rows of one grid on one dataset at one preset. Every table carries a caption
naming the preset, dataset, CLIP and commit that produced it. A stand-in CLIP (trained here on a
public split, see the CLIP layer) is always named "stand-in CLIP", never as a pretrained CLIP.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

NO_ATTACK_FAMILY = "no-attack"


def flat_row(row: dict) -> dict[str, Any]:
    """One result row as flat columns (results.csv, index.html): metrics, no-defense metrics, split
    quality, cost, provenance."""
    split = row.get("split") or {}
    times = row.get("stage_times") or {}
    aurocs = {k: v for k, v in split.items() if k.startswith("auroc_") and v is not None}
    auroc_key = "auroc_combined" if "auroc_combined" in aurocs else (sorted(aurocs)[0] if aurocs else None)
    nd_ca, ca = row.get("nd_clean_acc"), row.get("clean_acc")
    n_total = split.get("n_total")
    return {
        "grid": row["grid"], "job_key": row["job_key"], "status": row["status"], "dataset": row["dataset"],
        "preset": row["preset"], "attack": row["attack_label"], "attack_name": row["attack"],
        "family": row.get("attack_family"), "defense": row["defense_label"], "defense_name": row["defense"],
        "threat_model": row.get("threat_model"), "clip": row.get("clip"), "seed": row["seed"],
        "clean_acc": ca, "asr": row.get("asr"), "ra": row.get("ra"), "der": row.get("der"),
        "nd_clean_acc": nd_ca, "nd_asr": row.get("nd_asr"), "nd_ra": row.get("nd_ra"),
        "ca_drop": None if ca is None or nd_ca is None else nd_ca - ca,
        "split_tpr": split.get("suspect_tpr"), "split_fpr": split.get("suspect_fpr"),
        "split_auroc": aurocs.get(auroc_key) if auroc_key else None, "split_auroc_score": auroc_key,
        "split_clean_part_poison_rate": split.get("clean_part_poison_rate"),
        "split_suspect_fraction": (split.get("n_suspect_part") / n_total) if n_total else None,
        "split_n_clean": split.get("n_clean_part"), "split_n_suspect": split.get("n_suspect_part"),
        "split_n_rest": split.get("n_rest"),
        "total_s": row.get("total_s"), "defense_s": times.get("defense"),
        "backdoor_training_s": times.get("backdoor_training"),
        "peak_rss_mb": row.get("peak_rss_mb"), "peak_gpu_mb": row.get("peak_gpu_mb"), "cpu_s": row.get("cpu_s"),
        "n_train": (row.get("data") or {}).get("n_train"),
        "git_commit": row.get("git_commit"), "host": row.get("host"),
        "error": (row.get("error") or "").splitlines()[0] if row.get("error") else None,
        "finished_at": row.get("finished_at"), "run_dir": row.get("run_dir"),
    }


def describe_clip(name: str | None, short: bool = False) -> str:
    if name is None:
        return "none" if short else "none (the defense reads no CLIP)"
    if name.startswith("standin:"):
        return f"stand-in CLIP `{name}`" + ("" if short else " (trained here on a public split the victim never sees)")
    return f"CLIP `{name}`"


def short_commit(commit: str | None) -> str:
    if not commit or commit == "unknown":
        return "unknown"
    sha, dirty = commit.split("-", 1)[0], commit.endswith("-dirty")
    return sha[:10] + (" (uncommitted changes)" if dirty else "")


def caption(rows: list[dict], short: bool = False) -> str:
    """Which preset, dataset, CLIP(s) and commit(s) produced `rows` (`short`: for plot titles)."""
    presets = sorted({r["preset"] for r in rows})
    datasets = sorted({r["dataset"] for r in rows})
    sizes = sorted({r["n_train"] for r in rows if r.get("n_train")})
    clips = sorted({r["clip"] for r in rows if r["clip"]})
    commits = sorted({short_commit(r["git_commit"]) for r in rows})
    size = f" ({', '.join(f'{n:,}' for n in sizes)} victim training images)" if sizes else ""
    clip = "; ".join(describe_clip(c, short) for c in clips) if clips else describe_clip(None, short)
    if short:
        return f"{', '.join(datasets)} · preset {', '.join(presets)} · CLIP: {clip} · commit {', '.join(commits)}"
    return (f"*Dataset {', '.join(datasets)}{size} · preset `{', '.join(presets)}` · CLIP: {clip} · "
            f"commit {', '.join(commits)}*")


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def fmt(self, scale: float = 100.0, digits: int = 2) -> str:
        if not self.values:
            return "–"
        text = f"{self.mean * scale:.{digits}f}"
        return text + (f" ± {self.std * scale:.{digits}f}" if self.std is not None else "")


def stat(rows: Iterable[dict], key: str | Callable[[dict], Any]) -> Stat:
    get = key if callable(key) else (lambda r: r.get(key))
    values = [float(v) for v in (get(r) for r in rows) if v is not None and not
              (isinstance(v, float) and math.isnan(v))]
    return Stat(values)


def _group(rows: Iterable[dict], *keys: str) -> dict[Any, list[dict]]:
    """Rows by the value of `keys` (a tuple for several keys), in first-seen order."""
    out: dict[Any, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]].append(r)
    return out


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in body]
    return lines


def _ordered(rows: list[dict], key: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r[key], None)
    return list(seen)


def many_clips(rows: list[dict]) -> bool:
    return len({r["clip"] for r in rows if r["clip"]}) > 1


def with_series(rows: list[dict]) -> list[dict]:
    """Set each row's `series`: its defense label, plus its CLIP on boards that vary the CLIP (the
    ablations), so rows of one defense under different CLIPs are never averaged together."""
    for board in _group(rows, "grid", "dataset", "preset").values():
        vary = many_clips(board)
        for r in board:
            r["series"] = r["defense"] + (f" ({r['clip']})" if vary and r["clip"] else "")
    return rows


def boards(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Done rows grouped by (grid, dataset, preset), in grid order."""
    return dict(_group([r for r in rows if r["status"] == "done"], "grid", "dataset", "preset"))


def attack_tables(rows: list[dict]) -> list[str]:
    """Per attack: CA / ASR / RA / DER and the suspect fraction for every defense, mean ± std over seeds."""
    out = []
    for attack in _ordered(rows, "attack"):
        sub = [r for r in rows if r["attack"] == attack]
        family = sub[0]["family"] or "?"
        body = []
        for name, group in _group(sub, "series").items():
            body.append([name, stat(group, "clean_acc").fmt(), stat(group, "asr").fmt(), stat(group, "ra").fmt(),
                         stat(group, "der").fmt(1, 3), stat(group, "split_suspect_fraction").fmt(),
                         str(len(group))])
        out += [f"#### {attack} ({family})", "", caption(sub), ""]
        out += _table(["defense", "CA %", "ASR %", "RA %", "DER", "flagged suspect %", "seeds"], body) + [""]
    return out


def ranking(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Defenses ranked by mean DER over the attacks (each attack first averaged over seeds), with
    mean ASR, CA, RA and the cost on clean data (CA drop and fraction flagged on the no-attack case)."""
    attacked = [r for r in rows if r["family"] != NO_ATTACK_FAMILY]
    clean = [r for r in rows if r["family"] == NO_ATTACK_FAMILY]
    n_attacks = len({r["attack"] for r in attacked})
    entries = []
    for defense in _ordered(rows, "series"):
        mine = [r for r in attacked if r["series"] == defense]
        per_attack = _group(mine, "attack")
        means = {k: Stat([m for m in (stat(g, k).mean for g in per_attack.values()) if m is not None])
                 for k in ("der", "asr", "clean_acc", "ra")}
        mine_clean = [r for r in clean if r["series"] == defense]
        entries.append({"defense": defense, "attacks": len(per_attack), "der": means["der"], "asr": means["asr"],
                        "clean_acc": means["clean_acc"], "ra": means["ra"],
                        "clean_ca_drop": stat(mine_clean, "ca_drop"),
                        "clean_flagged": stat(mine_clean, "split_suspect_fraction")})
    entries.sort(key=lambda e: (-(e["der"].mean if e["der"].mean is not None else -1), e["defense"]))
    body = [[str(i + 1), e["defense"], e["der"].fmt(1, 3), e["asr"].fmt(), e["clean_acc"].fmt(), e["ra"].fmt(),
             e["clean_ca_drop"].fmt(), e["clean_flagged"].fmt(), f"{e['attacks']}/{n_attacks}"]
            for i, e in enumerate(entries)]
    lines = _table(["rank", "defense", "mean DER", "mean ASR %", "mean CA %", "mean RA %",
                    "CA drop on clean data (pts)", "flagged on clean data %", "attacks"], body)
    return lines, entries


def clip_variant_table(rows: list[dict]) -> list[str]:
    """Ablation view: one line per (defense, CLIP), one column per attack, cells 'CA / ASR'."""
    attacks = _ordered(rows, "attack")
    body = []
    for (defense, clip), group in _group([r for r in rows if r["clip"]], "defense", "clip").items():
        cells = []
        for attack in attacks:
            g = [r for r in group if r["attack"] == attack]
            cells.append(f"{stat(g, 'clean_acc').fmt(digits=1)} / {stat(g, 'asr').fmt(digits=1)}" if g else "–")
        body.append([defense, f"`{clip}`" + (" (stand-in)" if clip.startswith("standin:") else "")] + cells)
    reference = [r for r in rows if not r["clip"]]
    for defense, group in _group(reference, "defense").items():
        cells = []
        for attack in attacks:
            g = [r for r in group if r["attack"] == attack]
            cells.append(f"{stat(g, 'clean_acc').fmt(digits=1)} / {stat(g, 'asr').fmt(digits=1)}" if g else "–")
        body.append([defense, "none"] + cells)
    return _table(["defense", "CLIP"] + [f"{a} CA / ASR %" for a in attacks], body)


def split_table(rows: list[dict]) -> list[str]:
    with_split = [r for r in rows if r["split_n_suspect"] is not None]
    body = []
    for (attack, name), group in _group(with_split, "attack", "series").items():
        auroc_names = sorted({r["split_auroc_score"] for r in group if r["split_auroc_score"]})
        body.append([attack, name,
                     stat(group, "split_tpr").fmt(), stat(group, "split_fpr").fmt(),
                     stat(group, "split_clean_part_poison_rate").fmt(), stat(group, "split_auroc").fmt(1, 3)
                     + (f" ({', '.join(n[6:] for n in auroc_names)})" if auroc_names else ""),
                     stat(group, "split_n_clean").fmt(1, 0), stat(group, "split_n_suspect").fmt(1, 0),
                     stat(group, "split_n_rest").fmt(1, 0)])
    return _table(["attack", "defense", "suspect TPR %", "suspect FPR %", "poison in clean part %", "AUROC (score)",
                   "clean part", "suspect part", "rest"], body)


def cost_table(rows: list[dict]) -> list[str]:
    body = []
    for defense, group in _group(rows, "series").items():
        peak = max((r["peak_rss_mb"] for r in group if r["peak_rss_mb"] is not None), default=None)
        gpu = max((r["peak_gpu_mb"] for r in group if r["peak_gpu_mb"] is not None), default=None)
        body.append([defense, str(len(group)), stat(group, "defense_s").fmt(1, 1), stat(group, "total_s").fmt(1, 1),
                     stat(group, "cpu_s").fmt(1, 1), "–" if peak is None else f"{peak:,.0f}",
                     "–" if gpu is None else f"{gpu:,.0f}"])
    return _table(["defense", "jobs", "defense stage s", "whole job s", "job CPU s", "peak RSS MB", "peak GPU MB"],
                  body)
