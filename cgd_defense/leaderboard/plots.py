"""PNG plots of one board (matplotlib, no display): ASR vs CA per defense, and per-attack bars."""
from __future__ import annotations

import textwrap
from pathlib import Path

from .tables import NO_ATTACK_FAMILY, caption, stat


def _means(rows: list[dict]) -> dict[tuple[str, str], tuple[float | None, float | None]]:
    """(defense, attack) -> (mean CA, mean ASR) over seeds."""
    out = {}
    for key in {(r["series"], r["attack"]) for r in rows}:
        group = [r for r in rows if (r["series"], r["attack"]) == key]
        out[key] = (stat(group, "clean_acc").mean, stat(group, "asr").mean)
    return out


def _title(rows: list[dict], width_in: float) -> str:
    return textwrap.fill(caption(rows, short=True).replace("`", ""), width=max(40, int(width_in * 13)))


def board_plots(rows: list[dict], out_dir: Path, slug: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    attacked = [r for r in rows if r["family"] != NO_ATTACK_FAMILY and r["asr"] is not None]
    if not attacked:
        return []
    defenses = list(dict.fromkeys(r["series"] for r in attacked))
    attacks = list(dict.fromkeys(r["attack"] for r in attacked))
    means = _means(attacked)
    colours = {a: plt.cm.tab20(i % 20) for i, a in enumerate(attacks)}
    written = []

    cols = min(4, len(defenses))
    nrows = -(-len(defenses) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.0 * nrows + 0.8), squeeze=False, sharex=True,
                             sharey=True)
    for ax, defense in zip(axes.flat, defenses):
        for attack in attacks:
            ca, asr = means.get((defense, attack), (None, None))
            if ca is not None and asr is not None:
                ax.scatter(100 * ca, 100 * asr, color=colours[attack], s=30, label=attack)
        ax.set_title(defense, fontsize=9)
        ax.set_xlim(0, 100)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(defenses):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("CA %")
    for ax in axes[:, 0]:
        ax.set_ylabel("ASR %")
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[a]) for a in attacks]
    fig.legend(handles, attacks, loc="lower center", ncol=min(7, len(attacks)), fontsize=8)
    fig.suptitle(_title(rows, fig.get_figwidth()), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(attacks) // 7), 1, 0.9))
    path = out_dir / f"{slug}-asr_vs_ca.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(attacks) * max(1, len(defenses)) ** 0.5 + 3), 6.5),
                             sharex=True)
    width = 0.8 / len(defenses)
    for i, defense in enumerate(defenses):
        xs = [j + (i - (len(defenses) - 1) / 2) * width for j in range(len(attacks))]
        for ax, metric in zip(axes, (1, 0)):
            values = [means.get((defense, a), (None, None))[metric] for a in attacks]
            ax.bar(xs, [100 * v if v is not None else 0 for v in values], width, label=defense,
                   color=plt.cm.tab20(i % 20))
    axes[0].set_ylabel("ASR %")
    axes[1].set_ylabel("CA %")
    axes[1].set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    axes[0].legend(fontsize=7, ncol=min(4, len(defenses)))
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(_title(rows, fig.get_figwidth()), fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{slug}-per_attack.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
