"""Removal measurement: fast paths against the obvious ones, side by side.

    python benchmarks/bench_removal.py          # ~3 minutes on 2 CPU cores

1. Iterative greedy deletion (SLEB-style, budget 3): every candidate of a step in one
   engine call, against one full reference forward per candidate. The chosen layers
   must agree.
2. Sliding-window perplexity: equal-length windows batched (max_tokens=4096) against
   one window per forward. The perplexities must agree.

Prints the median of 3 runs of each and the ratio; single thread, so the numbers do not
depend on what else runs on the machine's other core.
"""

from __future__ import annotations

import statistics
import time

import torch

from redundancy_monitor import find_blocks, make_batch
from redundancy_monitor.probing.blocks import find_head
from redundancy_monitor.probing.model_io import untouched
from redundancy_monitor.probing.reference import reference_distances
from redundancy_monitor.probing.variants import Variant
from redundancy_monitor.removal.baselines import greedy_deletion_steps
from redundancy_monitor.removal.cost import sliding_perplexity


def build(n_layers: int = 12, width: int = 256, vocab: int = 4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=n_layers, num_attention_heads=8, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def greedy_by_reference(model, blocks, batch, budget: int) -> list[int]:
    n, chosen = len(blocks), []
    for _ in range(budget):
        candidates = [s for s in range(n) if s not in chosen]
        variants = [Variant.deletion(n, [*chosen, s]) for s in candidates]
        d = reference_distances(model, blocks, batch, variants)
        chosen.append(min(zip((x.mean for x in d), candidates, strict=True))[1])
    return chosen


def median_time(fn, repeats: int = 3):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    torch.set_num_threads(1)
    model = build()
    blocks, head = find_blocks(model), find_head(model)
    ids = torch.randint(0, 4096, (8, 128), generator=torch.Generator().manual_seed(1))
    batch = make_batch(ids)

    fast_t, steps = median_time(lambda: greedy_deletion_steps(model, blocks, head, batch, 3))
    slow_t, chosen = median_time(lambda: greedy_by_reference(model, blocks, batch, 3))
    fast = [s.layer for s in steps]
    assert fast == chosen, (fast, chosen)
    print(f"greedy deletion, 12 layers, budget 3, batch 8x128: engine {fast_t:.2f}s, "
          f"reference {slow_t:.2f}s, ratio {slow_t / fast_t:.1f}x (layers {fast})")  # fmt: skip

    held = torch.randint(0, 4096, (1, 8192), generator=torch.Generator().manual_seed(2))
    with untouched(model):
        batched_t, a = median_time(lambda: sliding_perplexity(model, held, 256, 128))
        single_t, b = median_time(lambda: sliding_perplexity(model, held, 256, 128, 256))
    assert abs(a - b) <= 1e-6 * a, (a, b)
    print(f"sliding perplexity, 8192 tokens, window 256, stride 128: batched {batched_t:.2f}s, "
          f"one window per forward {single_t:.2f}s, ratio {single_t / batched_t:.1f}x "
          f"(ppl {a:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
