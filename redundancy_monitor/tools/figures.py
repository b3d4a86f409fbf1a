"""Every figure the offline tools draw: the report's and `score`'s.

matplotlib is an optional extra (``pip install 'redundancy-monitor[plots]'``). Figures
are built with its object API (`matplotlib.figure.Figure`) and rendered with Agg, never
through pyplot: no global backend, no figure registry, no display is touched. Each
function returns a Figure (or None when there is nothing to draw); `png` and `rgb`
render one for a file or for TensorBoard.
"""

from __future__ import annotations

import io
import math

import numpy as np

from redundancy_monitor.extras import require
from redundancy_monitor.monitoring.sinks import GAP_CHART
from redundancy_monitor.monitoring.tensorboard import HEATMAPS, pair_matrix
from redundancy_monitor.probing.result import ProbeResult
from redundancy_monitor.tools.records import RunRecords

MISSING = "#d0d0d0"  # pairs not probed
COST_COLUMNS = {"d_del": "d_del on the probe batch (nats)", "perplexity": "held-out perplexity"}


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1):
    """A Figure with an Agg canvas and its ``nrows x ncols`` axes (always a 2-D array).

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    Figure = require("matplotlib.figure", "drawing figures").Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def png(fig) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def rgb(fig) -> np.ndarray:
    """The figure as an ``H x W x 3`` uint8 image (for TensorBoard's add_image)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# ----- trajectories (the report) -------------------------------------------------------


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


def _band(points: list, name: str) -> tuple[list[int], list[float], list[float]]:
    """Steps and interval ends of one summary scalar, at the probes that have them."""
    ends = [(p.step, *p.result.summary.interval(name)) for p in points]
    finite = [
        (s, lo, hi)
        for s, lo, hi in ends
        if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
    ]
    return [s for s, _, _ in finite], [lo for _, lo, _ in finite], [hi for _, _, hi in finite]


def _plot_by_segment(ax, run: RunRecords, name: str, label: str, style: dict) -> None:
    """One scalar over steps, its interval shaded around it where the probes have one;
    each trajectory (between new baselines) is its own line in the same colour, so no
    line joins probes of two trajectories."""
    style = dict(style)
    color = style.pop("color", None)
    for k, points in enumerate(run.segments()):
        steps, values = _series(points, name)
        (line,) = ax.plot(steps, values, label=label if k == 0 else None, color=color, **style)
        color = line.get_color()
        band_steps, low, high = _band(points, name)
        if band_steps:
            ax.fill_between(band_steps, low, high, color=color, alpha=0.18, linewidth=0)


def _trajectories(run: RunRecords, lines: dict[str, tuple[str, dict]], ylabel: str, title: str):
    """One line per summary scalar over the probes (label -> (scalar name, plot style)),
    with the new baselines marked."""
    fig, axes = new_figure((8, 4))
    ax = axes[0, 0]
    for label, (name, style) in lines.items():
        _plot_by_segment(ax, run, name, label, style)
    for k, b in enumerate(run.baselines):
        mark = "new baseline" if k == 0 else None
        ax.axvline(b.step, color="grey", linestyle="--", linewidth=0.8, label=mark)
    _step_axis(ax, run.steps)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax


def gap_trajectory(run: RunRecords):
    """Summary gap mean, median, p75 and max over steps, each with its interval as a band."""
    marker = {"marker": "o", "markersize": 3}
    lines = {name.replace("gap_", ""): (name, marker) for name in GAP_CHART}
    fig, ax = _trajectories(run, lines, "gap = d_repl - d_int (nats)", "Protocol gap over training")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.legend(loc="best", fontsize=8)
    return fig


def change_trajectory(run: RunRecords, names: tuple[str, ...] = ("gap_median", "gap_mean")):
    """The change of the gap since the current trajectory's baseline probe, each scalar
    with its paired interval as a band (docs/intervals.md, "Change"); None when the
    records carry no change (a single probe, or files of older versions)."""
    series = {name: run.change_trajectory(name) for name in names}
    if not any(series.values()):
        return None
    fig, axes = new_figure((8, 4))
    ax = axes[0, 0]
    for name, points in series.items():
        finite = [(s, v) for s, v, _, _ in points if v is not None]
        (line,) = ax.plot(
            [s for s, _ in finite], [v for _, v in finite], marker="o", markersize=3, label=name
        )
        band = [(s, lo, hi) for s, _, lo, hi in points if lo is not None and hi is not None]
        if band:
            ax.fill_between(
                [b[0] for b in band],
                [b[1] for b in band],
                [b[2] for b in band],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    ax.axhline(0.0, color="black", linewidth=0.6)
    steps = [s for points in series.values() for s, *_ in points]
    _step_axis(ax, steps)
    ax.set_ylabel("change since the baseline probe (nats)")
    ax.set_title(f"Change of the gap since step {min(steps)}, with paired 95% intervals")
    ax.legend(loc="best", fontsize=8)
    return fig


def ir_by_separation(run: RunRecords):
    """Median ir = d_int / d_repl over steps, one line per pair separation |i-j|."""
    separations = sorted(
        {d for p in run.probes if p.result is not None for d in p.result.summary.by_separation}
    )
    marker = {"marker": "o", "markersize": 3}
    lines = {f"|i-j| = {d}": (f"d{d}/ir_median", marker) for d in separations}
    if len(separations) > 1:
        lines["all pairs"] = ("ir_median", {"color": "black", "linestyle": "--"})
    fig, ax = _trajectories(
        run,
        lines,
        "median ir = d_int / d_repl",
        "Interchange / replacement ratio by pair separation |i-j|",
    )
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8, label="regime threshold")
    ax.legend(loc="best", fontsize=8)
    return fig


def alert_timeline(run: RunRecords):
    """Probes, failures and each rule's alerts along the step axis."""
    rules = sorted({a.rule for a in run.alerts})
    rows = ["probes", *rules] + (["failures"] if run.failures else [])
    fig, axes = new_figure((8, 1.2 + 0.45 * len(rows)))
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
    ax.set_title("Alerts along training" if run.alerts else "Alerts along training (none fired)")
    return fig


# ----- one probe (the report and score) ------------------------------------------------


def _draw_heatmap(fig, ax, matrix: np.ndarray, field: str, top: float, title: str) -> None:
    """`matrix` over (i, j): viridis from 0 for a distance, blue-red around 0 for the gap."""
    from matplotlib import colormaps

    cmap = colormaps["RdBu_r" if field == "gap" else "viridis"].with_extremes(bad=MISSING)
    low = -top if field == "gap" else 0.0
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=low, vmax=top)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("slot j", fontsize=8)
    ax.set_ylabel("slot i", fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"{field} (nats)")


def _largest(matrices: list[np.ndarray]) -> float:
    finite = [np.abs(m[np.isfinite(m)]).max() for m in matrices if np.isfinite(m).any()]
    return float(max(finite, default=0.0)) or 1.0


def heatmaps(rows: list[tuple[str, ProbeResult]], zero_diagonal: bool = True):
    """d_repl, d_int and gap over (i, j), one row per (label, result); each quantity
    has one colour scale shared by every row, so the rows compare directly."""
    matrices = {
        (k, name): pair_matrix(result, name, zero_diagonal)
        for k, (_, result) in enumerate(rows)
        for name in HEATMAPS
    }
    fig, axes = new_figure((11, 3.4 * len(rows)), nrows=len(rows), ncols=len(HEATMAPS))
    for col, name in enumerate(HEATMAPS):
        top = _largest([m for (_, n), m in matrices.items() if n == name])
        for k, (label, _) in enumerate(rows):
            _draw_heatmap(fig, axes[k, col], matrices[k, name], name, top, f"{name}, {label}")
    return fig


def heatmap(result: ProbeResult, field: str, zero_diagonal: bool = True):
    """One quantity of one probe over (i, j)."""
    matrix = pair_matrix(result, field, zero_diagonal)
    fig, axes = new_figure((5, 4.2))
    _draw_heatmap(fig, axes[0, 0], matrix, field, _largest([matrix]), f"{field} over (i, j)")
    return fig


def gap_vs_depth(result: ProbeResult, title: str = "Per-pair gap against depth"):
    """Per-pair gap against depth (the pair's mid-slot), one line per separation |i-j|,
    with each pair's interval as an error bar when the probe computed intervals."""
    by_separation: dict[int, list[tuple[float, float, float, float]]] = {}
    for r in result.pairs:
        if r.gap is not None and math.isfinite(r.gap):
            low, high = r.interval("gap")
            down = 0.0 if low is None else max(0.0, r.gap - low)
            up = 0.0 if high is None else max(0.0, high - r.gap)
            by_separation.setdefault(r.separation, []).append(((r.i + r.j) / 2, r.gap, down, up))
    fig, axes = new_figure((8, 3.6))
    ax = axes[0, 0]
    for d, points in sorted(by_separation.items()):
        xs, ys, downs, ups = zip(*sorted(points), strict=True)
        bars = [downs, ups] if any(downs) or any(ups) else None
        ax.errorbar(xs, ys, yerr=bars, marker="o", markersize=4, capsize=3, label=f"|i-j| = {d}")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("depth: (i + j) / 2")
    ax.set_ylabel("gap = d_repl - d_int (nats)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if by_separation:
        ax.legend(loc="best", fontsize=8)
    return fig


# ----- removal (the report and score) --------------------------------------------------


def _cost_lines(rows: list[dict], column: str) -> dict[str, list[tuple[float, float, float]]]:
    """selector -> sorted (budget, value, spread) for one cost column."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        value, budget = r.get(column), r.get("budget")
        if isinstance(value, (int, float)) and isinstance(budget, (int, float)):
            spread = r.get(f"{column}_std") or 0.0
            lines.setdefault(str(r.get("selector", "?")), []).append((budget, value, spread))
    return {name: sorted(points) for name, points in lines.items()}


def removal_cost(table: dict):
    """Measured cost against budget, one line per selector (random: mean and spread of
    its draws), from a removal table as `RemovalReport.to_dict()` writes it."""
    rows = table.get("rows", [])
    columns = [c for c in COST_COLUMNS if any(isinstance(r.get(c), (int, float)) for r in rows)]
    if not columns:
        return None
    fig, axes = new_figure((5.5 * len(columns), 3.8), ncols=len(columns))
    from matplotlib.ticker import MaxNLocator

    for ax, column in zip(axes[0], columns, strict=True):
        for name, points in _cost_lines(rows, column).items():
            xs, ys, spread = zip(*points, strict=True)
            ax.errorbar(
                xs, ys, yerr=spread if any(spread) else None, marker="o", capsize=3, label=name
            )
        base = table.get("base_perplexity")
        if column == "perplexity" and isinstance(base, (int, float)):
            ax.axhline(base, color="black", linestyle=":", label="unpruned")
        ax.set_xlabel("layers removed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(COST_COLUMNS[column])
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("Measured removal cost")
    return fig
