"""Soak: 220 training steps of launch/train.py (configs/cpu_soak.json: ZeRO-3, SP=2, tiny model) on 2 gloo ranks,
run in-process through ``train.main``, with memory sampled on every rank.

A test-side hook on ``ds_burst.reset_comm_stats`` (train.py calls it once at the start of every step) records
every SAMPLE_EVERY steps: the resident set size (/proc/self/statm), the number of Python objects tracked by the
garbage collector and the number of live ``torch.Tensor`` objects among them. After WARMUP steps nothing may grow:

- RSS: the last sample exceeds the first post-warm-up sample by at most RSS_GROWTH_MIB (about 45 KiB per step),
  and the least-squares slope over the post-warm-up samples is below RSS_SLOPE_KIB_PER_STEP (measured: about
  1 MiB over 180 steps, 5-7 KiB/step, part of it train.py's per-step metrics history, which it keeps by design);
- live tensors: no more than TENSOR_GROWTH more than at the end of warm-up (a tensor kept per step adds 200);
- Python objects: no more than OBJECT_GROWTH more.
"""

from __future__ import annotations

import os
import sys

import pytest

from dist_utils import run_ranks, values

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 220
SAMPLE_EVERY = 20
WARMUP = 40
RSS_GROWTH_MIB = 8.0
RSS_SLOPE_KIB_PER_STEP = 32.0
TENSOR_GROWTH = 20
OBJECT_GROWTH = 2000


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker_soak(rank: int, world: int, out_dir: str) -> list[dict]:
    import gc

    import torch

    import ds_burst

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "WANDB_MODE": "disabled"})
    sys.path.insert(0, os.path.join(REPO, "launch"))
    import train

    samples: list[dict] = []
    orig = ds_burst.reset_comm_stats
    step = [0]

    def sampling_reset() -> None:
        if step[0] % SAMPLE_EVERY == 0:
            gc.collect()
            objs = gc.get_objects()
            tensors = sum(1 for o in objs if isinstance(o, torch.Tensor))
            samples.append({"step": step[0], "rss_mib": _rss_mib(), "objects": len(objs), "tensors": tensors})
            del objs
        step[0] += 1
        orig()

    ds_burst.reset_comm_stats = sampling_reset
    try:
        summary = train.main(["--config", os.path.join(REPO, "configs/cpu_soak.json"), "--override",
                              f"train.output_dir={out_dir}"])
    finally:
        ds_burst.reset_comm_stats = orig
    assert summary["steps_run"] == STEPS
    samples.append({"step": STEPS, "rss_mib": _rss_mib(), "objects": None, "tensors": None,
                    "final_loss": summary["final_loss"], "first_loss": summary["first_loss"]})
    return samples


@pytest.fixture(scope="module")
def soak(tmp_path_factory) -> list[list[dict]]:
    return values(run_ranks(worker_soak, 2, str(tmp_path_factory.mktemp("soak")), timeout=400))


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@pytest.mark.parametrize("rank", [0, 1])
def test_soak_memory_is_stable(soak, rank):
    samples = soak[rank]
    assert samples[-1]["step"] == STEPS and len(samples) == STEPS // SAMPLE_EVERY + 1
    assert samples[-1]["final_loss"] < samples[-1]["first_loss"]  # it trained
    post = [s for s in samples if s["step"] >= WARMUP]
    base = post[0]
    rss = [s["rss_mib"] for s in post]
    growth = rss[-1] - base["rss_mib"]
    slope_kib = _slope([s["step"] for s in post], rss) * 1024
    counted = [s for s in post if s["tensors"] is not None]
    d_tensors = max(s["tensors"] for s in counted) - base["tensors"]
    d_objects = max(s["objects"] for s in counted) - base["objects"]
    print(f"\n[soak] rank {rank}: RSS {samples[0]['rss_mib']:.1f} MiB at step 0, {base['rss_mib']:.1f} at step "
          f"{WARMUP}, {rss[-1]:.1f} at step {STEPS} (growth {growth:+.2f} MiB, slope {slope_kib:+.2f} KiB/step); "
          f"tensors {base['tensors']} -> max {base['tensors'] + d_tensors}; objects {base['objects']} -> max "
          f"{base['objects'] + d_objects}")
    assert growth <= RSS_GROWTH_MIB, rss
    assert slope_kib <= RSS_SLOPE_KIB_PER_STEP, rss
    assert d_tensors <= TENSOR_GROWTH, [s["tensors"] for s in counted]
    assert d_objects <= OBJECT_GROWTH, [s["objects"] for s in counted]
