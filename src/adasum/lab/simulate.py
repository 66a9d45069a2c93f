"""``adasum simulate``: data-parallel training with N simulated workers in one process.

The workers share one model. Each step, ``torch.func.vmap`` takes every worker's gradient over
its own examples in one batched call; the gradients (gradient mode) or the per-worker optimizer
deltas (delta mode, each worker with its own optimizer state) are combined by
:func:`adasum.reduce`, the average or the sum. Data order, learning-rate schedule and evaluation
points are those of ``adasum train`` (:class:`~adasum.experiments.config.Plan`), so a simulated
run follows the real one to float tolerance.

At every evaluation point the simulator also measures how far each combined update is from
the update sequential SGD would make over the same examples: starting from the current
weights, worker 0's examples, then worker 1's at the new weights, and so on, each a plain SGD
step at the current learning rate. The distance is relative, ``|c - s| / |s|``, over all layers.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.func import functional_call, grad, grad_and_value, vmap
from tqdm import tqdm

import adasum
from adasum.lab.config import COMBINERS, DELTA_MODE, Plan, RunConfig
from adasum.lab.optimizers import make_optimizer, set_lr
from adasum.lab.records import evaluate, summarize, write_csv
from adasum.lab.tasks import Task

__all__ = ["combine_stacked", "simulate_run", "sweep", "geometry", "write_report", "lr_grid_table",
           "distance_table"]


def combine_stacked(stacked: Sequence[torch.Tensor], combiner: str) -> list[torch.Tensor]:
    """Combine ``[workers, ...]`` tensors (one per layer) over the worker dimension."""
    if combiner == "adasum":
        return adasum.reduce([[t[r] for t in stacked] for r in range(stacked[0].shape[0])])
    if combiner == "average":
        return [t.mean(0) for t in stacked]
    return [t.sum(0) for t in stacked]


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(t.double().pow(2).sum().item() for t in tensors))


class _Workers:
    """Per-worker gradients of one shared model, taken in one vmap call."""

    def __init__(self, task: Task, model: torch.nn.Module) -> None:
        self.task, self.model = task, model
        self.names = [n for n, _ in model.named_parameters()]

        def loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return task.loss(functional_call(model, params, (x,)), y)

        self._loss = loss
        self._batched = vmap(grad_and_value(loss), in_dims=(None, 0, 0))

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``([workers, *shape] per layer, [workers] losses)`` at the current weights."""
        grads, losses = self._batched(self.params(), x, y)
        return [grads[n] for n in self.names], losses

    def sequential_update(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> list[torch.Tensor]:
        """What plain SGD would change, taking the workers' batches one after the other."""
        start = self.params()
        w = dict(start)
        for i in range(x.shape[0]):
            g = grad(self._loss)(w, x[i], y[i])
            w = {n: w[n] - lr * g[n] for n in self.names}
        return [w[n] - start[n] for n in self.names]


def _sequential_distances(workers: _Workers, grads: list[torch.Tensor], x: torch.Tensor,
                          y: torch.Tensor, lr: float) -> dict[str, float]:
    """Relative distance of each combiner's SGD update to the sequential one, and how much
    longer Adasum's update is than the average's (1 = average, workers = sum)."""
    seq = workers.sequential_update(x, y, lr)
    seq_norm = _norm(seq)
    row = {}
    combined = {c: combine_stacked(grads, c) for c in COMBINERS}
    for c, update in combined.items():
        row[f"dist_{c}"] = _norm([-lr * u - s for u, s in zip(update, seq)]) / max(seq_norm, 1e-300)
    row["adasum_scale"] = _norm(combined["adasum"]) / max(_norm(combined["average"]), 1e-300)
    return row


def simulate_run(task: Task, config: RunConfig, workers: int, *, distances: bool = True,
                 progress: bool = False) -> tuple[list[dict], dict]:
    """Train ``config`` with ``workers`` simulated workers; returns ``(history, summary)``.

    ``history`` has one row per step (as ``adasum train`` writes it); rows at evaluation
    points add the test score and, with ``distances``, the distances to sequential SGD.
    """
    plan = Plan(config.validated(), workers, len(task.x_train))
    model = task.build_model(config.seed)
    sim = _Workers(task, model)
    params = list(model.parameters())
    delta = config.optimizer in DELTA_MODE
    if delta:
        # Each worker steps its own copy of the weights with its own optimizer state.
        copies = [[torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(workers)]
        optimizers = [make_optimizer(config.optimizer, c, config.lr) for c in copies]
    else:
        optimizers = [make_optimizer(config.optimizer, params, config.lr)]
    history: list[dict] = []
    started = time.perf_counter()
    for step, examples in tqdm(plan.batches(), total=plan.total_steps, disable=not progress,
                               leave=False, unit="step"):
        lr = plan.lr_at(step)
        for opt in optimizers:
            set_lr(opt, lr)
        idx = examples.view(workers, plan.per_worker)
        x, y = task.x_train[idx], task.y_train[idx]
        grads, losses = sim.gradients(x, y)
        row = {"step": step + 1, "epoch": plan.epoch_of(step + 1), "lr": lr, "loss": losses.mean().item()}
        evaluating = plan.evaluates_after(step + 1)
        if evaluating and distances:
            row.update(_sequential_distances(sim, grads, x, y, lr))
        if delta:
            _delta_step(params, copies, optimizers, grads, config.combiner)
        else:
            for p, g in zip(params, combine_stacked(grads, config.combiner)):
                p.grad = g
            optimizers[0].step()
        if evaluating:
            row.update(evaluate(task, model))
        history.append(row)
        if not math.isfinite(row["loss"]):
            break
    summary = summarize(history, plan)
    measured = [r for r in history if "dist_adasum" in r]
    for key in ("dist_adasum", "dist_average", "dist_sum", "adasum_scale"):
        summary[key] = sum(r[key] for r in measured) / len(measured) if measured else math.nan
    summary["seconds"] = time.perf_counter() - started
    return history, summary


def _delta_step(params: list[torch.nn.Parameter], copies: list[list[torch.nn.Parameter]],
                optimizers: list[torch.optim.Optimizer], grads: list[torch.Tensor],
                combiner: str) -> None:
    """Every worker steps from the shared weights; the shared weights move by the combined
    deltas."""
    deltas = []
    for r, (copy, opt) in enumerate(zip(copies, optimizers)):
        with torch.no_grad():
            for c, p, g in zip(copy, params, grads):
                c.copy_(p)
                c.grad = g[r]
        opt.step()
        deltas.append([c.detach() - p.detach() for c, p in zip(copy, params)])
    stacked = [torch.stack(layer) for layer in zip(*deltas)]
    with torch.no_grad():
        for p, d in zip(params, combine_stacked(stacked, combiner)):
            p.add_(d)


def sweep(task: Task, base: RunConfig, *, workers: Sequence[int], combiners: Sequence[str],
          optimizers: Sequence[str], lrs: Sequence[float], batches: Sequence[int],
          accums: Sequence[int], distances: bool = True,
          on_run: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Every combination of the given values; returns ``(summaries, curves)`` where each curve
    row is a history row tagged with its run's index. Settings whose step would need more
    examples than the training set holds are skipped."""
    summaries, curves = [], []
    grid = itertools.product(optimizers, batches, accums, workers, combiners, lrs)
    for optimizer, batch, accum, n, combiner, lr in grid:
        if n * batch * accum > len(task.x_train):
            continue
        config = base.with_(optimizer=optimizer, batch=batch, accum=accum, combiner=combiner, lr=lr)
        history, summary = simulate_run(task, config, n, distances=distances)
        summary["run"] = len(summaries)
        summaries.append(summary)
        curves.extend({"run": summary["run"], **r} for r in history)
        if on_run is not None:
            on_run(summary)
    return summaries, curves


def geometry(workers: Sequence[int], cosines: Sequence[float], dim: int = 4096,
             seed: int = 0) -> list[dict]:
    """Adasum of N unit vectors whose pairwise cosine is ``c``: its length relative to the sum
    and to the average. Orthogonal vectors (c = 0) should give the sum, equal ones the average.

    The vectors are ``sqrt(c) u + sqrt(1 - c) e_i`` with u a shared unit vector and e_i
    orthonormal noise directions, so every pair has cosine exactly c.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in workers:
        basis, _ = torch.linalg.qr(torch.randn(dim, n + 1, generator=g, dtype=torch.float64))
        shared, noise = basis[:, 0], basis[:, 1:].T
        for c in cosines:
            vectors = math.sqrt(c) * shared + math.sqrt(1 - c) * noise
            a = adasum.reduce(list(vectors))
            total, mean = vectors.sum(0), vectors.mean(0)
            rows.append({
                "workers": n, "cosine": c,
                "dist_to_sum": ((a - total).norm() / total.norm()).item(),
                "dist_to_average": ((a - mean).norm() / mean.norm()).item(),
                "norm_over_average": (a.norm() / mean.norm()).item(),
            })
    return rows


# ---------------------------------------------------------------- report: CSV, markdown, plots

_TABLE_COLUMNS = ("optimizer", "combiner", "workers", "batch", "accum", "examples_per_step", "lr",
                  "steps", "score", "train_loss", "steps_to_target", "epochs_to_target",
                  "dist_adasum", "dist_average", "dist_sum")


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


_SETTING = ("optimizer", "combiner", "workers", "batch", "accum", "examples_per_step")


def _grid_cell(s: dict) -> str:
    """``epochs to target (final score)``; ``div`` for a diverged run, ``-`` for epochs when the
    target was not reached."""
    if s["diverged"]:
        return "div"
    reached = "-" if s["epochs_to_target"] is None else f"{s['epochs_to_target']:.3g}"
    return f"{reached} ({_cell(s['score'])})" if s["target"] is not None else _cell(s["score"])


def lr_grid_table(summaries: Sequence[dict]) -> str:
    """One row per setting (optimizer, combiner, workers, batch, accum), one column per learning
    rate: epochs to the target and final score, or ``div``. Shows at a glance which learning
    rates each combiner tolerates and the largest setting that still reaches the target."""
    lrs = sorted({s["lr"] for s in summaries})
    rows: dict[tuple, dict[float, dict]] = {}
    for s in summaries:
        rows.setdefault(tuple(s[k] for k in _SETTING), {})[s["lr"]] = s
    head = ["optimizer", "combiner", "N", "batch", "accum", "E"] + [f"lr {lr:g}" for lr in lrs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_lr in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][5], kv[0][2])):
        cells = [str(v) for v in key] + [_grid_cell(by_lr[lr]) if lr in by_lr else "" for lr in lrs]
        lines.append("| " + " | ".join(cells) + " |")
    note = "\nCells: epochs to the target (final test score); `-` = target not reached; `div` = diverged.\n"
    return "\n".join(lines) + "\n" + (note if any(s["target"] is not None for s in summaries) else "")


def _has_distances(summaries: Sequence[dict]) -> bool:
    """Whether any run measured the distance to sequential SGD (``adasum train`` runs and
    ``--no-distances`` sweeps do not)."""
    return any(not math.isnan(s.get("dist_adasum", math.nan)) for s in summaries)


def distance_table(summaries: Sequence[dict]) -> str:
    """Per run (workers, learning rate): the mean distance of each combiner's update to
    sequential SGD, the closest combiner, and Adasum's length relative to the average."""
    lines = ["| workers | lr | dist_adasum | dist_average | dist_sum | closest | adasum_scale |",
             "|---|---|---|---|---|---|---|"]
    for s in sorted(summaries, key=lambda s: (s["lr"], s["workers"])):
        closest = min(COMBINERS, key=lambda c: s[f"dist_{c}"]) if s["workers"] > 1 else "(all equal)"
        cells = [s["workers"], s["lr"], *(s[f"dist_{c}"] for c in COMBINERS), closest, s["adasum_scale"]]
        lines.append("| " + " | ".join(_cell(v) for v in cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(summaries: list[dict], curves: list[dict], out: Path, title: str) -> list[Path]:
    """``summary.csv``, ``curves.csv``, ``table.md`` and the plots that the sweep's varying
    dimensions make meaningful; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(summaries, out / "summary.csv")
    write_csv(curves, out / "curves.csv")
    (out / "table.md").write_text(f"# {title}\n\n" + markdown_table(summaries, _TABLE_COLUMNS))
    (out / "by_lr.md").write_text(f"# {title}\n\n" + lr_grid_table(summaries))
    written = [out / "summary.csv", out / "curves.csv", out / "table.md", out / "by_lr.md"]
    if _has_distances(summaries):
        (out / "distances.md").write_text(f"# {title}\n\n" + distance_table(summaries))
        written.append(out / "distances.md")
    written += _plots(summaries, curves, out, title)
    return written


def _plots(summaries: list[dict], curves: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    written = [_plot_curves(summaries, curves, out / "curves.png", title)]
    if len({s["lr"] for s in summaries}) > 1:
        written.append(_plot_by(summaries, "lr", "score", out / "lr_range.png", title, logx=True))
    if len({s["examples_per_step"] for s in summaries}) > 1:
        written.append(_plot_scaling(summaries, out / "scaling.png", title))
    if len({s["workers"] for s in summaries}) > 1 and _has_distances(summaries):
        written.append(_plot_distances(summaries, out / "sequential_distance.png", title))
    return written


def _series(summaries: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in summaries:
        groups.setdefault((s["optimizer"], s["combiner"]), []).append(s)
    return groups


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _plot_curves(summaries, curves, path: Path, title: str) -> Path:
    """Training loss and test score per epoch of the best run (highest final score) of each
    optimizer and combiner."""
    import matplotlib.pyplot as plt

    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for (opt, comb), runs in sorted(_series(summaries).items()):
        best = max(runs, key=lambda s: -math.inf if math.isnan(s["score"]) else s["score"])
        rows = [r for r in curves if r["run"] == best["run"]]
        label = f"{opt}/{comb} lr={best['lr']:g} N={best['workers']}"
        loss_ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], label=label)
        scored = [r for r in rows if "score" in r]
        score_ax.plot([r["epoch"] for r in scored], [r["score"] for r in scored], label=label)
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log")
    score_ax.set(xlabel="epoch", ylabel="test score")
    score_ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _plot_by(summaries, x: str, y: str, path: Path, title: str, logx: bool) -> Path:
    """Final ``y`` against ``x``. One panel when the sweep has one setting per combiner (lines:
    optimizer/combiner); otherwise one panel per optimizer/combiner, a line per setting (E, N)."""
    import matplotlib.pyplot as plt

    series = _series(summaries)
    settings = sorted({(s["examples_per_step"], s["workers"]) for s in summaries})
    panels = [("", list(series))] if len(settings) == 1 else [(f"{o}/{c}", [(o, c)]) for o, c in series]
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
    return _save(fig, path)


def _plot_scaling(summaries, path: Path, title: str) -> Path:
    """Epochs to the target at the best learning rate, against examples before communication;
    an x at the epoch budget marks an E at which no learning rate reached the target."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    budget = max(s["epochs"] for s in summaries)
    for (opt, comb), runs in sorted(_series(summaries).items()):
        best = _best_per(runs, "examples_per_step")
        line, = ax.plot(list(best), [b["epochs_to_target"] if b else math.nan for b in best.values()],
                        "o-", label=f"{opt}/{comb}")
        missed = [e for e, b in best.items() if b is None]
        ax.plot(missed, [budget] * len(missed), "x", ms=10, mew=2, color=line.get_color())
    ax.axhline(budget, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="examples before communication (E)",
           ylabel="epochs to target (best lr; x = none reached)", title=title)
    ax.title.set_fontsize(9)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _best_per(runs: Sequence[dict], key: str) -> dict:
    """For each value of ``key``, the run that reached the target in the fewest epochs (None if
    no run did)."""
    best: dict = {}
    for s in sorted(runs, key=lambda s: s[key]):
        cur = best.setdefault(s[key], None)
        if s["epochs_to_target"] is not None and (cur is None or s["epochs_to_target"] < cur["epochs_to_target"]):
            best[s[key]] = s
    return best


def _plot_distances(summaries, path: Path, title: str) -> Path:
    """Mean relative distance of each combined update to sequential SGD, against workers; one
    line per combiner and learning rate (the sequential update depends on the learning rate).
    One worker is left out: every combiner is sequential SGD there (distance 0 up to rounding)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lrs = sorted({s["lr"] for s in summaries})
    styles = ["o-", "s--", "^:", "d-."]
    for i, lr in enumerate(lrs):
        by_n: dict[int, list[dict]] = {}
        for s in summaries:
            if s["lr"] == lr and s["workers"] > 1:
                by_n.setdefault(s["workers"], []).append(s)
        ns = sorted(by_n)
        for c, color in zip(COMBINERS, ("C0", "C1", "C2")):
            ax.plot(ns, [sum(s[f"dist_{c}"] for s in by_n[n]) / len(by_n[n]) for n in ns],
                    styles[i % len(styles)], color=color,
                    label=c if len(lrs) == 1 else f"{c}, lr {lr:g}")
    ax.set(xlabel="workers", ylabel="|update - sequential SGD| / |sequential|", yscale="log",
           title=title)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    return _save(fig, path)
