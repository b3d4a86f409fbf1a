"""Draw a run's protocol-gap trajectory from its JSON Lines record file.

    python examples/plot_trajectory.py RUN_DIR OUT.png

RUN_DIR is a folder the monitor or `redundancy-monitor replay` wrote (the one
``redundancy.jsonl`` in it or below it is read), or the ``.jsonl`` file itself. The
top panel shows the two protocols' mean distances, the bottom one the gap between them
(mean, median and max over the probed pairs); alerts are marked on the step axis.
Needs matplotlib (``pip install 'redundancy-monitor[plots]'``). The figure in the
README, docs/gap_trajectory.png, was drawn with this script from the demo's run.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from redundancy_monitor import read_records

DISTANCES = (("d_repl_mean", "replacement  d_repl"), ("d_int_mean", "interchange  d_int"))
GAPS = (("gap_max", "max"), ("gap_mean", "mean"), ("gap_median", "median"))
ALERT_MARKERS = "v^sDxP*"


def record_file(path: Path) -> Path:
    """The one ``redundancy.jsonl`` at or below `path`."""
    if path.is_file():
        return path
    found = sorted(path.rglob("*.jsonl"))
    if len(found) != 1:
        raise SystemExit(
            f"expected one .jsonl file under {path}, found {len(found)}; pass the file itself"
        )
    return found[0]


def series(probes: list[dict], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one summary scalar, leaving out probes where it is undefined."""
    points = [(p["step"], p["result"]["summary"].get(name)) for p in probes]
    kept = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    return [s for s, _ in kept], [v for _, v in kept]


def draw(records: list[dict], title: str) -> Figure:
    probes = sorted((r for r in records if r.get("type") == "probe"), key=lambda r: r["step"])
    if not probes:
        raise SystemExit("the record file holds no finished probe")
    alerts = [r for r in records if r.get("type") == "alert"]
    fig = Figure(figsize=(8, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name, label in DISTANCES:
        top.plot(*series(probes, name), marker="o", markersize=3, label=label)
    top.set_ylabel("mean distance (nats)")
    top.set_title(title)
    for name, label in GAPS:
        bottom.plot(*series(probes, name), marker="o", markersize=3, label=f"gap {label}")
    bottom.axhline(0.0, color="black", linewidth=0.6)
    bottom.set_ylabel("gap = d_repl - d_int (nats)")
    bottom.set_xlabel("optimizer step")
    steps = [p["step"] for p in probes]
    positive = [s for s in steps if s > 0]
    for ax in (top, bottom):
        if positive and max(positive) / min(positive) >= 100:  # dense early probes
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.grid(True, alpha=0.3)
    for rule, marker in zip(sorted({a["rule"] for a in alerts}), ALERT_MARKERS, strict=False):
        at = [a["step"] for a in alerts if a["rule"] == rule]
        bottom.plot(at, [0.0] * len(at), "k", linestyle="none", marker=marker, markersize=7,
                    label=f"alert: {rule}")  # fmt: skip
    top.legend(loc="upper left", fontsize=8)
    bottom.legend(loc="upper left", fontsize=8, ncol=2)
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder or its .jsonl file")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--title", default="Replacement vs interchange during pretraining")
    args = parser.parse_args(argv)
    path = record_file(args.run)
    draw(read_records(path), args.title).savefig(args.out)
    print(f"wrote {args.out} from {path}")


if __name__ == "__main__":
    main()
