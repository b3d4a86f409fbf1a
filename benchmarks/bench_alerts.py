"""v2: do the change intervals mean what they say, and do the default alerts fire on
change, on time, and never on a run whose weights do not change?

The demo's model (a 6-layer Pythia-style GPT-NeoX, `redundancy_monitor.demo`) is trained
from scratch on the Python standard library's text and probed every `--every` steps on
three disjoint sets of held-out 64-token sequences: the 8-sequence probe batch, 64
"truth" sequences, and 64 more cut into 8 groups of 8 (their per-sequence tables are
sliced, so a group is exactly what a probe of those 8 sequences gives). Goals, printed
next to the figures:

- coverage: the 8-sequence paired change interval (since the first probe, and since the
  previous probe) contains the change measured on the 64 truth sequences for >= 90% of
  pair values and summary scalars;
- detection: the default `gap_growth` (and an amount rule) fires, through the same
  `Recorder` the monitor uses, at the first probe where the 64-sequence change crosses
  the rule's limit, within one probe;
- null: 0 alerts from the default rules on runs with learning rate 0 (weights
  unchanged; from the random init and from the trained checkpoint, a real training loop
  with the monitor attached), and no change alert at a probe where the 64-sequence change
  is below half the rule's limit (the probe batch and each of the 8 groups as probe
  batches).

Also printed: how much narrower the change interval is than the level's, the level's
coverage from the same data, and the change's sample-size extrapolation from 8 to 64.

    OMP_NUM_THREADS=1 python benchmarks/bench_alerts.py            # ~10 min on 2 cores
    python benchmarks/bench_alerts.py --steps 200 --every 20        # quicker, coarser
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from redundancy_monitor import probe
from redundancy_monitor.demo import pythia_config, stdlib_corpus, token_rows, train_tokenizer
from redundancy_monitor.monitoring.alerts import AlertConfig
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.probe_config import ProbeConfig
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.recorder import Recorder
from redundancy_monitor.monitoring.schedule import ProbeSchedule
from redundancy_monitor.probing.change import CHANGE_SCALARS, PAIR_FIELDS, paired_change
from redundancy_monitor.probing.intervals import (
    SampleSizeAdvice,
    from_per_sequence,
    predicted_halfwidth,
)

GOAL_COVERAGE = 0.90


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


def new_model(args):
    torch.manual_seed(0)
    config = pythia_config(args.vocab_size, args.layers, args.width, args.seq_len)
    return AutoModelForCausalLM.from_config(config).train()


def train(args, model, data_train, probe_steps, on_probe, lr: float, monitor=None):
    """The demo's recipe (AdamW, warm-up then linear decay); `on_probe(step, model)` at
    each of `probe_steps`; with a `monitor`, its hooks at every optimizer step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / args.steps)
    )
    g = torch.Generator().manual_seed(1)
    if monitor is not None:
        monitor.start()
    for step in range(args.steps + 1):
        if step in probe_steps and on_probe is not None:
            on_probe(step, model)
        if monitor is not None:
            monitor.step(step, model)
        if step == args.steps:
            break
        ids = data_train[torch.randint(0, len(data_train), (args.batch,), generator=g)]
        model(input_ids=ids, labels=ids).loss.backward()
        if monitor is not None:
            monitor.before_weights_change()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if monitor is not None:
        monitor.train_end(args.steps, model)
        monitor.close()


# ----- coverage of the change --------------------------------------------------------------


def groups_of(result, n_small: int):
    """The 8-sequence groups of a 64-sequence probe, from its per-sequence tables."""
    ps = result.per_sequence
    return [
        from_per_sequence(ps.subset(range(k * n_small, (k + 1) * n_small)))
        for k in range(ps.n_seq // n_small)
    ]


def change_hits(estimate, truth) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {"pairs": [], "scalars": []}
    for got, want in zip(estimate.pairs, truth.pairs, strict=True):
        for name in PAIR_FIELDS:
            low, high = got.interval(name)
            value = getattr(want, name)
            if low is not None and high is not None and value is not None:
                out["pairs"].append(low <= value <= high)
    for name in CHANGE_SCALARS:
        low, high = estimate.interval(name)
        value = truth.value(name)
        if low is not None and high is not None and value is not None:
            out["scalars"].append(low <= value <= high)
    return out


def coverage(steps, truth, groups) -> None:
    print("\n== coverage: 95% paired change intervals from 8 sequences vs the change on 64 ==")
    hits: dict[tuple[str, str], list[bool]] = {}
    level_hits: list[bool] = []
    widths: dict[str, list[float]] = {"baseline": [], "previous": []}
    for k in range(1, len(steps)):
        for since, j in (("baseline", 0), ("previous", k - 1)):
            want = paired_change(truth[j], truth[k], steps[j], config=False)
            for g_early, g_late in zip(groups[j], groups[k], strict=True):
                got = paired_change(g_early, g_late, steps[j])
                for kind, h in change_hits(got, want).items():
                    hits.setdefault((since, kind), []).extend(h)
                low, high = got.interval("gap_median")
                lvl_low, lvl_high = g_late.summary.interval("gap_median")
                if high is not None and high > low:
                    widths[since].append((lvl_high - lvl_low) / (high - low))
        for g in groups[k]:
            low, high = g.summary.interval("gap_median")
            level_hits.append(low <= truth[k].summary.gap_median <= high)
    n_groups = len(groups[0])
    print(
        f"  {len(steps) - 1} later probes x {n_groups} groups of 8 x (since the first, since the previous)"
    )
    all_hits = []
    for (since, kind), h in sorted(hits.items()):
        all_hits.extend(h)
        print(f"  since the {since:>8} probe, {kind:>7}: {np.mean(h):6.1%} of {len(h)}")
    total = float(np.mean(all_hits))
    verdict = "met" if total >= GOAL_COVERAGE else "NOT met"
    print(f"  all: {total:.1%} of {len(all_hits)} (goal >= {GOAL_COVERAGE:.0%}: {verdict})")
    print(
        f"  (the level's gap_median interval from the same groups covers {np.mean(level_hits):.1%} of {len(level_hits)})"
    )
    for since, w in widths.items():
        print(
            f"  level interval width / change interval width (gap_median, since the {since}): "
            f"median {np.median(w):.1f}x (range {min(w):.1f}-{max(w):.1f}x)"
        )


# ----- detection and no change alert on noise ------------------------------------------------


def run_recorder(steps, results, config: AlertConfig) -> Recorder:
    recorder = Recorder(alerts=config, probe_config=ProbeConfig())
    for step, result in zip(steps, results, strict=True):
        recorder.record(ProbeRecord(step, result))
    return recorder


def detection(steps, small, truth, groups, n_small: int) -> None:
    print(f"\n== detection along training ({len(steps)} probes) ==")
    truth_change = [paired_change(truth[0], t, steps[0], config=False) for t in truth]
    small_rec = run_recorder(steps, small, AlertConfig())
    print(
        f"  {'step':>5} {'gap_median 8':>12} {'change since step 0, 8 seqs [paired interval]':>46} {'change on 64':>13}"
    )
    for k, step in enumerate(steps):
        rec = small_rec.history[k]
        c = rec.change.baseline if rec.change is not None else None
        band = (
            ""
            if c is None
            else f"{c.value('gap_median'):+.4f} [{c.interval('gap_median')[0]:+.4f}, {c.interval('gap_median')[1]:+.4f}]"
        )
        print(
            f"  {step:>5} {rec.result.summary.gap_median:>12.4f} {band:>46} "
            f"{truth_change[k].value('gap_median'):>+13.4f}"
        )
    for advice in (small_rec.sample_size, small_rec.change_sample_size):
        if advice is not None:
            fields = {k: v for k, v in advice.items() if k not in ("type", "step")}
            print(f"  advice at step {advice['step']}: {SampleSizeAdvice(**fields).sentence()}")
    cases = [
        ("default gap_growth (factor 3.0)", AlertConfig()),
        ("gap_growth, growth_amount 0.01", AlertConfig(growth_factor=None, growth_amount=0.01)),
        ("default on gap_mean", AlertConfig(gap_metric="gap_mean")),
    ]
    print(
        f"\n  {'rule':>34} {'limit (8 / 64)':>16} {'64 crosses':>11} {'8 fires':>8} "
        f"{'probes after':>13} {'goal <= 1':>10}"
    )
    false_alarms, opportunities = [], 0
    for label, config in cases:
        metric = config.gap_metric
        truth_rec = run_recorder(steps, truth, dataclasses.replace(config, use_intervals=False))
        limit_64 = config.growth_limit(truth_rec.alert_engine.baseline)
        rec = run_recorder(steps, small, config)
        limit_8 = config.growth_limit(rec.alert_engine.baseline)
        values = [c.value(metric) for c in truth_change]
        crossing = next((s for s, v in zip(steps, values, strict=True) if v > limit_64), None)
        fired = next((a.step for a in rec.alerts if a.rule == "gap_growth"), None)
        late = (
            None
            if crossing is None or fired is None
            else steps.index(fired) - steps.index(crossing)
        )
        verdict = "-" if late is None else ("met" if late <= 1 else "NOT met")
        print(
            f"  {label:>34} {limit_8:>7.4f}/{limit_64:<8.4f} {crossing!s:>11} {fired!s:>8} "
            f"{late if late is not None else '-'!s:>13} {verdict:>10}"
        )
        # No change alert where the 64-sequence change is below half the limit: the probe
        # batch and each group of 8 as probe batches.
        batches = [small] + [[g[i] for g in groups] for i in range(len(groups[0]))]
        for results in batches:
            r = run_recorder(steps, results, config)
            for a in r.alerts:
                if a.rule in ("gap_growth", "gap_decline"):
                    opportunities += 1
                    truth_value = values[steps.index(a.step)]
                    if abs(truth_value) < limit_64 / 2:
                        false_alarms.append((label, a.step, truth_value))
    print(
        f"  change alerts at a probe where the 64-sequence change is below half the limit: "
        f"{len(false_alarms)} of {opportunities} change alerts over {1 + len(groups[0])} "
        f"probe batches x {len(cases)} rules (goal 0: {'met' if not false_alarms else 'NOT met'})"
        + (f" {false_alarms}" if false_alarms else "")
    )


def change_sample_size(steps, truth, groups, n_small: int) -> None:
    """The change advice's 1/sqrt(n) extrapolation from 8 to 64 sequences."""
    k = len(steps) - 1
    big = paired_change(truth[0], truth[k], steps[0]).interval("gap_median")
    measured = (big[1] - big[0]) / 2
    predictions = []
    for early, late in zip(groups[0], groups[k], strict=True):
        low, high = paired_change(early, late, steps[0]).interval("gap_median")
        predictions.append(predicted_halfwidth((high - low) / 2, n_small, truth[k].meta.n_seq))
    print(
        f"\n== change sample size (step {steps[0]} -> {steps[k]}): half-width of the "
        f"gap_median change at {truth[k].meta.n_seq} sequences predicted from {n_small}: "
        f"median {np.median(predictions):.4f} (range {min(predictions):.4f}-"
        f"{max(predictions):.4f}) over {len(predictions)} groups; measured {measured:.4f}; "
        f"ratio {np.median(predictions) / measured:.2f}"
    )


# ----- null: learning rate 0 ------------------------------------------------------------


def null_runs(args, data_train, probe_ids, trained_state) -> None:
    print("\n== null: the default rules on real training loops with learning rate 0 ==")
    null_args = argparse.Namespace(**{**vars(args), "steps": args.null_steps})
    for label, state in (("random init", None), (f"trained (step {args.steps})", trained_state)):
        model = new_model(args)
        if state is not None:
            model.load_state_dict(state)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        monitor = RedundancyMonitor(
            probe_ids,
            schedule=ProbeSchedule(every_n_steps=args.every, log_spaced=False),
            executor="inline",
            probe_config=ProbeConfig(pairs=args.pairs),
        )
        train(null_args, model, data_train, set(), None, lr=0.0, monitor=monitor)
        unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        first = monitor.history[0].result.summary
        state_info = monitor.recorder.baseline_state or {}
        overlap = state_info.get("removal_overlap", {})
        print(
            f"  {label:>22}: {len(monitor.history)} probes, weights unchanged: {unchanged}; "
            f"level at the baseline: gap_median {first.gap_median:.4f}, regime "
            f"{first.regime_text()}, removal sets {overlap.get('replacement')} / "
            f"{overlap.get('interchange')}; alerts {len(monitor.alerts)} "
            f"{[a.rule for a in monitor.alerts]} (goal 0: {'met' if not monitor.alerts else 'NOT met'})"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps")
    p.add_argument("--every", type=int, default=20, help="probe every N steps")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-small", type=int, default=8, help="sequences per probe batch")
    p.add_argument("--null-steps", type=int, default=60, help="steps of each lr=0 run")
    p.add_argument("--pairs", default="adjacent")
    args = p.parse_args(argv)
    started = time.perf_counter()
    # The alerts are counted and printed here; the monitor's log lines would drown them.
    logging.getLogger("redundancy_monitor").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    train_text, held_text = stdlib_corpus()
    tokenizer = train_tokenizer(train_text)
    args.vocab_size = tokenizer.get_vocab_size()
    data_train = token_rows(tokenizer, train_text, args.seq_len)
    n = args.n_small
    sets = held_out_sets(
        tokenizer, held_text, args.seq_len, {"probe": n, "truth": 8 * n, "groups": 8 * n}
    )
    steps = sorted(set(range(0, args.steps + 1, args.every)) | {args.steps})
    print(
        f"demo model: GPT-NeoX {args.layers} layers x {args.width}, {args.steps} steps of "
        f"{args.batch} x {args.seq_len} tokens; probes at {len(steps)} steps on {n} + {8 * n} "
        f"+ {8 * n} held-out sequences; pairs {args.pairs}; {torch.get_num_threads()} threads"
    )
    small, truth, groups = [], [], []

    def on_probe(step, model):
        small.append(probe(model, sets["probe"], pairs=args.pairs))
        truth.append(probe(model, sets["truth"], pairs=args.pairs, intervals=False))
        groups.append(groups_of(probe(model, sets["groups"], pairs=args.pairs, intervals=False), n))

    model = new_model(args)
    train(args, model, data_train, set(steps), on_probe, lr=args.lr)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"trained and probed in {time.perf_counter() - started:.0f} s")
    detection(steps, small, truth, groups, n)
    coverage(steps, truth, groups)
    change_sample_size(steps, truth, groups, n)
    null_runs(args, data_train, sets["probe"], trained)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
