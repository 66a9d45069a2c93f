"""The plots of ``adasum study``: steps to the target against examples before communication,
and how orthogonal the workers' updates are over training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from adasum.lab.plots import plt, save_figure

__all__ = ["plot_steps", "plot_diagnostics"]


def _main_line(rows: Sequence[dict]) -> list[dict]:
    """Per E the setting with the most workers (the grid grows by workers; the settings with
    fewer workers accumulating more are the accumulation axis, drawn unconnected)."""
    by_e: dict[int, dict] = {}
    for b in rows:
        if b["examples"] not in by_e or b["workers"] > by_e[b["examples"]]["workers"]:
            by_e[b["examples"]] = b
    return [by_e[e] for e in sorted(by_e)]


def plot_steps(best: Sequence[dict], path: Path, title: str) -> Path:
    """Median steps to the target at the best learning rate against E, log-log, a colour and
    marker per combiner (a panel per optimizer), bars from the fewest to the most steps over
    the seeds; an x on the top edge marks an E where most seeds missed the target; the grey
    line is perfect scaling (steps halving as E doubles) from the smallest E. The line joins
    the settings that grow by workers; the accumulation axis's are unjoined markers. Elastic
    settings are left out (their E changes midway)."""
    optimizers = sorted({b["optimizer"] for b in best})
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5.5 * len(optimizers), 4), squeeze=False)
    for ax, optimizer in zip(axes[0], optimizers):
        rows = [b for b in best if b["optimizer"] == optimizer and ">" not in b["setting"]]
        top = max([b["max_steps"] for b in rows if math.isfinite(b["max_steps"])] or [1.0]) * 2
        for c, combiner in enumerate(sorted({b["combiner"] for b in rows})):
            mine = [b for b in rows if b["combiner"] == combiner]
            line = _main_line(mine)
            for points, style in ((line, "-"), ([b for b in mine if b not in line], "none")):
                done = [b for b in points if math.isfinite(b["median_steps"])]
                med = [b["median_steps"] for b in done]
                low = [m - b["min_steps"] for m, b in zip(med, done)]
                high = [(b["max_steps"] if math.isfinite(b["max_steps"]) else top) - m for m, b in zip(med, done)]
                ax.errorbar([b["examples"] for b in done], med, yerr=[low, high], color=f"C{c}",
                            marker="osD^v"[c % 5], ms=8 - 2 * c, mfc="none", capsize=3, ls=style,
                            label=combiner if style == "-" else f"{combiner}, accumulating")
            missed = [b["examples"] for b in mine if not math.isfinite(b["median_steps"])]
            ax.plot(missed, [top] * len(missed), "x", ms=9, mew=2, color=f"C{c}")
        reached = [b for b in rows if math.isfinite(b["median_steps"])]
        if reached:
            first = min(reached, key=lambda b: (b["examples"], b["median_steps"]))
            es = sorted({b["examples"] for b in rows})
            ax.plot(es, [first["median_steps"] * first["examples"] / e for e in es], color="grey", ls=":",
                    lw=1, label="perfect scaling")
        ax.set(xscale="log", yscale="log", xlabel="examples before communication (E)",
               ylabel="steps to target (median, min-max over seeds)", title=optimizer)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_diagnostics(records: Sequence[dict], curves: Sequence[dict], best_runs: dict[tuple, list[int]],
                     path: Path, title: str) -> Path:
    """Adasum's scaling of the workers' vectors (0.5 = averaged, 1 = summed, above 1 = partly
    opposed) over training, at each setting's best learning rate (first seed): thin lines per
    layer, a thick line over all layers; one panel per combiner, one colour per setting."""
    combiners = sorted({key[1] for key in best_runs})
    fig, axes = plt.subplots(1, len(combiners), figsize=(5 * len(combiners), 3.8), squeeze=False, sharey=True)
    for ax, combiner in zip(axes[0], combiners):
        keys = sorted((k for k in best_runs if k[1] == combiner),
                      key=lambda k: records[best_runs[k][0]]["examples_per_step"])
        for i, key in enumerate(keys):
            run = best_runs[key][0]
            rows = [r for r in curves if r["run"] == run and "orth/scale" in r]
            if not rows:
                continue
            color = f"C{i % 10}"
            epochs = [r["epoch"] for r in rows]
            for layer in (k for k in rows[0] if k.startswith("orth/layer/") and k.endswith("/scale")):
                ax.plot(epochs, [r.get(layer, math.nan) for r in rows], color=color, lw=0.5, alpha=0.4)
            ax.plot(epochs, [r["orth/scale"] for r in rows], color=color, lw=2, label=f"{key[0]} {key[2]}")
        ax.axhline(0.5, color="grey", ls=":", lw=0.8)
        ax.axhline(1.0, color="grey", ls=":", lw=0.8)
        ax.set(xlabel="epoch", title=f"runs with {combiner}")
        ax.set_ylim(bottom=0.4)  # no upper limit: a scaling above 1 (opposed vectors) stays in view
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("Adasum scaling (0.5 averaged, 1 summed, >1 opposed)")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
