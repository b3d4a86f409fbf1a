"""What the monitor costs training: throughput with and without it, time blocked per probe.

One run alternates segments of training without the monitor, with the background
executor and with the inline executor (same model, same data order, rounds interleaved
so drift hits every mode alike) on the demo model (examples/pretrain_lightning.py).

    python benchmarks/bench_overhead.py                  # ~5 min on 2 CPU cores
    python benchmarks/bench_overhead.py --every 100 --rounds 3

Printed: training steps/s per mode and the ratio to no monitor at the measured cadence;
per probe, the time training was blocked (snapshot copy + hand-off; for inline, the whole
probe) and the probe's own time; and the ratio projected to other cadences from the
measured extra time per probe. Goals: ratio >= 0.97 at the default cadence
(every 500 steps); blocked <= 10% of the probe's own time with the background executor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from redundancy_monitor import RedundancyMonitor
from redundancy_monitor.demo import demo_data, pythia_config
from redundancy_monitor.schedule import DEFAULT_EVERY_N_STEPS


def train_segment(model, opt, batches, monitor, first_step):
    """Train on `batches`; return wall seconds. The monitor, if any, sees every step."""
    started = time.perf_counter()
    for k, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if monitor is not None:
            monitor.before_weights_change()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if monitor is not None:
            monitor.step(first_step + k + 1, model)
    return time.perf_counter() - started


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--every", type=int, default=50, help="probe cadence measured (steps)")
    p.add_argument("--segment", type=int, default=100, help="steps per segment")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--pairs", default="window:2")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = demo_data(seq_len=args.seq_len)
    config = pythia_config(data.vocab_size, args.layers, args.width, args.seq_len)
    model = AutoModelForCausalLM.from_config(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def batches(n):
        idx = torch.randint(0, len(data.train_ids), (n, args.batch), generator=g)
        return [data.train_ids[i] for i in idx]

    monitors = {
        kind: RedundancyMonitor(
            data.probe_ids,
            every_n_steps=args.every,
            log_spaced=False,
            at_train_end=False,
            executor=kind,
            pairs=args.pairs,
        )
        for kind in ("background", "inline")
    }
    modes = ("off", "background", "inline")
    seconds = {m: 0.0 for m in modes}
    steps = {m: 0 for m in modes}
    train_segment(model, opt, batches(10), None, 0)  # warm-up
    global_step = 10
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            monitor = monitors.get(mode)
            seconds[mode] += train_segment(model, opt, batches(args.segment), monitor, global_step)
            if monitor is not None:
                t = time.perf_counter()
                monitor.drain()  # a probe still running belongs to this mode's time
                seconds[mode] += time.perf_counter() - t
            steps[mode] += args.segment
            global_step += args.segment

    rate = {m: steps[m] / seconds[m] for m in modes}
    print(
        f"demo model: GPT-NeoX {args.layers} layers x {args.width}, batch {args.batch} x "
        f"{args.seq_len} tokens, probe batch {tuple(data.probe_ids.shape)}, pairs "
        f"{args.pairs}, {torch.get_num_threads()} threads"
    )
    print(f"{args.rounds} rounds x {args.segment} steps per mode, probe every {args.every} steps\n")
    print(
        f"{'mode':>11} {'steps/s':>9} {'ratio':>7} {'probes':>7} {'skipped':>8} "
        f"{'blocked/probe':>14} {'probe time':>11} {'blocked/probe time':>19}"
    )
    step_time = 1 / rate["off"]
    extra = {}
    for mode in modes:
        line = f"{mode:>11} {rate[mode]:>9.2f} {rate[mode] / rate['off']:>7.3f}"
        mon = monitors.get(mode)
        if mon is not None and mon.history:
            blocked = statistics.median(h["blocked_seconds"] for h in mon.history)
            own = statistics.median(h["probe_seconds"] for h in mon.history)
            line += (
                f" {mon.n_probes:>7} {mon.n_skipped_busy:>8} {blocked * 1e3:>11.1f} ms "
                f"{own * 1e3:>8.0f} ms {blocked / own:>18.1%}"
            )
            # extra wall time per probe, from the measured throughput loss
            extra[mode] = (seconds[mode] - steps[mode] * step_time) / max(1, mon.n_probes)
        print(line)
    print(
        "\nprojected throughput ratio at other cadences (from the measured extra time per probe):"
    )
    for every in sorted({args.every, 100, 200, DEFAULT_EVERY_N_STEPS}):
        cells = "  ".join(
            f"{mode}: {every * step_time / (every * step_time + max(0.0, e)):.3f}"
            for mode, e in extra.items()
        )
        tag = " (default)" if every == DEFAULT_EVERY_N_STEPS else ""
        print(f"  every {every:>4} steps{tag}: {cells}")
    for mon in monitors.values():
        mon.close()


if __name__ == "__main__":
    main()
