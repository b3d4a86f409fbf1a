"""`probe()`: replacement, interchange and deletion distances of one model on one batch."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence

import torch
from torch import nn

from redundancy_monitor import __version__
from redundancy_monitor.errors import InvalidBatchError, InvalidConfigError, UnsupportedModelError
from redundancy_monitor.probing.batch import ProbeBatch, make_batch
from redundancy_monitor.probing.blocks import find_blocks, find_head, unwrap_model
from redundancy_monitor.probing.cancel import CancellableProgress, current_token
from redundancy_monitor.probing.engine import (
    DEFAULT_LOGIT_ELEMENTS,
    EngineOptions,
    VariantDistance,
    variant_distances,
)
from redundancy_monitor.probing.intervals import IntervalConfig, add_intervals
from redundancy_monitor.probing.model_io import _accepts, vocab_size_of
from redundancy_monitor.probing.result import (
    DeletionRecord,
    PairRecord,
    PerSequence,
    ProbeMeta,
    ProbeResult,
    SkippedPair,
    Thresholds,
    summarize,
)
from redundancy_monitor.probing.streaming import HostWeights, ModuleWeights, streamed_model
from redundancy_monitor.probing.variants import (
    PairSpec,
    Variant,
    check_protocols,
    exchange_mismatch,
    parse_pairs,
)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prepare(
    model: nn.Module,
    input_ids,
    attention_mask=None,
    blocks: str | nn.ModuleList | None = None,
    head: str | nn.Module | None = None,
    device: torch.device | None = None,
    weights_elsewhere: bool = False,
) -> tuple[nn.Module, nn.ModuleList, nn.Module, ProbeBatch]:
    """Unwrap the model, find its blocks and head, validate the batch and move it there
    (or to `device`). With `weights_elsewhere` the blocks' own parameters may be
    placeholders (meta): a streamed probe brings the weights."""
    root = unwrap_model(model)
    block_list = find_blocks(root, blocks)
    if len(block_list) < 2:
        raise UnsupportedModelError(
            f"{type(root).__name__} has {len(block_list)} block(s); a probe compares blocks, "
            "so it needs at least 2"
        )
    _check_weights(block_list, allow_meta=weights_elsewhere)
    head_module = find_head(root, head)
    batch = make_batch(input_ids, attention_mask, vocab_size_of(root))
    _check_positions(root, batch)
    return root, block_list, head_module, batch.to(device or model_device(root))


#: Config fields that, beside the class and the depth, tell one architecture from another.
SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def model_class_name(root: nn.Module) -> str:
    """The model's class name, the same for a model sharded by FSDP2 (whose
    ``fully_shard`` puts a generated ``FSDP<Class>`` in front of it)."""
    for cls in type(root).__mro__:
        if not cls.__name__.startswith("FSDP"):
            return cls.__name__
    return type(root).__name__


def model_sizes(root: nn.Module, head: nn.Module) -> dict[str, int] | None:
    """The sizes of the model's architecture: the integer `SIZE_FIELDS` of its config,
    else the output head's ``[vocab, hidden]`` shape (None when neither is known). Read
    from the config and the head, never the blocks, whose weights may be elsewhere."""
    config = getattr(root, "config", None)
    sizes = {}
    for name in SIZE_FIELDS:
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            sizes[name] = value
    weight = getattr(head, "weight", None)
    if not sizes and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        sizes = {"vocab_size": int(weight.shape[0]), "hidden_size": int(weight.shape[1])}
    return sizes or None


def _check_positions(root: nn.Module, batch: ProbeBatch) -> None:
    """Refuse, before any forward, sequences longer than the model's position limit
    (GPT-2's learned position table would otherwise fail deep inside with an IndexError)."""
    limit = getattr(getattr(root, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return
    needed = batch.seq_len
    if batch.has_padding and _accepts(root.forward, "position_ids"):
        needed = int(batch.position_ids().max()) + 1  # positions count valid tokens only
    if needed > limit:
        raise InvalidBatchError(
            f"the probe batch needs {needed} positions, but {type(root).__name__} takes at "
            f"most {limit} (config.max_position_embeddings); pass sequences of at most "
            f"{limit} tokens, e.g. input_ids[:, :{limit}]"
        )


def _check_weights(blocks: nn.ModuleList, allow_meta: bool = False) -> None:
    """Refuse blocks whose weights a probe cannot run or move."""
    for s, block in enumerate(blocks):
        params = list(block.named_parameters())
        if not allow_meta and any(p.is_meta for _, p in params):
            raise UnsupportedModelError(
                f"block {s} has parameters on the meta device (no data); load the weights "
                "first (from_pretrained, or to_empty() then load_state_dict())"
            )
        known = {n for n, _ in params} | {n for n, _ in block.named_buffers()}
        packed = [k for k, v in block.state_dict().items() if k not in known and torch.is_tensor(v)]
        if packed:
            raise UnsupportedModelError(
                f"block {s} keeps weights outside its parameters ({', '.join(packed[:3])}), as "
                "quantized or packed layers do; their weights cannot be exchanged between "
                "slots. Probe the unquantized (e.g. bf16) model instead"
            )


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def distances_with_retry(
    root, block_list, head_module, batch, variants, options, bar, retries=3, weights=None
):
    """Run the engine; on out-of-memory retry with a quarter of the batch and chunk sizes.

    Returns the distances and how many retries it took.
    """
    for attempt in range(retries + 1):
        try:
            return variant_distances(
                root, block_list, head_module, batch, variants, options, bar, weights
            ), attempt
        except Exception as error:
            if not _is_out_of_memory(error) or attempt == retries:
                raise
            # Not from a monitor's worker thread: emptying the allocator's cache there
            # would make training's next allocations go back to the driver mid-step.
            if torch.cuda.is_available() and current_token() is None:
                torch.cuda.empty_cache()
            rows = options.logit_rows or max(
                8, DEFAULT_LOGIT_ELEMENTS // (vocab_size_of(root) or 1)
            )
            options = EngineOptions(
                logit_rows=max(4, rows // 4), batch_tokens=max(1, options.batch_tokens // 4)
            )
            if bar is not None:
                bar.reset()
    raise AssertionError("unreachable")


def plan_variants(
    n_layers: int,
    pairs: list[tuple[int, int]],
    protocols: Sequence[str],
    deletion_slots: Sequence[int] | None = None,
) -> dict[Variant, None]:
    """The distinct variants the protocols need, in a stable order."""
    variants: dict[Variant, None] = {}
    for i, j in pairs:
        if "replacement" in protocols:
            variants[Variant.replacement(n_layers, i, j)] = None
            variants[Variant.replacement(n_layers, j, i)] = None
        if "interchange" in protocols:
            variants[Variant.interchange(n_layers, i, j)] = None
    if "deletion" in protocols:
        for s in range(n_layers) if deletion_slots is None else deletion_slots:
            variants[Variant.deletion(n_layers, [s])] = None
    return variants


def shard_pairs(
    pairs: list[tuple[int, int]], n_layers: int, rank: int, world_size: int
) -> list[tuple[int, int]]:
    """This rank's share of the pairs: balanced by the blocks each pair costs.

    Deterministic, so every rank computes the same split without talking. A pair (i, j)
    costs about (L - i) + (L - j) + (L - i) block evaluations (its three variants'
    suffixes); pairs go, most costly first, to the least loaded rank.
    """
    if not 0 <= rank < world_size:
        raise InvalidConfigError(f"shard rank {rank} is not in 0..{world_size - 1}")
    load = [0] * world_size
    mine = []
    for i, j in sorted(pairs, key=lambda p: (-(3 * n_layers - 2 * p[0] - p[1]), p)):
        owner = min(range(world_size), key=lambda r: (load[r], r))
        load[owner] += 3 * n_layers - 2 * i - j
        if owner == rank:
            mine.append((i, j))
    return sorted(mine)


def merge_shards(parts: Sequence[ProbeResult], thresholds: Thresholds | None = None) -> ProbeResult:
    """One `ProbeResult` from the shards of a probe run on several ranks.

    Intervals are computed here, over all pairs, when the shards asked for them
    (``meta["intervals"]``) and kept their per-sequence distances.
    """
    if not parts:
        raise InvalidConfigError("merge_shards needs at least one shard")
    hashes = {p.meta.batch_sha256 for p in parts}
    if len(hashes) != 1:
        raise InvalidConfigError(
            "shards were measured on different probe batches; every rank must probe the same batch"
        )
    thresholds = thresholds or parts[0].meta.thresholds or Thresholds()
    records = sorted((r for p in parts for r in p.pairs), key=lambda r: (r.i, r.j))
    skipped = sorted((s for p in parts for s in p.skipped), key=lambda s: (s.i, s.j))
    deletion = sorted((d for p in parts for d in p.deletion), key=lambda d: d.slot)
    meta = dataclasses.replace(
        parts[0].meta,
        shard=None,
        n_variants=sum(p.meta.n_variants or 0 for p in parts),
        elapsed_s=max(p.meta.elapsed_s or 0.0 for p in parts),
        world_size=len(parts),
        intervals=None,
    )
    per_seq = [p.per_sequence for p in parts if p.per_sequence is not None]
    merged = ProbeResult(
        records,
        summarize(records, thresholds),
        skipped,
        deletion,
        meta,
        per_sequence=PerSequence.merge(per_seq) if len(per_seq) == len(parts) else None,
    )
    requested = parts[0].meta.intervals
    if requested is None:
        return merged
    config = IntervalConfig(
        **{k: requested[k] for k in ("n_boot", "confidence", "seed", "expanded") if k in requested}
    )
    return add_intervals(merged, config, thresholds)


def probe(
    model: nn.Module,
    input_ids,
    attention_mask=None,
    pairs: PairSpec = "adjacent",
    protocols: str | Sequence[str] = ("replacement", "interchange"),
    blocks: str | nn.ModuleList | None = None,
    head: str | nn.Module | None = None,
    thresholds: Thresholds | None = None,
    logit_rows: int | None = None,
    batch_tokens: int = EngineOptions.batch_tokens,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    stream_to: torch.device | str | None = None,
    host_weights: HostWeights | None = None,
    intervals: bool | IntervalConfig = True,
) -> ProbeResult:
    """Measure replacement and interchange distances of pairs of blocks (docs/definitions.md §2-4).

    Args:
        model: a causal LM whose decoder blocks form one `nn.ModuleList`.
        input_ids: ``[n_seq, seq_len]`` integer token ids (the probe batch).
        attention_mask: optional 0/1 mask of the same shape (left or right padding).
        pairs: ``"adjacent"`` (default), ``"window:k"``, ``"all"`` or a list of ``(i, j)``.
        protocols: any of ``"replacement"``, ``"interchange"``, ``"deletion"``.
        blocks: dotted path of the block list (or the list) when it is not found alone.
        head: dotted path of the output head when `get_output_embeddings` is absent.
        thresholds: similarity bands and regime thresholds (docs/definitions.md §4 defaults).
        logit_rows: token rows of vocabulary-wide logits allowed at once.
        batch_tokens: tokens run through the stack per forward (variants x batch).
        progress: show a progress bar over the variants.
        shard: ``(rank, world_size)``: measure only this rank's share of the pairs (and
            of the deletion slots); combine the shares with `merge_shards`.
            `redundancy_monitor.monitoring.ranks.probe_across_ranks` does both.
        stream_to: run the probe on this device while the weights stay where they are
            (host memory): the non-block weights and buffers are copied there for the
            probe, block weights are copied slot by slot, a few blocks at a time
            (probing/streaming.py). The distances are the same as on a resident model.
        host_weights: with `stream_to`, read the weights from here instead of from
            `model` (whose block parameters may then be placeholders on the meta device).
        intervals: bootstrap intervals over the batch's sequences for every pair value
            and summary scalar, and the regime's stability (docs/intervals.md); True
            (default: 1000 replicates, 95%, seed 0), an `IntervalConfig`, or False to
            skip the bootstrap. A shard defers it to `merge_shards`.

    Returns:
        A `ProbeResult`; the model is left bitwise unchanged, in its original mode.

    Raises:
        InvalidBatchError, InvalidPairsError, InvalidProtocolError, BlockDiscoveryError,
        UnsupportedModelError: each says what to pass instead.

    Example:
        >>> result = probe(model, batch_ids, pairs="window:3")
        >>> print(result.to_table())
    """
    started = time.perf_counter()
    protocols = check_protocols(protocols)
    interval_config = IntervalConfig.of(intervals)
    thresholds = thresholds or Thresholds()
    options = EngineOptions(logit_rows=logit_rows, batch_tokens=batch_tokens)
    device = None if stream_to is None else torch.device(stream_to)
    root, block_list, head_module, batch = prepare(
        model, input_ids, attention_mask, blocks, head, device, host_weights is not None
    )
    n_layers = len(block_list)
    pair_list = parse_pairs(pairs, n_layers)
    skipped, usable = [], []
    for i, j in pair_list:
        reason = exchange_mismatch(block_list, i, j)
        if reason is None:
            usable.append((i, j))
        else:
            skipped.append(SkippedPair(i, j, reason))
    deletion_slots = list(range(n_layers))
    if shard is not None:
        rank, world_size = shard
        usable = shard_pairs(usable, n_layers, rank, world_size)
        deletion_slots = deletion_slots[rank::world_size]
        skipped = skipped if rank == 0 else []
    variants = list(plan_variants(n_layers, usable, protocols, deletion_slots))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(variants), desc="probe variants", unit="variant")
    token = current_token()  # set in a monitor's worker thread: stop early when asked
    tracker = bar if token is None else CancellableProgress(bar, token)
    streamed: dict | None = None
    with contextlib.ExitStack() as stack:
        weights = None
        if device is not None:
            source = host_weights or ModuleWeights(root, block_list)
            weights, skeleton_bytes = stack.enter_context(
                streamed_model(root, block_list, source, device)
            )
        try:
            distances, oom_retries = distances_with_retry(
                root, block_list, head_module, batch, variants, options, tracker, weights=weights
            )
        finally:
            if bar is not None:
                bar.close()
        if weights is not None:
            streamed = {
                "device_weight_peak_bytes": skeleton_bytes + weights.peak_bytes,
                "block_loads": weights.n_loads,
                "capacity_blocks": weights.capacity,
            }
    by_variant: dict[Variant, VariantDistance] = dict(zip(variants, distances, strict=True))
    records = [_pair_record(n_layers, i, j, protocols, by_variant) for i, j in usable]
    deletion = []
    if "deletion" in protocols:
        for s in deletion_slots:
            d = by_variant[Variant.deletion(n_layers, [s])]
            deletion.append(DeletionRecord(s, d.mean, d.last))
    meta = ProbeMeta(
        version=__version__,
        model_class=model_class_name(root),
        model_sizes=model_sizes(root, head_module),
        dtype=str(next(root.parameters()).dtype).replace("torch.", ""),
        device=str(batch.input_ids.device),
        n_layers=n_layers,
        n_seq=batch.n_seq,
        seq_len=batch.seq_len,
        n_tokens=batch.n_tokens,
        batch_sha256=batch.sha256,
        pairs=pairs if isinstance(pairs, str) else "explicit",
        protocols=tuple(protocols),
        thresholds=thresholds,
        n_variants=len(variants),
        oom_retries=oom_retries,
        elapsed_s=round(time.perf_counter() - started, 4),
        shard=None if shard is None else (int(shard[0]), int(shard[1])),
        streamed=streamed,
    )
    result = ProbeResult(
        records,
        summarize(records, thresholds),
        skipped,
        deletion,
        meta,
        per_sequence=_per_sequence(n_layers, usable, protocols, by_variant),
    )
    if interval_config is None:
        return result
    if shard is not None:  # the summary needs every pair: merge_shards bootstraps
        result.meta = dataclasses.replace(meta, intervals=dataclasses.asdict(interval_config))
        return result
    return add_intervals(result, interval_config, thresholds)


def _per_sequence(n_layers, pairs, protocols, by_variant) -> PerSequence:
    """The per-sequence D of every pair's variants, in pair order."""
    variants = {}
    if "replacement" in protocols:
        variants["repl_ij"] = lambda i, j: Variant.replacement(n_layers, i, j)
        variants["repl_ji"] = lambda i, j: Variant.replacement(n_layers, j, i)
    if "interchange" in protocols:
        variants["d_int"] = lambda i, j: Variant.interchange(n_layers, i, j)
    tables = {
        name: tuple(by_variant[make(i, j)].per_seq for i, j in pairs)
        for name, make in variants.items()
    }
    return PerSequence(tuple(pairs), tables)


def _pair_record(n_layers, i, j, protocols, by_variant) -> PairRecord:
    repl_ij = repl_ji = inter = None
    if "replacement" in protocols:
        repl_ij = by_variant[Variant.replacement(n_layers, i, j)]
        repl_ji = by_variant[Variant.replacement(n_layers, j, i)]
    if "interchange" in protocols:
        inter = by_variant[Variant.interchange(n_layers, i, j)]

    def pick(d: VariantDistance | None, attr: str):
        return None if d is None else getattr(d, attr)

    return PairRecord.build(
        i,
        j,
        pick(repl_ij, "mean"),
        pick(repl_ji, "mean"),
        pick(inter, "mean"),
        last=(pick(repl_ij, "last"), pick(repl_ji, "last"), pick(inter, "last")),
    )
