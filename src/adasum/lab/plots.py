"""The plots of a report: learning curves, final score against the learning rate, epochs to the
target against examples per step, and the distance to sequential SGD against the number of
workers. Each is drawn only when the runs vary along its axis."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from adasum.lab.config import REDUCERS  # noqa: E402

__all__ = ["write_plots", "save_figure", "plt"]


def write_plots(summaries: Sequence[dict], curves: Sequence[dict], out: Path, title: str, *,
                distances: bool) -> list[Path]:
    """The learning curves, and the plots whose axis the runs vary along (``distances``: the
    runs measured the distance to sequential SGD); returns the files written."""
    written = [_plot_curves(summaries, curves, out / "curves.png", title)]
    if len({s["lr"] for s in summaries}) > 1:
        written.append(_plot_by(summaries, "lr", "score", out / "lr_range.png", title, logx=True))
    if len({s["examples_per_step"] for s in summaries}) > 1:
        written.append(_plot_scaling(summaries, out / "scaling.png", title))
    if len({s["workers"] for s in summaries}) > 1 and distances:
        written.append(_plot_distances(summaries, out / "sequential_distance.png", title))
    return written


def _series(summaries: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in summaries:
        groups.setdefault((s["optimizer"], s["reducer"]), []).append(s)
    return groups


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` and close it (figures stay open until closed)."""
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _plot_curves(summaries: Sequence[dict], curves: Sequence[dict], path: Path, title: str) -> Path:
    """Training loss and test score per epoch of the best run (highest final score) of each
    optimizer and reducer."""
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for (opt, red), runs in sorted(_series(summaries).items()):
        best = max(runs, key=lambda s: -math.inf if math.isnan(s["score"]) else s["score"])
        rows = [r for r in curves if r["run"] == best["run"]]
        label = f"{opt}/{red} lr={best['lr']:g} N={best['workers']}"
        loss_ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], label=label)
        scored = [r for r in rows if "score" in r]
        score_ax.plot([r["epoch"] for r in scored], [r["score"] for r in scored], label=label)
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log")
    score_ax.set(xlabel="epoch", ylabel="test score")
    score_ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def _plot_by(summaries: Sequence[dict], x: str, y: str, path: Path, title: str, logx: bool) -> Path:
    """Final ``y`` against ``x``. One panel when the sweep has one setting per reducer (lines:
    optimizer/reducer); otherwise one panel per optimizer/reducer, a line per setting (E, N)."""
    series = _series(summaries)
    settings = sorted({(s["examples_per_step"], s["workers"]) for s in summaries})
    panels = [("", list(series))] if len(settings) == 1 else [(f"{o}/{r}", [(o, r)]) for o, r in series]
    fig, axes = plt.subplots(1, len(panels), figsize=(min(4.0 + 2.2 * (len(panels) - 1), 11), 3.8),
                             sharey=True, squeeze=False)
    colors = plt.get_cmap("viridis")
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            for i, (e, n) in enumerate(settings):
                runs = sorted((s for s in series[key] if (s["examples_per_step"], s["workers"]) == (e, n)),
                              key=lambda s: s[x])
                if not runs:
                    continue
                label = "/".join(key) if len(settings) == 1 else f"E={e} N={n}"
                color = None if len(settings) == 1 else colors(i / max(1, len(settings) - 1))
                ax.plot([s[x] for s in runs], [0.0 if s["diverged"] else s[y] for s in runs], "o-",
                        ms=3, color=color, label=label)
        ax.set(xlabel=x, title=name)
        ax.title.set_fontsize(9)
        if logx:
            ax.set_xscale("log")
    axes[0][0].set_ylabel(f"final {y} (diverged = 0)")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def _plot_scaling(summaries: Sequence[dict], path: Path, title: str) -> Path:
    """Epochs to the target at the best learning rate, against examples before communication;
    an x at the epoch budget marks an E at which no learning rate reached the target."""
    fig, ax = plt.subplots(figsize=(6, 4))
    budget = max(s["epochs"] for s in summaries)
    for (opt, red), runs in sorted(_series(summaries).items()):
        best = _best_per(runs, "examples_per_step")
        line, = ax.plot(list(best), [b["epochs_to_target"] if b else math.nan for b in best.values()],
                        "o-", label=f"{opt}/{red}")
        missed = [e for e, b in best.items() if b is None]
        ax.plot(missed, [budget] * len(missed), "x", ms=10, mew=2, color=line.get_color())
    ax.axhline(budget, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="examples before communication (E)",
           ylabel="epochs to target (best lr; x = none reached)", title=title)
    ax.title.set_fontsize(9)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _best_per(runs: Sequence[dict], key: str) -> dict:
    """For each value of ``key``, the run that reached the target in the fewest epochs (None if
    no run did)."""
    best: dict = {}
    for s in sorted(runs, key=lambda s: s[key]):
        cur = best.setdefault(s[key], None)
        if s["epochs_to_target"] is not None and (cur is None or s["epochs_to_target"] < cur["epochs_to_target"]):
            best[s[key]] = s
    return best


def _plot_distances(summaries: Sequence[dict], path: Path, title: str) -> Path:
    """Mean relative distance of each reduced update to sequential SGD, against workers; one
    line per reducer and learning rate (the sequential update depends on the learning rate).
    One worker is left out: every reducer is sequential SGD there (distance 0 up to rounding)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    lrs = sorted({s["lr"] for s in summaries})
    styles = ["o-", "s--", "^:", "d-."]
    for i, lr in enumerate(lrs):
        by_n: dict[int, list[dict]] = {}
        for s in summaries:
            if s["lr"] == lr and s["workers"] > 1:
                by_n.setdefault(s["workers"], []).append(s)
        ns = sorted(by_n)
        for name, color in zip(REDUCERS, ("C0", "C1", "C2")):
            ax.plot(ns, [sum(s[f"dist_{name}"] for s in by_n[n]) / len(by_n[n]) for n in ns],
                    styles[i % len(styles)], color=color,
                    label=name if len(lrs) == 1 else f"{name}, lr {lr:g}")
    ax.set(xlabel="workers", ylabel="|update - sequential SGD| / |sequential|", yscale="log",
           title=title)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
