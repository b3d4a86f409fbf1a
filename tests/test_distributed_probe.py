"""Probe work split across two real gloo processes equals the single-process probe."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env, tiny_batch, tiny_model

from redundancy_monitor import ProbeResult, probe
from redundancy_monitor.probing.probe import merge_shards, shard_pairs
from redundancy_monitor.probing.variants import parse_pairs

SCRIPTS = Path(__file__).parent / "dist_scripts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    script: Path, *args: str, nproc: int = 2, timeout: int = 180
) -> subprocess.CompletedProcess:
    """torchrun on loopback with a hang guard: a stuck collective fails the test, not CI."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
    env = subprocess_env(OMP_NUM_THREADS="1")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"distributed run hung for {timeout}s: {e.stderr!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_shards_partition_the_pairs_and_balance_cost():
    pairs = parse_pairs("all", 12)
    shares = [shard_pairs(pairs, 12, r, 3) for r in range(3)]
    assert sorted(p for s in shares for p in s) == pairs
    costs = [sum(3 * 12 - 2 * i - j for i, j in s) for s in shares]
    assert max(costs) - min(costs) <= 3 * 12


def test_merged_shards_equal_the_whole_probe_in_one_process():
    model = tiny_model("gpt2", n_layers=5)
    ids, mask = tiny_batch(padding="right")
    whole = probe(
        model, ids, mask, pairs="all", protocols=("replacement", "interchange", "deletion")
    )
    parts = [
        probe(
            model,
            ids,
            mask,
            pairs="all",
            protocols=("replacement", "interchange", "deletion"),
            shard=(r, 3),
        )
        for r in range(3)
    ]
    merged = merge_shards(parts)
    assert merged.pairs == whole.pairs
    assert merged.deletion == whole.deletion
    assert merged.summary == whole.summary


@pytest.mark.parametrize("reader", ["0", "1"])
def test_two_gloo_processes_give_the_single_process_result_on_every_rank(tmp_path, reader):
    out = tmp_path / "result.json"
    torchrun(SCRIPTS / "probe_sharded.py", str(out), reader)
    got = ProbeResult.from_dict(json.loads(out.read_text()))
    model = tiny_model("llama", n_layers=6)
    ids, mask = tiny_batch(padding="left")
    want = probe(
        model, ids, mask, pairs="window:2", protocols=("replacement", "interchange", "deletion")
    )
    assert [(r.i, r.j) for r in got.pairs] == [(r.i, r.j) for r in want.pairs]
    for a, b in zip(got.pairs, want.pairs, strict=True):
        assert a.d_int == pytest.approx(b.d_int, abs=1e-6, rel=1e-5)
        assert a.d_repl == pytest.approx(b.d_repl, abs=1e-6, rel=1e-5)
    assert [d.slot for d in got.deletion] == list(range(6))
    assert got.meta.world_size == 2
