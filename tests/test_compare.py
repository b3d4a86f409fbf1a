"""`redundancy-monitor compare CKPT_A CKPT_B`: the paired change between two saved
checkpoints on one probe batch, as a table and JSON, against the library computed here."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_runs import corpus, word_tokenizer
from conftest import tiny_model

from redundancy_monitor.probing.change import CHANGE_SCALARS, paired_change
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.tools.cli import main
from redundancy_monitor.tools.loading import load_checkpoint, probe_batch_from_text


def save(folder, model, tokenizer, step):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tokenizer = word_tokenizer()
    model = tiny_model("llama", 4, vocab=len(tokenizer))
    a = save(root / "ckpt-a", model, tokenizer, 100)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1.4)
    b = save(root / "ckpt-b", model, tokenizer, 200)
    deeper = save(root / "deeper", tiny_model("llama", 5, vocab=len(tokenizer)), tokenizer, 300)
    text = root / "text.txt"
    text.write_text(corpus(600, seed=4))
    return a, b, deeper, text


def test_compare_prints_and_writes_the_paired_change(two_checkpoints, tmp_path, capsys):
    a, b, _, text = two_checkpoints
    out = tmp_path / "change.json"
    args = [str(a), str(b), "--text", str(text), "--n-seq", "6", "--seq-len", "16"]
    assert main(["compare", *args, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "step 100" in printed and "step 200" in printed and "gap_median" in printed
    assert "change of gap_median since step 100" in printed and "paired interval" in printed
    data = json.loads(out.read_text())
    # The same computation in the library, from the two checkpoints on the same ids.
    model_a, tokenizer = load_checkpoint(a)
    ids = probe_batch_from_text(tokenizer, text.read_text(), 6, 16)
    want = paired_change(probe(model_a, ids), probe(load_checkpoint(b)[0], ids), 100)
    c = data["change"]
    assert c["step"] == 100 and data["a"]["step"] == 100 and data["b"]["step"] == 200
    for name in CHANGE_SCALARS:
        assert c[name] == pytest.approx(want.value(name), abs=1e-7)
        assert (c[f"{name}_low"], c[f"{name}_high"]) == pytest.approx(want.interval(name), abs=1e-7)
    assert [(p["i"], p["j"]) for p in c["pairs"]] == [(0, 1), (1, 2), (2, 3)]
    assert {"gap", "gap_low", "gap_high", "d_repl", "d_int", "ir"} <= set(c["pairs"][0])
    assert c["d_repl_mean"] != 0  # layer 2 changed
    assert data["sample_size"]["change"]["of"] == "change"
    assert data["sample_size"]["level"]["of"] == "level"


def test_compare_refuses_checkpoints_of_different_depths_in_one_line(two_checkpoints, capsys):
    a, _, deeper, text = two_checkpoints
    args = [str(a), str(deeper), "--text", str(text), "--n-seq", "2", "--seq-len", "16"]
    assert main(["compare", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 layers" in err[0] and "5" in err[0]
