"""Probe engine vs reference, side by side in one run.

For a ~20M-parameter 12-layer and a 24-layer GPT-NeoX (Pythia architecture, built from a
config) on adjacent pairs, prints: engine time, reference time and their ratio; engine
time over its lower bound (the block and head evaluations it cannot avoid x the measured
time of one block and of one head+KL); peak memory of each path (measured in a fresh
child process); and the widest logits tensor for adjacent vs all pairs.

    python benchmarks/bench_probe.py            # ~8 minutes on 2 CPU cores
    python benchmarks/bench_probe.py --quick    # smaller batch, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch


def build(n_layers: int, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=8192,
        hidden_size=384,
        num_hidden_layers=n_layers,
        num_attention_heads=6,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).eval()


def batch(n_seq: int, seq_len: int):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 8192, (n_seq, seq_len), generator=g)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _peak_child(kind: str, n_layers: int, n_seq: int, seq_len: int, out) -> None:
    """Run one path in a fresh process; report its peak RSS above the model's footprint."""
    torch.set_num_threads(2)
    from redundancy_monitor.probing.engine import variant_distances
    from redundancy_monitor.probing.probe import plan_variants, prepare
    from redundancy_monitor.probing.reference import reference_distances
    from redundancy_monitor.probing.variants import parse_pairs

    model = build(n_layers)
    root, blocks, head, b = prepare(model, batch(n_seq, seq_len))
    variants = list(
        plan_variants(n_layers, parse_pairs("adjacent", n_layers), ["replacement", "interchange"])
    )
    before = _rss_kib("VmRSS")
    if kind == "engine":
        variant_distances(root, blocks, head, b, variants)
    else:
        reference_distances(root, blocks, b, variants)
    out.put((_rss_kib("VmHWM") - before) / 1024)


def peak_mib(kind: str, n_layers: int, n_seq: int, seq_len: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(kind, n_layers, n_seq, seq_len, q))
    p.start()
    value = q.get()
    p.join()
    return value


def widest_logits(model, ids, pairs: str) -> int:
    """Largest number of logit rows the engine materialises at once (with a small
    `logit_rows` budget, so that chunking, not the batch, sets the bound)."""
    from redundancy_monitor.probing.engine import EngineOptions, variant_distances
    from redundancy_monitor.probing.probe import plan_variants, prepare
    from redundancy_monitor.probing.variants import parse_pairs

    root, blocks, head, b = prepare(model, ids)
    L = len(blocks)
    variants = list(plan_variants(L, parse_pairs(pairs, L), ["replacement", "interchange"]))
    widest = [0]
    vocab = model.config.vocab_size

    def hook(module, args, out):
        if out.shape[-1] == vocab:
            widest[0] = max(widest[0], out[..., 0].numel())

    h = head.register_forward_hook(hook)
    try:
        variant_distances(root, blocks, head, b, variants, EngineOptions(logit_rows=128))
    finally:
        h.remove()
    return widest[0]


def unit_times(model, ids, repeats: int = 3) -> tuple[float, float]:
    """Median time of one block on the batch, and of one head + log-softmax + KL."""
    from redundancy_monitor.probing.engine import Engine
    from redundancy_monitor.probing.model_io import untouched
    from redundancy_monitor.probing.probe import prepare

    root, blocks, head, b = prepare(model, ids)
    with untouched(root):
        engine = Engine(root, blocks, head, b)
        engine.record_reference()
        engine._prepare_logits()
        x = engine.reference.slot_outputs[3]
        captured = {}
        hook = blocks[4].register_forward_pre_hook(
            lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True
        )
        from redundancy_monitor.probing.model_io import call_model

        call_model(root, b)
        hook.remove()
        args = (x, *captured["args"][1:])
        block_t, head_t = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            blocks[4](*args, **captured["kwargs"])
            block_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine._token_kl(engine.reference.final_hidden, 1)
            head_t.append(time.perf_counter() - t)
    return sorted(block_t)[repeats // 2], sorted(head_t)[repeats // 2]


def run(n_layers: int, n_seq: int, seq_len: int, repeats: int = 3) -> dict:
    from redundancy_monitor.probing.engine import variant_distances
    from redundancy_monitor.probing.probe import plan_variants, prepare
    from redundancy_monitor.probing.reference import reference_distances
    from redundancy_monitor.probing.variants import parse_pairs

    model = build(n_layers)
    ids = batch(n_seq, seq_len)
    root, blocks, head, b = prepare(model, ids)
    variants = list(
        plan_variants(n_layers, parse_pairs("adjacent", n_layers), ["replacement", "interchange"])
    )
    variant_distances(root, blocks, head, b, variants)  # warm up kernels and allocator

    # Interleave the two paths and keep each one's median, so that drift in the
    # machine's speed hits both alike.
    engine_runs, reference_runs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        fast = variant_distances(root, blocks, head, b, variants)
        engine_runs.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = reference_distances(root, blocks, b, variants)
        reference_runs.append(time.perf_counter() - t)
    engine_s = statistics.median(engine_runs)
    reference_s = statistics.median(reference_runs)
    worst = max(abs(f.mean - r.mean) for f, r in zip(fast, ref, strict=True))

    block_s, head_s = unit_times(model, ids, repeats=7)
    block_evals = n_layers + sum(n_layers - v.first_changed for v in variants)
    head_evals = 1 + len(variants)
    bound_s = block_evals * block_s + head_evals * head_s
    return {
        "layers": n_layers,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "variants": len(variants),
        "engine_s": round(engine_s, 2),
        "reference_s": round(reference_s, 2),
        "speedup": round(reference_s / engine_s, 2),
        "lower_bound_s": round(bound_s, 2),
        "engine_over_bound": round(engine_s / bound_s, 2),
        "max_abs_diff": float(f"{worst:.2e}"),
        "engine_peak_MiB": round(peak_mib("engine", n_layers, n_seq, seq_len)),
        "reference_peak_MiB": round(peak_mib("reference", n_layers, n_seq, seq_len)),
        # Same (shorter) batch for both pair sets: the bound depends on rows, not variants.
        "widest_logit_rows_adjacent": widest_logits(model, ids[:2, :48], "adjacent"),
        "widest_logit_rows_all": widest_logits(model, ids[:2, :48], "all"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch")
    parser.add_argument("--json", action="store_true", help="print JSON lines only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    n_seq, seq_len = (2, 64) if args.quick else (4, 128)
    rows = [run(12, n_seq, seq_len), run(24, n_seq, seq_len)]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(
        f"batch: {n_seq} sequences x {seq_len} tokens, adjacent pairs, fp32, {torch.get_num_threads()} threads"
    )
    keys = list(rows[0])
    width = max(len(k) for k in keys)
    for k in keys:
        print(f"{k:<{width}}  " + "  ".join(f"{r[k]!s:>10}" for r in rows))


if __name__ == "__main__":
    main()
