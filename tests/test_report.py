"""`redundancy-monitor report`: the HTML page and PNGs built from a run folder."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import page_attributes, screenshot
from PIL import Image
from run_folders import (
    REPO,
    an_alert,
    hand_result,
    run_cli,
    train_with_monitor,
    write_records,
)

from redundancy_monitor.errors import RunFolderError
from redundancy_monitor.tools.records import load_run
from redundancy_monitor.tools.report import write_report

ALWAYS = (
    "gap_trajectory",
    "change_trajectory",
    "ir_by_separation",
    "heatmaps",
    "gap_vs_depth",
    "alert_timeline",
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    monitor = train_with_monitor(run_dir)
    return run_dir, monitor


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_of_a_real_run_embeds_every_png_it_writes_beside_the_html(trained_run):
    run_dir, _ = trained_run
    report = write_report(run_dir)
    assert report.html == run_dir / "report.html"
    assert sorted(report.images) == sorted(ALWAYS)  # no removal plan in a monitor run
    page = report.html.read_text(encoding="utf-8")
    embedded = embedded_images(page)
    assert embedded == [report.images[n].read_bytes() for n in ALWAYS]
    for png in report.images.values():
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 100
    # Self-contained: nothing is fetched from anywhere.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "default-src 'none'" in page
    assert "No removal plan was computed" in page


def test_summary_of_a_real_run_states_regime_and_change_from_the_records(trained_run):
    run_dir, monitor = trained_run
    records = [json.loads(line) for line in (run_dir / "redundancy.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["type"] == "probe"]
    first, last = probes[0]["result"]["summary"], probes[-1]["result"]["summary"]
    assert [p["step"] for p in probes] == monitor.probed_steps
    summary = " ".join(write_report(run_dir).summary)
    assert f"{len(probes)} probe(s)" in summary
    assert f"Regime now (step {probes[-1]['step']}): {last['regime']}" in summary
    assert f"median gap {first['gap_median']:.4f} -> {last['gap_median']:.4f}" in summary
    n_alerts = sum(r["type"] == "alert" for r in records)
    assert f"{n_alerts} alert(s)" in summary
    change = probes[-1]["change"]["baseline"]
    assert (
        f"Change of the median gap since the baseline probe (step {probes[0]['step']}): "
        f"{change['gap_median']:+.4f} nats, paired interval [{change['gap_median_low']:+.4f}, "
        f"{change['gap_median_high']:+.4f}]"
    ) in summary


def test_the_change_figure_draws_the_records_and_old_files_without_change_still_load(
    trained_run, tmp_path
):
    run_dir, _ = trained_run
    lines = [json.loads(x) for x in (run_dir / "redundancy.jsonl").read_text().splitlines()]
    probes = [r for r in lines if r["type"] == "probe"]
    run = load_run(run_dir)
    assert run.change_trajectory("gap_median") == [(probes[0]["step"], 0.0, 0.0, 0.0)] + [
        (p["step"], *(p["change"]["baseline"][f"gap_median{k}"] for k in ("", "_low", "_high")))
        for p in probes[1:]
    ]
    old = tmp_path / "old" / "redundancy.jsonl"
    old.parent.mkdir()
    old.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "change"}) + "\n" for r in lines)
    )
    old_run = load_run(old.parent)
    assert old_run.steps == run.steps and all(p.change is None for p in old_run.probes)
    assert old_run.change_trajectory("gap_median") == []
    report = write_report(old.parent)
    assert "change_trajectory" not in report.images
    assert not any("Change of the median gap" in s for s in report.summary)


def test_report_states_the_intervals_of_a_real_run(trained_run, tmp_path):
    from redundancy_monitor.tools.figures import _band

    run_dir, _ = trained_run
    probes = [r for r in map(json.loads, (run_dir / "redundancy.jsonl").read_text().splitlines())
              if r["type"] == "probe"]  # fmt: skip
    last = probes[-1]["result"]["summary"]
    low, high = last["gap_median_low"], last["gap_median_high"]
    report = write_report(run_dir, tmp_path / "page.html")
    summary = " ".join(report.summary)
    assert (
        f"Median gap now: {last['gap_median']:.4f} nats, interval [{low:.4f}, {high:.4f}]"
        in summary
    )
    page = report.html.read_text(encoding="utf-8")
    assert "gap median interval" in page and "% of replicates" in page
    steps, lows, highs = _band(load_run(run_dir).probes, "gap_median")
    assert steps == [p["step"] for p in probes]
    assert lows[-1] == low and highs[-1] == high


def test_report_renders_in_headless_chromium_with_every_image_decoded(trained_run, tmp_path):
    run_dir, _ = trained_run
    report = write_report(run_dir, tmp_path / "out" / "page.html")
    assert report.images["heatmaps"].parent == tmp_path / "out"
    attrs = page_attributes(report.html, tmp_path)
    assert attrs.get("images-total") == str(len(ALWAYS)), attrs
    assert attrs.get("images-decoded") == attrs["images-total"], attrs
    assert "errors" not in attrs and "blocked-requests" not in attrs, attrs
    with Image.open(screenshot(report.html, tmp_path)) as shot:
        grey = np.asarray(shot.convert("L"), dtype=np.float64)
    assert grey.shape == (3000, 1200)
    assert grey.std() > 20  # figures and text, not a blank page
    assert (grey < 128).mean() > 0.01


def test_summary_names_the_layers_each_protocol_would_remove(tmp_path):
    # 6 layers, adjacent pairs (0,1)..(4,5). Replacement: pair (2,3) closest -> layer 2
    # (ties broken by index). Interchange: pair (0,1) closest -> layer 0.
    result = hand_result([0.5, 0.4, 0.01, 0.3, 0.6], [0.02, 0.1, 0.2, 0.3, 0.4])
    write_records(tmp_path, probes=[(5, result)])
    summary = " ".join(write_report(tmp_path).summary)
    assert "at budget 1" in summary
    assert "replacement [2], interchange [0]" in summary
    assert "Jaccard overlap 0.00" in summary


def test_one_probe_no_alerts_gives_one_heatmap_row_and_says_so(tmp_path):
    write_records(tmp_path, probes=[(0, hand_result([0.2, 0.1, 0.3], [0.05, 0.1, 0.02]))])
    report = write_report(tmp_path)
    assert "Only one probe so far" in " ".join(report.summary)
    assert "No alert fired." in report.summary
    page = report.html.read_text()
    assert "No alert fired during this run." in page and "No probe failed." in page
    two = tmp_path / "two"
    result = hand_result([0.2, 0.1, 0.3], [0.05, 0.1, 0.02])
    write_records(two, probes=[(0, result), (10, result)])
    two_png = write_report(two).images["heatmaps"]
    with Image.open(report.images["heatmaps"]) as one_row, Image.open(two_png) as two_rows:
        assert two_rows.height > 1.5 * one_row.height


def test_failures_alerts_and_non_finite_pairs_are_reported(tmp_path):
    healthy = hand_result([0.2, 0.1, 0.3], [0.05, 0.1, 0.02])
    broken = hand_result([0.2, float("nan"), 0.3], [0.05, 0.1, None])
    write_records(
        tmp_path,
        probes=[(0, healthy), (20, broken)],
        alerts=[an_alert(20)],
        failures=[(10, "RuntimeError: CUDA out of memory\nTraceback ...")],
    )
    report = write_report(tmp_path)
    page = report.html.read_text()
    assert "RuntimeError: CUDA out of memory" in page and "Traceback" not in page
    assert "step 20: gap_median is above 0.1" in page
    assert "1 failed probe(s); 1 alert(s)" in report.summary[0]
    assert "Alerts: gap_threshold x1." in " ".join(report.summary)
    run = load_run(tmp_path)
    assert run.last.result.summary.n_nonfinite == 1 and len(run.failures) == 1


def test_measured_removal_table_adds_cost_curves_and_the_recommendation(tmp_path):
    from conftest import tiny_batch, tiny_model

    from redundancy_monitor.probing.probe import probe
    from redundancy_monitor.removal.table import compare_removal

    model = tiny_model("llama", n_layers=5)
    ids, _ = tiny_batch(n_seq=2, seq_len=12)
    heldout, _ = tiny_batch(n_seq=1, seq_len=40, seed=3)
    result = probe(model, ids)
    table = compare_removal(
        model, result, ids, heldout[0], budgets=(1,), baselines=("random",), random_draws=1
    )
    write_records(tmp_path / "run", probes=[(7, result)])
    score = tmp_path / "score" / "result.json"
    score.parent.mkdir()
    score.write_text(json.dumps({"removal": table.to_dict()}))

    assert "removal_cost" not in write_report(tmp_path / "run").images
    report = write_report(tmp_path / "run", removal=score)
    assert "removal_cost" in report.images
    page = report.html.read_text()
    assert 'data-figure="removal_cost"' in page and "No removal plan" not in page
    verdict = table.verdict(1)
    expected = f"at budget 1 the cheapest set on held-out text is {list(verdict.recommended)}"
    assert expected in " ".join(report.summary)
    # Found on its own when it sits in the run folder.
    (tmp_path / "run" / "result.json").write_text(score.read_text())
    assert "removal_cost" in write_report(tmp_path / "run").images


def test_run_without_a_finished_probe_is_a_clear_error(tmp_path):
    write_records(tmp_path, failures=[(0, "ValueError: boom")])
    with pytest.raises(RunFolderError, match="1 failed probe"):
        load_run(tmp_path)
    with pytest.raises(RunFolderError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_report_command_exit_codes_and_messages(tmp_path):
    write_records(tmp_path, probes=[(3, hand_result([0.2, 0.1], [0.05, 0.1]))])
    done = run_cli("report", str(tmp_path), "--out", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.html").is_file() and "wrote" in done.stdout
    missing = run_cli("report", str(tmp_path / "absent"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_without_matplotlib_the_report_says_how_to_install_it(tmp_path):
    write_records(tmp_path, probes=[(3, hand_result([0.2, 0.1], [0.05, 0.1]))])
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from redundancy_monitor.tools.cli import main\n"
        f"raise SystemExit(main(['report', {str(tmp_path)!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 2
    assert "pip install 'redundancy-monitor[plots]'" in done.stderr


def test_figures_use_no_pyplot_and_leave_the_backend_alone(tmp_path):
    write_records(tmp_path, probes=[(3, hand_result([0.2, 0.1], [0.05, 0.1]))])
    table = {
        "rows": [{"budget": 1, "selector": "random", "perplexity": 9.0, "perplexity_std": 1.0}]
    }
    code = (
        "import sys, matplotlib\n"
        "backend = lambda: dict.__getitem__(matplotlib.rcParams, 'backend')  # unresolved\n"
        "before = backend()\n"
        "from redundancy_monitor.tools import figures\n"
        "from redundancy_monitor.tools.report import write_report\n"
        f"report = write_report({str(tmp_path)!r})\n"
        f"image = figures.rgb(figures.removal_cost({table!r}))\n"
        "print(len(report.images), image.ndim, image.shape[2], image.dtype)\n"
        "print('matplotlib.pyplot' in sys.modules, backend() == before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["5 3 3 uint8", "False True"]


def test_no_finite_adjacent_pair_means_no_removal_selection(tmp_path):
    nan = float("nan")
    write_records(tmp_path, probes=[(0, hand_result([nan, nan], [nan, nan]))])
    summary = " ".join(write_report(tmp_path).summary)
    assert "No removal selection at budget 1" in summary


def test_report_finds_the_records_a_lightning_callback_wrote_below_the_root(tmp_path):
    from training_fixtures import lightning_module, lightning_trainer, probe_ids, token_loader

    from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback
    from redundancy_monitor.monitoring.schedule import ProbeSchedule

    cb = RedundancyMonitorCallback(probe_ids(), schedule=ProbeSchedule(2, log_spaced=False))
    lightning_trainer(tmp_path, [cb], max_steps=4).fit(lightning_module(), token_loader())
    report = write_report(tmp_path)  # the trainer's default_root_dir
    records = Path(cb.jsonl_file)
    assert records.parent != tmp_path and report.html == records.parent / "report.html"
    assert f"{len(cb.monitor.probed_steps)} probe(s)" in report.summary[0]


def test_the_browser_check_catches_a_broken_image_and_a_network_fetch(tmp_path):
    from redundancy_monitor.tools.report import CHECK_SCRIPT, CSP

    page = tmp_path / "bad.html"
    page.write_text(
        f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
        f'content="{CSP}"><script>{CHECK_SCRIPT}</script></head><body>'
        '<img src="data:image/png;base64,iVBORw0KGgoAAAA">'
        '<img src="https://example.invalid/remote.png"></body></html>'
    )
    attrs = page_attributes(page, tmp_path)
    assert attrs["images-total"] == "2" and attrs["images-decoded"] == "0", attrs
    assert int(attrs["errors"]) >= 1 and int(attrs["blocked-requests"]) >= 1, attrs
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    with Image.open(screenshot(blank, tmp_path)) as shot:
        assert np.asarray(shot.convert("L"), dtype=np.float64).std() < 1  # what "blank" reads as
