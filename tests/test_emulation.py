"""One-GPU rank emulation (``launch/bench_emulate.py``): one process runs rank r of a P-rank group on torch's fake
process group, and ds-burst takes its emulated-group shortcuts there and nowhere else.

* the entry point, on CPU with the reference kernel, P in {2, 4, 8}, every schedule: it finishes in bounded time,
  every row has positive times, and the emulated rank ran every tile of its step plan (the kernel's ``fwd_step`` /
  ``bwd_step`` calls, counted by the benchmark, against a count made here from ``core.step_plan`` alone);
* on a fake group the shortcuts hold even when its collectives would fail (no header round, agreement helpers
  answer with this rank's values, ``position_ids`` refused by name);
* on real gloo ranks none of them is taken;
* the cost model's compute term is what ``predict`` charges when links are free.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_utils import run_ranks, values

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "launch" / "bench_emulate.py"
HQ, D, L = 8, 16, 2


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def _bench(tmp_path: Path, name: str, *flags: str) -> list[dict]:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(BENCH), "--device", "cpu", "--kernels", "torch", "--heads", str(HQ), "--head-dim",
           str(D), "--gpus-per-node", str(L), "--iters", "1", "--out", str(out), *flags]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)  # a hang fails here
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["emulated"] is True and data["meta"]["device_type"] == "cpu"
    return data["rows"]


def expected_tiles(row: dict) -> tuple[int, int, int, int]:
    """``(forward, backward, local, blocks)``: tile calls of the row's rank, from ``core.step_plan`` alone (each of
    the ``blocks`` blocks of the zigzag ring, node-level for ulysses_ring, meets this rank's queries once)."""
    from ds_burst.core.cost import choose_backward
    from ds_burst.core.layout import segments
    from ds_burst.core.step_plan import pair_ops

    p, s, rank, hkv = row["P"], row["S"], row["rank"], row["Hkv"]
    if row["schedule"] == "ulysses_ring":
        n, me, hq, kv = p // L, rank // L, HQ // L, max(hkv, L) // L
    elif row["schedule"] == "ulysses":  # the whole sequence at every rank: a ring of one
        n, me, hq, kv = 1, 0, HQ // p, max(hkv, p) // p
    else:
        n, me, hq, kv = p, rank, HQ, hkv
    segs = [segments("zigzag", r, n, s // n) for r in range(n)]
    ops = lambda i, j: len(pair_ops(segs[i], segs[j], True, (-1, 0)))
    fwd = sum(ops(me, j) for j in range(n))
    bwd = sum(ops(j, me) for j in range(n)) if choose_backward(hq, kv, D, 4) == "burst" else fwd
    return fwd, bwd, ops(me, me), n


def _check_rows(rows: list[dict]) -> None:
    for r in rows:
        assert "error" not in r, r
        for key in ("fwd_ms", "fwdbwd_ms", "fwd_host_ms", "fwdbwd_host_ms", "predicted_ms", "fwdbwd_tflops",
                    "ratio_to_predicted", "ratio_to_ulysses"):
            assert r[key] > 0, (key, r)
        if r["method"] == "ulysses-rank":
            assert r["Hq_local"] == HQ // r["P"] and r["Hkv_local"] == max(r["Hkv"], r["P"]) // r["P"], r
            continue
        fwd, bwd, local, blocks = expected_tiles(r)
        assert (r["tiles_fwd"], r["tiles_bwd"]) == (fwd, bwd), r  # what the kernel ran
        assert (r["plan_tiles_fwd"], r["plan_tiles_bwd"]) == (fwd, bwd), r  # what the benchmark's plan says
        assert fwd > local or blocks == 1, r  # the whole ring, not only the rank's own block


def test_emulated_ranks_run_their_whole_ring(tmp_path):
    rows = _bench(tmp_path, "all", "--world", "2", "4", "8", "--seqs", "64", "--kv-heads", "8", "2",
                  "--schedules", "ring", "double_ring", "ulysses_ring")
    # one node (P = 2 = L): the double ring is the flat ring, which runs once
    assert len(rows) == 2 * (3 + 4 + 4), [r["method"] for r in rows]
    _check_rows(rows)
    ran = {(r["method"], r["P"]): r["schedule"] for r in rows}
    assert ("ds-burst-torch-double_ring", 2) not in ran
    for p in (2, 4, 8):
        assert ran[("ds-burst-torch", p)] == "ring"
        if p > L:
            assert ran[("ds-burst-torch-double_ring", p)] == "double_ring"
        # inside one node ulysses_ring is Ulysses over the node, the whole group: a ring of one
        assert ran[("ds-burst-torch-ulysses_ring", p)] == ("ulysses_ring" if p > L else "ulysses")
    assert {r["rank"] for r in rows} == {0}  # causal zigzag: every rank has the same work, the lowest is taken
    assert {r["backward"] for r in rows if "backward" in r} == {"burst", "ring"}  # MHA and GQA both ran
    tiles = {r["P"]: r["tiles_fwd"] for r in rows if r["method"] == "ds-burst-torch"}
    assert tiles[2] < tiles[4] < tiles[8], tiles


def test_host_steps_mode(tmp_path):
    """``--host-steps``: one row per (P, mask, backward, phase) with the tile calls the timed calls made (causal
    zigzag: 3 local tiles and one per other rank; full: one per rank; backward as many again). No timing asserted."""
    rows = _bench(tmp_path, "host", "--host-steps", "--world", "2", "4", "--host-iters", "2")
    assert len(rows) == 2 * 2 * 2 * 2
    for r in rows:
        fwd = r["P"] + 2 if r["causal"] else r["P"]
        assert r["tiles"] == (fwd if r["phase"] == "fwd" else 2 * fwd), r
        assert r["host_us"] > 0 and r["kernel"] == "none" and r["backward"] in ("burst", "ring"), r


def _slow_ring_table(path: Path) -> dict:
    """A tile-rates file at this file's head dim whose ring tiles are 100x slower than its whole call."""
    from ds_burst.core.tile_rates import TILE_RATES_FORMAT

    pt = lambda r, t: [{"tokens": 16, "fwd_tflops": r, "bwd_tflops": r / 2}, {"tokens": 64, "fwd_tflops": t,  # noqa: E731
                                                                               "bwd_tflops": t / 2}]
    doc = {"format": TILE_RATES_FORMAT, "gpu": "test", "head_dim": D, "dtype": "float32",
           "curves": {"diag": {"torch": pt(1e-4, 2e-4)}, "step": {"torch": pt(1e-4, 2e-4)},
                      "whole": {"torch": pt(1e-2, 2e-2)}, "peer": {"sdpa-cpu": pt(3e-2, 4e-2)}}}
    path.write_text(json.dumps(doc))
    return doc


def test_emulated_rank_from_the_command_line(tmp_path):
    """Rank 3 of 4, contiguous; with a tile table (``--tiles``) every row's prediction is the cost model's compute
    term at that table and the kernel the row ran, and ``auto`` runs the schedule the table makes fastest."""
    from ds_burst.core import tile_rates
    from ds_burst.core.cost_model import Hardware, Problem, compute_seconds

    _slow_ring_table(tmp_path / "tiles.json")
    rows = _bench(tmp_path, "rank3", "--world", "4", "--rank", "3", "--seqs", "32", "--kv-heads", "2",
                  "--layout", "contiguous", "--schedules", "ring", "ulysses_ring", "auto",
                  "--tiles", str(tmp_path / "tiles.json"))
    assert len(rows) == 4 and {r["rank"] for r in rows} == {3}
    _check_rows(rows)
    hw = Hardware(tiles=tile_rates.read(str(tmp_path / "tiles.json")))
    by = {r["method"]: r for r in rows}
    assert by["ds-burst-torch-auto"]["schedule"] == "ulysses"  # the ring's tiles are the slow ones
    for r in rows:
        prob = Problem(32, 2, L, HQ, 2, D, 1, 4, True)
        f, b = compute_seconds(prob, r["schedule"], hw, peer=r["method"] == "ulysses-rank", kernel="torch")
        assert r["predicted_ms"] == pytest.approx((f + b) * 1e3, rel=1e-9), r


def test_default_rank_is_the_busiest():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import bench_emulate
    finally:
        sys.path.remove(str(ROOT / "launch"))
    assert bench_emulate.busiest_rank(4, 64, "zigzag") == 0  # causal zigzag: every rank sees as many keys
    assert bench_emulate.busiest_rank(4, 64, "contiguous") == 0  # the plan computes on zigzag shards all the same
    assert bench_emulate.busiest_rank(4, 12, "contiguous") == 3  # odd S_local stays contiguous: the last rank


_FAKE = r"""
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=2, world_size=4)

def refuse(*a, **k):
    raise AssertionError("a collective ran on the emulated group")

dist.all_gather = dist.all_gather_object = refuse  # the answers must not come from the fake backend
import ds_burst
from ds_burst.attention import validate
from ds_burst.dist import comm

info = comm.resolve_group(None)
assert comm.emulated(info) and comm.header_channel(info) is None
assert comm.all_gather_ints(info, [7, 8], torch.device("cpu")) == [[7, 8]] * 4
assert comm.all_gather_objects(info, "x") == ["x"] * 4
assert comm.exchange_header(info, [1, 2])[0] == [[1, 2]] * 4
topo = ds_burst.init_sequence_parallel(4, gpus_per_node=2, schedule="double_ring")
assert all(comm.emulated(g) for g in (topo.node_groups.intra, topo.node_groups.inter))
headers = []
validate.exchange_header = lambda *a, **k: headers.append(1) or refuse()
q, k, v = (torch.randn(1, 8, 4, 8, requires_grad=True) for _ in range(3))
for check in (True, False, "always"):
    out = ds_burst.burst_attn_func(q, k, v, kernel="torch", group=topo, check_inputs=check, check_finite=True)
    out.sum().backward()
assert headers == []
try:
    ds_burst.burst_attn_func(q, k, v, kernel="torch", position_ids=torch.arange(8))
except ValueError as exc:
    assert "emulated group" in str(exc), exc
else:
    raise AssertionError("position_ids ran on an emulated group")
print("EMULATED-OK")
"""


def test_shortcuts_on_a_fake_group_need_no_collective():
    proc = subprocess.run([sys.executable, "-c", _FAKE], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "EMULATED-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def _real_group_worker(rank: int, world: int) -> dict:
    import torch

    import ds_burst
    from ds_burst.attention import validate
    from ds_burst.dist import comm

    info = comm.resolve_group(None)
    topo = ds_burst.init_sequence_parallel(world, gpus_per_node=1, schedule="double_ring")
    groups = [info, comm.resolve_group(topo), topo.node_groups.intra, topo.node_groups.inter]
    headers = []
    exchange = validate.exchange_header
    validate.exchange_header = lambda *a, **k: headers.append(1) or exchange(*a, **k)
    q, k, v = (torch.randn(1, 8, 4, 8, requires_grad=True) for _ in range(3))
    ds_burst.burst_attn_func(q, k, v, kernel="torch").sum().backward()
    return {"emulated": [comm.emulated(g) for g in groups if g.world > 1],
            "channel": comm.header_channel(info) is info,
            "ints": comm.all_gather_ints(info, [10 * rank + 1], torch.device("cpu")),
            "objects": comm.all_gather_objects(info, f"rank{rank}"),
            "header": comm.exchange_header(info, [rank])[0], "headers": len(headers)}


def test_no_shortcut_on_real_gloo_ranks():
    for res in values(run_ranks(_real_group_worker, 2, timeout=120)):
        assert res["emulated"] and not any(res["emulated"]), res
        assert res["channel"] and res["headers"] == 1, res  # the per-call header round ran
        assert res["ints"] == [[1], [11]] and res["objects"] == ["rank0", "rank1"], res
        assert res["header"] == [[0], [1]], res


@pytest.mark.parametrize("schedule,nodes,per_node,hkv", [("ring", 1, 4, 8), ("ring", 2, 4, 2),
                                                         ("double_ring", 2, 4, 8), ("ulysses_ring", 4, 2, 2),
                                                         ("ulysses", 1, 8, 8)])
def test_compute_term_is_what_predict_charges_on_free_links(schedule, nodes, per_node, hkv):
    from dataclasses import replace

    from ds_burst.core.cost_model import Hardware, Problem, compute_seconds, predict

    prob = Problem(2**16, nodes, per_node, 16, hkv, 128)
    free = replace(Hardware(), intra_gbps=1e12, inter_gbps=1e12, a2a_intra_gbps=1e12, a2a_inter_gbps=1e12,
                   intra_latency_s=0.0, inter_latency_s=0.0, fwd_tflops_full=900.0)
    f, b = compute_seconds(prob, schedule, free, peer=schedule == "ulysses")
    got = [x for x in predict(prob, free) if x.schedule == schedule]
    assert got
    for x in got:
        assert x.fwd_ms == pytest.approx(f * 1e3, rel=1e-6) and x.bwd_ms == pytest.approx(b * 1e3, rel=1e-6), x
    with pytest.raises(ValueError, match="no compute term"):
        compute_seconds(prob, "nonsense", free)
