"""Reports of a :class:`~amortcvx.evaluation.compare.Comparison`: a text table, CSV files and PNG plots.

* :func:`format_table`: aligned plain-text table, one row per strategy (median / p90 / mean exact iterations,
  ratio of medians to the baseline, non-optimal count, warm-started count, median solver time);
* :func:`write_summary_csv` / :func:`write_instances_csv`: the same summary, and one row per (strategy,
  instance);
* :func:`plot_iterations_cdf`: empirical CDF of the iteration counts per strategy, ``F(k) = #{i : k_i <= k} / N``,
  on a log x axis;
* :func:`plot_medians`: bar chart of the median iterations with whiskers up to the 90th percentile;
* :func:`plot_learning_curve`: the automatic training recipe's learning curve (validation loss and median C
  iterations against the training-set size, every training beside it);
* :func:`new_figure` / :func:`save_figure`: the figure and PNG helpers these use (also for the benchmarks' plots).

Plots need matplotlib (``pip install 'amortcvx[bench]'``); it is imported when a plot is made, and only its
object-oriented API is used (no pyplot, so the caller's backend and global state are left alone).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from amortcvx.evaluation.compare import Comparison, StrategyResult, Summary

if TYPE_CHECKING:
    from amortcvx.training.recipe import RecipeResult

_COLUMNS = ("strategy", "median", "p90", "mean", "ratio", "non-optimal", "warm", "time ms", "obj gap")


def _fmt(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if float(value).is_integer() and digits <= 1:
        return f"{int(value)}"
    return f"{value:.{digits}f}"


def _row(s: Summary) -> list[str]:
    return [s.name, _fmt(s.median), _fmt(s.p90), _fmt(s.mean), _fmt(s.ratio, 3), f"{s.non_optimal}",
            f"{s.warm}/{s.count}", _fmt(s.median_time_ms, 3), "-" if math.isnan(s.objective_gap)
            else f"{s.objective_gap:.1e}"]


def format_rows(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None, *,
                left: Sequence[int] = (0,)) -> str:
    """Align ``rows`` of strings under ``header``: columns in ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(str(h)), *(len(str(r[j])) for r in rows)) if rows else len(str(h))
              for j, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if j in left else str(c).rjust(w)
                         for j, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [] if title is None else [title]
    out += [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_table(comparison: Comparison, title: str | None = None) -> str:
    """The comparison as an aligned text table (one row per strategy).

    Columns: median / p90 / mean of the exact iteration counts, ``ratio`` = median / baseline median,
    ``non-optimal`` = solves not ending ``optimal``, ``warm`` = warm-started instances out of all, ``time ms`` =
    median solver setup + solve time (timed pass), ``obj gap`` = largest relative objective difference to the
    baseline.
    """
    return format_rows(_COLUMNS, [_row(s) for s in comparison.summaries], title=title)


def write_summary_csv(comparison: Comparison, path: str | os.PathLike) -> Path:
    """Write one row per strategy (the :class:`Summary` fields) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["backend", *Summary._fields])
        for s in comparison.summaries:
            writer.writerow([comparison.backend, *(_csv_value(v) for v in s)])
    return path


def write_instances_csv(comparison: Comparison, path: str | os.PathLike) -> Path:
    """Write one row per (strategy, instance): iterations, status, objective, times, warm; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["strategy", "instance", "iterations", "status", "objective", "setup_time",
                         "solve_time", "warm"])
        for name, r in comparison.strategies.items():
            for i in range(r.iterations.shape[0]):
                writer.writerow([name, i, int(r.iterations[i]), r.status[i], _csv_value(r.objective[i]),
                                 _csv_value(r.setup_time[i]), _csv_value(r.solve_time[i]), int(r.warm[i])])
    return path


def _csv_value(v):
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def new_figure(figsize: tuple[float, float]):
    """A matplotlib ``Figure`` (object-oriented API, Agg canvas; pyplot's global state is left alone)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib, which is not installed; install it with "
                          "`pip install matplotlib` (or `pip install 'amortcvx[bench]'`)") from None
    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save ``fig`` as a PNG at ``path`` (folders made as needed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_iterations_cdf(comparison: Comparison, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Empirical CDF of the exact iteration counts, one step curve per strategy, log x axis; saved as PNG.

    ``F_s(k) = #{i : k_s,i <= k} / N``. Counts below 1 (failed solves report 0) are drawn at 1.
    """
    fig = new_figure((6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    top = 1
    for j, (name, r) in enumerate(comparison.strategies.items()):
        it = np.sort(np.maximum(np.asarray(r.iterations, dtype=np.float64), 1.0))
        top = max(top, float(it[-1]))
        frac = np.arange(1, it.size + 1) / it.size
        ax.step(np.concatenate([[it[0]], it]), np.concatenate([[0.0], frac]), where="post", label=name,
                linewidth=1.8, color=f"C{j % 10}")
    ax.set_xscale("log")
    ax.set_xlim(0.8, top * 1.25)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(f"exact {comparison.backend.upper()} iterations to tolerance")
    ax.set_ylabel("fraction of instances solved")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_title(title or f"{comparison.backend.upper()} iterations, {_count(comparison)} instances", fontsize=10)
    return save_figure(fig, path)


def plot_medians(comparison: Comparison, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Bar chart of the median exact iterations per strategy, whiskers from the median to the p90; PNG."""
    sums = comparison.summaries
    fig = new_figure((max(4.8, 1.1 * len(sums) + 2.0), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(sums))
    med = np.array([s.median for s in sums])
    p90 = np.array([s.p90 for s in sums])
    colors = [f"C{j % 10}" for j in range(len(sums))]
    ax.bar(pos, med, color=colors, width=0.65, alpha=0.85)
    ax.errorbar(pos, med, yerr=[np.zeros_like(med), np.maximum(p90 - med, 0.0)], fmt="none", ecolor="black",
                capsize=5, linewidth=1.2)
    for j, s in enumerate(sums):
        ax.annotate(_fmt(s.median), (pos[j], s.median), textcoords="offset points", xytext=(8, 2), fontsize=8,
                    ha="left")
    ax.set_xticks(pos)
    ax.set_xticklabels([s.name for s in sums], rotation=20, ha="right", fontsize=9)
    ax.set_ylabel(f"exact {comparison.backend.upper()} iterations (median, whisker: p90)")
    ax.set_ylim(0.0, max(1.0, float(p90.max())) * 1.12)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or f"{comparison.backend.upper()}: median iterations, {_count(comparison)} instances",
                 fontsize=10)
    return save_figure(fig, path)


def learning_curve_figure(result: RecipeResult, *, title: str | None = None):
    """The figure of :func:`plot_learning_curve` (a matplotlib ``Figure``: axes 0 the loss, axes 1 the iterations;
    in each, line 0 is the curve, line 1 the other trainings, line 2 the chosen model; the iterations' axes then
    has the cold start's median and half of it)."""
    if not result.curve:
        raise ValueError("the recipe result has an empty learning curve: nothing to plot")
    from matplotlib.ticker import FixedLocator, NullLocator

    fig = new_figure((10.0, 4.0))
    loss_ax, iter_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    on_curve = {(p.num_train, p.val_regression, p.val_median_iterations) for p in result.curve}
    chosen = [t for t in result.trials if t.candidate == result.candidate and t.num_train == result.num_train][-1:]
    others = [t for t in result.trials if (t.num_train, t.val_regression, t.val_median_iterations) not in on_curve
              and t not in chosen]
    series = (("curve", result.curve, "o-", "C0"), ("other", others, "x", "0.55"), ("chosen", chosen, "*", "C1"))
    configurations = [p.configuration for p in result.curve]
    first = configurations[0] or dataclasses.replace(result.candidate, member=0, ensemble=1).label()
    labels = {"curve": f"learning curve: {first}" + (" (widened where marked)" if len(set(configurations)) > 1
                                                      else ""),
              "other": "the recipe's other trainings",
              "chosen": f"chosen: {result.label()}, n = {result.num_train}"}
    for name, points, style, color in series:
        n = [p.num_train for p in points]
        size = 9 if name == "chosen" else 6
        loss_ax.plot(n, [p.val_regression for p in points], style, color=color, linewidth=1.8, markersize=size,
                     label=labels[name])
        iter_ax.plot(n, [p.val_median_iterations for p in points], style, color=color, linewidth=1.8,
                     markersize=size, label=labels[name])
    for j in range(1, len(result.curve)):  # where a wider network took over: its width beside the point
        if configurations[j] != configurations[j - 1]:
            p = result.curve[j]
            width = configurations[j].split(" ")[1] if " " in configurations[j] else configurations[j]
            for ax, y in ((loss_ax, p.val_regression), (iter_ax, p.val_median_iterations)):
                ax.annotate(width, (p.num_train, y), textcoords="offset points", xytext=(-6, -12), fontsize=7,
                            ha="right", color="C0")
    cold = result.cold_median_iterations
    iter_ax.axhline(cold, color="C3", linestyle="--", linewidth=1.2, label=f"cold start ({cold:g})")
    iter_ax.axhline(cold / 2, color="C2", linestyle=":", linewidth=1.2, label="1/2 of cold")
    sizes = sorted({t.num_train for t in result.trials} | {p.num_train for p in result.curve})
    for ax in (loss_ax, iter_ax):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(v) for v in sizes], rotation=45 if len(sizes) > 5 else 0, fontsize=8)
        ax.set_xlabel("training instances")
        ax.grid(True, alpha=0.25)
    if all(p.val_regression > 0 for p in (*result.curve, *others, *chosen)):
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("validation regression loss")
    iter_ax.set_ylabel("validation median C iterations (k = 0)")
    top = max([cold] + [p.val_median_iterations for p in (*result.curve, *others, *chosen)])
    iter_ax.set_ylim(0.0, top * 1.15)
    iter_ax.legend(fontsize=7, frameon=False, loc="lower left")  # below half of cold: empty but for a good model
    fig.suptitle(title or f"learning curve: {len(result.trials)} trainings in {result.seconds:.0f} s of a "
                 f"{result.budget_seconds:.0f} s budget", fontsize=10)
    return fig


def plot_learning_curve(result: RecipeResult, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """The learning curve of :func:`~amortcvx.training.recipe.fit_predictor` (``AmortizedSolver.fit(budget=...)``
    keeps it as ``solver.recipe``) as a PNG: against the training-set size (log axis), the validation regression
    loss (left, log axis) and the validation median of exact C iterations from the bare prediction (right), for the
    learning curve (line; the width of a network the capacity step widened is written where it took over), every
    other training the recipe ran (crosses) and the chosen model (star), with the cold start's median and half of
    it as horizontal lines. Where the loss still falls at the largest size, more data would improve the fit; where
    the iterations stay flat, not the warm start."""
    return save_figure(learning_curve_figure(result, title=title), path)


def _count(comparison: Comparison) -> int:
    first = next(iter(comparison.strategies.values()))
    return int(first.iterations.shape[0])


def read_instances_csv(path: str | os.PathLike, *, backend: str, settings=None, baseline: str | None = "cold",
                       timed: bool = False) -> Comparison:
    """The :class:`Comparison` written by :func:`write_instances_csv` (strategies in file order).

    ``backend``, ``settings``, ``baseline`` and ``timed`` are not in the file; pass those of the run.
    """
    rows: dict[str, list[dict[str, str]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rows.setdefault(row["strategy"], []).append(row)
    strategies = {}
    for name, rs in rows.items():
        rs.sort(key=lambda r: int(r["instance"]))

        def col(key: str, dtype, rs=rs) -> np.ndarray:
            return np.array([dtype(r[key]) for r in rs])

        strategies[name] = StrategyResult(
            name=name, iterations=col("iterations", int).astype(np.int64), status=col("status", str),
            objective=col("objective", float), setup_time=col("setup_time", float),
            solve_time=col("solve_time", float), warm=col("warm", int).astype(bool))
    if baseline is not None and baseline not in strategies:
        baseline = None
    return Comparison(backend=backend, settings=dict(settings or {}), strategies=strategies, baseline=baseline,
                      timed=timed)
