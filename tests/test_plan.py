"""Cost model (ds_burst.plan): sanity of the predictions and the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ds_burst.plan import Hardware, Problem, choose, predict


def _by(preds, schedule, backward):
    return next(x for x in preds if x.schedule == schedule and x.backward == backward)


def test_matches_the_measured_two_gpu_ring_within_10_percent():
    # docs/BENCHMARKS.md: 2 H200, S=128K causal, H=32, D=128: fwd 140.9 ms, fwd+bwd 607.4 ms
    pred = _by(predict(Problem(131072, 1, 2, 32, 32, 128)), "ring", "burst")
    assert abs(pred.fwd_ms - 140.9) / 140.9 < 0.1
    assert abs(pred.total_ms - 607.4) / 607.4 < 0.1


def test_topology_aware_schedules_beat_the_flat_ring_across_nodes():
    preds = predict(Problem(131072, 4, 8, 32, 8, 128))
    flat = _by(preds, "ring", "ring")
    assert _by(preds, "double_ring", "ring").total_ms < flat.total_ms
    assert _by(preds, "ulysses_ring", "ring").total_ms < flat.total_ms
    assert choose(Problem(131072, 4, 8, 32, 8, 128), implemented_only=False).schedule != "ring"


def test_backward_choice_follows_bytes_when_communication_bound():
    slow = Hardware(intra_gbps=2.0)  # a crude slow link: communication dominates
    mha = predict(Problem(16384, 1, 4, 32, 32, 128), slow)
    gqa = predict(Problem(16384, 1, 4, 32, 8, 128), slow)
    assert _by(mha, "ring", "burst").bwd_ms < _by(mha, "ring", "ring").bwd_ms
    assert _by(gqa, "ring", "ring").bwd_ms < _by(gqa, "ring", "burst").bwd_ms


def test_bad_problem_is_rejected():
    with pytest.raises(ValueError, match="divisible by kv_heads"):
        predict(Problem(4096, 1, 2, 32, 5, 128))
    with pytest.raises(ValueError, match="divisible by 2 \\* world"):
        predict(Problem(4098, 1, 2, 32, 8, 128))


def test_command_line_prints_table_and_choice():
    out = subprocess.run([sys.executable, "-m", "ds_burst.plan", "--seq", "1048576", "--nodes", "4",
                          "--gpus-per-node", "8", "--heads", "32", "--kv-heads", "8", "--head-dim", "128"],
                         capture_output=True, text=True, check=True).stdout
    assert "ulysses_ring" in out and "choice: schedule=double_ring" in out


def test_auto_schedule_choice():
    from ds_burst.plan import choose_schedule

    assert choose_schedule(131072, 1, 8, 32, 8, 128, 2, True) == "ring"  # one node
    assert choose_schedule(131072, 4, 8, 32, 8, 128, 2, True) in ("double_ring", "ulysses_ring")


def test_memory_command_line():
    out = subprocess.run([sys.executable, "-m", "ds_burst.plan", "--memory", "--seq", "131072", "--nodes", "1",
                          "--gpus-per-node", "2", "--heads", "32", "--kv-heads", "8", "--head-dim", "128",
                          "--checkpointing", "--lm-head-chunk", "4096"], capture_output=True, text=True, check=True)
    assert "ZeRO-3" in out.stdout and "total" in out.stdout and out.stderr == ""
