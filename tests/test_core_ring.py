"""Distributed tests on real gloo ranks: gathered outputs and every gradient against a full-sequence
float64 reference, bf16/fp32 error against single-process attention, byte counters, bad input.

Each group size is spawned once (spawning is the slow part); every case runs inside that one launch and
the parametrised tests read its results.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_ranks, values
from kernel_utils import ref_grads, rel

WORLDS = [1, 2, 3, 4, 8]
HQ = 8
# (causal, window) families; window sizes are in units of S_local, resolved per case
MASKS = {
    "causal": (True, None),
    "full": (False, None),
    "causal_window": (True, (1.5, 0)),
    "window": (False, (0.7, 1.2)),
}
CASES = [
    (mask, layout, backward, hkv)
    for mask, layout, backward, hkv in itertools.product(MASKS, ["zigzag", "contiguous"], ["burst", "ring"],
                                                          [HQ, HQ // 4, 1])
]
HEAD_DIMS = [32, 64, 80, 128]


def _inputs(world, case_idx, hkv, d, dtype, batch=2, per_rank=6):
    g = torch.Generator().manual_seed(1000 + 17 * case_idx + world)
    s = per_rank * world
    mk = lambda h: torch.randn(batch, s, h, d, generator=g, dtype=torch.float64)
    q, k, v, do = mk(HQ), mk(hkv), mk(hkv), mk(HQ)
    return q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype)


def _resolve_mask(mask, s_local):
    causal, w = MASKS[mask]
    if w is None:
        return causal, (-1, -1)
    return causal, (int(w[0] * s_local), int(w[1] * s_local))


def _run_case(q, k, v, do, causal, window, layout, backward, kernel="torch"):
    """Run the distributed call on this rank's shards; returns gathered (out, dq, dk, dv)."""
    import ds_burst

    ql, kl, vl = (ds_burst.shard_sequence(x, 1, layout=layout).requires_grad_() for x in (q, k, v))
    out = ds_burst.burst_attn_func(ql, kl, vl, causal=causal, window_size=window, layout=layout,
                                   backward=backward, kernel=kernel)
    out.backward(ds_burst.shard_sequence(do, 1, layout=layout))
    with torch.no_grad():
        return [ds_burst.gather_sequence(t, 1, layout=layout) for t in (out, ql.grad, kl.grad, vl.grad)]


def worker_float64(rank, world, wanted=None):
    errs = {}
    for idx, (mask, layout, backward, hkv) in enumerate(CASES):
        if wanted is not None and (mask, layout, backward, hkv) not in wanted:
            continue
        d = HEAD_DIMS[idx % len(HEAD_DIMS)]
        q, k, v, do = _inputs(world, idx, hkv, d, torch.float64)
        causal, window = _resolve_mask(mask, q.shape[1] // world)
        got = _run_case(q, k, v, do, causal, window, layout, backward)
        ref = ref_grads(q, k, v, do, causal=causal, window=window)
        errs[(mask, layout, backward, hkv)] = max(rel(a, b) for a, b in zip(got, ref))
    return errs


def worker_main(rank, world, wanted=None, with_bf16=False):
    """The float64 cases of this group size and, at P=8, the bf16 ring too (one 8-rank launch for both)."""
    out = {"float64": worker_float64(rank, world, wanted)}
    if with_bf16:
        out["bf16"] = worker_bf16_large_ring(rank, world)
    return out


@functools.cache
def _launch(world, wanted):
    return values(run_ranks(worker_main, world, wanted, world == 8, timeout=900))


def _float64_results(world, wanted):
    return [r["float64"] for r in _launch(world, wanted)]


@pytest.fixture(scope="session")
def float64_selection(request: pytest.FixtureRequest) -> dict[int, frozenset]:
    """The cases each group size runs in this session (all of them in the whole suite, one in the fast tier):
    one launch per group size computes just those."""
    chosen: dict[int, set] = {}
    for item in request.session.items:
        if getattr(item, "originalname", "") == "test_float64_matches_reference":
            chosen.setdefault(item.callspec.params["world"], set()).add(item.callspec.params["case"])
    return {w: frozenset(c) for w, c in chosen.items()}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_float64_matches_reference(world, case, float64_selection):
    """Gathered output and dq, dk, dv within 1e-10 of the float64 full-sequence reference, on every rank."""
    for rank_errs in _float64_results(world, float64_selection[world]):
        assert rank_errs[case] < 1e-10, rank_errs[case]


# --------------------------------------------------------------------------------- low precision

LOW_CASES = [
    ("causal", "zigzag", "burst", HQ),
    ("causal_window", "contiguous", "ring", 2),
    ("full", "zigzag", "burst", 1),
]


def _sdpa_single(q, k, v, do, causal, window):
    """Single-process attention in the inputs' dtype (torch SDPA), for the error baseline."""
    from ds_burst.kernels.reference import visible_mask

    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    s = q.shape[1]
    mask = visible_mask(0, s, 0, s, causal, window, q.device)
    out = F.scaled_dot_product_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True).transpose(1, 2)
    out.backward(do)
    return [out.detach(), qf.grad, kf.grad, vf.grad]


def worker_low_precision(rank, world):
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        for idx, (mask, layout, backward, hkv) in enumerate(LOW_CASES):
            q, k, v, do = _inputs(world, idx, hkv, 64, dtype, per_rank=32)
            causal, window = _resolve_mask(mask, q.shape[1] // world)
            got = _run_case(q, k, v, do, causal, window, layout, backward)
            single = _sdpa_single(q, k, v, do, causal, window)
            ref = ref_grads(q, k, v, do, causal=causal, window=window)
            res[(str(dtype), mask)] = [(rel(a, r), rel(b, r)) for a, b, r in zip(got, single, ref)]
    return res


def _rounding_kernel():
    """The PyTorch tiles, but rounding the carried output to bf16 after every ring step: the defect that makes
    errors grow with the ring size (what ds-burst avoids by carrying fp32 state). A registered kernel."""
    import functools
    import types

    from ds_burst.kernels import reference

    @functools.wraps(reference.fwd_step)
    def fwd_step(q, k, v, out, lse, **kw):
        reference.fwd_step(q, k, v, out, lse, **kw)
        out.copy_(out.to(torch.bfloat16))

    impl = types.SimpleNamespace(fwd_step=fwd_step, bwd_preprocess=reference.bwd_preprocess,
                                 bwd_step=reference.bwd_step)
    return dataclasses.replace(reference.KERNEL, name="rounding", impl=impl)


def worker_bf16_large_ring(rank, world):
    """bf16 at P=8: ds-burst's error against float64, single-process SDPA's, and a per-step-rounding ring's;
    plus the floor: the exact output rounded once to bf16."""
    from ds_burst.kernels import registry

    registry.register(_rounding_kernel())
    res = {}
    for idx, mask in enumerate(("causal", "full")):
        q, k, v, do = _inputs(world, 50 + idx, HQ, 64, torch.bfloat16, batch=1, per_rank=64)
        causal, window = _resolve_mask(mask, q.shape[1] // world)
        ref = ref_grads(q, k, v, do, causal=causal, window=window)
        single = _sdpa_single(q, k, v, do, causal, window)
        got = _run_case(q, k, v, do, causal, window, "zigzag", "burst")
        bad = _run_case(q, k, v, do, causal, window, "zigzag", "burst", kernel="rounding")
        res[mask] = {"errs": [(rel(a, r), rel(b, r)) for a, b, r in zip(got, single, ref)],
                     "floor": rel(ref[0].to(torch.bfloat16), ref[0]), "ours_out": rel(got[0], ref[0]),
                     "bad_out": rel(bad[0], ref[0])}
    return res


def test_bf16_at_p8_within_2x_and_per_step_rounding_is_caught(float64_selection):
    """P=8, bf16: every gathered tensor within 2x of single-process SDPA's error, and the output within 1.2x of
    the floor (the exact output rounded once to bf16) -- which a ring that rounds its partial output to bf16
    after each step fails (measured: ~1.4x the floor), so this check catches per-step rounding. Runs in the
    launch of the P=8 float64 cases."""
    for rank_res in (r["bf16"] for r in _launch(8, float64_selection.get(8, frozenset()))):
        for mask, r in rank_res.items():
            for name, (ours, single) in zip(["out", "dq", "dk", "dv"], r["errs"]):
                assert ours <= 2 * single, (mask, name, ours, single)
            assert r["ours_out"] <= 1.2 * r["floor"], (mask, r)
            assert r["bad_out"] > 1.2 * r["floor"], (mask, r)  # the check is sensitive to the defect


@pytest.mark.parametrize("world", [2, 4])
def test_low_precision_within_2x_of_single_process(world):
    for rank_res in values(run_ranks(worker_low_precision, world, timeout=600)):
        for key, pairs in rank_res.items():
            for name, (dist_err, single_err) in zip(["out", "dq", "dk", "dv"], pairs):
                assert dist_err <= 2 * single_err + 1e-7, (key, name, dist_err, single_err)


# --------------------------------------------------------------------------------- byte counters


def worker_bytes(rank, world):
    import ds_burst

    out = {}
    b, s, d = 1, 8, 16
    for name, hq, hkv, backward, window in [
        ("mha_burst", 8, 8, "burst", (-1, -1)),
        ("mha_ring", 8, 8, "ring", (-1, -1)),
        ("gqa_auto", 8, 2, "auto", (-1, -1)),
        ("gqa_ring", 8, 2, "ring", (-1, -1)),
        ("gqa_burst", 8, 2, "burst", (-1, -1)),
        ("window_one_hop", 8, 8, "burst", (s, 0)),
    ]:
        g = torch.Generator().manual_seed(7)
        q = torch.randn(b, s, hq, d, generator=g).requires_grad_()
        k = torch.randn(b, s, hkv, d, generator=g).requires_grad_()
        v = torch.randn(b, s, hkv, d, generator=g).requires_grad_()
        ds_burst.reset_comm_stats()
        o = ds_burst.burst_attn_func(q, k, v, causal=True, window_size=window, layout="contiguous", backward=backward)
        o.sum().backward()
        out[name] = ds_burst.comm_stats()
    return out


def test_comm_volume_burst_vs_ring():
    world = 4
    stats = values(run_ranks(worker_bytes, world, timeout=300))[0]
    b, s, d, e = 1, 8, 16, 4  # fp32 inputs
    hops = world - 1
    # forward: K and V of every other rank, once
    assert stats["mha_burst"]["fwd"] == hops * 2 * b * s * 8 * d * e
    # Burst backward sends fewer bytes than the K/V/dK/dV ring for MHA ...
    assert stats["mha_burst"]["bwd"] < stats["mha_ring"]["bwd"]
    assert stats["mha_burst"]["bwd"] == hops * b * s * 8 * (2 * d * e + 8 + 4 * d)
    assert stats["mha_ring"]["bwd"] == hops * b * s * 8 * (2 * d * e + 8 * d)
    # ... and "auto" picks the cheaper one for GQA (the ring pattern)
    assert stats["gqa_burst"]["bwd"] > stats["gqa_ring"]["bwd"]
    assert stats["gqa_auto"]["bwd"] == stats["gqa_ring"]["bwd"]
    # a causal window within one shard: one forward hop and one backward hop, whatever P is
    assert stats["window_one_hop"]["fwd"] == 2 * b * s * 8 * d * e


# --------------------------------------------------------------------------------- bad input


def _bad_case(rank, name):
    """Per-rank inputs for a bad-input case: (q, k, v, kwargs)."""
    g = torch.Generator().manual_seed(3)
    r = lambda *shape, dt=torch.float32: torch.randn(*shape, generator=g).to(dt)
    q, k, v = r(1, 8, 4, 16), r(1, 8, 2, 16), r(1, 8, 2, 16)
    kw = dict(causal=True, layout="zigzag")
    if name == "s_local_differs":
        if rank == 1:
            q, k, v = r(1, 10, 4, 16), r(1, 10, 2, 16), r(1, 10, 2, 16)
    elif name == "zigzag_odd":
        q, k, v = r(1, 7, 4, 16), r(1, 7, 2, 16), r(1, 7, 2, 16)
    elif name == "heads_not_divisible":
        k, v = r(1, 8, 3, 16), r(1, 8, 3, 16)
    elif name == "head_dim_mismatch":
        k, v = r(1, 8, 2, 8), r(1, 8, 2, 8)
    elif name == "dtype_mismatch":
        k = k.double()
    elif name == "dtype_differs_across_ranks":
        if rank == 1:
            q, k, v = q.double(), k.double(), v.double()
    elif name == "device_mismatch":
        v = v.to("meta")
    elif name == "unknown_layout":
        kw["layout"] = "spiral"
    elif name == "unknown_backward":
        kw["backward"] = "both"
    elif name == "unknown_kernel":
        kw["kernel"] = "cuda-magic"
    elif name == "window_conflicts_causal":
        kw["window_size"] = (4, 4)
    elif name == "one_rank_bad_window":
        if rank == 1:
            kw["window_size"] = (-5, 0)
    elif name == "causal_differs":
        kw["causal"] = rank == 0
    elif name == "empty":
        q, k, v = q[:, :0], k[:, :0], v[:, :0]
    elif name == "not_a_tensor":
        k = "keys"
    elif name == "schedule_needs_topology":
        kw["schedule"] = "double_ring"
    elif name == "nan_on_one_rank":
        kw["check_finite"] = True
        if rank == 1:
            k = k.clone()
            k[0, 1, 0, 3] = float("nan")
    elif name == "inf_on_one_rank_no_collective":
        kw.update(check_finite=True, check_inputs=False)  # check_finite still checks on every rank
        if rank == 0:
            q = q.clone()
            q[0, 0, 0, 0] = float("inf")
    return q, k, v, kw


BAD = {
    "s_local_differs": (ValueError, "S_local differs"),
    "zigzag_odd": (ValueError, "2P"),
    "heads_not_divisible": (ValueError, "Hq % Hkv"),
    "head_dim_mismatch": (ValueError, "head dim"),
    "dtype_mismatch": (ValueError, "dtypes differ"),
    "dtype_differs_across_ranks": (ValueError, "dtype differs"),
    "device_mismatch": (ValueError, "devices differ"),
    "unknown_layout": (ValueError, "unknown layout"),
    "unknown_backward": (ValueError, "unknown backward"),
    "unknown_kernel": (ValueError, "unknown kernel"),
    "window_conflicts_causal": (ValueError, "conflicts with causal"),
    "one_rank_bad_window": (ValueError, "rank 1: window_size"),
    "causal_differs": (ValueError, "causal differs"),
    "empty": (ValueError, "empty input"),
    "not_a_tensor": (TypeError, "must be a torch.Tensor"),
    "schedule_needs_topology": (ValueError, "needs group=<topology"),
    "nan_on_one_rank": (ValueError, "rank 1: k contains 1 NaN/Inf"),
    "inf_on_one_rank_no_collective": (ValueError, "rank 0: q contains 1 NaN/Inf"),
}


def worker_bad_inputs(rank, world):
    import ds_burst

    seen = {}
    for name in BAD:
        q, k, v, kw = _bad_case(rank, name)
        try:
            ds_burst.burst_attn_func(q, k, v, **kw)
            seen[name] = ("no error", "")
        except (ValueError, TypeError) as exc:
            seen[name] = (type(exc).__name__, str(exc))
    # the group is still usable afterwards
    q, k, v, kw = _bad_case(rank, "none")
    ds_burst.burst_attn_func(q, k, v, **kw)
    return seen


@functools.cache
def _bad_results():
    return values(run_ranks(worker_bad_inputs, 2, timeout=300))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_on_every_rank(name):
    exc, match = BAD[name]
    for rank, seen in enumerate(_bad_results()):
        kind, msg = seen[name]
        assert kind == exc.__name__, (rank, kind, msg)
        assert match in msg, (rank, msg)


def worker_nonfinite_grad(rank, world):
    import ds_burst

    q, k, v, kw = _bad_case(rank, "none")
    q.requires_grad_()
    out = ds_burst.burst_attn_func(q, k, v, check_finite=True, **kw)
    dout = torch.ones_like(out)
    if rank == 1:
        dout[0, 0, 0, 0] = float("nan")
    try:
        out.backward(dout)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_nonfinite_output_gradient_raises_on_every_rank():
    for msg in values(run_ranks(worker_nonfinite_grad, 2, timeout=120)):
        assert "rank 1: the output gradient of attention contains 1 NaN/Inf" in msg, msg


# --------------------------------------------------------------------------------- determinism


def worker_repeat(rank, world):
    import ds_burst

    grads = []
    for _ in range(2):
        g = torch.Generator().manual_seed(11)
        q = torch.randn(2, 10, 4, 16, generator=g).requires_grad_()
        k = torch.randn(2, 10, 2, 16, generator=g).requires_grad_()
        v = torch.randn(2, 10, 2, 16, generator=g).requires_grad_()
        out = ds_burst.burst_attn_func(q, k, v, causal=True, layout="contiguous", deterministic=True)
        out.backward(torch.ones_like(out))
        grads.append([out.detach(), q.grad, k.grad, v.grad])
    return all(torch.equal(a, b) for a, b in zip(*grads))


def test_repeated_runs_are_bitwise_identical():
    assert all(values(run_ranks(worker_repeat, 3, timeout=300)))


# --------------------------------------------------------------------------------- other local kernels

KERNEL_CASES = [
    # (causal, window, layout, backward, hkv)
    (True, (-1, -1), "zigzag", "auto", 2),
    (False, (-1, -1), "contiguous", "ring", 1),
    (True, (5, 0), "contiguous", "auto", 2),
    (False, (3, 2), "zigzag", "ring", 2),
]


def worker_kernels(rank, world, kernel):
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # Triton kernels on CPU tensors (set before triton is imported)
    dtype = torch.float32 if kernel == "triton" else torch.float64
    errs = []
    for idx, (causal, window, layout, backward, hkv) in enumerate(KERNEL_CASES):
        g = torch.Generator().manual_seed(idx)
        s = 8 * world
        q, k, v, do = (torch.randn(1, s, h, 16, generator=g, dtype=torch.float64) for h in (2, hkv, hkv, 2))
        got = _run_case(q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype), causal, window, layout, backward,
                        kernel=kernel)
        ref = ref_grads(q, k, v, do, causal=causal, window=window)
        errs.append(max(rel(a, b) for a, b in zip(got, ref)))
    return errs


@pytest.mark.parametrize("kernel,tol", [("triton", 1e-5), ("sdpa", 1e-10)])
def test_ring_with_other_kernels(kernel, tol):
    """The whole ring on gloo ranks with the Triton tiles (interpreter, fp32) and the fused-op tiles (fp64)."""
    for rank_errs in values(run_ranks(worker_kernels, 2, kernel, timeout=600)):
        for case, err in zip(KERNEL_CASES, rank_errs):
            assert err < tol, (case, err)
