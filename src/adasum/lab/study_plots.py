"""The plots of ``adasum study``: steps to the target against examples before communication,
and how orthogonal the workers' updates are over training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from adasum.lab.plots import plt, save_figure

__all__ = ["plot_steps", "plot_diagnostics"]


def plot_steps(best: Sequence[dict], path: Path, title: str) -> Path:
    """Median steps to the target at the best learning rate against E, log-log, a colour and
    marker per combiner and a line style per worker count (E grows along a line by
    accumulation; a panel per optimizer), bars from the fewest to the most steps over the
    seeds; an x on the top edge marks an E where most seeds missed the target. Elastic
    settings are left out (their E changes midway). Hollow markers: lines that coincide
    (summing at lr x is averaging at lr N x) stay visible."""
    optimizers = sorted({b["optimizer"] for b in best})
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5.5 * len(optimizers), 4), squeeze=False)
    for ax, optimizer in zip(axes[0], optimizers):
        rows = [b for b in best if b["optimizer"] == optimizer and ">" not in b["setting"]]
        top = max([b["max_steps"] for b in rows if math.isfinite(b["max_steps"])] or [1.0]) * 2
        combiners = sorted({b["combiner"] for b in rows})
        workers = sorted({b["workers"] for b in rows})
        for c, combiner in enumerate(combiners):
            for w, n in enumerate(workers):
                line = sorted((b for b in rows if (b["combiner"], b["workers"]) == (combiner, n)),
                              key=lambda b: b["examples"])
                done = [b for b in line if math.isfinite(b["median_steps"])]
                med = [b["median_steps"] for b in done]
                low = [m - b["min_steps"] for m, b in zip(med, done)]
                high = [(b["max_steps"] if math.isfinite(b["max_steps"]) else top) - m for m, b in zip(med, done)]
                ax.errorbar([b["examples"] for b in done], med, yerr=[low, high], color=f"C{c}",
                            marker="osD^v"[c % 5], ms=8 - 2 * c, mfc="none", capsize=3,
                            ls=["-", "--", ":", "-."][w % 4], label=f"{combiner} N={n}")
                missed = [b["examples"] for b in line if not math.isfinite(b["median_steps"])]
                ax.plot(missed, [top] * len(missed), "x", ms=9, mew=2, color=f"C{c}")
        ax.set(xscale="log", yscale="log", xlabel="examples before communication (E)",
               ylabel="steps to target (median, min-max over seeds)", title=optimizer)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_diagnostics(records: Sequence[dict], curves: Sequence[dict], best_runs: dict[tuple, list[int]],
                     path: Path, title: str) -> Path:
    """Adasum's scaling of the workers' vectors (0.5 = averaged, 1 = summed) over training, at
    each setting's best learning rate (first seed): thin lines per layer, a thick line over all
    layers; one panel per combiner, one colour per setting."""
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
        ax.set(xlabel="epoch", title=f"runs with {combiner}", ylim=(0.4, 1.05))
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("Adasum scaling (0.5 averaged, 1 summed)")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
