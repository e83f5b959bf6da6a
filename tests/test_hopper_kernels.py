"""The Gluon Hopper tiles (ds_burst.kernels.hopper_attn) against the float64 PyTorch reference, on an sm_90 GPU.

Every mask case the ``tl`` kernels take: global q/k offsets (ring steps), causal diagonal and straddling blocks,
zigzag halves (one query half against one key half), sliding windows, GQA/MQA, ragged sizes that end inside a
tile, a carried state from an earlier step, and rows that see no key. Real sizes (up to 16K) in bf16 and fp16.
Off the GPU (CPU CI, other GPUs) the module's applicability rules are tested and the GPU cases skip.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from ds_burst.kernels import hopper_attn as ha  # noqa: E402
from ds_burst.kernels import hopper_attn_bwd as hb  # noqa: E402
from ds_burst.kernels import reference as ref  # noqa: E402
from ds_burst.kernels import triton_attn as ta  # noqa: E402
from kernel_utils import Case, gpu, rel  # noqa: E402

ON_HOPPER = (torch.cuda.is_available() and ha.AVAILABLE and torch.cuda.get_device_capability()[0] == 9
             and ha.why_not(*(torch.empty(1, 128, 1, 128, device="cuda", dtype=torch.bfloat16),) * 3, None) is None)
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU with Gluon (triton 3.6)")


CASES = [
    Case("full-square-d128", 4096, 4096, 8, 8, 128, False),
    Case("causal-square-d128", 4096, 4096, 8, 8, 128, True),
    Case("causal-square-d64-gqa4", 4096, 4096, 8, 2, 64, True),
    Case("full-ragged-d128-b2", 1000, 1777, 4, 2, 128, False, b=2),
    Case("causal-ragged-d64", 1999, 1999, 4, 1, 64, True),
    Case("ring-step-past-keys-carried", 2048, 2048, 4, 2, 128, True, q_off=2048, k_off=0, carried=True),
    Case("ring-diagonal-offset-carried", 3000, 3000, 4, 4, 128, True, q_off=6000, k_off=6000, carried=True),
    Case("zigzag-late-q-early-k", 1024, 1024, 4, 2, 128, True, q_off=7168, k_off=1024, carried=True),
    Case("zigzag-straddle", 1536, 1024, 4, 2, 64, True, q_off=1000, k_off=1200, carried=True),
    Case("causal-rows-empty", 512, 700, 4, 2, 128, True, q_off=0, k_off=300),
    Case("window-both-sides", 3000, 3000, 4, 2, 128, False, window=(257, 63)),
    Case("window-causal-offsets", 2048, 4096, 4, 4, 64, True, window=(1000, 0), q_off=4096, k_off=1024,
         carried=True),
    Case("long-causal-d128", 16384, 16384, 4, 1, 128, True),
]


def _inputs(c: Case, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(c.b, c.sq, c.hq, c.d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(c.b, c.sk, c.hkv, c.d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(c.b, c.sk, c.hkv, c.d, device="cuda", dtype=dtype, generator=g)
    if c.carried:  # a state from an earlier ring step: some rows with keys, some (every 7th) without
        out = torch.randn(c.b, c.sq, c.hq, c.d, device="cuda", generator=g)
        lse = torch.randn(c.b, c.hq, c.sq, device="cuda", generator=g) * 2 + 3
        lse[:, :, ::7] = -math.inf
        out[:, ::7] = 0
    else:
        out = torch.zeros(c.b, c.sq, c.hq, c.d, device="cuda")
        lse = torch.full((c.b, c.hq, c.sq), -math.inf, device="cuda")
    return q, k, v, out, lse


def _ref_fresh(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """``(out, lse)`` of the block from no state, by the float64 reference."""
    out64 = torch.zeros(q.shape, device="cuda", dtype=torch.float64)
    lse64 = torch.full((case.b, case.hq, case.sq), -math.inf, device="cuda", dtype=torch.float64)
    ref.fwd_step(q.double(), k.double(), v.double(), out64, lse64, scale=scale, **case.mask_kw())
    return out64, lse64


@gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_matches_float64_reference(case: Case, dtype: torch.dtype) -> None:
    q, k, v, out, lse = _inputs(case, dtype, seed=sum(map(ord, case.name)))
    assert ha.applicable(q, k, v), ha.why_not(q, k, v, None)
    scale = case.d ** -0.5
    out64, lse64 = out.double(), lse.double()
    ref.fwd_step(q.double(), k.double(), v.double(), out64, lse64, scale=scale, **case.mask_kw())
    o, l_ = out.clone(), lse.clone()
    ha.fwd_step(q, k, v, o, l_, scale=scale, **case.mask_kw())
    torch.cuda.synchronize()
    assert rel(l_, lse64) < ta.KERNEL.tolerance[dtype][0] / 10
    assert rel(o, out64) < ta.KERNEL.tolerance[dtype][0]
    # rows that saw no key keep their state bitwise
    untouched = torch.isneginf(lse64) & torch.isneginf(lse)
    if untouched.any():
        assert torch.equal(o.permute(0, 2, 1, 3)[untouched], out.permute(0, 2, 1, 3)[untouched])


@gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [c for c in CASES if c.sq * c.sk <= 4096 * 4096], ids=repr)
def test_backward_matches_float64_reference(case: Case, dtype: torch.dtype) -> None:
    """dQ, dK, dV added to carried fp32 accumulators, with global lse (this block's, raised where the case
    carries a state: other blocks' keys) and delta, against the float64 reference."""
    q, k, v, _, _ = _inputs(case, dtype, seed=sum(map(ord, case.name)) + 1)
    g = torch.Generator(device="cuda").manual_seed(7)
    dout = torch.randn(q.shape, device="cuda", dtype=dtype, generator=g)
    scale = case.d ** -0.5
    _, lse64 = _ref_fresh(case, q, k, v, scale)
    if case.carried:
        lse64 = lse64 + torch.rand(lse64.shape, device="cuda", generator=g, dtype=torch.float64)
    # lse and delta in rows padded to 16 bytes (TMA reads them): strided views, as the ring may hand them
    pad = -(-case.sq // 4) * 4
    lse = torch.empty(case.b, case.hq, pad, device="cuda")[..., :case.sq]
    lse.copy_(lse64)
    delta = torch.empty(case.b, case.hq, pad, device="cuda")[..., :case.sq]
    delta.copy_(torch.randn(lse.shape, device="cuda", generator=g))
    init = [torch.randn(t.shape, device="cuda", generator=g) for t in (q, k, v)]
    grads = [x.clone() for x in init]
    want = [x.double() for x in init]
    ref.bwd_step(q.double(), k.double(), v.double(), dout.double(), lse.double(), delta.double(), *want,
                 scale=scale, **case.mask_kw())
    assert hb.applicable(q, k, v, dout, lse, delta, *grads, None, deterministic=False)
    assert not hb.applicable(q, k, v, dout, lse, delta, *grads, None, deterministic=True)
    heads_apart = torch.zeros(case.b, case.hq, case.sq, case.d, device="cuda").transpose(1, 2)
    assert not hb.applicable(q, k, v, dout, lse, delta, heads_apart, *grads[1:], None, deterministic=False)
    if case.sq % 4:  # rows of lse not 16-byte aligned: refused (the tl backward runs such calls)
        assert not hb.applicable(q, k, v, dout, lse.contiguous(), delta, *grads, None, deterministic=False)
    hb.bwd_step(q, k, v, dout, lse, delta, *grads, scale=scale, **case.mask_kw())
    torch.cuda.synchronize()
    for name, got, exp, start in zip(("dq", "dk", "dv"), grads, want, init):
        # the increments, not the accumulators (a dropped gradient must not hide behind the carried values)
        assert rel(got.double() - start.double(), exp - start.double()) < 2 * ta.KERNEL.tolerance[dtype][0], name


WHOLE = [c for c in CASES if not c.carried and c.sq * c.sk <= 4096 * 4096]


@gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", WHOLE, ids=repr)
def test_attend_whole_block_matches_float64_reference(case: Case, dtype: torch.dtype) -> None:
    """``triton_attn.attend`` / ``attend_bwd`` (one rank, the whole block): the output in the input dtype and lse
    written without a state, dK/dV written directly and dQ, against float64; both refuse what they do not cover
    (softcap, ``deterministic=True``, lse rows TMA cannot read)."""
    q, k, v, _, _ = _inputs(case, dtype, seed=sum(map(ord, case.name)) + 2)
    g = torch.Generator(device="cuda").manual_seed(11)
    dout = torch.randn(q.shape, device="cuda", dtype=dtype, generator=g)
    scale = case.d ** -0.5
    q64, k64, v64, do64 = (x.double() for x in (q, k, v, dout))
    out64, lse64 = _ref_fresh(case, q, k, v, scale)
    got = ta.attend(q, k, v, scale=scale, **case.mask_kw())
    assert got is not None
    out, lse = got
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel(lse, lse64) < ta.KERNEL.tolerance[dtype][0] / 10
    assert rel(out.float(), out64) < ta.KERNEL.tolerance[dtype][0]
    want = [torch.zeros(x.shape, device="cuda", dtype=torch.float64) for x in (q, k, v)]
    delta64 = (do64 * out64).sum(-1).transpose(1, 2)
    ref.bwd_step(q64, k64, v64, do64, lse64, delta64, *want, scale=scale, **case.mask_kw())
    grads = ta.attend_bwd(q, k, v, out, dout, lse, scale=scale, **case.mask_kw())
    if case.sq % 4:  # lse / delta rows not 16-byte aligned for TMA: refused (the general path runs the tl backward)
        assert grads is None
        return
    assert grads is not None
    for name, got_g, exp in zip(("dq", "dk", "dv"), grads, want):
        assert got_g.dtype == dtype, name
        assert rel(got_g.float(), exp) < 2 * ta.KERNEL.tolerance[dtype][0], name
    assert ta.attend(q, k, v, scale=scale, softcap=30.0, **case.mask_kw()) is None
    assert ta.attend_bwd(q, k, v, out, dout, lse, scale=scale, deterministic=True, **case.mask_kw()) is None


@gpu
@needs_hopper
def test_burst_attn_func_one_rank_uses_attend(monkeypatch: pytest.MonkeyPatch) -> None:
    """At one rank ``burst_attn_func(kernel="triton")`` runs the whole block through ``attend``/``attend_bwd``
    (one launch each way) and matches the ``tl`` path that runs with the Hopper kernels off."""
    import ds_burst
    from ds_burst.kernels import registry

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = ta.Tiles.attend, ta.Tiles.attend_bwd

    def count_fwd(*a, **kw):
        calls["fwd"] += 1
        return fwd(*a, **kw)

    def count_bwd(*a, **kw):
        calls["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(ta.Tiles, "attend", count_fwd)
    monkeypatch.setattr(ta.Tiles, "attend_bwd", count_bwd)
    registry.register(ta.kernel(ta.Tiles(hopper=False), "triton-tl"))  # the tl tiles alone, as a benchmark does
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v, do = (torch.randn(1, 2048, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    runs = []
    try:
        for kernel in ("triton", "triton-tl"):
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            out = ds_burst.burst_attn_func(qq, kk, vv, causal=True, kernel=kernel)
            out.backward(do)
            runs.append((out.detach(), qq.grad, kk.grad, vv.grad))
    finally:
        registry.unregister("triton-tl")
    assert calls == {"fwd": 2, "bwd": 2}  # called both times; with the Hopper kernels off they return None
    for a, b in zip(*runs):
        assert rel(a.float(), b.float()) < 2e-2


@gpu
@needs_hopper
def test_triton_fwd_step_routes_to_hopper_and_matches_tl() -> None:
    """``triton_attn.fwd_step`` hands covered calls to the Hopper kernel; the ``tl`` kernel gives the same result
    within bf16 rounding, and a call it does not cover (softcap) still runs on ``tl``."""
    c = CASES[1]
    q, k, v, out, lse = _inputs(c, torch.bfloat16, seed=3)
    kw = dict(scale=c.d ** -0.5, **c.mask_kw())
    runs = {}
    for use in (True, False):
        o, l_ = out.clone(), lse.clone()
        ta.Tiles(hopper=use).fwd_step(q, k, v, o, l_, **kw)
        runs[use] = (o, l_)
    assert rel(runs[True][0], runs[False][0]) < 1e-2
    assert rel(runs[True][1], runs[False][1]) < 1e-3
    assert not ha.applicable(q, k, v, softcap=30.0)


@gpu
def test_cases_run_on_sm90() -> None:
    """On an sm_90 GPU with Gluon and the kernels on, the GPU cases run: a probe that stopped matching the
    applicability rules would skip every one of them."""
    if not (torch.cuda.is_available() and ha.ENABLED and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("not an sm_90 GPU with the Gluon kernels on")
    probe = torch.empty(1, 128, 1, 128, device="cuda", dtype=torch.bfloat16)
    assert ON_HOPPER, ha.why_not(probe, probe, probe, None)


def test_attend_refuses_off_hopper() -> None:
    """Off an sm_90 GPU (here: CPU tensors) the one-rank entry points return ``None``, so ``burst_attn_func``
    runs its general path."""
    x = torch.randn(1, 256, 2, 64)
    assert ta.attend(x, x, x, scale=0.125, causal=True) is None
    lse = torch.zeros(1, 2, 256)
    assert ta.attend_bwd(x, x, x, x, x, lse, scale=0.125, causal=True) is None


def test_applicability_rules() -> None:
    """What the Hopper path refuses is named (and then runs on the ``tl`` kernels): wrong device or dtype,
    head dims other than 64/128, softcap, heads not side by side in a row."""
    x = torch.empty(1, 8, 2, 128)
    assert ha.why_not(x, x, x, None) is not None  # CPU (or off, or no Gluon)
    if not ON_HOPPER:
        return
    cu = torch.empty(1, 256, 4, 128, device="cuda", dtype=torch.bfloat16)
    assert ha.why_not(cu, cu, cu, None) is None
    assert "softcap" in ha.why_not(cu, cu, cu, 20.0)
    assert "dtype" in ha.why_not(cu.float(), cu.float(), cu.float(), None)
    d96 = torch.empty(1, 256, 4, 96, device="cuda", dtype=torch.bfloat16)
    assert "head dims" in ha.why_not(d96, d96, d96, None)
    heads_first = torch.empty(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    assert "side by side" in ha.why_not(heads_first, cu, cu, None)
    short = torch.empty(1, 100, 4, 128, device="cuda", dtype=torch.bfloat16)
    assert "shorter" in ha.why_not(short, cu, cu, None) and "shorter" in ha.why_not(cu, short, short, None)
