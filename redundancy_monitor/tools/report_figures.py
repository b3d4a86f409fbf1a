"""The report's figures, drawn with matplotlib (an optional extra: ``pip install
'redundancy-monitor[plots]'``). Each function returns PNG bytes, or None when the run has
nothing to draw for it. No pyplot: figures are built and rendered directly with Agg, so
no global state or display is touched."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np

from redundancy_monitor.errors import MissingDependencyError
from redundancy_monitor.monitoring.sinks import GAP_CHART
from redundancy_monitor.monitoring.tensorboard import HEATMAPS, pair_matrix
from redundancy_monitor.probing.result import ProbeResult
from redundancy_monitor.tools.records import RunRecords

MISSING = "#d0d0d0"  # pairs not probed


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "the report draws its figures with matplotlib, which is not installed; "
            "install it with: pip install 'redundancy-monitor[plots]'"
        ) from None
    return Figure, FigureCanvasAgg


def _render(draw: Callable, figsize: tuple[float, float], ncols: int = 1, nrows: int = 1) -> bytes:
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    draw(fig, axes)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _step_axis(ax, steps: list[int]) -> None:
    """Log-like x axis when the probes span orders of magnitude (dense early probes)."""
    positive = [s for s in steps if s > 0]
    if positive and max(positive) / min(positive) >= 100:
        ax.set_xscale("symlog", linthresh=max(1, min(positive)))
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)


def _series(points: list, name: str) -> tuple[list[int], list[float]]:
    values = [(p.step, p.result.summary.scalars().get(name)) for p in points]
    finite = [(s, v) for s, v in values if v is not None and math.isfinite(v)]
    return [s for s, _ in finite], [v for _, v in finite]


def _plot_by_segment(ax, run: RunRecords, name: str, **style) -> None:
    """One scalar over steps; each trajectory (between new baselines) is its own line in
    the same colour, so no line joins probes of two trajectories."""
    label, color = style.pop("label", None), style.pop("color", None)
    for k, points in enumerate(run.segments()):
        steps, values = _series(points, name)
        (line,) = ax.plot(steps, values, label=label if k == 0 else None, color=color, **style)
        color = line.get_color()


def _mark_baselines(ax, run: RunRecords) -> None:
    for k, b in enumerate(run.baselines):
        label = "new baseline" if k == 0 else None
        ax.axvline(b.step, color="grey", linestyle="--", linewidth=0.8, label=label)


def gap_trajectory(run: RunRecords) -> bytes:
    """Summary gap mean, median, p75 and max over steps."""

    def draw(fig, axes):
        ax = axes[0, 0]
        for name in GAP_CHART:
            label = name.replace("gap_", "")
            _plot_by_segment(ax, run, name, marker="o", markersize=3, label=label)
        _mark_baselines(ax, run)
        ax.axhline(0.0, color="black", linewidth=0.6)
        _step_axis(ax, run.steps)
        ax.set_ylabel("gap = d_repl - d_int (nats)")
        ax.set_title("Protocol gap over training")
        ax.legend(loc="best", fontsize=8)

    return _render(draw, (8, 4))


def ir_by_distance(run: RunRecords) -> bytes:
    """Median ir = d_int / d_repl over steps, one line per pair distance |i-j|."""
    distances = sorted({d for p in run.probes for d in p.result.summary.by_distance})

    def draw(fig, axes):
        ax = axes[0, 0]
        for d in distances:
            _plot_by_segment(
                ax, run, f"d{d}/ir_median", marker="o", markersize=3, label=f"|i-j| = {d}"
            )
        if len(distances) > 1:
            _plot_by_segment(ax, run, "ir_median", color="black", linestyle="--", label="all pairs")
        _mark_baselines(ax, run)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8, label="regime threshold")
        _step_axis(ax, run.steps)
        ax.set_ylabel("median ir = d_int / d_repl")
        ax.set_title("Interchange / replacement ratio by pair distance")
        ax.legend(loc="best", fontsize=8)

    return _render(draw, (8, 4))


def heatmaps(run: RunRecords) -> bytes:
    """d_repl, d_int and gap over (i, j) at the first and the last probe."""
    points = [run.first] if len(run.current) == 1 else [run.first, run.last]

    from matplotlib import colormaps

    matrices = {
        (row, name): np.ma.masked_invalid(pair_matrix(point.result, name))
        for row, point in enumerate(points)
        for name in HEATMAPS
    }
    # One colour scale per quantity, shared by both probes, so the rows compare directly.
    top = {
        name: max(
            (float(np.abs(m).max()) for (_, n), m in matrices.items() if n == name and m.count()),
            default=0.0,
        )
        or 1.0
        for name in HEATMAPS
    }

    def draw(fig, axes):
        for row, point in enumerate(points):
            for col, name in enumerate(HEATMAPS):
                ax = axes[row, col]
                matrix = matrices[row, name]
                low = -top[name] if name == "gap" else 0.0
                cmap = colormaps["RdBu_r" if name == "gap" else "viridis"]
                image = ax.imshow(
                    matrix, cmap=cmap.with_extremes(bad=MISSING), vmin=low, vmax=top[name]
                )
                ax.set_title(f"{name}, step {point.step}", fontsize=9)
                ax.set_xlabel("slot j", fontsize=8)
                ax.set_ylabel("slot i", fontsize=8)
                fig.colorbar(image, ax=ax, shrink=0.8)

    return _render(draw, (11, 3.4 * len(points)), ncols=3, nrows=len(points))


def gap_vs_depth(result: ProbeResult, step: int) -> bytes:
    """Per-pair gap against depth (the pair's mid-slot) at one probe, by pair distance."""
    by_distance: dict[int, list[tuple[float, float]]] = {}
    for r in result.pairs:
        if r.gap is not None and math.isfinite(r.gap):
            by_distance.setdefault(r.distance, []).append(((r.i + r.j) / 2, r.gap))

    def draw(fig, axes):
        ax = axes[0, 0]
        for d, points in sorted(by_distance.items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", markersize=4, label=f"|i-j| = {d}")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("depth: (i + j) / 2")
        ax.set_ylabel("gap (nats)")
        ax.set_title(f"Per-pair gap against depth, step {step}")
        ax.grid(True, alpha=0.3)
        if by_distance:
            ax.legend(loc="best", fontsize=8)

    return _render(draw, (8, 3.6))


COST_COLUMNS = {"d_del": "d_del on the probe batch (nats)", "perplexity": "held-out perplexity"}


def removal_cost(table: dict) -> bytes | None:
    """Measured cost against budget, one line per selector (a score removal table)."""
    from matplotlib.ticker import MaxNLocator

    rows = table.get("rows", [])
    columns = [c for c in COST_COLUMNS if any(isinstance(r.get(c), (int, float)) for r in rows)]
    if not columns:
        return None

    def draw(fig, axes):
        for ax, column in zip(axes[0], columns, strict=True):
            lines: dict[str, list[tuple[float, float]]] = {}
            for r in rows:
                value, budget = r.get(column), r.get("budget")
                if isinstance(value, (int, float)) and isinstance(budget, (int, float)):
                    lines.setdefault(str(r.get("selector", "?")), []).append((budget, value))
            for name, points in sorted(lines.items()):
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=name)
            base = table.get("base_perplexity")
            if column == "perplexity" and isinstance(base, (int, float)):
                ax.axhline(base, color="black", linestyle=":", label="unpruned")
            ax.set_xlabel("layers removed")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(COST_COLUMNS[column])
            ax.grid(True, alpha=0.3)
            ax.legend(loc="best", fontsize=8)
        fig.suptitle("Measured removal cost")

    return _render(draw, (5.5 * len(columns), 3.8), ncols=len(columns))


def alert_timeline(run: RunRecords) -> bytes:
    """Probes, failures and each rule's alerts along the step axis."""
    rules = sorted({a.rule for a in run.alerts})
    rows = ["probes", *rules] + (["failures"] if run.failures else [])

    def draw(fig, axes):
        ax = axes[0, 0]
        ax.scatter(run.steps, [0] * len(run.probes), marker="|", s=200, color="tab:blue")
        for y, rule in enumerate(rules, start=1):
            steps = [a.step for a in run.alerts if a.rule == rule]
            ax.scatter(steps, [y] * len(steps), marker="v", s=60, color="tab:orange")
        if run.failures:
            steps = [f.step for f in run.failures]
            ax.scatter(steps, [len(rows) - 1] * len(steps), marker="x", s=60, color="tab:red")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        _step_axis(ax, run.steps + [f.step for f in run.failures])
        title = "Alerts along training" if run.alerts else "Alerts along training (none fired)"
        ax.set_title(title)

    return _render(draw, (8, 1.2 + 0.45 * len(rows)))
