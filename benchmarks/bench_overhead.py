"""What the monitor costs training: throughput with and without it, time blocked per probe.

One run alternates segments of training without the monitor, with the background
executor and with the inline executor (same model, same data order, rounds interleaved
so drift hits every mode alike) on the demo model (examples/pretrain_lightning.py).

    python benchmarks/bench_overhead.py                  # ~5 min on 2 CPU cores
    python benchmarks/bench_overhead.py --every 100 --rounds 3

Printed: training steps/s per mode and the ratio to no monitor at the measured cadence;
per probe, the time training was blocked (snapshot copy + hand-off; for inline, the whole
probe) and the probe's own time; and the ratio projected to other cadences from the
measured ratio. Goals: ratio >= 0.97 at the default cadence
(every 500 steps); blocked <= 10% of the probe's own time with the background executor.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor
from redundancy_monitor.demo import demo_data, pythia_config
from redundancy_monitor.monitoring.schedule import DEFAULT_EVERY_N_STEPS


def train_segment(model, opt, batches, monitor, first_step):
    """Train on `batches` (then wait for a probe still running); return (wall s, CPU s).

    CPU seconds count every thread of the process, the probe worker included, so they
    measure the monitor's cost even when other processes share the cores.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    for k, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if monitor is not None:
            monitor.before_weights_change()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if monitor is not None:
            monitor.step(first_step + k + 1, model)
    if monitor is not None:
        monitor.drain()  # a probe still running belongs to this mode's time
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--every", type=int, default=50, help="probe cadence measured (steps)")
    p.add_argument("--segment", type=int, default=100, help="steps per segment")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--pairs", default="window:2")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    logging.getLogger("redundancy_monitor").setLevel(logging.ERROR)  # alerts are not measured
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
            schedule=ProbeSchedule(args.every, log_spaced=False, at_train_end=False),
            executor=kind,
            probe_config=ProbeConfig(pairs=args.pairs),
        )
        for kind in ("background", "inline")
    }
    modes = ("off", "background", "inline")
    wall = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    train_segment(model, opt, batches(10), None, 0)  # warm-up
    global_step = 10
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            w, c = train_segment(model, opt, batches(args.segment), monitors.get(mode), global_step)
            wall[mode].append(w)
            cpu[mode].append(c)
            global_step += args.segment

    # Per round, each mode against the "off" segment of the same round, then the median.
    def ratio(times, mode):
        return statistics.median(o / t for o, t in zip(times["off"], times[mode], strict=True))

    cpu_step = {m: sum(cpu[m]) / (args.segment * args.rounds) for m in modes}
    print(
        f"demo model: GPT-NeoX {args.layers} layers x {args.width}, batch {args.batch} x "
        f"{args.seq_len} tokens, probe batch {tuple(data.probe_ids.shape)}, pairs "
        f"{args.pairs}, {torch.get_num_threads()} threads"
    )
    print(
        f"{args.rounds} rounds x {args.segment} steps per mode, probe every {args.every} "
        "steps; ratios = median over rounds of (time without monitor / time with)\n"
    )
    print(
        f"{'mode':>11} {'steps/s':>8} {'wall ratio':>11} {'CPU ms/step':>12} {'CPU ratio':>10} "
        f"{'probes':>7} {'skipped':>8} {'blocked/probe':>14} {'probe time':>11} "
        f"{'blocked/probe time':>19}"
    )
    for mode in modes:
        rate = args.segment * args.rounds / sum(wall[mode])
        line = (
            f"{mode:>11} {rate:>8.2f} {ratio(wall, mode):>11.3f} "
            f"{cpu_step[mode] * 1e3:>12.1f} {ratio(cpu, mode):>10.3f}"
        )
        mon = monitors.get(mode)
        if mon is not None and mon.history:
            blocked = statistics.median(h.blocked_seconds for h in mon.history)
            own = statistics.median(h.probe_seconds for h in mon.history)
            line += (
                f" {mon.n_probes:>7} {mon.n_skipped_busy:>8} {blocked * 1e3:>11.1f} ms "
                f"{own * 1e3:>8.0f} ms {blocked / own:>18.1%}"
            )
        print(line)
    # The extra time per step is proportional to the probe rate: r_N = 1 / (1 + c * E / N),
    # with c = 1/r_E - 1 measured at cadence E.
    print("\nprojected wall-clock throughput ratio at other cadences (from the measured ratio):")
    for every in sorted({args.every, 100, 200, DEFAULT_EVERY_N_STEPS}):
        cells = "  ".join(
            f"{mode}: {1 / (1 + max(0.0, 1 / ratio(wall, mode) - 1) * args.every / every):.3f}"
            for mode in modes[1:]
        )
        tag = " (default)" if every == DEFAULT_EVERY_N_STEPS else ""
        print(f"  every {every:>4} steps{tag}: {cells}")
    for mon in monitors.values():
        mon.close()


if __name__ == "__main__":
    main()
