"""Public API of the probe: block discovery, pair sets, slot semantics, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHITECTURES, tiny_batch, tiny_model
from torch import nn

import redundancy_monitor as rm
from redundancy_monitor import BlockDiscoveryError, InvalidBatchError, find_blocks, probe
from redundancy_monitor.errors import InvalidPairsError, InvalidProtocolError, UnsupportedModelError
from redundancy_monitor.probing.probe import prepare
from redundancy_monitor.probing.reference import reference_distances
from redundancy_monitor.probing.variants import Variant, parse_pairs

BLOCK_PATHS = {
    "gpt_neox": "gpt_neox.layers",
    "llama": "model.layers",
    "qwen3": "model.layers",
    "mistral": "model.layers",
    "gpt2": "transformer.h",
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_find_blocks_returns_the_decoder_list(arch):
    model = tiny_model(arch, n_layers=3)
    assert find_blocks(model) is model.get_submodule(BLOCK_PATHS[arch])
    assert find_blocks(model, BLOCK_PATHS[arch]) is model.get_submodule(BLOCK_PATHS[arch])


class Wrapper(nn.Module):
    """Stands for DDP: the real model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


Wrapper.__name__ = "DistributedDataParallel"


def test_find_blocks_unwraps_ddp_and_compile():
    model = tiny_model("llama", n_layers=3)
    assert find_blocks(Wrapper(model)) is model.model.layers
    assert find_blocks(torch.compile(model)) is model.model.layers


class ToyBlock(nn.Module):
    def __init__(self, width: int, inner: int, slot: int):
        super().__init__()
        self.up = nn.Linear(width, inner)
        self.down = nn.Linear(inner, width)
        # Belongs to the position, not the weights: slot semantics keeps it in place.
        self.register_buffer("slot_gain", torch.tensor(1.0 + 0.5 * slot))

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x))) * self.slot_gain


class ToyLM(nn.Module):
    """A plain PyTorch LM: blocks at trunk.stack, head at `out`, no Hugging Face."""

    def __init__(self, vocab=50, width=16, inners=(24, 24, 24, 24)):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.trunk = nn.ModuleDict(
            {
                "stack": nn.ModuleList(ToyBlock(width, h, s) for s, h in enumerate(inners)),
                "extra": nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]),
            }
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, idx):
        h = self.emb(idx)
        for block in self.trunk["stack"]:
            h = block(h)
        return self.out(self.norm(h))


def _manual_kl(model, ids, slots):
    """D of a variant computed by hand from the toy's definition."""
    with torch.no_grad():
        h = model.emb(ids)
        base = h
        for block in model.trunk["stack"]:
            base = block(base)
        for s, b in enumerate(slots):
            if b is None:
                continue
            src, dst = model.trunk["stack"][b], model.trunk["stack"][s]
            h = h + src.down(torch.tanh(src.up(h))) * dst.slot_gain
        p = torch.log_softmax(model.out(model.norm(base)), -1)
        q = torch.log_softmax(model.out(model.norm(h)), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())


def test_plain_model_with_given_path_uses_slot_semantics():
    torch.manual_seed(0)
    model = ToyLM()
    ids = torch.randint(0, 50, (2, 7))
    with pytest.raises(BlockDiscoveryError, match=r"trunk\.stack"):
        probe(model, ids)  # two candidate lists: the error names them
    result = probe(model, ids, blocks="trunk.stack", head="out", pairs=[(0, 1), (1, 3)])
    rec = result.pair(1, 3)
    assert rec.repl_ij == pytest.approx(_manual_kl(model, ids, [0, 3, 2, 3]), rel=1e-5)
    assert rec.repl_ji == pytest.approx(_manual_kl(model, ids, [0, 1, 2, 1]), rel=1e-5)
    assert rec.d_int == pytest.approx(_manual_kl(model, ids, [0, 3, 2, 1]), rel=1e-5)


def test_heterogeneous_blocks_are_reported_as_skipped_with_reason():
    torch.manual_seed(0)
    model = ToyLM(inners=(24, 24, 32, 24))
    ids = torch.randint(0, 50, (2, 7))
    result = probe(model, ids, blocks="trunk.stack", head="out", pairs="all")
    skipped = {(s.i, s.j): s.reason for s in result.skipped}
    assert set(skipped) == {(0, 2), (1, 2), (2, 3)}
    assert "shape" in skipped[(0, 2)]
    assert {(r.i, r.j) for r in result.pairs} == {(0, 1), (0, 3), (1, 3)}


def test_qwen3_mixed_attention_types_keep_their_slot():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        sliding_window=3,
        use_sliding_window=True,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 61, (2, 10))
    result = probe(model, ids, pairs="adjacent")
    root, blocks, _, batch = prepare(model, ids, None)
    ref = reference_distances(root, blocks, batch, [Variant.replacement(4, 0, 1)])
    assert result.pair(0, 1).repl_ij == pytest.approx(ref[0].mean, rel=1e-4, abs=1e-6)


def test_pair_sets_have_the_documented_sizes_and_separations():
    assert parse_pairs("adjacent", 6) == [(i, i + 1) for i in range(5)]
    assert len(parse_pairs("all", 6)) == 15
    window = parse_pairs("window:3", 6)
    assert all(1 <= j - i <= 3 for i, j in window) and len(window) == 5 + 4 + 3
    assert parse_pairs([(3, 1), (1, 3), (0, 5)], 6) == [(0, 5), (1, 3)]
    result = probe(tiny_model("llama", 4), tiny_batch()[0], pairs="window:2")
    assert [r.separation for r in result.pairs] == [r.j - r.i for r in result.pairs]
    assert set(result.summary.by_separation) == {1, 2}


@pytest.mark.parametrize(
    ("kwargs", "error", "says", "advice"),
    [
        ({"input_ids": torch.zeros(5, dtype=torch.long)}, InvalidBatchError, "2-D", "unsqueeze(0)"),
        ({"input_ids": torch.zeros(2, 3)}, InvalidBatchError, "integer", "pass token ids"),
        ({"input_ids": torch.zeros(0, 4, dtype=torch.long)}, InvalidBatchError, "empty", "pass at least one token"),
        ({"attention_mask": torch.zeros(2, 4)}, InvalidBatchError, "all padding", "pass a mask with 1"),
        ({"input_ids": torch.full((2, 4), -1)}, InvalidBatchError, "negative", "pass the tokenizer's ids"),
        ({"input_ids": torch.full((2, 4), 97)}, InvalidBatchError, "vocabulary", "tokenize with the model's own"),
        ({"attention_mask": torch.ones(2, 5)}, InvalidBatchError, "same shape", "pass a mask of the same shape"),
        ({"pairs": [(0, 9)]}, InvalidPairsError, "0..3", "valid slots are 0..3"),
        ({"pairs": "window:0"}, InvalidPairsError, "window", "e.g. 'window:3'"),
        ({"pairs": "neighbours"}, InvalidPairsError, "adjacent", "pass 'adjacent', 'window:k', 'all'"),
        ({"protocols": ("replacement", "swap")}, InvalidProtocolError, "interchange", "choose from"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_clear_error(kwargs, error, says, advice):
    model = tiny_model("llama", n_layers=4)
    args = {"input_ids": torch.ones(2, 4, dtype=torch.long), **kwargs}
    with pytest.raises(error, match=says) as info:
        probe(model, **args)
    assert advice in str(info.value)  # it says what to pass instead


def test_model_with_one_block_is_refused():
    with pytest.raises(UnsupportedModelError, match="at least 2"):
        probe(tiny_model("gpt_neox", n_layers=1), torch.ones(1, 4, dtype=torch.long))


def test_result_is_json_safe_and_round_trips():
    result = probe(tiny_model("mistral", 4), tiny_batch(padding="left")[0], pairs="all")
    text = json.dumps(result.to_dict(), allow_nan=False)
    again = rm.ProbeResult.from_dict(json.loads(text))
    assert again.pairs == result.pairs
    assert again.summary == result.summary
    assert result.meta.batch_sha256 == again.meta.batch_sha256
    assert "regime=" in result.to_table()


def test_results_written_with_the_old_distance_keys_read_back_the_same():
    """|i-j| used to be written as "distance" / "by_distance"; old record files still load."""
    result = probe(tiny_model("llama", 4), tiny_batch()[0], pairs="window:2")
    data = json.loads(json.dumps(result.to_dict()))
    assert "separation" in data["pairs"][0] and "by_separation" in data["summary"]
    for pair in data["pairs"]:
        pair["distance"] = pair.pop("separation")
    data["summary"]["by_distance"] = data["summary"].pop("by_separation")
    again = rm.ProbeResult.from_dict(data)
    assert again.pairs == result.pairs
    assert again.summary == result.summary
    assert set(again.summary.by_separation) == {1, 2}


def test_batch_hash_depends_on_ids_and_mask():
    ids, mask = tiny_batch(padding="left")
    a = rm.make_batch(ids, mask).sha256
    assert a == rm.make_batch(ids.clone(), mask.clone()).sha256
    assert a != rm.make_batch(ids, None).sha256
    ids2 = ids.clone()
    ids2[1, 3] += 1
    assert a != rm.make_batch(ids2, mask).sha256


def test_public_api_is_the_short_list_and_internals_stay_in_their_modules():
    from redundancy_monitor.probing import engine, reference

    # Every error class is exported (test_public_api.py); the rest stays a short list.
    errors = {
        n for n, v in vars(rm.errors).items() if isinstance(v, type) and issubclass(v, Exception)
    }
    assert 18 <= len(set(rm.__all__) - errors) <= 32
    for name in rm.__all__:
        assert getattr(rm, name) is not None, name
    assert rm.MonitorStateError.__module__ == "redundancy_monitor.errors"
    assert rm.probe.__module__ == "redundancy_monitor.probing.probe"
    for internal in ("reference_distances", "variant_distances", "EngineOptions", "Variant"):
        assert internal not in rm.__all__
        with pytest.raises(AttributeError, match=internal):
            getattr(rm, internal)
    assert callable(reference.reference_distances) and callable(engine.variant_distances)


def test_find_blocks_unwraps_a_peft_style_wrapper():
    """peft is not a dependency; a wrapper with PEFT's class name and accessor stands in."""

    class PeftModelForCausalLM(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_model = nn.ModuleDict({"model": base})

        def get_base_model(self):
            return self.base_model["model"]

    model = tiny_model("llama", n_layers=3)
    assert find_blocks(PeftModelForCausalLM(model)) is model.model.layers
