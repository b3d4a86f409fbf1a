"""What a scoring run writes: the terminal tables, result.json, summary.md, PNG plots
and a TensorBoard run folder. matplotlib is optional: without it the PNGs (and the
TensorBoard images) are skipped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from redundancy_monitor.errors import MissingDependencyError
from redundancy_monitor.files import write_bytes_atomic, write_json_atomic
from redundancy_monitor.formatting import fmt
from redundancy_monitor.monitoring.sinks import PREFIX, probe_scalars, scalar_tag
from redundancy_monitor.monitoring.tensorboard import HEATMAPS
from redundancy_monitor.probing.result import PairRecord, ProbeResult
from redundancy_monitor.tools.score import ScoreRun

TOP_PAIRS = 10


def most_interchangeable(result: ProbeResult, field: str, k: int = TOP_PAIRS) -> list[PairRecord]:
    """The k pairs with the smallest `field` (``d_int`` or ``d_repl``), ties by (i, j)."""
    rows = [r for r in result.pairs if getattr(r, field) is not None]
    return sorted(rows, key=lambda r: (getattr(r, field), r.i, r.j))[:k]


def _with_interval(x: float | None, bounds: tuple[float | None, float | None]) -> str:
    """``0.1234 [0.1000, 0.1500]``, or the value alone when there is no interval."""
    low, high = bounds
    if low is None or high is None:
        return fmt(x)
    return f"{fmt(x)} [{fmt(low)}, {fmt(high)}]"


def _pair_lines(result: ProbeResult, field: str, markdown: bool) -> list[str]:
    """The most interchangeable pairs; each value with its interval when there is one."""
    rows = most_interchangeable(result, field)
    names = ("d_int", "d_repl", "gap")
    with_bounds = any(r.interval(n)[0] is not None for r in rows for n in names)
    width = 25 if with_bounds else 9
    if markdown:
        suffix = " (95% interval)" if with_bounds else ""
        lines = [
            "| i | j | " + " | ".join(f"{n}{suffix}" for n in names) + " |",
            "|---|---|---|---|---|",
        ]
        row = "| {} | {} | {} | {} | {} |"
    else:
        lines = [f"{'i':>3} {'j':>3} " + " ".join(f"{n:>{width}}" for n in names)]
        row = "{:>3} {:>3} " + " ".join(f"{{:>{width}}}" for _ in names)
    for r in rows:
        cells = [_with_interval(getattr(r, n), r.interval(n)) for n in names]
        lines.append(row.format(r.i, r.j, *cells))
    return lines


def _regime_line(run: ScoreRun, bold: bool = False) -> str:
    s = run.result.summary
    regime = f"**{s.regime}**" if bold else str(s.regime)
    stability = f" ({s.stability_text()})" if s.stability_text() else ""
    return (
        f"{regime}{stability} (median ir {_with_interval(s.ir_median, s.interval('ir_median'))}, "
        f"median d_repl {_with_interval(s.d_repl_median, s.interval('d_repl_median'))}, "
        f"median d_int {_with_interval(s.d_int_median, s.interval('d_int_median'))}, "
        f"median gap {_with_interval(s.gap_median, s.interval('gap_median'))}, "
        f"mean gap {_with_interval(s.gap_mean, s.interval('gap_mean'))})"
    )


def _interval_note(run: ScoreRun) -> str:
    info = run.result.meta.intervals or {}
    if "levels" not in info:
        return "no intervals (the probe batch has fewer than 2 sequences, or they were off)"
    return (
        f"[low, high]: {100 * info['confidence']:.0f}% intervals, {info['method']} "
        f"({info['n_boot']} replicates of the {info['n_seq']} sequences, seed {info['seed']})"
    )


def terminal_summary(run: ScoreRun) -> str:
    """Regime, the ten most interchangeable pairs under each protocol, the removal table."""
    meta = run.result.meta
    lines = [
        f"{meta.model_class}: {meta.n_layers} layers, probe batch {meta.n_seq} x "
        f"{meta.seq_len} tokens (sha256 {(meta.batch_sha256 or '')[:12]}), pairs {meta.pairs}",
        f"regime: {_regime_line(run)}",
        f"precision: {run.sample_size.sentence()}",
        _interval_note(run),
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
    meta, rep = run.result.meta, run.report
    out = [
        f"# redundancy-monitor score: `{run.config.path}`",
        "",
        f"- model: {meta.model_class}, {meta.n_layers} layers, dtype {meta.dtype}",
        f"- probe batch: {meta.n_seq} x {meta.seq_len} tokens, sha256 "
        f"`{meta.batch_sha256}`; pairs: {meta.pairs}",
        f"- regime: {_regime_line(run, bold=True)}. The regime describes; the recommendation "
        "below comes from measured cost.",
        f"- precision: {run.sample_size.sentence()}.",
        f"- {_interval_note(run)}.",
        "",
    ]
    for field, name in (("d_int", "interchange"), ("d_repl", "replacement")):
        out += [f"## Most interchangeable pairs under {name}", ""]
        out += [*_pair_lines(run.result, field, markdown=True), ""]
    out += [
        "## Removal table",
        "",
        f"Base perplexity {fmt(rep.base_perplexity)} on {rep.heldout_tokens} held-out tokens "
        f"(sliding window {rep.window}, stride {rep.stride}; "
        f"{rep.heldout.get('evaluation', 'reference')} evaluation). Δppl intervals: "
        f"{100 * rep.heldout.get('confidence', 0.95):.0f}% bootstrap over windows; `tokens`: "
        "the held-out tokens a set was measured on (fewer when racing stopped it early, its "
        "interval lying above the best's).",
        "",
        "| n | selector | layers | d_del | perplexity | Δppl | Δppl interval | tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep.rows:
        layers = "random (mean of draws)" if r.layers is None else ", ".join(map(str, r.layers))
        ppl = fmt(r.perplexity)
        if r.perplexity_std is not None:
            ppl += f" ± {r.perplexity_std:.3f}"
        interval = ""
        if r.change_low is not None and r.change_high is not None:
            interval = f"[{100 * r.change_low:+.2f}, {100 * r.change_high:+.2f}] %"
        tokens = "" if r.heldout_tokens is None else str(r.heldout_tokens)
        if r.selector == "random" and r.draws_stopped:
            tokens += f" ({r.draws_stopped}/{len(r.draws)} draws stopped)"
        elif r.stopped_early:
            tokens += " (stopped early)"
        out.append(
            f"| {r.budget} | {r.selector} | {layers} | {fmt(r.d_del)} | {ppl} | "
            f"{100 * r.perplexity_change:+.2f} % | {interval} | {tokens} |"
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
    ties = [f"- n={v.budget}: {v.sentence()}." for v in rep.verdicts if v.tied_with]
    if ties:
        out += ["", *ties]
    if run.export:
        out += ["", f"Pruned checkpoint: `{run.export['dir']}` (removed {run.export['removed']})."]
    return "\n".join(out) + "\n"


# -- figures ------------------------------------------------------------------------


def make_figures(run: ScoreRun) -> dict[str, Any]:
    """name -> matplotlib Figure.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    from redundancy_monitor.tools import figures as figs

    out = {
        f"heatmap_{field}": figs.heatmap(run.result, field, zero_diagonal=False)
        for field in HEATMAPS
    }
    out["gap_vs_depth"] = figs.gap_vs_depth(run.result)
    removal = figs.removal_cost(run.report.to_dict())
    if removal is not None:
        out["removal_cost"] = removal
    return out


def write_tensorboard(run: ScoreRun, folder: Path, figures: dict[str, Any]) -> None:
    """The summary scalars, the removal table and the figures as one TensorBoard run, all
    under the ``redundancy/`` prefix the training monitor uses."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        scalars = probe_scalars(run.result)
        for name, (low, high) in run.result.summary.intervals.items():
            if low is not None and high is not None:
                scalars[f"{scalar_tag(name)}_low"] = low
                scalars[f"{scalar_tag(name)}_high"] = high
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, 0)
        for r in run.report.rows:
            writer.add_scalar(f"{PREFIX}/removal/{r.selector}/perplexity", r.perplexity, r.budget)
            writer.add_scalar(f"{PREFIX}/removal/{r.selector}/d_del", r.d_del, r.budget)
        for v in run.report.verdicts:
            for name in ("increase_ratio", "jaccard"):
                value = getattr(v, name)
                if value is not None:
                    writer.add_scalar(f"{PREFIX}/removal/{name}", value, v.budget)
        writer.add_scalar(f"{PREFIX}/removal/base_perplexity", run.report.base_perplexity, 0)
        writer.add_text(f"{PREFIX}/summary", summary_markdown(run), 0)
        if figures:
            from redundancy_monitor.tools.figures import rgb

            for name, fig in figures.items():
                writer.add_image(f"{PREFIX}/figures/{name}", rgb(fig), 0, dataformats="HWC")
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
    write_bytes_atomic(written[1], summary_markdown(run).encode("utf-8"))
    try:
        figures = make_figures(run)
    except MissingDependencyError:
        figures = {}
        notice(
            "matplotlib is not installed: PNG plots skipped "
            "(pip install 'redundancy-monitor[plots]')"
        )
    if figures:
        from redundancy_monitor.tools.figures import png

        for name, fig in figures.items():
            written.append(out / f"{name}.png")
            write_bytes_atomic(written[-1], png(fig))
    write_tensorboard(run, out / "tensorboard", figures)
    written.append(out / "tensorboard")
    return written
