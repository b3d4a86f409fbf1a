"""The fast, exact engine: D(V) and D_last(V) (docs/definitions.md §2) for many variants at once.

How it avoids recomputation, for one probe batch of n sequences:

1. One forward of the unmodified model records the output of every slot and the final
   (post-norm) hidden states.
2. Variants are sorted by the first slot they change and run together, k at a time, as
   one model forward on the batch tiled k times. In that forward every slot is served by
   a router: rows of a variant that has not yet diverged copy the recorded output of the
   unmodified model (no block is evaluated), the other rows run the block the variant
   assigns to the slot, with the slot's own module and the block's weights
   (`torch.func.functional_call`), so the slot keeps its position, mask and attention type.
3. The head is swapped for a recorder during those forwards; logits are then computed in
   row chunks and reduced to per-token KL at once, so at most `logit_rows` x vocabulary
   logits exist at any time, however many variants there are.

Block weights come from a `weights` object (probing/streaming.py): the blocks' own
parameters by default, or a streamer that copies each block from host memory when a
slot needs it. Before every forward the engine tells it which blocks that forward will
ask for, in order, so it can copy them ahead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from redundancy_monitor.errors import InvalidConfigError, UnsupportedModelError
from redundancy_monitor.probing.batch import ProbeBatch
from redundancy_monitor.probing.model_io import (
    SlotStandIn,
    block_hidden,
    blocks_replaced,
    call_model,
    final_hidden,
    logit_transform,
    logits_of,
    same_logits,
    untouched,
)
from redundancy_monitor.probing.streaming import ResidentWeights
from redundancy_monitor.probing.variants import Variant

#: Default number of logit elements (rows x vocabulary) alive at once: 64M floats.
DEFAULT_LOGIT_ELEMENTS = 1 << 26
#: Default number of tokens (sequences x length) run through the stack in one forward.
DEFAULT_BATCH_TOKENS = 1 << 14

_CACHED = "cached"  # router action: the variant has not diverged yet at this slot


@dataclass(frozen=True)
class VariantDistance:
    """D(V) and D_last(V) of one variant, in nats; `per_seq` is D per sequence."""

    mean: float
    last: float
    per_seq: tuple[float, ...]


@dataclass(frozen=True)
class EngineOptions:
    """Memory knobs of the engine.

    Args:
        logit_rows: token rows whose vocabulary-wide logits may exist at once
            (None: ``2**26 // vocab``). Memory of the logits part is independent of the
            number of variants.
        batch_tokens: tokens (sequences x length, summed over variants) run through
            the block stack in one forward. Larger is faster until memory runs out.
    """

    logit_rows: int | None = None
    batch_tokens: int = DEFAULT_BATCH_TOKENS

    def __post_init__(self):
        if self.logit_rows is not None and self.logit_rows < 2:
            raise InvalidConfigError(f"logit_rows must be >= 2, got {self.logit_rows}")
        if self.batch_tokens < 1:
            raise InvalidConfigError(f"batch_tokens must be >= 1, got {self.batch_tokens}")


def _select_rows(obj, rows, batch_size: int):
    """Take rows of every per-sequence tensor in a block's arguments.

    A tensor is per-sequence when it has at least 2 dims and its first dim is the batch
    size; broadcast tensors (first dim 1) and scalars pass through unchanged.
    """
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == batch_size:
            return obj[rows]
        return obj
    if isinstance(obj, tuple):
        return tuple(_select_rows(x, rows, batch_size) for x in obj)
    if isinstance(obj, list):
        return [_select_rows(x, rows, batch_size) for x in obj]
    if isinstance(obj, dict):
        return {k: _select_rows(v, rows, batch_size) for k, v in obj.items()}
    return obj


class _Reference:
    """What the unmodified model computed on the batch, recorded once per probe."""

    def __init__(self, slot_outputs, returns_tuple, final_hidden):
        self.slot_outputs: list[torch.Tensor] = slot_outputs  # [n, T, d] per slot
        self.returns_tuple: list[bool] = returns_tuple
        self.final_hidden: torch.Tensor = final_hidden  # [n, T, d] after the final norm


class _Router(SlotStandIn):
    """Serves one slot for a tiled batch of k variants (n rows each)."""

    def __init__(self, slot_module: nn.Module, slot: int, group: _Group):
        super().__init__(slot_module)
        self.slot = slot
        self.group = group

    def forward(self, *args, **kwargs):
        return self.group.run_slot(self.slot, self.slot_module, args, kwargs)


class _StreamedSlot(SlotStandIn):
    """Runs the slot's own block with weights from a streamer (the unmodified model)."""

    def __init__(self, slot_module: nn.Module, slot: int, weights):
        super().__init__(slot_module)
        self.slot = slot
        self.weights = weights

    def forward(self, *args, **kwargs):
        return functional_call(self.slot_module, self.weights.get(self.slot), args, kwargs)


class _Group:
    """k variants run together as one forward of the tiled batch."""

    def __init__(self, variants: Sequence[Variant], n: int, reference: _Reference, weights):
        self.variants = list(variants)
        self.n = n
        self.reference = reference
        self.weights = weights  # ResidentWeights or a BlockStreamer
        self._rows_cache: dict[tuple[int, ...], object] = {}

    def action(self, variant: Variant, slot: int):
        return _CACHED if variant.first_changed > slot else variant.slots[slot]

    def by_action(self, slot: int) -> dict[object, list[int]]:
        """Variant indices grouped by what they do at `slot`, in first-seen order."""
        groups: dict[object, list[int]] = {}
        for v, variant in enumerate(self.variants):
            groups.setdefault(self.action(variant, slot), []).append(v)
        return groups

    def uses(self, n_slots: int) -> list[int]:
        """The blocks one forward of this group evaluates, in order."""
        return [
            a
            for slot in range(n_slots)
            for a in self.by_action(slot)
            if isinstance(a, int)  # a block index, not None (skipped) or _CACHED
        ]

    def call_block(self, module: nn.Module, slot: int, block: int, args, kwargs):
        """Run block `block`'s weights in the slot's module."""
        if block == slot and not self.weights.streamed:
            return module(*args, **kwargs)
        return functional_call(module, self.weights.get(block), args, kwargs)

    def rows(self, members: tuple[int, ...], device):
        """Row index (a slice when contiguous) of the tiled batch for these variants."""
        if members not in self._rows_cache:
            n = self.n
            if members == tuple(range(members[0], members[-1] + 1)):
                self._rows_cache[members] = slice(members[0] * n, (members[-1] + 1) * n)
            else:
                idx = [v * n + r for v in members for r in range(n)]
                self._rows_cache[members] = torch.tensor(idx, device=device)
        return self._rows_cache[members]

    def run_slot(self, slot: int, module: nn.Module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        by_action = self.by_action(slot)
        if list(by_action) == [slot]:
            return self.call_block(module, slot, slot, args, kwargs)
        batch_size = hidden.shape[0]
        out = torch.empty_like(hidden)
        template = None
        for action, members in by_action.items():
            rows = self.rows(tuple(members), hidden.device)
            if action == _CACHED:
                recorded = self.reference.slot_outputs[slot]
                out[rows] = recorded.repeat(len(members), *([1] * (recorded.dim() - 1)))
            elif action is None:
                out[rows] = hidden[rows]
            else:
                assert isinstance(action, int)  # a block index
                sub_args = _select_rows(args, rows, batch_size)
                sub_kwargs = _select_rows(kwargs, rows, batch_size)
                result = self.call_block(module, slot, action, sub_args, sub_kwargs)
                template = result
                out[rows] = block_hidden(result)
        if isinstance(template, (tuple, list)) or (
            template is None and self.reference.returns_tuple[slot]
        ):
            extra = len(template) - 1 if template is not None else 0
            return (out,) + (None,) * extra
        return out


class Engine:
    """Computes D and D_last for variants of `model` on one batch.

    The model must be in a state where running it is allowed (the caller wraps the
    whole computation in `untouched`).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        head: nn.Module,
        batch: ProbeBatch,
        options: EngineOptions | None = None,
        weights=None,
    ):
        self.model = model
        self.blocks = blocks
        self.slot_modules = list(blocks)  # the slots' own modules, whatever stands in them
        self.head = head
        self.batch = batch
        self.options = options or EngineOptions()
        self.weights = weights if weights is not None else ResidentWeights(blocks)
        self.transform = logit_transform(model)
        mask = batch.attention_mask
        self.valid = mask.flatten().nonzero().squeeze(1)  # flat index of scored tokens
        self.seq_of_row = self.valid // batch.seq_len
        self.counts = mask.sum(-1).double()
        self.last_row = (mask.sum(-1).cumsum(0) - 1).long()  # last valid token of each seq
        self.reference: _Reference | None = None
        self._chunk = 1
        self._base_resident: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- the unmodified model -------------------------------------------------------
    def _forward_recording_final(self, batch: ProbeBatch, repeat: int = 1) -> torch.Tensor:
        return final_hidden(
            self.model,
            self.head,
            batch,
            repeat,
            advice="pass head='dotted.path' naming the module that maps final hidden states "
            "to logits",
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Head (and the model's own logit transform) applied to final hidden states."""
        z = self.head(hidden)
        return self.transform(z) if self.transform else z

    def check_head(self) -> None:
        """Logits from the recorded final hidden must equal the model's own logits."""
        length = min(16, self._chunk)
        short = ProbeBatch(
            self.batch.input_ids[:1, :length],
            self.batch.attention_mask[:1, :length],
            self.batch.has_padding,
            "",
        )
        if int(short.attention_mask.sum()) == 0:
            return
        self.weights.plan(range(len(self.blocks)))
        expected = logits_of(call_model(self.model, short)).float()
        self.weights.plan(range(len(self.blocks)))
        got = self.logits(self._forward_recording_final(short))
        if not same_logits(expected, got):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}'s logits are not its output head applied to "
                "the head's input (the model transforms them further); pass head= naming "
                "the module whose output is the logits"
            )

    def record_reference(self) -> None:
        n = self.batch.n_seq
        outputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        returns_tuple = [False] * len(self.blocks)

        def recorder(slot):
            def hook(module, args, output):
                hidden = block_hidden(output)
                if not isinstance(hidden, torch.Tensor) or hidden.shape[0] != n:
                    raise UnsupportedModelError(
                        f"block {slot} returned {type(hidden).__name__} without the batch "
                        "dimension first; only blocks that map [batch, seq, hidden] hidden "
                        "states can be probed"
                    )
                outputs[slot] = hidden.detach()
                returns_tuple[slot] = isinstance(output, (tuple, list))

            return hook

        handles = [b.register_forward_hook(recorder(s)) for s, b in enumerate(self.blocks)]
        try:
            self.weights.plan(range(len(self.blocks)))
            final = self._forward_recording_final(self.batch)
        finally:
            for h in handles:
                h.remove()
        missing = [s for s, o in enumerate(outputs) if o is None]
        if missing:
            raise UnsupportedModelError(
                f"blocks {missing} did not run in the model's forward; is blocks= the list "
                "the model iterates over?"
            )
        self.reference = _Reference(outputs, returns_tuple, final)

    # -- logits and KL --------------------------------------------------------------
    def _prepare_logits(self) -> None:
        """Pick the row chunk from the vocabulary; keep base probabilities if they fit."""
        assert self.reference is not None  # recorded first (record_reference)
        final = self.reference.final_hidden
        vocab = self.logits(final[:1, :1]).shape[-1]
        # About four chunk x vocab tensors live at once (base p, logits, log q, product).
        budget = self.options.logit_rows or max(2, DEFAULT_LOGIT_ELEMENTS // vocab)
        self._chunk = max(1, budget // 4)
        n_valid = self.valid.numel()
        self._base_resident = self._base_chunk(0, n_valid) if n_valid <= self._chunk else None

    def _base_chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, sum p log p) of the unmodified model for valid rows [start, stop)."""
        assert self.reference is not None  # recorded first (record_reference)
        final = self.reference.final_hidden
        h = final.reshape(-1, final.shape[-1]).index_select(0, self.valid[start:stop])
        logp = torch.log_softmax(self.logits(h).float(), dim=-1)
        p = logp.exp()
        return p, torch.linalg.vecdot(p, logp)

    def _token_kl(self, finals: torch.Tensor, k: int) -> torch.Tensor:
        """Per-token KL(base || variant) for k tiled variants: [k, n_valid], fp32."""
        n_valid = self.valid.numel()
        flat = finals.reshape(k, -1, finals.shape[-1])
        out = torch.empty(k, n_valid, dtype=torch.float32, device=finals.device)
        for start in range(0, n_valid, self._chunk):
            stop = min(n_valid, start + self._chunk)
            p, neg_entropy = self._base_resident or self._base_chunk(start, stop)
            rows = self.valid[start:stop]
            for v in range(k):
                logq = torch.log_softmax(self.logits(flat[v].index_select(0, rows)).float(), -1)
                # KL = sum p log p - sum p log q; >= 0 mathematically, so clamp float noise.
                out[v, start:stop] = (neg_entropy - torch.linalg.vecdot(p, logq)).clamp_(min=0.0)
        return out

    def _reduce(self, token_kl: torch.Tensor) -> list[VariantDistance]:
        kl = token_kl.double()
        per_seq = torch.zeros(kl.shape[0], self.batch.n_seq, dtype=torch.float64, device=kl.device)
        per_seq.index_add_(1, self.seq_of_row, kl)
        per_seq = (per_seq / self.counts.to(kl.device)).cpu()
        last = kl[:, self.last_row].mean(1).cpu()
        return [
            VariantDistance(float(row.mean()), float(last[v]), tuple(float(x) for x in row))
            for v, row in enumerate(per_seq)
        ]

    # -- variants -------------------------------------------------------------------
    def _groups(self, variants: list[Variant]) -> list[list[int]]:
        """Indices of variants to run together, sorted by first changed slot."""

        def key(v: int):
            slots = variants[v].slots
            return (variants[v].first_changed, tuple(-1 if b is None else b for b in slots))

        order = sorted(range(len(variants)), key=key)
        tokens = self.batch.n_seq * self.batch.seq_len
        k = max(1, self.options.batch_tokens // tokens)
        return [order[a : a + k] for a in range(0, len(order), k)]

    def run(self, variants: Sequence[Variant], progress=None) -> list[VariantDistance]:
        """D and D_last for each variant, in the order given."""
        L = len(self.blocks)
        for variant in variants:
            if variant.n_layers != L:
                raise InvalidConfigError(
                    f"variant maps {variant.n_layers} slots but the model has {L} blocks"
                )
        with self._own_blocks_streamed():
            if self.reference is None:
                self.record_reference()
                self._prepare_logits()
                self.check_head()
            return self._run_variants(variants, progress)

    def _own_blocks_streamed(self):
        """With streamed weights, every slot runs its own block through the streamer."""
        if not self.weights.streamed:
            return contextlib.nullcontext()
        stand_ins = {s: _StreamedSlot(m, s, self.weights) for s, m in enumerate(self.slot_modules)}
        return blocks_replaced(self.blocks, stand_ins)

    def _run_variants(self, variants: Sequence[Variant], progress) -> list[VariantDistance]:
        L = len(self.blocks)
        zero = VariantDistance(0.0, 0.0, (0.0,) * self.batch.n_seq)
        results: list[VariantDistance | None] = [None] * len(variants)
        todo = []
        for v, variant in enumerate(variants):
            if variant.changed_slots:
                todo.append(v)
            else:
                results[v] = zero  # the unmodified model: D = 0 by definition
        for members in self._groups([variants[v] for v in todo]):
            group_variants = [variants[todo[m]] for m in members]
            assert self.reference is not None  # recorded first (record_reference)
            group = _Group(group_variants, self.batch.n_seq, self.reference, self.weights)
            routers = {s: _Router(self.slot_modules[s], s, group) for s in range(L)}
            self.weights.plan(group.uses(L))
            with blocks_replaced(self.blocks, routers):
                finals = self._forward_recording_final(self.batch, repeat=len(members))
            for m, dist in zip(
                members, self._reduce(self._token_kl(finals, len(members))), strict=True
            ):
                results[todo[m]] = dist
            del finals
            if progress is not None:
                progress.update(len(members))
        return results  # type: ignore[return-value]


def variant_distances(
    model: nn.Module,
    blocks: nn.ModuleList,
    head: nn.Module,
    batch: ProbeBatch,
    variants: Sequence[Variant],
    options: EngineOptions | None = None,
    progress=None,
    weights=None,
) -> list[VariantDistance]:
    """D and D_last of each variant; the model is left exactly as it was.

    `weights`: where block weights come from (default: the blocks' own parameters; a
    `BlockStreamer` copies them from host memory slot by slot).
    """
    with untouched(model):
        return Engine(model, blocks, head, batch, options, weights).run(variants, progress)
