"""Attention variants of today's open models against float64 references: logit softcapping (Gemma 2), attention
sinks (GPT-OSS, with d sinks), a value head dim different from the q/k head dim (MLA, DeepSeek-V3), and their
combination, on 1-4 gloo ranks, both layouts, both backward patterns, windows and GQA; kernel fallbacks; and the
cases that used to be silently wrong (NaN propagation, mismatched shards with ``check_inputs=False``, a launcher
world without a process group).

Each group size is spawned once; every case runs inside that launch and the parametrised tests read its results.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_ranks, values
from kernel_utils import ref_grads, rel

WORLDS = [1, 2, 3, 4]
HQ = 4
D, DV = 16, 8
MASKS = {
    "causal": (True, None),
    "full": (False, None),
    "causal_window": (True, (1.5, 0)),
    "window": (False, (0.7, 1.2)),
}
VARIANTS = {  # (softcap, sinks, value head dim)
    "softcap": (2.0, False, D),
    "softcap50": (50.0, False, D),
    "sinks": (None, True, D),
    "mla": (None, False, DV),
    "all": (3.0, True, DV),
}
CASES = [
    (mask, layout, backward, hkv, variant)
    for mask, layout, backward, hkv in itertools.product(MASKS, ["zigzag", "contiguous"], ["burst", "ring"], [HQ, 2])
    for variant in (["softcap", "sinks", "mla", "all"] if hkv == HQ else ["softcap50", "all"])
]
CASE_IDS = ["-".join(map(str, c)) for c in CASES]
TOL64 = 1e-10


def _inputs(world, idx, hkv, dv, with_sinks, dtype=torch.float64, batch=2, per_rank=4):
    g = torch.Generator().manual_seed(500 + 31 * idx + world)
    s = per_rank * world
    q = torch.randn(batch, s, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(batch, s, hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(batch, s, hkv, dv, generator=g, dtype=torch.float64)
    do = torch.randn(batch, s, HQ, dv, generator=g, dtype=torch.float64)
    sinks = torch.randn(HQ, generator=g, dtype=torch.float64) * 2 if with_sinks else None
    q, k = q * 1.5, k * 1.5  # larger scores: the softcap bites
    cast = lambda x: None if x is None else x.to(dtype)
    return cast(q), cast(k), cast(v), cast(do), cast(sinks)


def _mask(mask, s_local):
    causal, w = MASKS[mask]
    if w is None:
        return causal, (-1, -1)
    return causal, (int(w[0] * s_local), int(w[1] * s_local))


def _distributed(q, k, v, do, sinks, causal, window, layout, backward, softcap, kernel="torch"):
    """This rank's call on its shards; returns gathered out, dq, dk, dv and the all-reduced d sinks."""
    import torch.distributed as dist

    import ds_burst

    ql, kl, vl = (ds_burst.shard_sequence(x, 1, layout=layout).requires_grad_() for x in (q, k, v))
    sl = None if sinks is None else sinks.clone().requires_grad_()
    out = ds_burst.burst_attn_func(ql, kl, vl, causal=causal, window_size=window, layout=layout, backward=backward,
                                   kernel=kernel, softcap=softcap, sinks=sl)
    out.backward(ds_burst.shard_sequence(do, 1, layout=layout))
    with torch.no_grad():
        got = [ds_burst.gather_sequence(t, 1, layout=layout) for t in (out, ql.grad, kl.grad, vl.grad)]
        ds = None
        if sl is not None:
            ds = sl.grad.clone()
            if dist.is_initialized():
                dist.all_reduce(ds)  # each rank holds its queries' part
    return got + [ds]


def worker_float64(rank, world):
    errs = {}
    for idx, (mask, layout, backward, hkv, variant) in enumerate(CASES):
        softcap, with_sinks, dv = VARIANTS[variant]
        q, k, v, do, sinks = _inputs(world, idx, hkv, dv, with_sinks)
        causal, window = _mask(mask, q.shape[1] // world)
        got = _distributed(q, k, v, do, sinks, causal, window, layout, backward, softcap)
        ref = ref_grads(q, k, v, do, sinks=sinks, causal=causal, window=window, softcap=softcap)
        errs[CASE_IDS[idx]] = [None if r is None else rel(g, r) for g, r in zip(got, ref)]
    return errs


@functools.cache
def _float64_results(world):
    return values(run_ranks(worker_float64, world, timeout=600))[0]


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("world", WORLDS)
def test_variants_float64(world, case):
    errs = _float64_results(world)[case]
    names = ["out", "dq", "dk", "dv", "dsinks"]
    for name, e in zip(names, errs):
        if e is not None:
            assert e < TOL64, f"{name}: relative error {e:.3e} (world={world}, {case})"


def test_sinks_gradient_sign_and_reference():
    """d sink_h = -sum_q exp(sink_h - lse_q) * delta_q, checked against float64 autograd and finite differences."""
    from ds_burst.attention.api import burst_attn_func
    from ds_burst.kernels.reference import naive_attention

    q, k, v, do, sinks = _inputs(1, 0, HQ, D, True)
    s = sinks.clone().requires_grad_()
    out = burst_attn_func(q, k, v, causal=True, sinks=s)
    (out * do).sum().backward()
    sr = sinks.clone().requires_grad_()
    ref, _ = naive_attention(q, k, v, causal=True, sinks=sr)
    (ref * do).sum().backward()
    assert rel(s.grad, sr.grad) < TOL64
    eps = 1e-6
    for h in range(HQ):
        sp, sm = sinks.clone(), sinks.clone()
        sp[h] += eps
        sm[h] -= eps
        fp = (burst_attn_func(q, k, v, causal=True, sinks=sp) * do).sum()
        fm = (burst_attn_func(q, k, v, causal=True, sinks=sm) * do).sum()
        assert abs((fp - fm).item() / (2 * eps) - s.grad[h].item()) < 1e-6


def test_sinks_match_gpt_oss_eager_formula():
    """The GPT-OSS eager formula (concatenate the sink column, softmax, drop it) equals ``sinks=``."""
    from ds_burst.attention.api import burst_attn_func

    q, k, v, do, sinks = _inputs(1, 3, HQ, D, True)
    scale = D ** -0.5
    w = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-1, -2)) * scale
    w = w.masked_fill(torch.ones(w.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    comb = torch.cat([w, sinks.reshape(1, -1, 1, 1).expand(*w.shape[:3], 1)], -1)
    probs = torch.softmax(comb - comb.amax(-1, keepdim=True), -1)[..., :-1]
    ref = torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2)
    assert rel(burst_attn_func(q, k, v, causal=True, sinks=sinks), ref) < TOL64


# ---------------------------------------------------------------------------------------------------------------
# kernels: which one runs, and fallbacks that stay exact


def _plan_kernel(q, k, v, kernel, softcap=None, sinks=None):
    from ds_burst.attention.lookup import lookup_plan

    plan = lookup_plan(q, k, v, True, None, (-1, -1), None, "zigzag", "auto", kernel, False, False, "once", None,
                       False, softcap, sinks)
    return plan.setup.kernel.name


@pytest.mark.parametrize("variant", ["softcap", "mla", "sinks", "all"])
def test_sdpa_kernel_falls_back_or_runs_exactly(variant):
    """kernel='sdpa' cannot do softcap or Dv != D: the call runs on the reference instead (exact); sinks alone keep
    the fused op (merged after the ring)."""
    from ds_burst.attention.api import burst_attn_func

    softcap, with_sinks, dv = VARIANTS[variant]
    q, k, v, do, sinks = _inputs(1, 7, HQ, dv, with_sinks)
    name = _plan_kernel(q, k, v, "sdpa", softcap, sinks)
    assert name == ("sdpa" if variant == "sinks" else "torch")
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    ss = None if sinks is None else sinks.clone().requires_grad_()
    out = burst_attn_func(qq, kk, vv, causal=True, kernel="sdpa", softcap=softcap, sinks=ss)
    out.backward(do)
    ref = ref_grads(q, k, v, do, sinks=sinks, causal=True, window=(-1, -1), softcap=softcap)
    got = [out, qq.grad, kk.grad, vv.grad, None if ss is None else ss.grad]
    for g, r in zip(got, ref):
        if r is not None:
            assert rel(g, r) < TOL64


def test_plan_key_and_summary_hold_the_variants():
    from ds_burst.attention.lookup import call_key
    from ds_burst.attention.validate import _FIELD_NAMES

    q, k, v, _, sinks = _inputs(1, 0, HQ, DV, True)
    base = (q, k, v, True, None, (-1, -1), None, "zigzag", "auto", "auto", False, False, None, False)
    keys = {call_key(*base), call_key(*base, 2.0), call_key(*base, 3.0), call_key(*base, None, sinks)}
    assert len(keys) == 4
    assert {"value head dim", "softcap", "sinks"} <= set(_FIELD_NAMES)


@pytest.mark.parametrize("bad", ["softcap_zero", "softcap_inf", "sinks_shape", "sinks_int", "v_heads"])
def test_variant_input_errors(bad):
    from ds_burst.attention.api import burst_attn_func

    q, k, v, _, sinks = _inputs(1, 0, HQ, DV, True)
    kw = {}
    if bad == "softcap_zero":
        kw["softcap"] = 0.0
    elif bad == "softcap_inf":
        kw["softcap"] = float("inf")
    elif bad == "sinks_shape":
        kw["sinks"] = sinks[:2]
    elif bad == "sinks_int":
        kw["sinks"] = torch.zeros(HQ, dtype=torch.int64)
    else:
        v = v[:, :, :1]
    with pytest.raises(ValueError, match="softcap|sinks|k and v"):
        burst_attn_func(q, k, v, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Triton under the interpreter (fp32/fp16, tiny) and on GPU (bf16)


def _triton_case(dtype, device, variant, causal=True, window=(-1, -1), hkv=2, s=32):
    from ds_burst.attention.api import burst_attn_func

    softcap, with_sinks, dv = VARIANTS[variant]
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, s, HQ, D, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(1, s, hkv, D, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(1, s, hkv, dv, generator=g, dtype=torch.float64)
    do = torch.randn(1, s, HQ, dv, generator=g, dtype=torch.float64)
    sinks = torch.randn(HQ, generator=g, dtype=torch.float64) if with_sinks else None
    ref = ref_grads(q, k, v, do, sinks=sinks, causal=causal, window=window, softcap=softcap)
    xs = [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]
    sl = None if sinks is None else sinks.to(device=device, dtype=torch.float32).requires_grad_()
    name = _plan_kernel(xs[0].detach(), xs[1].detach(), xs[2].detach(), "triton", softcap, sl)
    out = burst_attn_func(*xs, causal=causal, window_size=window, kernel="triton", softcap=softcap, sinks=sl)
    out.backward(do.to(device=device, dtype=dtype))
    got = [out, *(x.grad for x in xs), None if sl is None else sl.grad]
    return name, [None if r is None else rel(a.cpu(), r) for a, r in zip(got, ref)]


TRITON_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", ["softcap", "mla", "all"])
def test_triton_variants_interpreter(monkeypatch, dtype, variant):
    pytest.importorskip("triton")
    from ds_burst.core import settings

    if not settings.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1 (CPU)")
    name, errs = _triton_case(dtype, "cpu", variant, window=(5, 0))
    # the Triton tiles do softcap and Dv != D (their record says so): the call runs on them
    assert name == "triton"
    for e in errs:
        if e is not None:
            assert e < TRITON_TOL[dtype], errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("variant", ["softcap", "softcap50", "sinks", "mla", "all"])
@pytest.mark.parametrize("mask", ["causal", "full", "window"])
def test_triton_variants_gpu(dtype, variant, mask):
    causal, window = {"causal": (True, (-1, -1)), "full": (False, (-1, -1)), "window": (True, (40, 0))}[mask]
    name, errs = _triton_case(dtype, "cuda", variant, causal=causal, window=window, s=256)
    assert name == "triton"
    for e in errs:
        if e is not None:
            assert e < TRITON_TOL[dtype], errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("variant", ["softcap", "sinks", "mla", "all"])
def test_auto_kernel_variants_gpu(variant):
    """kernel='auto' on CUDA with a variant: Triton (or the reference) runs it, never sdpa's fused ops silently."""
    from ds_burst.attention.api import burst_attn_func

    softcap, with_sinks, dv = VARIANTS[variant]
    q, k, v, do, sinks = _inputs(1, 1, HQ, dv, with_sinks, per_rank=128)
    ref = ref_grads(q, k, v, do, sinks=sinks, causal=True, window=(-1, -1), softcap=softcap)
    xs = [x.cuda().bfloat16() for x in (q, k, v)]
    name = _plan_kernel(*xs, "auto", softcap, None if sinks is None else sinks.cuda())
    assert name == "triton"
    out = burst_attn_func(*xs, causal=True, softcap=softcap, sinks=None if sinks is None else sinks.cuda())
    assert rel(out.cpu(), ref[0]) < 2e-2


# ---------------------------------------------------------------------------------------------------------------
# non-finite values propagate like torch SDPA (no silently zeroed row)


def _nan_inputs(bad):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 16, 2, 16, generator=g) for _ in range(3))
    t = {"q": q, "k": k, "v": v}[bad[0]]
    t[0, 5, 1, 3] = float("nan") if bad[1] == "nan" else float("inf")
    return q, k, v


def _sdpa_rows(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("kernel", ["torch", "sdpa"])
@pytest.mark.parametrize("bad", [("k", "nan"), ("q", "nan"), ("v", "nan"), ("k", "inf"), ("v", "inf")],
                         ids=lambda b: "-".join(b))
def test_non_finite_propagates_like_sdpa(kernel, bad):
    from ds_burst.attention.api import burst_attn_func

    q, k, v = _nan_inputs(bad)
    ref = _sdpa_rows(q, k, v)
    out = burst_attn_func(q, k, v, causal=True, kernel=kernel)
    # every row SDPA makes non-finite is non-finite here too (no row silently zeroed), finite rows agree
    bad_ref = ~torch.isfinite(ref)
    assert bad_ref.any()
    assert (~torch.isfinite(out))[bad_ref].all()
    ok = torch.isfinite(ref)
    assert torch.allclose(out[ok], ref[ok], atol=1e-5)


def test_non_finite_propagates_triton_interpreter():
    pytest.importorskip("triton")
    from ds_burst.attention.api import burst_attn_func
    from ds_burst.core import settings

    if not settings.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1 (CPU)")
    q, k, v = _nan_inputs(("k", "nan"))
    ref = _sdpa_rows(q, k, v)
    out = burst_attn_func(q, k, v, causal=True, kernel="triton")
    assert (~torch.isfinite(out))[~torch.isfinite(ref)].all()


def worker_nan(rank, world, kernel, check_finite):
    import ds_burst

    q, k, v = _nan_inputs(("k", "nan"))
    ql, kl, vl = (ds_burst.shard_sequence(x, 1, layout="zigzag") for x in (q, k, v))
    out = ds_burst.burst_attn_func(ql, kl, vl, causal=True, kernel=kernel, check_finite=check_finite)
    got = ds_burst.gather_sequence(out, 1, layout="zigzag")
    ref = _sdpa_rows(q, k, v)
    return bool((~torch.isfinite(got))[~torch.isfinite(ref)].all()), int((~torch.isfinite(got)).sum())


@pytest.mark.parametrize("kernel", ["torch", "sdpa"])
def test_non_finite_propagates_across_ranks(kernel):
    res = values(run_ranks(worker_nan, 2, kernel, False, timeout=120))
    assert all(ok and n > 0 for ok, n in res)


def test_non_finite_check_finite_raises_on_every_rank():
    res = run_ranks(worker_nan, 2, "torch", True, timeout=120)
    for status, val in res:
        assert status == "error" and val[0] == "ValueError" and "NaN/Inf" in val[1], val


# ---------------------------------------------------------------------------------------------------------------
# check_inputs=False with shards that disagree: every rank raises


def worker_mismatch(rank, world, field):
    import ds_burst
    from ds_burst.dist.comm import set_comm_timeout

    set_comm_timeout(30)
    s = 8 if (rank != 1 or field != "length") else 12
    dv = D if (rank != 1 or field != "vdim") else DV
    q, k = torch.randn(1, s, 2, D), torch.randn(1, s, 2, D)
    v = torch.randn(1, s, 2, dv)
    softcap = 2.0 if (rank == 1 and field == "softcap") else None
    out = ds_burst.burst_attn_func(q, k, v, check_inputs=False, layout="contiguous", softcap=softcap)
    return tuple(out.shape)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("field", ["length", "vdim", "softcap"])
def test_check_inputs_false_mismatch_raises_on_every_rank(world, field):
    res = run_ranks(worker_mismatch, world, field, timeout=120)
    names = {"length": "S_local", "vdim": "value head dim", "softcap": "softcap"}
    for r, (status, val) in enumerate(res):
        assert status == "error", f"rank {r} returned {val}"
        if world == 2 or r in (0, 1, 2):  # the odd rank's ring neighbours (all of them for 2 and 3 ranks)
            assert val[0] == "ValueError" and names[field] in val[1], val


# ---------------------------------------------------------------------------------------------------------------
# a launcher world without a process group


def test_launcher_world_without_process_group_raises(monkeypatch):
    import torch.distributed as dist

    import ds_burst
    from ds_burst.integrations.deepspeed import DistributedAttention

    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2.*process group"):
        ds_burst.burst_attn_func(q, q, q)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2.*process group"):
        ds_burst.shard_sequence(q, 1)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2.*process group"):
        DistributedAttention(torch.nn.Identity(), None)(q, q, q, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ds_burst.burst_attn_func(q, q, q).shape == q.shape
