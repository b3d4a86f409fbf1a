"""The side-stream path on one GPU: cost, overlap, memory, devices and correctness.

One short script (under 5 minutes on one H100): a ~350M-parameter Llama-style model in
bf16 trains for the same number of steps without the monitor, with the background
executor and with the inline executor (a probe every 20 steps), then one probe of fp32
weights on the GPU side stream is compared with the same probe on the CPU.

    python benchmarks/gpu_check.py                # needs a CUDA device
    python benchmarks/gpu_check.py --cpu-smoke    # a tiny model on the CPU: runs every
                                                  # step of the script, measures nothing

Printed: the training step time per mode and the ratio to no monitor; the fraction of
probe time overlapped with training (1 - (background time - plain time) / probe time);
peak device memory with and without the monitor; the device the probe worker used and
whether this process holds a CUDA context on any other device; and the largest relative
difference between the GPU probe and the CPU probe of the same weights (goal: 1e-4).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

import torch

from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor, probe
from redundancy_monitor.monitoring import monitor as monitor_module


def llama_config(layers: int, width: int, vocab: int, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(width * 2.75) // 64 * 64 or 64,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        num_key_value_heads=max(1, width // 64),
        max_position_embeddings=seq_len,
    )


def build(args, device, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = llama_config(args.layers, args.width, args.vocab, args.seq_len)
    return AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).train()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model, steps, batches, monitor, device) -> float:
    """Seconds for `steps` optimizer steps (a probe still running is waited for)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync(device)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        ids = batches[step % len(batches)]
        model(input_ids=ids, labels=ids).loss.backward()
        if monitor is not None:
            monitor.before_weights_change()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if monitor is not None:
            monitor.step(step, model)
    if monitor is not None:
        monitor.drain()
    sync(device)
    return time.perf_counter() - started


def other_device_contexts(device) -> str:
    """Which other devices hold a CUDA context of this process (needs pynvml)."""
    if device.type != "cuda":
        return "not applicable on CPU"
    if torch.cuda.device_count() < 2:
        return "one device only: nothing to check (the worker's current device is above)"
    import os

    try:
        found = [
            d
            for d in range(torch.cuda.device_count())
            if d != device.index and str(os.getpid()) in torch.cuda.list_gpu_processes(d)
        ]
    except Exception as exc:  # pynvml missing
        return f"cannot tell ({type(exc).__name__}: {exc})"
    return "none" if not found else f"CONTEXTS ON {found}: the worker missed set_device"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per mode")
    p.add_argument("--every", type=int, default=20, help="probe cadence (steps)")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--pairs", default="adjacent")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.steps, args.every, args.layers, args.width = 6, 3, 4, 64
        args.vocab, args.batch, args.seq_len = 256, 2, 32
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "gpu_check needs a CUDA device (none found). Run it on a GPU machine, or with "
            "--cpu-smoke to exercise the script on a tiny CPU model.",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device("cuda", torch.cuda.device_count() - 1)  # not device 0 if >1
        torch.cuda.set_device(device)
    logging.getLogger("redundancy_monitor").setLevel(logging.ERROR)
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device)
        for _ in range(8)
    ]
    probe_ids = torch.randint(0, args.vocab, (4, min(256, args.seq_len)), generator=g)
    worker_devices = []
    real_probe = monitor_module.probe

    def recording_probe(*a, **k):
        if device.type == "cuda":
            worker_devices.append(torch.cuda.current_device())
        return real_probe(*a, **k)

    monitor_module.probe = recording_probe

    model = build(args, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    train(model, 3, batches, None, device)  # warm-up: kernels, allocator
    rows = {}
    for mode in ("off", "background", "inline"):
        monitor = None
        if mode != "off":
            monitor = RedundancyMonitor(
                probe_ids,
                schedule=ProbeSchedule(args.every, log_spaced=False, at_train_end=False),
                executor=mode,
                probe_config=ProbeConfig(pairs=args.pairs),
            )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = train(model, args.steps, batches, monitor, device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        probe_s = sum(h.probe_seconds for h in monitor.history) if monitor else 0.0
        rows[mode] = (seconds, peak, probe_s, monitor)
        if monitor is not None:
            monitor.close()

    print(
        f"model: Llama {args.layers} x {args.width}, {n_params / 1e6:.1f}M parameters, "
        f"{str(dtype).replace('torch.', '')}, batch {args.batch} x {args.seq_len}, device "
        f"{device}; probe every {args.every} steps, pairs {args.pairs}, probe batch "
        f"{tuple(probe_ids.shape)}"
    )
    base = rows["off"][0] / args.steps
    print(f"{'mode':>11} {'ms/step':>9} {'ratio':>7} {'peak MiB':>9} {'probes':>7} {'probe s':>8}")
    for mode, (seconds, peak, probe_s, monitor) in rows.items():
        n = monitor.n_probes if monitor else 0
        print(
            f"{mode:>11} {seconds / args.steps * 1e3:>9.1f} {base * args.steps / seconds:>7.3f} "
            f"{peak / 2**20:>9.0f} {n:>7} {probe_s:>8.2f}"
        )
    extra = rows["background"][0] - rows["off"][0]
    probe_s = rows["background"][2]
    if probe_s > 0:
        overlap = min(1.0, max(0.0, 1 - extra / probe_s))
        print(f"probe time overlapped with training: {overlap:.1%}")
    print(f"probe worker's current CUDA device(s): {sorted(set(worker_devices)) or 'n/a'}")
    print(f"CUDA contexts of this process on other devices: {other_device_contexts(device)}")
    monitor_module.probe = real_probe
    return compare_with_cpu(model, probe_ids, device, args)


def compare_with_cpu(model, probe_ids, device, args) -> int:
    """Probe fp32 weights on the GPU side stream (background monitor) and on the CPU."""
    n = args.layers
    pairs = [(0, 1), (n // 2 - 1, n // 2), (n - 2, n - 1)]
    model = model.float()
    monitor = RedundancyMonitor(
        probe_ids[:2, :64],
        schedule=ProbeSchedule.explicit([0], at_train_end=False),
        probe_config=ProbeConfig(pairs=pairs),
    )
    monitor.step(0, model)
    on_cpu = copy.deepcopy(model).cpu()  # the same weights as the snapshot (no step since)
    monitor.close()
    side_stream = monitor._shadow.stream is not None
    gpu = monitor.history[0].result.summary.scalars() if monitor.history else None
    cpu = probe(on_cpu, probe_ids[:2, :64], pairs=pairs).summary.scalars()
    if gpu is None:
        print("GPU probe FAILED: see the log")
        return 1
    worst = max(
        abs(gpu[k] - cpu[k]) / max(abs(cpu[k]), 1e-6)
        for k in ("d_repl_mean", "d_int_mean", "gap_mean")
        if cpu[k] is not None
    )
    verdict = "ok" if worst <= 1e-4 else "ABOVE 1e-4"
    print(
        f"GPU probe (side stream: {side_stream}) vs CPU probe of the same fp32 weights, "
        f"pairs {pairs}: largest relative difference {worst:.2e} ({verdict})"
    )
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
