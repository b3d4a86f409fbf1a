"""`redundancy-monitor report`: one self-contained HTML page (plus its PNGs) from a run folder.

The page opens with a plain-language summary (the regime now, what changed since the
first probe, which layers each protocol would remove), then the figures, then tables of
the probes, alerts and failures. Images are embedded as base64 data URIs and a
Content-Security-Policy forbids every network fetch, so the file can be mailed around.
"""

from __future__ import annotations

import base64
import functools
import html
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from redundancy_monitor.errors import InvalidBudgetError
from redundancy_monitor.files import write_bytes_atomic
from redundancy_monitor.formatting import fmt
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.removal.selection import default_budget, jaccard, plan_removal
from redundancy_monitor.tools.records import RunRecords, load_run

_f = functools.partial(fmt, missing="n/a")  # a page for people: "n/a", not "null"

REGIME_MEANING = {
    "divergent": "the two protocols disagree strongly (median ir <= 0.5 with median d_repl "
    ">= 0.10); the paper found interchange-guided removal safer in this regime on Qwen3-8B",
    "tied": "the protocols agree and blocks are close (median ir > 0.5, median d_repl < 0.10); "
    "either protocol is a reasonable guide",
    "unreliable": "median d_int >= 0.10: even swapping blocks changes the output a lot, so swap "
    "scores alone are a weak guide",
    "mixed": "none of the clear-cut regimes applies",
    None: "undefined (too few finite pairs to compute the medians)",
}


@dataclass
class Report:
    """What `write_report` wrote: the HTML page and the PNGs beside it."""

    html: Path
    images: dict[str, Path] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)


def _f_interval(bounds: tuple[float | None, float | None], digits: int = 4) -> str:
    """``[low, high]`` or ``n/a`` when the probe computed no interval."""
    low, high = bounds
    return "n/a" if low is None or high is None else f"[{_f(low, digits)}, {_f(high, digits)}]"


def _change(name: str, first: float | None, last: float | None) -> str:
    if first is None or last is None:
        return f"{name} {_f(first)} -> {_f(last)}"
    return f"{name} {_f(first)} -> {_f(last)} ({last - first:+.4f})"


def summary_sentences(run: RunRecords) -> list[str]:
    """The plain-language summary at the top of the report, one sentence per item."""
    first, last = run.first, run.last
    assert first.result is not None and last.result is not None  # probes hold results
    sm = last.result.summary
    n_layers = last.result.n_layers
    out = [
        f"{len(run.current)} probe(s) of a {n_layers}-layer model from step {first.step} to step "
        f"{last.step}; {len(run.failures)} failed probe(s); {len(run.alerts)} alert(s).",
    ]
    out.extend(_baseline_sentences(run))
    out.append(
        f"Regime now (step {last.step}): {sm.regime_text() if sm.regime else 'undefined'}, "
        f"meaning {REGIME_MEANING.get(sm.regime, REGIME_MEANING['mixed'])}."
    )
    low, high = sm.interval("gap_median")
    if low is not None and high is not None:
        out.append(
            f"Median gap now: {_f(sm.gap_median)} nats, interval {_f_interval((low, high))} "
            "(bootstrap over the probe batch's sequences: how much the number would move "
            "with other text of the same kind)."
        )
    if len(run.current) == 1:
        out.append("Only one probe so far, so there is no change to report yet.")
    else:
        s0 = first.result.summary
        regime = (
            f"the regime stayed {sm.regime}"
            if s0.regime == sm.regime
            else f"the regime went from {s0.regime} to {sm.regime}"
        )
        out.append(
            f"Since step {first.step}: {regime}; "
            + "; ".join(
                _change(label, getattr(s0, key), getattr(sm, key))
                for label, key in (
                    ("median gap", "gap_median"),
                    ("max gap", "gap_max"),
                    ("median ir", "ir_median"),
                    ("mean d_repl", "d_repl_mean"),
                    ("mean d_int", "d_int_mean"),
                )
            )
            + " (nats)."
        )
    out.extend(_change_sentences(run))
    out.extend(_removal_sentences(last))
    out.extend(_measured_sentences(run))
    if run.alerts:
        counts = ", ".join(
            f"{rule} x{n}" for rule, n in sorted(Counter(a.rule for a in run.alerts).items())
        )
        out.append(f"Alerts: {counts}. Latest: {run.alerts[-1].message.rstrip('.')}.")
    else:
        out.append("No alert fired.")
    return out


def _change_sentences(run: RunRecords) -> list[str]:
    """The paired change of the median gap since the baseline, when the records carry it."""
    change = run.last.change.baseline if run.last.change is not None else None
    if change is None or change.value("gap_median") is None:
        return []
    low, high = change.interval("gap_median")
    band = "" if low is None or high is None else f", paired interval [{low:+.4f}, {high:+.4f}]"
    return [
        f"Change of the median gap since the baseline probe (step {change.step}): "
        f"{change.value('gap_median'):+.4f} nats{band} (the same sequences at both steps, "
        "resampled together: far narrower than the level's interval, it says how much "
        "the change would move with other text of the same kind)."
    ]


def _baseline_sentences(run: RunRecords) -> list[str]:
    """Where the trajectory restarted; changes are only measured within the last one."""
    if not run.baselines:
        return []
    earlier = len(run.probes) - len(run.current)
    starts = "; ".join(f"step {b.step} ({b.reason})" for b in run.baselines)
    return [
        f"The run holds {len(run.segments())} separate trajectories: a new baseline started "
        f"at {starts}. The {earlier} earlier probe(s) are drawn apart and not compared with "
        f"the current trajectory (from step {run.first.step})."
    ]


def _removal_sentences(point: ProbeRecord) -> list[str]:
    assert point.result is not None  # a probe record of RunRecords.probes
    budget = default_budget(point.result.n_layers)
    try:
        plan = plan_removal(
            point.result, budgets=(budget,), protocols=("replacement", "interchange")
        )
    except InvalidBudgetError as exc:
        return [
            f"No removal selection at budget {budget} from the step {point.step} distances: {exc}."
        ]
    by_repl = set(plan.layers("replacement", budget))
    by_int = set(plan.layers("interchange", budget))
    overlap = jaccard(by_repl, by_int)
    agree = "the same set" if by_repl == by_int else f"Jaccard overlap {_f(overlap, 2)}"
    return [
        f"Layers each protocol would remove at budget {budget} (the non-adjacent removability rule on the step "
        f"{point.step} distances; 0-based): replacement {sorted(by_repl)}, interchange "
        f"{sorted(by_int)} ({agree}). This ranks layers; it does not measure what removing "
        "them costs: run `redundancy-monitor score` on the checkpoint for measured cost."
    ]


def _measured_sentences(run: RunRecords) -> list[str]:
    if run.removal is None:
        return []
    out = []
    base = run.removal.get("base_perplexity")
    assert run.removal_source is not None  # set with the table
    source = run.removal_source.name
    if run.removal.get("checkpoint"):
        source = f"{run.removal['checkpoint']}, {source}"
    for v in run.removal.get("verdicts", []):
        chosen = v.get("recommended")
        by = ", ".join(v.get("recommended_by", [])) or "?"
        out.append(
            f"Measured ({source}): at budget {v.get('budget')} the cheapest "
            f"set on held-out text is {chosen} (chosen by {by}; perplexity "
            f"{_f(v.get('recommended_perplexity'))} vs {_f(base)} unpruned)."
        )
    if not out:
        out.append(f"A measured removal table is in {run.removal_source.name}; see its curves.")
    return out


# ----- the page ------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
td.text { text-align: left; } .note { color: #555; }
"""
# Lets a headless browser (and a curious reader's devtools) confirm every image decoded.
CHECK_SCRIPT = """
function count(name) {
  var d = document.documentElement.dataset;
  d[name] = String(Number(d[name] || 0) + 1);
}
// Capturing on window also sees resource errors (an image that fails), which do not bubble.
window.addEventListener('error', function () { count('errors'); }, true);
document.addEventListener('securitypolicyviolation', function () { count('blockedRequests'); });
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.dataset.imagesTotal = String(images.length);
  document.body.dataset.imagesDecoded = String(ok.length);
});
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
FIGURE_TITLES = {
    "gap_trajectory": "Protocol gap over steps",
    "change_trajectory": "Change of the gap since the baseline probe, with paired intervals",
    "ir_by_separation": "ir over steps, by pair separation |i-j|",
    "heatmaps": "Heatmaps at the first and last probe",
    "gap_vs_depth": "Per-pair gap against depth at the last probe",
    "removal_cost": "Removal-cost curves",
    "alert_timeline": "Alert timeline",
}


def _img(name: str, png: bytes | None) -> str:
    if png is None:  # a figure that could not be drawn
        return ""
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(FIGURE_TITLES[name])
    return f'<img src="data:image/png;base64,{data}" alt="{alt}" data-figure="{name}">'


def _table(header: list[str], rows: list[list[str]], text_cols: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="text">{html.escape(c)}</td>'
            if k in text_cols
            else f"<td>{html.escape(c)}</td>"
            for k, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _probe_table(run: RunRecords) -> str:
    header = [
        "step",
        "regime",
        "gap mean",
        "gap median",
        "gap median interval",
        "gap p75",
        "gap max",
        "ir median",
        "d_repl mean",
        "d_int mean",
        "pairs",
        "non-finite",
    ]
    several = len(run.segments()) > 1
    if several:
        header.insert(1, "trajectory")
    rows = []
    for p in run.probes:
        assert p.result is not None  # probes hold results
        s = p.result.summary
        rows.append(
            [
                str(p.step),
                *([str(run.segment_of.get(p.step, 0) + 1)] if several else []),
                s.regime_text(),
                _f(s.gap_mean),
                _f(s.gap_median),
                _f_interval(s.interval("gap_median")),
                _f(s.gap_p75),
                _f(s.gap_max),
                _f(s.ir_median, 3),
                _f(s.d_repl_mean),
                _f(s.d_int_mean),
                str(s.n_pairs),
                str(s.n_nonfinite),
            ]
        )
    return _table(header, rows, text_cols=(2,) if several else (1,))


def _alert_section(run: RunRecords) -> str:
    if not run.alerts:
        return '<p class="note">No alert fired during this run.</p>'
    rows = [[str(a.step), a.rule, _f(a.value), _f(a.threshold), a.message] for a in run.alerts]
    return _table(["step", "rule", "value", "threshold", "message"], rows, text_cols=(1, 4))


def _failure_section(run: RunRecords) -> str:
    if not run.failures:
        return '<p class="note">No probe failed.</p>'
    rows = [
        [str(f.step), f.error.strip().splitlines()[0] if f.error.strip() else ""]
        for f in run.failures
        if f.error is not None  # every failure has its error
    ]
    return _table(["step", "error"], rows, text_cols=(1,))


def _removal_section(run: RunRecords, png: bytes | None) -> str:
    if run.removal is None:
        return (
            '<p class="note">No removal plan was computed for this run, so there are no '
            "measured removal costs to show. Run <code>redundancy-monitor score CHECKPOINT "
            "--out DIR</code> and pass its result.json with <code>--removal</code> (or put "
            "it in the run folder) to add them.</p>"
        )
    rows = [
        [
            str(r.get("budget")),
            str(r.get("selector")),
            "random draws" if r.get("layers") is None else str(r.get("layers")),
            _f(r.get("d_del")),
            _f(r.get("perplexity")),
        ]
        for r in run.removal["rows"]
    ]
    table = _table(["budget", "selector", "layers", "d_del", "perplexity"], rows, (1, 2))
    measured = run.removal.get("checkpoint") or "one checkpoint"
    note = (
        f'<p class="note">Measured by <code>redundancy-monitor score</code> on {html.escape(str(measured))} '
        f"(from {html.escape(str(run.removal_source))}).</p>"
    )
    return (_img("removal_cost", png) if png else "") + table + note


def render_html(run: RunRecords, figures: dict[str, bytes | None], summary: list[str]) -> str:
    """The whole page as a string: summary, figures, tables; no external resource."""
    items = "".join(f"<li>{html.escape(s)}</li>" for s in summary)
    sections = []
    for name in ("gap_trajectory", "change_trajectory", "ir_by_separation"):
        png = figures.get(name)
        if png is not None:  # no change figure for records without change
            sections.append(f"<h2>{FIGURE_TITLES[name]}</h2>{_img(name, png)}")
    for name in ("heatmaps", "gap_vs_depth"):
        sections.append(f"<h2>{FIGURE_TITLES[name]}</h2>{_img(name, figures[name])}")
    removal = _removal_section(run, figures.get("removal_cost"))
    sections.append(f"<h2>{FIGURE_TITLES['removal_cost']}</h2>{removal}")
    timeline = _img("alert_timeline", figures["alert_timeline"])
    sections.append(
        f"<h2>{FIGURE_TITLES['alert_timeline']}</h2>{timeline}"
        f"{_alert_section(run)}<h3>Failed probes</h3>{_failure_section(run)}"
    )
    sections.append(f"<h2>Every probe</h2>{_probe_table(run)}")
    assert run.last.result is not None  # probes hold results
    meta = run.last.result.meta
    source = html.escape(str(run.source))
    batch = html.escape(str(meta.batch_sha256 or "unknown")[:16])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>Layer redundancy report</title><style>{CSS}</style>"
        f"<script>{CHECK_SCRIPT}</script></head><body>"
        "<h1>Layer redundancy report</h1>"
        f'<p class="note">Records: {source}; probe batch sha256 {batch}...; model '
        f"{html.escape(str(meta.model_class or 'unknown'))}. Distances are KL divergences "
        "in nats; gap = d_repl - d_int; ir = d_int / d_repl.</p>"
        f"<h2>Summary</h2><ul>{items}</ul>{''.join(sections)}</body></html>\n"
    )


def write_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    removal: str | os.PathLike | None = None,
) -> Report:
    """Write the HTML report of a run and its PNGs (beside the HTML).

    Args:
        run_dir: the folder the monitor or `replay` wrote (or its ``.jsonl`` file).
        out: the HTML path (default ``<run folder>/report.html``).
        removal: a `redundancy-monitor score` result.json whose measured removal table
            to show (default: a ``result.json`` in the run folder, if any).

    Raises:
        RunFolderError: no usable record file.
        MissingDependencyError: matplotlib is not installed.
    """
    from redundancy_monitor.tools import figures as figs

    run = load_run(run_dir, removal)
    html_path = Path(out) if out is not None else run.source.parent / "report.html"
    points = [run.first] if len(run.current) == 1 else [run.first, run.last]
    assert run.last.result is not None  # probes hold results
    drawn = {
        "gap_trajectory": figs.gap_trajectory(run),
        "change_trajectory": figs.change_trajectory(run),
        "ir_by_separation": figs.ir_by_separation(run),
        "heatmaps": figs.heatmaps(
            [(f"step {p.step}", p.result) for p in points if p.result is not None]
        ),
        "gap_vs_depth": figs.gap_vs_depth(
            run.last.result, f"Per-pair gap against depth, step {run.last.step}"
        ),
        "removal_cost": figs.removal_cost(run.removal) if run.removal is not None else None,
        "alert_timeline": figs.alert_timeline(run),
    }
    figures = {name: None if fig is None else figs.png(fig) for name, fig in drawn.items()}
    summary = summary_sentences(run)
    report = Report(html_path, summary=summary)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        if png is not None:
            path = html_path.parent / f"{name}.png"
            write_bytes_atomic(path, png)
            report.images[name] = path
    write_bytes_atomic(html_path, render_html(run, figures, summary).encode("utf-8"))
    return report
