"""Multi-process training with the monitor: real gloo ranks on CPU, with hang guards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env, tiny_model
from test_distributed_probe import free_port, torchrun
from training_fixtures import probe_ids

from redundancy_monitor import probe
from redundancy_monitor.monitoring.jsonl import read_records

SCRIPTS = Path(__file__).parent / "dist_scripts"


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 240):
    """Run a script that starts its own ranks (Lightning), with a hang guard."""
    full_env = subprocess_env(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), **(env or {}))
    try:
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / script), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script} hung for {timeout}s: {e.stderr!r}"[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def probes_by_step(path: Path) -> dict[int, dict]:
    records = [r for r in read_records(path) if r["type"] == "probe"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was written twice: {steps}"
    return {r["step"]: r["result"] for r in records}


def assert_equals_single_process_probe(
    result: dict, weights: Path, pairs: str = "window:2", world_size: int = 2
):
    model = tiny_model("gpt_neox", 4)
    model.load_state_dict(torch.load(weights))
    want = probe(model, probe_ids(), pairs=pairs)
    got = [(p["i"], p["j"], p["d_repl"], p["d_int"]) for p in result["pairs"]]
    assert [(i, j) for i, j, _, _ in got] == [(r.i, r.j) for r in want.pairs]
    for (_, _, d_repl, d_int), r in zip(got, want.pairs, strict=True):
        assert d_repl == pytest.approx(r.d_repl, rel=1e-4, abs=1e-6)
        assert d_int == pytest.approx(r.d_int, rel=1e-4, abs=1e-6)
    assert result["meta"]["world_size"] == world_size


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_lightning_ddp_ranks_share_the_probe_and_rank0_writes_it_once(tmp_path, strategy):
    run_script("lightning_ddp.py", str(tmp_path), strategy)
    probes = probes_by_step(tmp_path / "redundancy.jsonl")
    assert sorted(probes) == [0, 4, 8, 10]
    assert_equals_single_process_probe(probes[10], tmp_path / "final.pt")
    counts = json.loads((tmp_path / "summary.json").read_text())
    assert counts == {"probes": 4, "failures": 0, "world": 2}


def test_a_probe_failing_on_one_rank_is_recorded_and_training_finishes(tmp_path):
    run_script("lightning_ddp.py", str(tmp_path), "ddp", env={"RM_TEST_FAIL": "1,2"})
    records = read_records(tmp_path / "redundancy.jsonl")
    failures = [r for r in records if r["type"] == "failure"]
    assert [f["step"] for f in failures] == [4]
    assert "rank 1: RuntimeError: injected probe failure" in failures[0]["error"]
    assert sorted(probes_by_step(tmp_path / "redundancy.jsonl")) == [0, 8, 10]
    assert any(r["type"] == "alert" and r["rule"] == "probe_failure" for r in records)
    assert json.loads((tmp_path / "summary.json").read_text())["failures"] == 1
    assert (tmp_path / "final.pt").exists()  # training reached its end on rank 0


def test_lightning_rank0_alone_shares_its_stop_and_checkpoint_only_at_scheduled_steps(tmp_path):
    run_script("lightning_ddp.py", str(tmp_path), "ddp", env={"RM_TEST_MODE": "rank0-alerts"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # probes at steps 0 and 4 (the second fires the alert): every rank stops at step 4
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    # one agreement (both rules at once) at scheduled steps 0 and 4, then at train end;
    # not one per batch
    assert ranks[0]["reductions"] == ranks[1]["reductions"] == 3
    assert ranks[0]["alert_dir"] == ranks[1]["alert_dir"] == str(tmp_path / "tb")
    assert (tmp_path / "tb" / "redundancy-alert-step4.ckpt").exists()


def test_hf_trainer_under_torchrun_shares_the_probe_and_writes_once(tmp_path):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    torchrun(SCRIPTS / "hf_ddp.py", str(tmp_path), "plain")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # same probes and same alerts on both ranks
    probes = probes_by_step(tmp_path / "tb" / "redundancy.jsonl")
    assert sorted(probes) == [0, 2, 4, 6, 8]
    assert_equals_single_process_probe(probes[8], tmp_path / "final.pt")
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    # The trainer's run and ours beside it, rank 0 only (one event file each).
    assert sorted(p.parent for p in events) == [tmp_path / "runs", tmp_path / "runs" / "redundancy"]


def test_an_alert_that_stops_training_stops_every_rank_at_the_same_step(tmp_path):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    torchrun(SCRIPTS / "hf_ddp.py", str(tmp_path), "stop")  # a lone stop would hang DDP
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] < 8
    assert "gap_threshold" in ranks[0]["alerts"]


def test_rank0_probing_alone_stops_every_rank_at_the_same_step(tmp_path):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    torchrun(SCRIPTS / "hf_ddp.py", str(tmp_path), "stop-rank0")  # a lone stop would hang
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # probes at steps 0 and 2 on rank 0; the second fires: both ranks stop at step 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2
    assert ranks[0]["alerts"] == ["gap_threshold"] and ranks[1]["alerts"] == []


def test_fsdp2_sharded_model_is_gathered_at_the_scheduled_step_and_probed(tmp_path):
    torchrun(SCRIPTS / "fsdp2_loop.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"probes": 4, "failures": 0, "rng_untouched": True}
    probes = probes_by_step(tmp_path / "redundancy.jsonl")
    assert sorted(probes) == [0, 3, 6, 7]
    assert_equals_single_process_probe(probes[7], tmp_path / "final.pt")


def test_fsdp2_host_snapshot_keeps_shards_per_rank_and_rank0_probes_exactly(tmp_path):
    # Inline probes, so which steps are probed does not depend on timing.
    torchrun(SCRIPTS / "fsdp2_loop.py", str(tmp_path), "host", "inline")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"probes": 4, "failures": 0, "rng_untouched": True}
    probes = probes_by_step(tmp_path / "redundancy.jsonl")
    assert sorted(probes) == [0, 3, 6, 7]
    # rank 0 measured every pair alone, from shards gathered over gloo
    assert_equals_single_process_probe(probes[7], tmp_path / "final.pt", world_size=1)
    model = tiny_model("gpt_neox", 4)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    meta = probes[7]["meta"]
    by_rank = meta["shadow_host_bytes_by_rank"]
    assert sum(by_rank) == params + 2 * buffers  # shards add up to one model; buffers whole
    assert max(by_rank) <= 0.6 * (params + buffers)
    assert meta["shadow_device_bytes"] == 0
    assert 0 < meta["probe_device_peak_bytes"] < params + buffers


@pytest.mark.parametrize(
    "fault, errors",
    [
        ("snapshot:1", ["rank 1: RuntimeError: injected snapshot failure on rank 1"]),
        (
            "shards:1",
            [
                "rank 0: RuntimeError: another rank could not send its shards",
                "rank 1: RuntimeError: injected shard failure on rank 1",
            ],
        ),
    ],
    ids=["snapshot-fails", "shard-transfer-fails"],
)
def test_fsdp2_a_rank_failing_its_host_snapshot_fails_that_probe_on_every_rank(
    tmp_path, fault, errors
):
    torchrun(SCRIPTS / "fsdp2_loop.py", str(tmp_path), "host", "inline", fault)  # hang guard
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"probes": 3, "failures": 1, "rng_untouched": True}
    records = read_records(tmp_path / "redundancy.jsonl")
    failures = [r for r in records if r["type"] == "failure"]
    assert [f["step"] for f in failures] == [3]
    for error in errors:
        assert error in failures[0]["error"]
    assert sorted(probes_by_step(tmp_path / "redundancy.jsonl")) == [0, 6, 7]
    assert (tmp_path / "final.pt").exists()  # training reached its end


def test_lightning_fsdp1_strategy_is_refused_at_setup_with_advice():
    from lightning.pytorch.strategies import FSDPStrategy

    from redundancy_monitor.errors import InvalidConfigError
    from redundancy_monitor.integrations.lightning import refuse_unsupported_strategy

    with pytest.raises(InvalidConfigError, match="FSDP2"):
        refuse_unsupported_strategy(FSDPStrategy())


def test_deepspeed_zero3_is_refused_at_setup():
    """deepspeed is not installed here; a strategy object of that name and config stands in."""
    from redundancy_monitor.errors import InvalidConfigError
    from redundancy_monitor.integrations.lightning import refuse_unsupported_strategy

    DeepSpeedStrategy = type("DeepSpeedStrategy", (), {})
    zero3, zero2 = DeepSpeedStrategy(), DeepSpeedStrategy()
    zero3.config = {"zero_optimization": {"stage": 3}}
    zero2.config = {"zero_optimization": {"stage": 2}}
    with pytest.raises(InvalidConfigError, match="ZeRO-3"):
        refuse_unsupported_strategy(zero3)
    refuse_unsupported_strategy(zero2)  # stage 2 keeps whole parameters: allowed
