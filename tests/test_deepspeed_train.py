"""Sequence parallelism under DeepSpeed ZeRO-3 gives the SP=1 losses and gradients.

Runs tests/ds_equivalence_worker.py under the DeepSpeed launcher (CPU ranks, gloo): SP=1 on 1 rank with
full-sequence attention (micro batch 2) is the reference; SP=2 on 2 ranks (micro batch 2) and dp=2 x sp=2
on 4 ranks (micro batch 1 each: the same 2 samples per step) must match it for 3 optimizer steps, with
activation checkpointing off and on (torch.utils.checkpoint and deepspeed.checkpointing), with ZeRO-3's
reduce-scatter (DeepSpeed < 0.20.2 averages over the SP ranks); ZeRO-3's non-contiguous all-reduce path (which
averages too) and ZeRO-2 (which sums) are checked by tests/test_deepspeed_convention.py. The worker scales the
loss per ``sp_grads_averaged(config)``, so a wrong convention leaves every gradient off by a factor 2 and fails
the comparison (each reference gradient is checked to be non-zero); tests/test_deepspeed_convention.py covers
every ZeRO stage and path in one backward.

Tolerances (fp32): loss relative 1e-5; every gradient tensor max |diff| <= 1e-4 * max |reference| (measured:
~7e-7 at step 1, ~2e-5 after two Adam steps).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from launch_utils import deepspeed_launch

from ds_burst.training.data import write_token_file

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
WORKER = "tests/ds_equivalence_worker.py"

RUNS = {
    "sp1": (1, ["--sp", "1", "--mbs", "2"]),
    "sp2": (2, ["--sp", "2", "--mbs", "2"]),
    "dp2_sp2": (4, ["--sp", "2", "--mbs", "1"]),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("equiv")
    data = d / "tokens.bin"
    write_token_file(data, np.random.default_rng(0).integers(0, 64, size=4096))
    out = {}
    for name, (n, args) in RUNS.items():
        path = d / f"{name}.pt"
        deepspeed_launch(n, WORKER, [*args, "--data", str(data), "--out", str(path)], timeout=300)
        out[name] = torch.load(path)
    return out


def _compare(ref: dict, got: dict) -> None:
    assert len(ref["losses"]) == len(got["losses"]) == 3
    for step, (a, b) in enumerate(zip(ref["losses"], got["losses"])):
        assert abs(a - b) <= LOSS_RTOL * abs(a), f"step {step}: loss {b} vs SP=1 {a}"
    for step, (ga, gb) in enumerate(zip(ref["grads"], got["grads"])):
        assert ga.keys() == gb.keys()
        for name in ga:
            err = float((ga[name] - gb[name]).abs().max())
            scale = float(ga[name].abs().max())
            assert scale > 0, f"step {step} {name}: zero reference gradient (the comparison could not fail)"
            assert err <= GRAD_RTOL * scale, f"step {step} {name}: grad diff {err:.3g} (max |grad| {scale:.3g})"


@pytest.mark.parametrize("ckpt", ["off", "torch", "deepspeed"])
@pytest.mark.parametrize("run", ["sp2", "dp2_sp2"])  # ZeRO-0/1/2 and the other ZeRO-3 paths (the non-contiguous
# all-reduce included): tests/test_deepspeed_convention.py (one backward each against SP=1)
def test_matches_sp1(results, run, ckpt):
    key = f"ckpt={ckpt}"
    assert results[run]["world"] == RUNS[run][0]
    _compare(results["sp1"][key], results[run][key])


@pytest.mark.parametrize("run", ["sp1", "sp2", "dp2_sp2"])
@pytest.mark.parametrize("impl", ["torch", "deepspeed"])
def test_checkpointing_does_not_change_gradients(results, run, impl):
    _compare(results[run]["ckpt=off"], results[run][f"ckpt={impl}"])
