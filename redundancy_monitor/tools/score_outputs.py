"""What a scoring run writes: the terminal tables, result.json, summary.md, PNG plots
and a TensorBoard run folder. matplotlib is optional: without it the PNGs are skipped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from redundancy_monitor.files import write_json_atomic
from redundancy_monitor.formatting import fmt
from redundancy_monitor.monitoring.tensorboard import HEATMAPS, pair_matrix
from redundancy_monitor.probing.result import PairRecord, ProbeResult
from redundancy_monitor.tools.score import ScoreRun

TOP_PAIRS = 10


def most_interchangeable(result: ProbeResult, field: str, k: int = TOP_PAIRS) -> list[PairRecord]:
    """The k pairs with the smallest `field` (``d_int`` or ``d_repl``), ties by (i, j)."""
    rows = [r for r in result.pairs if getattr(r, field) is not None]
    return sorted(rows, key=lambda r: (getattr(r, field), r.i, r.j))[:k]


def _pair_lines(result: ProbeResult, field: str, markdown: bool) -> list[str]:
    rows = most_interchangeable(result, field)
    if markdown:
        lines = ["| i | j | d_int | d_repl | gap |", "|---|---|---|---|---|"]
        row = "| {} | {} | {} | {} | {} |"
    else:
        lines = [f"{'i':>3} {'j':>3} {'d_int':>9} {'d_repl':>9} {'gap':>9}"]
        row = "{:>3} {:>3} {:>9} {:>9} {:>9}"
    for r in rows:
        lines.append(row.format(r.i, r.j, fmt(r.d_int), fmt(r.d_repl), fmt(r.gap)))
    return lines


def terminal_summary(run: ScoreRun) -> str:
    """Regime, the ten most interchangeable pairs under each protocol, the removal table."""
    s, meta = run.result.summary, run.result.meta
    lines = [
        f"{meta['model_class']}: {meta['n_layers']} layers, probe batch {meta['n_seq']} x "
        f"{meta['seq_len']} tokens (sha256 {meta['batch_sha256'][:12]}), pairs {meta['pairs']}",
        f"regime: {s.regime}  (median ir {fmt(s.ir_median, 3)}, median d_repl "
        f"{fmt(s.d_repl_median)}, median d_int {fmt(s.d_int_median)}, mean gap "
        f"{fmt(s.gap_mean)})",
    ]
    for field, name in (("d_int", "interchange"), ("d_repl", "replacement")):
        lines += ["", f"most interchangeable pairs under {name} ({field}):"]
        lines += _pair_lines(run.result, field, markdown=False)
    lines += ["", "removal table (cost measured on held-out text):", run.report.to_table()]
    if run.export:
        lines += ["", f"pruned checkpoint (removed {run.export['removed']}): {run.export['dir']}"]
    return "\n".join(lines)


def summary_markdown(run: ScoreRun) -> str:
    """The terminal tables in Markdown."""
    s, meta, rep = run.result.summary, run.result.meta, run.report
    out = [
        f"# redundancy-monitor score: `{run.config.path}`",
        "",
        f"- model: {meta['model_class']}, {meta['n_layers']} layers, dtype {meta['dtype']}",
        f"- probe batch: {meta['n_seq']} x {meta['seq_len']} tokens, sha256 "
        f"`{meta['batch_sha256']}`; pairs: {meta['pairs']}",
        f"- regime: **{s.regime}** (median ir {fmt(s.ir_median, 3)}, median d_repl "
        f"{fmt(s.d_repl_median)}, median d_int {fmt(s.d_int_median)}, mean gap "
        f"{fmt(s.gap_mean)}). The regime describes; the recommendation below comes from "
        "measured cost.",
        "",
    ]
    for field, name in (("d_int", "interchange"), ("d_repl", "replacement")):
        out += [f"## Most interchangeable pairs under {name}", ""]
        out += [*_pair_lines(run.result, field, markdown=True), ""]
    out += [
        "## Removal table",
        "",
        f"Base perplexity {fmt(rep.base_perplexity)} on {rep.heldout_tokens} held-out tokens "
        f"(sliding window {rep.window}, stride {rep.stride}).",
        "",
        "| n | selector | layers | d_del | perplexity | Δppl |",
        "|---|---|---|---|---|---|",
    ]
    for r in rep.rows:
        layers = "random (mean of draws)" if r.layers is None else ", ".join(map(str, r.layers))
        ppl = fmt(r.perplexity)
        if r.perplexity_std is not None:
            ppl += f" ± {r.perplexity_std:.3f}"
        out.append(
            f"| {r.budget} | {r.selector} | {layers} | {fmt(r.d_del)} | {ppl} | "
            f"{100 * r.perplexity_change:+.2f} % |"
        )
    out += [
        "",
        "| n | recommended | chosen by | perplexity | Δppl ratio repl/int | Jaccard(int, repl) |",
        "|---|---|---|---|---|---|",
    ]
    for v in rep.verdicts:
        out.append(
            f"| {v.budget} | {', '.join(map(str, v.recommended))} | "
            f"{', '.join(v.recommended_by)} | {fmt(v.recommended_perplexity)} | "
            f"{fmt(v.increase_ratio, 3)} | {fmt(v.jaccard, 3)} |"
        )
    if run.export:
        out += ["", f"Pruned checkpoint: `{run.export['dir']}` (removed {run.export['removed']})."]
    return "\n".join(out) + "\n"


# -- figures ------------------------------------------------------------------------


def make_figures(run: ScoreRun) -> dict[str, Any]:
    """name -> matplotlib Figure; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    result = run.result
    for field in HEATMAPS:
        fig, ax = plt.subplots(figsize=(5, 4.2))
        matrix = pair_matrix(result, field, zero_diagonal=False)
        if field == "gap":  # signed: centre a diverging map on zero
            limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
            style = {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit}
        else:
            style = {"cmap": "viridis"}
        image = ax.imshow(matrix, origin="upper", **style)
        fig.colorbar(image, ax=ax, label=f"{field} (nats)")
        ax.set(xlabel="slot j", ylabel="slot i", title=f"{field} over (i, j)")
        fig.tight_layout()
        figures[f"heatmap_{field}"] = fig
    fig, ax = plt.subplots(figsize=(6, 4))
    for d in sorted({r.distance for r in result.pairs}):
        rows = [r for r in result.pairs if r.distance == d and r.gap is not None]
        ax.plot([(r.i + r.j) / 2 for r in rows], [r.gap for r in rows], "o-", label=f"|i-j|={d}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="pair depth (i+j)/2", ylabel="gap = d_repl - d_int (nats)", title="gap vs depth")
    ax.legend()
    fig.tight_layout()
    figures["gap_vs_depth"] = fig
    rep = run.report
    fig, ax = plt.subplots(figsize=(6, 4))
    for selector in dict.fromkeys(r.selector for r in rep.rows):
        rows = [r for r in rep.rows if r.selector == selector]
        ax.errorbar(
            [r.budget for r in rows],
            [r.perplexity for r in rows],
            yerr=[r.perplexity_std or 0.0 for r in rows],
            marker="o",
            capsize=3,
            label=selector,
        )
    ax.axhline(rep.base_perplexity, color="black", ls="--", lw=0.8, label="unpruned")
    ax.set(xlabel="layers removed", ylabel="held-out perplexity", title="removal cost")
    ax.set_xticks(list(rep.budgets))
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures["removal_cost"] = fig
    return figures


def write_tensorboard(run: ScoreRun, folder: Path, figures: dict[str, Any]) -> None:
    """The summary scalars, the removal table and the figures as one TensorBoard run."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        for name, value in run.result.summary.scalars().items():
            if value is not None:
                writer.add_scalar(f"probe/{name}", value, 0)
        for r in run.report.rows:
            writer.add_scalar(f"removal/{r.selector}/perplexity", r.perplexity, r.budget)
            writer.add_scalar(f"removal/{r.selector}/d_del", r.d_del, r.budget)
        for v in run.report.verdicts:
            for name in ("increase_ratio", "jaccard"):
                value = getattr(v, name)
                if value is not None:
                    writer.add_scalar(f"removal/{name}", value, v.budget)
        writer.add_scalar("removal/base_perplexity", run.report.base_perplexity, 0)
        writer.add_text("summary", summary_markdown(run), 0)
        for name, fig in figures.items():
            writer.add_figure(f"figures/{name}", fig, 0, close=False)
    finally:
        writer.close()


def write_outputs(
    run: ScoreRun, out_dir: str | Path, notice: Callable[[str], None] = print
) -> list[Path]:
    """Write result.json, summary.md, the PNGs (if matplotlib) and a TensorBoard folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "result.json", out / "summary.md"]
    write_json_atomic(written[0], run.to_dict())
    (out / "summary.md").write_text(summary_markdown(run), encoding="utf-8")
    try:
        figures = make_figures(run)
    except ImportError:
        figures = {}
        notice(
            "matplotlib is not installed: PNG plots skipped "
            "(pip install 'redundancy-monitor[plots]')"
        )
    try:
        for name, fig in figures.items():
            path = out / f"{name}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
        write_tensorboard(run, out / "tensorboard", figures)
        written.append(out / "tensorboard")
    finally:
        if figures:
            import matplotlib.pyplot as plt

            for fig in figures.values():
                plt.close(fig)
    return written
