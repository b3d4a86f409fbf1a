"""`redundancy-monitor score` end to end: the console script in a subprocess on a saved
checkpoint, its JSON checked against the library, its files read back, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from score_fixtures import make_text, save_checkpoint

from redundancy_monitor import find_blocks, probe
from redundancy_monitor.monitoring.sinks import BY_SEPARATION, DETAIL, PAIRS, PROBE_INFO
from redundancy_monitor.removal.export import prune_model
from redundancy_monitor.removal.table import compare_removal
from redundancy_monitor.tools.cli import main
from redundancy_monitor.tools.loading import load_checkpoint
from redundancy_monitor.tools.score_text import draw_text

ROOT = Path(__file__).parents[1]
SCRIPT = shutil.which("redundancy-monitor")
ARGS = ["--n-seq", "3", "--seq-len", "16", "--budgets", "1,2", "--random-draws", "2",
        "--window", "32", "--stride", "16"]  # fmt: skip

#: The line `--no-progress` prints when a phase starts.
PHASE_LINE = re.compile(r"^\[\s*\d+\.\d+s\] [a-z_ -]+(: |$)")
PHASE_NAME = re.compile(r"^\[\s*\d+\.\d+s\] ([a-z_ -]+?)(?:: |$)")


def run_script(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The installed console script, importing this checkout (PYTHONPATH) and one thread."""
    if SCRIPT is None:
        pytest.skip("the redundancy-monitor console script is not installed")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [SCRIPT, *args], input=stdin, capture_output=True, text=True, env=env, timeout=240
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    save_checkpoint(d / "ckpt", n_layers=6)
    (d / "text.txt").write_text(make_text(400, seed=1))
    return d


@pytest.fixture(scope="module")
def scored(workdir):
    proc = run_script(
        "score", str(workdir / "ckpt"), "--text", str(workdir / "text.txt"), *ARGS,
        "--pairs", "window:2", "--out", str(workdir / "out"),
        "--export-pruned", str(workdir / "pruned"), "--budget", "2", "--protocol", "interchange",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((workdir / "out" / "result.json").read_text())


def test_terminal_output_has_regime_top_pairs_and_removal_table(scored):
    proc, data = scored
    out = proc.stdout
    assert f"regime: {data['probe']['summary']['regime']}" in out
    assert "most interchangeable pairs under interchange (d_int):" in out
    assert "most interchangeable pairs under replacement (d_repl):" in out
    assert "n=1: recommend remove" in out and "n=2: recommend remove" in out
    for bar in ("load", "probe variants", "baselines", "greedy", "d_del", "held-out perplexity"):
        assert bar in proc.stderr  # a progress bar per phase


def test_result_json_matches_the_library_on_the_same_batch(scored, workdir):
    _, data = scored
    model, tokenizer = load_checkpoint(workdir / "ckpt")
    text = str(workdir / "text.txt")
    split = draw_text(tokenizer, [(text, (workdir / "text.txt").read_text())], 3, 16)
    result = probe(model, split.probe_ids, pairs="window:2")
    assert data["batch_sha256"] == result.meta.batch_sha256
    assert data["text"] == split.to_dict() and data["text"]["heldout_source"] == "split"
    assert data["config"]["pairs"] == "window:2" and data["config"]["budgets"] == [1, 2]
    assert set(data["versions"]) == {"redundancy_monitor", "torch", "transformers", "python"}
    assert len(data["probe"]["pairs"]) == len(result.pairs) == 5 + 4
    for got, want in zip(data["probe"]["pairs"], result.pairs, strict=True):
        assert (got["i"], got["j"]) == (want.i, want.j)
        for field in ("repl_ij", "repl_ji", "d_repl", "d_int", "gap"):
            assert got[field] == pytest.approx(getattr(want, field), rel=1e-5, abs=1e-7)
    assert data["probe"]["summary"]["regime"] == result.summary.regime
    report = compare_removal(
        model, result, split.probe_ids, split.heldout_ids, budgets=(1, 2), window=32,
        stride=16, random_draws=2,
    )  # fmt: skip
    removal = data["removal"]
    assert removal["base_perplexity"] == pytest.approx(report.base_perplexity, rel=1e-6)
    assert (removal["window"], removal["stride"]) == (32, 16)
    assert len(removal["rows"]) == len(report.rows) == 2 * 6
    for got, want in zip(removal["rows"], report.rows, strict=True):
        assert (got["budget"], got["selector"]) == (want.budget, want.selector)
        assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
        assert got["d_del"] == pytest.approx(want.d_del, rel=1e-5, abs=1e-7)
    for got, want in zip(removal["verdicts"], report.verdicts, strict=True):
        assert got["recommended"] == list(want.recommended)


def test_out_dir_has_summary_plots_and_a_tensorboard_run(scored, workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, data = scored
    out = workdir / "out"
    summary = (out / "summary.md").read_text()
    assert "## Removal table" in summary and f"**{data['probe']['summary']['regime']}**" in summary
    assert "| Δppl interval | tokens |" in summary and "race evaluation" in summary
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("heatmap_d_repl", "heatmap_d_int", "heatmap_gap", "gap_vs_depth",
                     "removal_cost"):  # fmt: skip
            assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    gap = events.Scalars("redundancy/gap_mean")[0].value
    assert gap == pytest.approx(data["probe"]["summary"]["gap_mean"], rel=1e-5)
    curve = {e.step: e.value for e in events.Scalars("redundancy/removal/interchange/perplexity")}
    want = {r["budget"]: r["perplexity"] for r in data["removal"]["rows"]
            if r["selector"] == "interchange"}  # fmt: skip
    assert curve.keys() == want.keys()
    assert all(curve[b] == pytest.approx(want[b], rel=1e-5) for b in want)
    assert "redundancy/removal/base_perplexity" in scalars
    sections = {"redundancy", BY_SEPARATION, DETAIL, PAIRS, PROBE_INFO}
    assert {tag.split("/", 1)[0] for tag in scalars} <= sections
    if importlib.util.find_spec("matplotlib") is not None:
        assert "redundancy/figures/heatmap_gap" in events.Tags()["images"]


def test_score_reports_intervals_stability_and_sample_size_advice(scored, workdir):
    proc, data = scored
    summary = data["probe"]["summary"]
    low, high = summary["gap_median_low"], summary["gap_median_high"]
    assert low <= high and summary["regime_stability"] is not None
    advice = data["sample_size"]
    assert advice["metric"] == "gap_median" and advice["n_seq"] == 3
    assert advice["halfwidth"] == pytest.approx((high - low) / 2)
    assert advice["n_seq_needed"] >= 2 and advice["target_halfwidth"] == 0.02
    assert f"[{low:.4f}, {high:.4f}]" in proc.stdout
    assert f"n_seq={advice['n_seq_needed']}" in proc.stdout
    assert "% of replicates" in proc.stdout
    pair = data["probe"]["pairs"][0]
    assert pair["d_int_low"] <= pair["d_int_high"]
    markdown = (workdir / "out" / "summary.md").read_text()
    assert "95% interval" in markdown and f"[{low:.4f}, {high:.4f}]" in markdown
    assert len(data["probe"]["per_sequence"]["d_int"][0]) == 3


def test_exported_pruned_checkpoint_round_trips(scored, workdir):
    from transformers import AutoModelForCausalLM

    _, data = scored
    layers = data["removal"]["plan"]["sets"]["interchange"]["2"]
    assert data["export"]["removed"] == layers and data["export"]["num_hidden_layers"] == 4
    model, _ = load_checkpoint(workdir / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(workdir / "pruned", local_files_only=True)
    assert len(find_blocks(reloaded)) == 4 and reloaded.config.num_hidden_layers == 4
    ids = torch.arange(20).reshape(2, 10) % model.config.vocab_size
    with torch.no_grad():
        got = reloaded.eval()(ids, use_cache=False).logits
        want = prune_model(model, layers)(ids, use_cache=False).logits
    assert torch.equal(got, want)
    assert (workdir / "pruned" / "tokenizer.json").exists()


def test_text_from_stdin_gives_the_same_probe_batch_and_exhaustive_the_same_table(scored, workdir):
    _, data = scored
    proc = run_script(
        "score", str(workdir / "ckpt"), "--text", "-", *ARGS, "--no-progress", "--exhaustive",
        "--pairs", "adjacent", "--out", str(workdir / "stdin"),
        stdin=(workdir / "text.txt").read_text(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((workdir / "stdin" / "result.json").read_text())
    assert again["batch_sha256"] == data["batch_sha256"]
    assert again["text"]["sequences"][0]["file"] == "-"
    # --no-progress: one line per phase, in order.
    phases = [m.group(1) for m in map(PHASE_NAME.match, proc.stderr.splitlines()) if m]
    assert phases == ["load", "probe", "baselines", "greedy", "d_del", "held-out perplexity"]
    # --exhaustive: every set on all the text, the straightforward way; the racing run
    # agrees on every set it did not stop, and recommends the same.
    fast, full = data["removal"], again["removal"]
    assert (fast["heldout"]["evaluation"], full["heldout"]["evaluation"]) == ("race", "reference")
    assert full["heldout"]["stopped_early"] == 0
    assert full["base_perplexity"] == pytest.approx(fast["base_perplexity"], rel=1e-6)
    for got, want in zip(fast["candidates"], full["candidates"], strict=True):
        assert got["layers"] == want["layers"] and not want["stopped_early"]
        if not got["stopped_early"]:
            assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
            assert (got["change_low"], got["change_high"]) == pytest.approx(
                (want["change_low"], want["change_high"]), rel=1e-6, abs=1e-9
            )
    for got, want in zip(fast["verdicts"], full["verdicts"], strict=True):
        assert got["recommended"] == want["recommended"]


def test_result_json_says_where_each_sequence_came_from_and_how_sure_each_cost_is(scored, workdir):
    proc, data = scored
    text = data["text"]
    assert text["sources"] == [str(workdir / "text.txt")] and text["guard_tokens"] == 16
    spans = [(s["start"], s["end"]) for s in text["sequences"]]
    assert len(spans) == 3 and all(e - s == 16 for s, e in spans)
    assert text["heldout_tokens"] == sum(p["end"] - p["start"] for p in text["heldout_pieces"])
    removal = data["removal"]
    assert removal["heldout"]["n_boot"] >= 100 and removal["heldout"]["confidence"] == 0.95
    for c in removal["candidates"]:
        assert c["change_low"] <= c["perplexity_change"] <= c["change_high"]
        assert c["heldout_tokens"] <= removal["heldout_tokens"] and c["selectors"]
    for r in removal["rows"]:
        assert {"change_low", "change_high", "heldout_tokens", "stopped_early"} <= set(r)
    for v in removal["verdicts"]:
        assert isinstance(v["statistically_tied"], bool)
        assert v["statistically_tied"] == bool(v["tied_with"])
    assert "95% interval" in proc.stdout and "race evaluation" in proc.stdout


# -- bad input: exit code 2 and one line saying why ------------------------------------


def test_console_script_reports_bad_input_in_one_line(workdir):
    for args, reason in [
        (
            ["score", str(workdir / "nowhere"), "--text", str(workdir / "text.txt")],
            "does not exist",
        ),
        (
            ["score", str(workdir / "ckpt"), "--text", "x", "--pairs", "diagonal"],
            "unknown pair set",
        ),
    ]:
        proc = run_script(*args)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def score_main(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr without the phase lines (the reason for a failure follows
    the phases that ran before it)."""
    try:
        code = main(["score", *args, "--no-progress"])
    except SystemExit as e:  # argparse rejects an option value
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, "\n".join(x for x in err.splitlines() if not PHASE_LINE.match(x))


def bad_inputs(workdir: Path) -> list[tuple[list[str], str]]:
    ckpt, text = str(workdir / "ckpt"), str(workdir / "text.txt")
    vit = workdir / "vit"
    if not vit.exists():
        from transformers import ViTConfig

        ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(vit)
    no_tok = workdir / "no_tokenizer"
    if not no_tok.exists():
        save_checkpoint(no_tok, n_layers=4, with_tokenizer=False)
    short = workdir / "short.txt"
    short.write_text("the cat sees a dog .")
    gguf = workdir / "model.gguf"
    gguf.write_bytes(b"GGUF")
    cases = [
        ([str(workdir / "nowhere"), "--text", text], "does not exist"),
        ([str(vit), "--text", text], "is not a causal LM"),
        ([str(no_tok), "--text", text], "--tokenizer"),
        ([ckpt, "--text", str(short), *ARGS], "too short for one sequence"),
        ([ckpt, "--text", str(workdir / "missing.txt")], "cannot read text file"),
        ([ckpt, "--text", text, *ARGS[:4], "--budgets", "4"], "non-adjacent layers"),
        ([ckpt, "--text", text, "--budgets", "0"], "positive"),
        ([ckpt, "--text", text, *ARGS, "--seed", "-1"], "seed >= 0"),
        ([ckpt, "--text", text, *ARGS[:4], "--window", "8", "--stride", "8"], "stride < window"),
        ([ckpt, "--text", text, "--budgets", "a,b"], "comma-separated"),
        ([ckpt, "--text", text, "--pairs", "window:0"], "positive integer"),
        ([ckpt, "--text", text, "--dtype", "float8"], "invalid choice"),
        ([ckpt, "--text", text, "--protocol", "deletion"], "invalid choice"),
        ([ckpt, "--text", text, "--seq-len", "100"], "max_position_embeddings"),
        ([ckpt, "--text", text, "--export-pruned", str(workdir / "x")], "exactly one of"),
        ([ckpt, "--text", text, "--remove", "1"], "--export-pruned"),
        ([ckpt, "--text", text, "--device", "tpu:x"], "device"),
        ([str(workdir / "text.txt"), "--text", text], "not a .gguf"),
        ([ckpt, "--text", text, "--target-halfwidth", "0"], "--target-halfwidth"),
    ]
    if importlib.util.find_spec("gguf") is None:
        cases.append(([str(gguf), "--text", text], "pip install 'redundancy-monitor[gguf]'"))
    return cases


def test_every_bad_input_exits_2_with_its_reason(workdir, capsys):
    cases = bad_inputs(workdir)
    capsys.readouterr()
    for args, reason in cases:
        code, err = score_main(capsys, *args)
        assert code == 2, (args, err)
        assert reason in err, (args, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_export_with_explicit_layers_out_of_range_is_bad_input(workdir, capsys):
    code, err = score_main(
        capsys, str(workdir / "ckpt"), "--text", str(workdir / "text.txt"), *ARGS,
        "--export-pruned", str(workdir / "bad_export"), "--remove", "2,9",
    )  # fmt: skip
    assert code == 2 and "cannot remove layer 9" in err
    assert not (workdir / "bad_export").exists()


def test_score_module_imports_stay_light():
    code = (
        "import sys, redundancy_monitor.tools.cli, redundancy_monitor;"
        "print(any(m.startswith(('transformers', 'lightning', 'matplotlib')) for m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "False", out.stderr


def test_tokenizer_override_and_plots_skipped_with_one_notice_without_matplotlib(
    workdir, capsys, monkeypatch
):
    no_tok = workdir / "no_tokenizer"
    if not no_tok.exists():
        save_checkpoint(no_tok, n_layers=4, with_tokenizer=False)
    capsys.readouterr()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = workdir / "no_mpl"
    code = main([
        "score", str(no_tok), "--tokenizer", str(workdir / "ckpt"),
        "--text", str(workdir / "text.txt"), *ARGS[:4], "--budgets", "1",
        "--random-draws", "1", "--window", "16", "--out", str(out), "--no-progress",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("matplotlib is not installed") == 1
    assert not list(out.glob("*.png"))
    assert json.loads((out / "result.json").read_text())["config"]["tokenizer"] == str(
        workdir / "ckpt"
    )
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
