"""Do the intervals mean what they say, and do alerts judged on them stay quiet on noise?

The demo's model (a 6-layer Pythia-style GPT-NeoX, `redundancy_monitor.demo`) is trained
from scratch here, on the Python standard library's text, saving a few checkpoints on the
way; held-out text is cut into disjoint sets of 64-token sequences. Three measurements:

- coverage: at each saved checkpoint, intervals from 8 sequences against the value
  measured on 64 other sequences, for every pair value (d_repl, d_int, gap, ir) and every
  summary scalar. Also against 64 sequences that include the 8 (the 8 are a subset).
  Goal: >= 90% contained.
- null: the last checkpoint probed on 40 disjoint batches of 8 sequences, treated as a
  trajectory in which nothing changes: alerts with and without intervals (default rules;
  and the gap threshold set to the value measured on all 320 sequences, where only noise
  decides). Goal: no alert with intervals.
- detection: along training, the step at which `gap_threshold` and `gap_growth` fire on
  the 8-sequence probe batch, with and without intervals, against the first probe at
  which the 64-sequence value crosses. Goal: within one probe. With the default
  hysteresis of 2 even a noiseless probe fires one probe after the crossing, so that
  column is printed too.

    OMP_NUM_THREADS=1 python benchmarks/bench_alerts.py            # ~5-10 min on 2 cores
    python benchmarks/bench_alerts.py --steps 200 --every 20        # quicker, coarser
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from redundancy_monitor import probe
from redundancy_monitor.demo import pythia_config, stdlib_corpus, token_rows, train_tokenizer
from redundancy_monitor.monitoring.alerts import AlertConfig, AlertEngine, removal_overlap
from redundancy_monitor.probing.intervals import (
    IntervalConfig,
    add_intervals,
    predicted_halfwidth,
)
from redundancy_monitor.probing.result import PairRecord

NOT_ESTIMATES = ("n_pairs", "n_finite", "n_nonfinite")
COUNTS = ("strong", "conditional", "not_similar")


# ----- data and training -------------------------------------------------------------------


def held_out_sets(tokenizer, text: str, seq_len: int, sizes: dict[str, int]):
    """Disjoint sets of held-out sequences, in a fixed random order."""
    rows = token_rows(tokenizer, text, seq_len)
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    need = sum(sizes.values())
    if len(rows) < need:
        raise SystemExit(f"only {len(rows)} held-out sequences of {seq_len} tokens; need {need}")
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = rows[start : start + n]
        start += n
    return out


def checkpoint_steps(steps: int, every: int) -> list[int]:
    return sorted(set(range(0, steps + 1, every)) | {steps})


def train(args, data_train, probe_steps, on_probe, save_steps, save_dir):
    """The demo's recipe (AdamW, warm-up then linear decay); `on_probe(step, model)` at
    each of `probe_steps`; `save_pretrained` at `save_steps`."""
    torch.manual_seed(0)
    config = pythia_config(args.vocab_size, args.layers, args.width, args.seq_len)
    model = AutoModelForCausalLM.from_config(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / args.steps)
    )
    g = torch.Generator().manual_seed(1)
    saved = {}
    for step in range(args.steps + 1):
        if step in probe_steps:
            on_probe(step, model)
        if step in save_steps:
            saved[step] = save_dir / f"step-{step}"
            model.save_pretrained(saved[step])
        if step == args.steps:
            break
        ids = data_train[torch.randint(0, len(data_train), (args.batch,), generator=g)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return saved


# ----- coverage ----------------------------------------------------------------------------


def contained(estimate, truth, by_name=None) -> dict[str, list[bool]]:
    """Per kind of value: does `estimate`'s interval contain `truth`'s value? (And per
    scalar name into `by_name`, when given.)"""
    out: dict[str, list[bool]] = {"pairs": [], "scalars": [], "counts": []}
    for got, want in zip(estimate.pairs, truth.pairs, strict=True):
        for name in PairRecord.INTERVAL_FIELDS:
            low, high = got.interval(name)
            value = getattr(want, name)
            if low is not None and value is not None:
                out["pairs"].append(low <= value <= high)
    for name, value in truth.summary.scalars().items():
        low, high = estimate.summary.interval(name)
        if value is None or low is None or name.split("/")[-1] in NOT_ESTIMATES:
            continue
        kind = "counts" if name.endswith(COUNTS) else "scalars"
        out[kind].append(low <= value <= high)
        if by_name is not None:
            by_name.setdefault(name, []).append(low <= value <= high)
    return out


def coverage(saved, sets, n_small: int, pairs: str) -> None:
    print("\n== coverage: 95% intervals from 8 sequences vs the value on 64 sequences ==")
    plain = IntervalConfig(expanded=False)
    totals: dict[tuple[str, str, str], list[bool]] = {}
    by_name: dict[str, list[bool]] = {}
    for step, path in saved.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        truth = probe(model, sets["truth"], pairs=pairs, intervals=False)
        for reference, source in (("other 64", "groups"), ("64 incl. the 8", "truth")):
            rows = sets[source]
            for k in range(len(rows) // n_small):
                small = probe(model, rows[k * n_small : (k + 1) * n_small], pairs=pairs)
                for method, result in (
                    ("expanded", small),
                    ("plain", add_intervals(small, plain)),
                ):
                    named = by_name if (reference, method) == ("other 64", "expanded") else None
                    for kind, hits in contained(result, truth, named).items():
                        totals.setdefault((reference, method, kind), []).extend(hits)
        print(f"  step {step}: gap_median on 64 = {truth.summary.gap_median:.4f}")
    print(f"  checkpoints {sorted(saved)}; {len(sets['groups']) // n_small} groups of {n_small}")
    print(f"  {'truth':>16} {'interval':>9} {'pairs':>14} {'scalars':>14} {'counts':>14}")
    for reference in ("other 64", "64 incl. the 8"):
        for method in ("expanded", "plain"):
            cells = []
            for kind in ("pairs", "scalars", "counts"):
                hits = totals.get((reference, method, kind), [])
                cells.append(f"{np.mean(hits):6.1%} of {len(hits):>4}" if hits else "-")
            print(f"  {reference:>16} {method:>9} " + " ".join(f"{c:>14}" for c in cells))
    worst = sorted((float(np.mean(v)), k) for k, v in by_name.items() if not k.endswith(COUNTS))
    print(
        "  lowest per scalar (other 64, expanded): "
        + ", ".join(f"{k} {c:.0%}" for c, k in worst[:6])
    )


# ----- null --------------------------------------------------------------------------------


def fired_rules(results, config: AlertConfig) -> dict[str, int]:
    engine, counts = AlertEngine(config), {}
    for step, result in enumerate(results):
        for alert in engine.observe(step, result):
            counts[alert.rule] = counts.get(alert.rule, 0) + 1
    return counts


def null(path, rows, n_small: int, pairs: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    n_batches = len(rows) // n_small
    results = [
        probe(model, rows[k * n_small : (k + 1) * n_small], pairs=pairs) for k in range(n_batches)
    ]
    whole = probe(model, rows[: n_batches * n_small], pairs=pairs, intervals=False)
    pooled = whole.summary
    print(
        f"\n== null: {path.name} on {n_batches} disjoint batches of {n_small} sequences "
        f"(gap_median on all {n_batches * n_small}: {pooled.gap_median:.4f}) =="
    )
    budget = max(1, whole.n_layers // 4)
    jaccard, by_repl, by_int = removal_overlap(whole, budget)
    print(
        f"  on all of them, removal sets at budget {budget}: replacement {sorted(by_repl)}, "
        f"interchange {sorted(by_int)} (Jaccard {jaccard}): the overlap rule's condition "
        f"{'holds' if jaccard is not None and jaccard < 0.5 else 'does not hold'} in truth"
    )
    medians = [r.summary.gap_median for r in results]
    print(
        f"  gap_median across batches: mean {np.mean(medians):.4f}, sd {np.std(medians):.4f}"
        f" ({np.std(medians) / abs(np.mean(medians)):.0%} of the mean); regime stable in "
        f"{np.mean([not r.summary.regime_uncertain for r in results]):.0%} of batches"
    )
    for label, base in (
        ("default rules", AlertConfig()),
        ("gap_threshold = value on all", AlertConfig(gap_threshold=pooled.gap_median)),
    ):
        with_i = fired_rules(results, base)
        with_h1 = fired_rules(results, dataclasses.replace(base, hysteresis=1))
        without = fired_rules(results, dataclasses.replace(base, use_intervals=False))
        print(
            f"  {label:>30}: with intervals {sum(with_i.values())} alert(s) {with_i}; "
            f"with intervals and hysteresis 1: {sum(with_h1.values())} {with_h1}; "
            f"without intervals {sum(without.values())} {without}"
        )


# ----- detection ---------------------------------------------------------------------------


def first_fire(results, steps, config: AlertConfig, rule: str) -> int | None:
    engine = AlertEngine(config)
    for step, result in zip(steps, results, strict=True):
        if any(a.rule == rule for a in engine.observe(step, result)):
            return step
    return None


def first_crossing(values, steps, limit) -> int | None:
    for step, value in zip(steps, values, strict=True):
        if value is not None and value > limit:
            return step
    return None


def detection(trajectory, pairs: str, threshold: float) -> None:
    steps = [t[0] for t in trajectory]
    small, large = [t[1] for t in trajectory], [t[2] for t in trajectory]
    print(f"\n== detection along training ({len(steps)} probes, pairs {pairs}) ==")
    print(f"  {'step':>5} {'gap_median, 8 seqs [interval]':>32} {'on 64':>7} {'gap_max 8':>10}")
    for step, s, big in zip(steps, small, large, strict=True):
        low, high = s.summary.interval("gap_median")
        print(
            f"  {step:>5} {s.summary.gap_median:>13.4f} [{low:.4f}, {high:.4f}] "
            f"{big.summary.gap_median:>7.4f} {s.summary.gap_max:>10.4f}"
        )

    def index(step):
        return None if step is None else steps.index(step)

    quiet = dict(overlap_threshold=None, regime_change=False)
    cases = [
        ("gap_threshold", AlertConfig(gap_threshold=threshold, growth_factor=None, **quiet)),
        (
            "gap_threshold",
            AlertConfig(gap_metric="gap_max", gap_threshold=0.10, growth_factor=None, **quiet),
        ),
        ("gap_growth", AlertConfig(gap_threshold=None, **quiet)),
    ]
    print(
        f"\n  {'rule (metric > limit)':>38} {'64 crosses':>11} {'64 fires':>9} "
        f"{'8 fires, intervals':>19} {'same, hyst. 1':>13} {'8 fires, point':>15} "
        f"{'probes after crossing':>22}"
    )
    for rule, config in cases:
        metric = config.gap_metric
        values = [r.summary.scalars()[metric] for r in large]
        if rule == "gap_threshold":
            limit = config.gap_threshold
            label = f"{rule} ({metric} > {limit})"
        else:
            limit = config.growth_factor
            values = [v / max(abs(values[0]), config.growth_floor) for v in values]
            label = f"{rule} ({metric} > {limit}x step {steps[0]})"
        crossing = first_crossing(values, steps, limit)
        point = dataclasses.replace(config, use_intervals=False)
        ideal = first_fire(large, steps, point, rule)
        with_i = first_fire(small, steps, config, rule)
        with_h1 = first_fire(small, steps, dataclasses.replace(config, hysteresis=1), rule)
        without = first_fire(small, steps, point, rule)
        late = (
            "-" if with_i is None or crossing is None else f"{index(with_i) - index(crossing):+d}"
        )
        print(
            f"  {label:>38} {crossing!s:>11} {ideal!s:>9} {with_i!s:>19} {with_h1!s:>13} "
            f"{without!s:>15} {late:>22}"
        )
    print(
        "  (fires: with the default hysteresis of 2, where one probe after the crossing is "
        "the earliest any probe can fire, unless marked hyst. 1; probes after crossing: "
        "8 sequences with intervals, hysteresis 2)"
    )


def sample_size_check(path, sets, n_small: int, pairs: str) -> None:
    """The advice's 1/sqrt(n) extrapolation against the half-width measured on 64."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    big = probe(model, sets["truth"], pairs=pairs).summary.interval("gap_median")
    measured = (big[1] - big[0]) / 2
    predictions = []
    rows = sets["groups"]
    for k in range(len(rows) // n_small):
        low, high = probe(
            model, rows[k * n_small : (k + 1) * n_small], pairs=pairs
        ).summary.interval("gap_median")
        predictions.append(predicted_halfwidth((high - low) / 2, n_small, len(sets["truth"])))
    print(
        f"\n== sample-size extrapolation ({path.name}): gap_median half-width at "
        f"{len(sets['truth'])} sequences predicted from {n_small}: median "
        f"{np.median(predictions):.4f} (range {min(predictions):.4f}-{max(predictions):.4f}) "
        f"over {len(predictions)} batches; measured {measured:.4f}; ratio "
        f"{np.median(predictions) / measured:.2f}"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps")
    p.add_argument("--every", type=int, default=20, help="probe every N steps")
    p.add_argument("--saves", type=int, default=4, help="checkpoints saved for coverage")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-small", type=int, default=8, help="sequences per probe batch")
    p.add_argument("--null-batches", type=int, default=40)
    p.add_argument("--pairs", default="adjacent")
    p.add_argument(
        "--detect-threshold",
        type=float,
        default=0.02,
        help="gap_median threshold for the detection test (the demo model's median gap "
        "stays below the default 0.10 for the first 600 steps; gap_max > 0.10 is tested too)",
    )
    p.add_argument("--save-dir", help="keep the checkpoints here (default: a temp folder)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    train_text, held_text = stdlib_corpus()
    tokenizer = train_tokenizer(train_text)
    args.vocab_size = tokenizer.get_vocab_size()
    data_train = token_rows(tokenizer, train_text, args.seq_len)
    n = args.n_small
    sets = held_out_sets(
        tokenizer,
        held_text,
        args.seq_len,
        {"probe": n, "truth": 8 * n, "groups": 8 * n, "null": args.null_batches * n},
    )
    steps = checkpoint_steps(args.steps, args.every)
    save_steps = set(
        np.linspace(steps[len(steps) // 4], args.steps, args.saves).round().astype(int)
    )
    save_steps = {min(steps, key=lambda s, t=t: abs(s - t)) for t in save_steps}
    print(
        f"demo model: GPT-NeoX {args.layers} layers x {args.width}, {args.steps} steps of "
        f"{args.batch} x {args.seq_len} tokens; probes at {len(steps)} steps; "
        f"{torch.get_num_threads()} threads"
    )
    trajectory = []

    def on_probe(step, model):
        small = probe(model, sets["probe"], pairs=args.pairs)
        large = probe(model, sets["truth"], pairs=args.pairs, intervals=False)
        trajectory.append((step, small, large))

    with tempfile.TemporaryDirectory() as tmp:
        save_dir = Path(args.save_dir or tmp)
        saved = train(args, data_train, set(steps), on_probe, save_steps, save_dir)
        print(f"trained and probed in {time.perf_counter() - started:.0f} s")
        detection(trajectory, args.pairs, args.detect_threshold)
        coverage(saved, sets, n, args.pairs)
        last = saved[max(saved)]
        null(last, sets["null"], n, args.pairs)
        sample_size_check(last, sets, n, args.pairs)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
