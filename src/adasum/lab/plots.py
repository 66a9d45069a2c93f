"""The plots of a report: learning curves (a column of panels per worker count and batch),
final score against the learning rate, epochs to the target (or, without a target, the final
score) against examples per step, and the distance to sequential SGD against the number of
workers. Each is drawn only when the runs vary along its axis; every score axis names the
task's metric and shows the target as a dashed line."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from adasum.lab.config import REDUCERS  # noqa: E402
from adasum.lab.records import metric_of, targets_of  # noqa: E402

__all__ = ["write_plots", "save_figure", "plt"]

#: Line styles by series: lines that coincide (with one worker every reducer is the same run)
#: stay visible.
_DASHES = ("-", "--", "-.", ":")


def write_plots(summaries: Sequence[dict], curves: Sequence[dict], out: Path, title: str, *,
                distances: bool) -> list[Path]:
    """The learning curves, and the plots whose axis the runs vary along (``distances``: the
    runs measured the distance to sequential SGD, at two or more worker counts above one);
    returns the files written."""
    written = [_plot_curves(summaries, curves, out / "curves.png", title)]
    if len({s["lr"] for s in summaries}) > 1:
        written.append(_plot_by(summaries, "lr", "score", out / "lr_range.png", title, logx=True))
    if len({s["examples_per_step"] for s in summaries}) > 1:
        written.append(_plot_scaling(summaries, out / "scaling.png", title))
    # A line of distances needs two worker counts above one (with one worker every distance is 0).
    if len({s["workers"] for s in summaries if s["workers"] > 1}) > 1 and distances:
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


def _best(runs: Sequence[dict]) -> dict:
    """The run with the highest final score (a diverged run's NaN counts as lowest)."""
    return max(runs, key=lambda s: -math.inf if math.isnan(s["score"]) else s["score"])


def _target_lines(ax: plt.Axes, summaries: Sequence[dict]) -> None:
    """The runs' target score as a dashed line on a score axis (none when no target was set)."""
    for target in targets_of(summaries):
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:g}")


def _plot_curves(summaries: Sequence[dict], curves: Sequence[dict], path: Path, title: str) -> Path:
    """Training loss (top) and test score (bottom) per epoch: a column per setting (workers and
    examples per step), in it a line per optimizer and reducer, at its best learning rate
    (highest final score) when several were tried; each line keeps its colour in every column."""
    settings = sorted({(s["workers"], s["examples_per_step"]) for s in summaries})
    groups = _series(summaries)
    several_lrs = len({s["lr"] for s in summaries}) > 1
    fig, axes = plt.subplots(2, len(settings), figsize=(max(6.0, 1.0 + 3.0 * len(settings)), 6.0), sharey="row",
                             squeeze=False)
    for (loss_ax, score_ax), (n, e) in zip(axes.T, settings):
        for i, key in enumerate(sorted(groups)):
            runs = [s for s in groups[key] if (s["workers"], s["examples_per_step"]) == (n, e)]
            if not runs:
                continue
            best = _best(runs)
            rows = [r for r in curves if r["run"] == best["run"]]
            scored = [r for r in rows if "score" in r]
            label = "/".join(key) + (f" lr={best['lr']:g}" if several_lrs else "")
            style = {"color": f"C{i % 10}", "ls": _DASHES[i % len(_DASHES)]}
            loss_ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], lw=0.8, **style)
            score_ax.plot([r["epoch"] for r in scored], [r["score"] for r in scored], label=label, **style)
        _target_lines(score_ax, summaries)
        loss_ax.set(title=f"N={n} worker{'s' if n > 1 else ''}, E={e}", yscale="log")
        loss_ax.title.set_fontsize(9)
        score_ax.set(xlabel="epoch")
        score_ax.legend(fontsize=6, loc="lower right")
    axes[0][0].set_ylabel("training loss")
    axes[1][0].set_ylabel(metric_of(summaries))
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
    if y == "score":
        for ax in axes[0]:
            _target_lines(ax, summaries)
    axes[0][0].set_ylabel(f"final {metric_of(summaries) if y == 'score' else y} (diverged = 0)")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def _plot_scaling(summaries: Sequence[dict], path: Path, title: str) -> Path:
    """Against examples before communication, at the best learning rate: the epochs to the
    target (an x at the epoch budget marks an E at which no learning rate reached it), or,
    with no target set, the final score."""
    if not targets_of(summaries):
        return _plot_final_scores(summaries, path, title)
    fig, ax = plt.subplots(figsize=(6, 4))
    budget = max(s["epochs"] for s in summaries)
    for i, ((opt, red), runs) in enumerate(sorted(_series(summaries).items())):
        best = _best_per(runs, "examples_per_step")
        line, = ax.plot(list(best), [b["epochs_to_target"] if b else math.nan for b in best.values()],
                        marker="o", ls=_DASHES[i % len(_DASHES)], label=f"{opt}/{red}")
        missed = [e for e, b in best.items() if b is None]
        ax.plot(missed, [budget] * len(missed), "x", ms=10, mew=2, color=line.get_color())
    ax.axhline(budget, color="grey", lw=0.8, ls=":", label=f"epoch budget ({budget:.3g})")
    goal = f"{metric_of(summaries)} {', '.join(f'{t:g}' for t in targets_of(summaries))}"
    ax.set(xlabel="examples before communication (E)",
           ylabel=f"epochs to {goal}\n(best lr; x = not reached)", title=title)
    ax.title.set_fontsize(9)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _plot_final_scores(summaries: Sequence[dict], path: Path, title: str) -> Path:
    """The final score of the best learning rate against examples before communication: what
    the epoch budget bought at each E, when no target says how long each took."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, ((opt, red), runs) in enumerate(sorted(_series(summaries).items())):
        by_e: dict[int, list[dict]] = {}
        for s in runs:
            by_e.setdefault(s["examples_per_step"], []).append(s)
        es = sorted(by_e)
        ax.plot(es, [0.0 if _best(by_e[e])["diverged"] else _best(by_e[e])["score"] for e in es], marker="o",
                ls=_DASHES[i % len(_DASHES)], label=f"{opt}/{red}")
    ax.set(xlabel="examples before communication (E)",
           ylabel=f"final {metric_of(summaries)} (best lr; diverged = 0)", title=f"{title} (no target set)")
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
    line per reducer and learning rate (the sequential update depends on the learning rate),
    each point the mean over the runs of that N and learning rate, whichever reducer they
    trained with. One worker is left out: every reducer is sequential SGD there (distance 0 up
    to rounding)."""
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
    ax.title.set_fontsize(9)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
