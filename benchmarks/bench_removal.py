"""Removal measurement: fast paths against the obvious ones, side by side.

    python benchmarks/bench_removal.py            # parts 1-3, ~10 minutes on 2 CPU cores
    python benchmarks/bench_removal.py --table    # part 3 only
    python benchmarks/bench_removal.py --score-135m [--exhaustive] [--tokens N]
        [--train-steps N | --checkpoint DIR] [--small]                # part 4 only

1. Iterative greedy deletion (SLEB-style, budget 3): every candidate of a step in one
   engine call, against one full reference forward per candidate. The chosen layers
   must agree.
2. Sliding-window perplexity: equal-length windows batched (max_tokens=4096) against
   one window per forward. The perplexities must agree.
3. The removal table's held-out perplexity (`compare_removal`, budgets 1,2, the default
   selectors) on a 12-layer Llama and real text (the Python standard library's source,
   a BPE trained on it): today's path (``evaluation="reference"``: one full forward of
   each pruned model per window batch, what ``score --exhaustive`` runs) against the
   shared computation alone (``"full"``) and with racing (``"race"``, the default).
   Same probe batch, budgets and text; the rows measured on all of the text must agree
   to 1e-6 and the recommendations must be the same.
4. ``--score-135m``: the whole ``redundancy-monitor score --n-seq 4 --seq-len 64
   --budgets 1,2`` of a 30-layer, 135M-parameter Llama (SmolLM-135M's shape: hidden 576,
   MLP 1536, 9 heads, 3 KV heads, vocabulary 49152) on 2 threads, given ``--tokens``
   tokens (default 5120) of standard-library source it was not trained on; with
   ``--exhaustive`` the same command with ``--exhaustive`` runs after it. The weights are
   random unless ``--train-steps N`` pretrains the model first (about 5 s a step), or
   ``--checkpoint DIR`` scores a checkpoint of your own instead; ``--small`` runs it on
   the 12-layer model of part 3 (about 0.5 s a training step).

Parts 1-3 print the median of 3 runs (part 3: 1 run each) and the ratio; single thread,
so the numbers depend less on what else runs on the machine's other core. The weights
are random: on a trained checkpoint, far more candidates are clearly worse than the best
and racing stops more of them.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from redundancy_monitor import find_blocks, make_batch, probe
from redundancy_monitor.probing.blocks import find_head
from redundancy_monitor.probing.model_io import untouched
from redundancy_monitor.probing.reference import reference_distances
from redundancy_monitor.probing.variants import Variant
from redundancy_monitor.removal.baselines import greedy_deletion_steps
from redundancy_monitor.removal.cost import sliding_perplexity
from redundancy_monitor.removal.table import compare_removal

ROOT = Path(__file__).parents[1]


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


def real_text(max_bytes: int = 600_000):
    """(tokenizer, train, held): a BPE (vocabulary 4096) trained on 600 kB of
    standard-library source, that source (the models' training text), and held-out source
    they were not trained on (every tenth file, up to `max_bytes` of source read)."""
    from redundancy_monitor.demo import stdlib_corpus, train_tokenizer

    train = stdlib_corpus(600_000)[0]
    held = stdlib_corpus(max_bytes)[1]  # every tenth file: never in `train`
    return train_tokenizer(train, 4096), train, held


def part_engines() -> None:
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


def part_table(train_steps: int = 0) -> None:
    from redundancy_monitor.tools.score_text import draw_text

    tokenizer, train, text = real_text()  # 5813 tokens: 7 x 128 for the batch, 3125 held out
    ids = torch.tensor(tokenizer.encode(text).ids)
    model = build()
    if train_steps:
        pretrain(model, tokenizer, train, train_steps)

    class _Tok:  # what draw_text calls: tokenizer(text)["input_ids"]
        def __call__(self, _text, **kwargs):
            return {"input_ids": ids.tolist()}

    split = draw_text(_Tok(), [("stdlib", "")], 16, 128, seed=0)
    result = probe(model, split.probe_ids)
    reports, times, cpu = {}, {}, {}
    for evaluation in ("reference", "full", "race"):
        t, c = time.perf_counter(), time.process_time()
        reports[evaluation] = compare_removal(
            model, result, split.probe_ids, split.heldout_ids, budgets=(1, 2),
            window=256, stride=128, evaluation=evaluation,
        )  # fmt: skip
        times[evaluation] = time.perf_counter() - t
        cpu[evaluation] = time.process_time() - c
    ref = reports["reference"]
    for evaluation, rep in reports.items():
        for got, want in zip(rep.candidates, ref.candidates, strict=True):
            if not got.stopped_early:
                assert abs(got.perplexity / want.perplexity - 1) <= 1e-6, (got, want)
        same = [v.recommended for v in rep.verdicts] == [v.recommended for v in ref.verdicts]
        info = rep.heldout
        print(
            f"removal table, 12 layers, budgets 1,2, {info['candidates']} distinct sets, "
            f"{split.heldout_tokens} held-out tokens (window 256, stride 128): {evaluation} "
            f"{times[evaluation]:.1f}s (CPU {cpu[evaluation]:.1f}s), ratio "
            f"{times['reference'] / times[evaluation]:.2f}x (CPU "
            f"{cpu['reference'] / cpu[evaluation]:.2f}x), "
            f"{info['stopped_early']} sets stopped early, {info['window_forwards']} window "
            f"evaluations, same recommendation as reference: {same}"
        )


def _children_cpu() -> float:
    """CPU seconds (user + system) of finished child processes: less sensitive than wall
    time to other work on a shared machine."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


SMOLLM_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
    tie_word_embeddings=True,
)  # fmt: skip


def pretrain(model, tokenizer, text: str, steps: int) -> None:
    """A short pretraining run of `model` on `text`, so that removing different layers
    costs different amounts, as on a real checkpoint (random weights cost about the same
    whichever layer goes). Seeded; AdamW, peak lr 2e-3, 20 warm-up steps then cosine to a
    tenth, batches of 8 x 128 tokens, bf16 autocast. About 5 s a step for the 135M model
    on 2 cores."""
    ids = torch.tensor(tokenizer.encode(text).ids)
    rows = ids[: ids.numel() // 128 * 128].view(-1, 128)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    for step in range(steps):
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 20) * cosine
        batch = rows[torch.randint(0, rows.shape[0], (8,), generator=generator)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 20 == 0 or step + 1 == steps:
            print(f"  training step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()


def part_score_135m(
    exhaustive: bool, tokens: int, train_steps: int, checkpoint: str | None, small: bool = False
) -> None:
    """The whole `score` command, default against --exhaustive, in child processes
    (`small`: the 12-layer model of part 3 instead of the 135M one)."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if checkpoint is None:
            tokenizer, train, held = real_text(3_000_000)
            torch.manual_seed(0)
            model = build() if small else LlamaForCausalLM(LlamaConfig(**SMOLLM_SHAPE))
            if train_steps:
                pretrain(model, tokenizer, train, train_steps)
            n_params = sum(p.numel() for p in model.parameters())
            n_layers = model.config.num_hidden_layers
            model.save_pretrained(folder / "ckpt")
            del model
            PreTrainedTokenizerFast(tokenizer_object=tokenizer._tokenizer).save_pretrained(
                folder / "ckpt"
            )
            checkpoint = str(folder / "ckpt")
            what = f"{n_params / 1e6:.0f}M params, {n_layers} layers, " + (
                f"trained {train_steps} steps" if train_steps else "random weights"
            )
        else:
            from redundancy_monitor.demo import stdlib_corpus

            tokenizer = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json"))
            held = stdlib_corpus(3_000_000)[1]
            what = checkpoint
        # `tokens` tokens of text the model was not trained on: 4 x 64 of them for the
        # probe batch, the rest held out.
        ids = tokenizer.encode(held).ids
        if len(ids) < tokens:
            raise SystemExit(f"only {len(ids)} tokens of held-out text; pass --tokens <= that")
        (folder / "text.txt").write_text(tokenizer.decode(ids[:tokens]))
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
        args = [sys.executable, "-m", "redundancy_monitor", "score", checkpoint,
                "--text", str(folder / "text.txt"), "--n-seq", "4", "--seq-len", "64",
                "--budgets", "1,2", "--no-progress"]  # fmt: skip
        times, cpu, tables = {}, {}, {}
        for name, extra in [("default", []), ("--exhaustive", ["--exhaustive"])]:
            if name == "--exhaustive" and not exhaustive:
                continue
            t, c = time.perf_counter(), _children_cpu()
            proc = subprocess.run([*args, *extra], capture_output=True, text=True, env=env)
            times[name], cpu[name] = time.perf_counter() - t, _children_cpu() - c
            assert proc.returncode == 0, proc.stderr[-2000:]
            tables[name] = [x for x in proc.stdout.splitlines() if x.startswith("n=")]
            print(f"score, {what}, {tokens} tokens of text, 2 threads, {name}: "
                  f"{times[name]:.0f}s wall, {cpu[name]:.0f}s CPU, load average "
                  f"{os.getloadavg()[0]:.1f}")  # fmt: skip
            print(proc.stderr.strip())
            table = proc.stdout.split("removal table")[-1].split("\n\n")[0]
            print("removal table" + table)  # with the recommendations
        if len(times) == 2:
            same = [x.split("(")[0] for x in tables["default"]] == [
                x.split("(")[0] for x in tables["--exhaustive"]
            ]
            print(f"ratio --exhaustive / default: {times['--exhaustive'] / times['default']:.2f}x "
                  f"wall, {cpu['--exhaustive'] / cpu['default']:.2f}x CPU, same recommendations: "
                  f"{same}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="part 3 only")
    parser.add_argument(
        "--train-table", type=int, default=0, metavar="STEPS",
        help="part 3: pretrain the 12-layer model this many steps first",
    )  # fmt: skip
    parser.add_argument("--score-135m", action="store_true", help="part 4 only")
    parser.add_argument("--exhaustive", action="store_true", help="part 4: also --exhaustive")
    parser.add_argument(
        "--tokens", type=int, default=5120, help="part 4: tokens of text given to score"
    )
    parser.add_argument(
        "--train-steps", type=int, default=0,
        help="part 4: pretrain the 135M model this many steps first (about 5 s each)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint", help="part 4: score this checkpoint folder (with its tokenizer.json)"
    )
    parser.add_argument(
        "--small", action="store_true",
        help="part 4: the 12-layer model of part 3 (width 256) instead of the 135M one",
    )  # fmt: skip
    args = parser.parse_args()
    if args.score_135m:
        part_score_135m(args.exhaustive, args.tokens, args.train_steps, args.checkpoint, args.small)
        return
    torch.set_num_threads(1)
    if not args.table:
        part_engines()
    part_table(args.train_table)


if __name__ == "__main__":
    main()
