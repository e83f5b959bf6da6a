"""Topology (DeepSpeed mpu) groups and the burst_attention config section."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks, values
from ds_burst.attention.config import BurstConfig
from ds_burst.dist.topology import check_schedule, init_sequence_parallel


def _topology_worker(rank: int, world: int) -> dict:
    out: dict = {}
    try:
        init_sequence_parallel(3)
    except ValueError as e:
        out["bad_size"] = str(e)
    try:
        init_sequence_parallel(4, gpus_per_node=3, schedule="double_ring")
    except ValueError as e:
        out["bad_schedule"] = str(e)
    try:  # ranks disagree on the node size
        init_sequence_parallel(2, gpus_per_node=2 if rank < 2 else 4)
    except ValueError as e:
        out["bad_agree"] = str(e)
    import socket

    real = socket.gethostname
    socket.gethostname = lambda: "host-a" if rank < 2 else "host-b"  # two hosts of 2 ranks
    try:
        try:  # a declared node of 4 ranks spans both hosts
            init_sequence_parallel(2, gpus_per_node=4)
        except ValueError as e:
            out["bad_hosts"] = str(e)
        out["hosts_ok"] = init_sequence_parallel(4, gpus_per_node=2, schedule="double_ring").schedule
    finally:
        socket.gethostname = real
    topo = init_sequence_parallel(2, gpus_per_node=4)
    out["sp"] = (topo.get_sequence_parallel_rank(), topo.get_sequence_parallel_world_size())
    out["dp"] = (topo.get_data_parallel_rank(), topo.get_data_parallel_world_size())
    out["sdp"] = (topo.get_sequence_data_parallel_rank(), topo.get_sequence_data_parallel_world_size())
    out["mp"] = (topo.get_model_parallel_rank(), topo.get_model_parallel_world_size())
    # Group members, seen through collectives on each group.
    for name, g in (("sp_members", topo.get_sequence_parallel_group()), ("dp_members", topo.get_data_parallel_group()),
                    ("sdp_members", topo.get_sequence_data_parallel_group()),
                    ("mp_members", topo.get_model_parallel_group())):
        t = torch.tensor([rank])
        parts = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(g))]
        dist.all_gather(parts, t, group=g)
        out[name] = [int(p) for p in parts]
    out["sp_ranks"] = topo.get_sequence_parallel_group_ranks()
    out["dp_ranks"] = topo.get_data_parallel_group_ranks()
    out["gpus_per_node"] = topo.gpus_per_node
    out["schedule"] = topo.schedule
    return out


def test_topology_groups_four_ranks():
    res = values(run_ranks(_topology_worker, 4, timeout=120))
    for r, o in enumerate(res):
        assert "must divide the world size 4" in o["bad_size"]
        assert "whole nodes" in o["bad_schedule"]
        assert "gpus_per_node differs across ranks: rank 0: 2, rank 1: 2, rank 2: 4, rank 3: 4" in o["bad_agree"]
        assert "ranks 0..3 in one node, but they run on hosts ['host-a', 'host-b']" in o["bad_hosts"]
        assert o["hosts_ok"] == "double_ring"  # nodes that match the hosts are fine
        assert o["sp"] == (r % 2, 2) and o["dp"] == (r // 2, 2)
        assert o["sdp"] == (r, 4) and o["mp"] == (0, 1)
        assert o["sp_members"] == o["sp_ranks"] == [r - r % 2, r - r % 2 + 1]
        assert o["dp_members"] == o["dp_ranks"] == [r % 2, r % 2 + 2]
        assert o["sdp_members"] == [0, 1, 2, 3]
        assert o["mp_members"] == [r]
        assert o["gpus_per_node"] == 4 and o["schedule"] == "ring"


def test_schedule_names():
    assert check_schedule("auto") == "ring" and check_schedule("ring") == "ring"
    assert check_schedule("auto", 8, 4) == "auto" and check_schedule("double_ring", 4, 8) == "ring"
    assert check_schedule("ring", 8, 4) == "ring"
    with pytest.raises(ValueError, match="whole nodes"):
        check_schedule("double_ring", 6, 4)
    assert check_schedule("ulysses_ring", 8, 4) == "ulysses_ring"
    with pytest.raises(ValueError, match="unknown schedule"):
        check_schedule("tree")


def test_init_without_distributed_raises():
    if dist.is_initialized():
        pytest.skip("torch.distributed already initialised in this process")
    with pytest.raises(RuntimeError, match="init_distributed"):
        init_sequence_parallel(1)


def test_config_defaults_and_top_level_sp(tmp_path):
    cfg = BurstConfig.from_ds_config({"sequence_parallel_size": 4})
    assert cfg.sequence_parallel_size == 4 and cfg.enabled and cfg.layout == "zigzag" and cfg.schedule == "auto"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"burst_attention": {"backward": "ring", "window_size": [128, 0]}}))
    cfg = BurstConfig.from_ds_config(str(path))
    assert cfg.backward == "ring" and cfg.window_size == (128, 0) and cfg.sequence_parallel_size == 1
    assert cfg.attn_kwargs()["window_size"] == (128, 0)
    assert BurstConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "section, key",
    [
        ({"sequence_paralel_size": 2}, "unknown key"),
        ({"layout": "striped"}, "burst_attention.layout"),
        ({"backward": "fast"}, "burst_attention.backward"),
        ({"kernel": "cuda"}, "burst_attention.kernel"),
        ({"schedule": "tree"}, "burst_attention.schedule"),
        ({"enabled": "yes"}, "burst_attention.enabled"),
        ({"gpus_per_node": 0}, "burst_attention.gpus_per_node"),
        ({"window_size": [5]}, "burst_attention.window_size"),
        ({"sequence_parallel_size": 8}, "disagrees"),
    ],
)
def test_config_rejects(section, key):
    with pytest.raises(ValueError, match=key):
        BurstConfig.from_ds_config({"sequence_parallel_size": 2, "burst_attention": section})
    with pytest.raises(ValueError, match="sequence_parallel_size"):
        BurstConfig.from_ds_config({"sequence_parallel_size": 0})
