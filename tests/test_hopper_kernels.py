"""The Gluon Hopper tiles (ds_burst.kernels.hopper_attn) against the float64 PyTorch reference, on an sm_90 GPU.

Every mask case the ``tl`` kernels take: global q/k offsets (ring steps), causal diagonal and straddling blocks,
zigzag halves (one query half against one key half), sliding windows, GQA/MQA, ragged sizes that end inside a
tile, a carried state from an earlier step, and rows that see no key. Real sizes (up to 16K) in bf16 and fp16.
Softcap (logits ``softcap * tanh(scale * q.k / softcap)``, ``tanh.approx.f32``) on a subset of the cases, with the
scores well above the cap. Off the GPU (CPU CI, other GPUs) the module's applicability rules are tested and the GPU
cases skip.
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


@pytest.fixture(autouse=True)
def _softcap_variants_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are the check ``hopper_common.SOFTCAP_CHECKED`` waits for: the softcap cases run the Hopper
    kernels."""
    from ds_burst.kernels import hopper_common

    monkeypatch.setattr(hopper_common, "SOFTCAP_CHECKED", True)


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
DTYPES = ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))

CAP = 5.0
"""The softcap of the softcap cases."""
CAP_SCALE = 4.0
"""Their ``scale * sqrt(D)``: scores ``scale * q.k`` of standard deviation 4, many of them beyond the cap."""
SOFTCAP_CASES = ("full-square-d128", "causal-square-d64-gqa4", "causal-ragged-d64", "ring-step-past-keys-carried",
                 "zigzag-straddle", "window-both-sides", "window-causal-offsets")
"""The cases also run with softcap (bf16): full and causal, GQA/MQA, ragged, offsets with a carried state,
windows."""


def _params(cases: list[Case]) -> list:
    """``(case, dtype, softcap)`` of a test over ``cases``: each in bf16 and fp16 without softcap, then those of
    :data:`SOFTCAP_CASES` in bf16 with softcap :data:`CAP`."""
    plain = [pytest.param(c, dt, None, id=f"{c.name}-{name}") for c in cases for dt, name in DTYPES]
    return plain + [pytest.param(c, torch.bfloat16, CAP, id=f"{c.name}-bf16-softcap") for c in cases
                    if c.name in SOFTCAP_CASES]


def _scale(case: Case, softcap: float | None) -> float:
    """The case's ``scale``: ``1 / sqrt(D)``, with softcap :data:`CAP_SCALE` times that."""
    return case.d ** -0.5 if softcap is None else CAP_SCALE * case.d ** -0.5


def _cap_tol(softcap: float | None) -> float:
    """What the Hopper kernels' ``tanh.approx.f32`` (relative error up to about ``2**-11``) adds to a relative
    tolerance: the largest error of a capped logit ``softcap * tanh(..)`` in natural units, which is the relative
    error it gives its ``exp``."""
    return 0.0 if softcap is None else softcap * 2.0 ** -11


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


def _ref_fresh(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               softcap: float | None = None):
    """``(out, lse)`` of the block from no state, by the float64 reference."""
    out64 = torch.zeros(q.shape, device="cuda", dtype=torch.float64)
    lse64 = torch.full((case.b, case.hq, case.sq), -math.inf, device="cuda", dtype=torch.float64)
    ref.fwd_step(q.double(), k.double(), v.double(), out64, lse64, scale=scale, softcap=softcap, **case.mask_kw())
    return out64, lse64


@gpu
@needs_hopper
@pytest.mark.parametrize("case,dtype,softcap", _params(CASES))
def test_forward_matches_float64_reference(case: Case, dtype: torch.dtype, softcap: float | None) -> None:
    """The forward continuing the case's state, against float64; with softcap also ``max_out`` (the largest
    visible ``scale * q.k``, before the cap), whose launch leaves out and lse bitwise as without it."""
    q, k, v, out, lse = _inputs(case, dtype, seed=sum(map(ord, case.name)))
    assert ha.applicable(q, k, v, softcap), ha.why_not(q, k, v, softcap)
    scale = _scale(case, softcap)
    tol = ta.KERNEL.tolerance[dtype][0] + _cap_tol(softcap)
    out64, lse64 = out.double(), lse.double()
    mx64 = torch.full(lse.shape, -math.inf, device="cuda", dtype=torch.float64)
    ref.fwd_step(q.double(), k.double(), v.double(), out64, lse64, scale=scale, softcap=softcap, max_out=mx64,
                 **case.mask_kw())
    o, l_ = out.clone(), lse.clone()
    ha.fwd_step(q, k, v, o, l_, scale=scale, softcap=softcap, **case.mask_kw())
    torch.cuda.synchronize()
    assert rel(l_, lse64) < tol / 10
    assert rel(o, out64) < tol
    # rows that saw no key keep their state bitwise
    untouched = torch.isneginf(lse64) & torch.isneginf(lse)
    if untouched.any():
        assert torch.equal(o.permute(0, 2, 1, 3)[untouched], out.permute(0, 2, 1, 3)[untouched])
    if softcap is not None:  # HAS_MAX with SOFTCAP: the maximum before the cap, the softmax unchanged
        assert (mx64 > softcap + 1).any()  # the cap changes the scores
        o2, l2 = out.clone(), lse.clone()
        mx = torch.full(lse.shape, -math.inf, device="cuda")
        ha.fwd_step(q, k, v, o2, l2, scale=scale, softcap=softcap, max_out=mx, **case.mask_kw())
        torch.cuda.synchronize()
        assert torch.equal(o2, o) and torch.equal(l2, l_)
        assert rel(mx, mx64) < 1e-4


@gpu
@needs_hopper
@pytest.mark.parametrize("case,dtype,softcap", _params([c for c in CASES if c.sq * c.sk <= 4096 * 4096]))
def test_backward_matches_float64_reference(case: Case, dtype: torch.dtype, softcap: float | None) -> None:
    """dQ, dK, dV added to carried fp32 accumulators, with global lse (this block's, raised where the case
    carries a state: other blocks' keys) and delta, against the float64 reference (softcap: P from the capped
    logits, dS times ``1 - tanh^2``)."""
    q, k, v, _, _ = _inputs(case, dtype, seed=sum(map(ord, case.name)) + 1)
    g = torch.Generator(device="cuda").manual_seed(7)
    dout = torch.randn(q.shape, device="cuda", dtype=dtype, generator=g)
    scale = _scale(case, softcap)
    _, lse64 = _ref_fresh(case, q, k, v, scale, softcap)
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
                 scale=scale, softcap=softcap, **case.mask_kw())
    assert hb.applicable(q, k, v, dout, lse, delta, *grads, softcap, deterministic=False)
    assert not hb.applicable(q, k, v, dout, lse, delta, *grads, softcap, deterministic=True)
    heads_apart = torch.zeros(case.b, case.hq, case.sq, case.d, device="cuda").transpose(1, 2)
    assert not hb.applicable(q, k, v, dout, lse, delta, heads_apart, *grads[1:], softcap, deterministic=False)
    if case.sq % 4:  # rows of lse not 16-byte aligned: refused (the tl backward runs such calls)
        assert not hb.applicable(q, k, v, dout, lse.contiguous(), delta, *grads, softcap, deterministic=False)
    hb.bwd_step(q, k, v, dout, lse, delta, *grads, scale=scale, softcap=softcap, **case.mask_kw())
    torch.cuda.synchronize()
    tol = 2 * (ta.KERNEL.tolerance[dtype][0] + _cap_tol(softcap))
    for name, got, exp, start in zip(("dq", "dk", "dv"), grads, want, init):
        # the increments, not the accumulators (a dropped gradient must not hide behind the carried values)
        assert rel(got.double() - start.double(), exp - start.double()) < tol, name


LIGHT_CASES = [c for c in CASES if c.name in ("causal-square-d64-gqa4", "zigzag-straddle", "window-causal-offsets",
                                               "full-ragged-d128-b2")]


@gpu
@needs_hopper
@pytest.mark.parametrize("softcap", [None, CAP])
@pytest.mark.parametrize("case", LIGHT_CASES, ids=[c.name for c in LIGHT_CASES])
def test_light_launch_is_the_jit_launch(case: Case, softcap: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The light launch (``fast_launch``: the compiled launcher, cached TMA maps) writes what the JIT launch
    writes: forward bitwise (from the same carried state), backward dK/dV bitwise and dQ (added by atomics in any
    order) to fp32 rounding; and after the first call of a variant no launch goes through the JIT."""
    import triton

    from ds_burst.kernels import fast_launch

    assert triton.__version__.startswith(fast_launch.WRITTEN_FOR), "the light launch reads triton 3.6's launcher"
    monkeypatch.setattr(fast_launch, "ENABLED", True)  # on for this test whatever TRITON_RELEASES declares
    q, k, v, out0, lse0 = _inputs(case, torch.bfloat16, seed=11)
    g = torch.Generator(device="cuda").manual_seed(12)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = _scale(case, softcap)

    def run() -> list[torch.Tensor]:
        out, lse = out0.clone(), lse0.clone()
        ha.fwd_step(q, k, v, out, lse, scale=scale, softcap=softcap, **case.mask_kw())
        pad = -(-case.sq // 4) * 4
        lse_p = torch.empty(case.b, case.hq, pad, device="cuda")[..., :case.sq]
        lse_p.copy_(lse)
        delta = torch.empty_like(lse_p)
        delta.copy_((out * dout.float()).sum(-1).transpose(1, 2))
        grads = [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]
        hb.bwd_step(q, k, v, dout, lse_p, delta, *grads, scale=scale, softcap=softcap, **case.mask_kw())
        torch.cuda.synchronize()
        return [out, lse, *grads]

    jit_before = (ha._FWD.jit_launches, hb._BWD.jit_launches)
    light = [run() for _ in range(3)]
    assert ha._FWD.jit_launches - jit_before[0] <= 1 and hb._BWD.jit_launches - jit_before[1] <= 1
    monkeypatch.setattr(fast_launch, "ENABLED", False)
    jit = run()
    for got in light:
        for name, a, b in zip(("out", "lse"), got[:2], jit[:2], strict=True):
            assert torch.equal(a, b), name
        for name, a, b in zip(("dk", "dv"), got[3:], jit[3:], strict=True):
            assert torch.equal(a, b), name
        assert rel(got[2], jit[2]) < 1e-6, "dq"


WHOLE = [c for c in CASES if not c.carried and c.sq * c.sk <= 4096 * 4096]


@gpu
@needs_hopper
@pytest.mark.parametrize("case,dtype,softcap", _params(WHOLE))
def test_attend_whole_block_matches_float64_reference(case: Case, dtype: torch.dtype, softcap: float | None) -> None:
    """``triton_attn.attend`` / ``attend_bwd`` (one rank, the whole block, with softcap or not): the output in the
    input dtype and lse written without a state, dK/dV written directly and dQ, against float64; both refuse what
    they do not cover (``deterministic=True``, lse rows TMA cannot read)."""
    q, k, v, _, _ = _inputs(case, dtype, seed=sum(map(ord, case.name)) + 2)
    g = torch.Generator(device="cuda").manual_seed(11)
    dout = torch.randn(q.shape, device="cuda", dtype=dtype, generator=g)
    scale = _scale(case, softcap)
    tol = ta.KERNEL.tolerance[dtype][0] + _cap_tol(softcap)
    kw = dict(scale=scale, softcap=softcap, **case.mask_kw())
    q64, k64, v64, do64 = (x.double() for x in (q, k, v, dout))
    out64, lse64 = _ref_fresh(case, q, k, v, scale, softcap)
    got = ta.attend(q, k, v, **kw)
    assert got is not None
    out, lse = got
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel(lse, lse64) < tol / 10
    assert rel(out.float(), out64) < tol
    want = [torch.zeros(x.shape, device="cuda", dtype=torch.float64) for x in (q, k, v)]
    delta64 = (do64 * out64).sum(-1).transpose(1, 2)
    ref.bwd_step(q64, k64, v64, do64, lse64, delta64, *want, **kw)
    grads = ta.attend_bwd(q, k, v, out, dout, lse, **kw)
    if case.sq % 4:  # lse / delta rows not 16-byte aligned for TMA: refused (the general path runs the tl backward)
        assert grads is None
        return
    assert grads is not None
    for name, got_g, exp in zip(("dq", "dk", "dv"), grads, want):
        assert got_g.dtype == dtype, name
        assert rel(got_g.float(), exp) < 2 * tol, name
    assert ta.attend_bwd(q, k, v, out, dout, lse, deterministic=True, **kw) is None


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
    """``triton_attn.fwd_step`` hands covered calls to the Hopper kernel, with softcap too; the ``tl`` kernel gives
    the same result within bf16 rounding (and, with softcap, ``tanh.approx.f32``'s error)."""
    c = CASES[1]
    q, k, v, out, lse = _inputs(c, torch.bfloat16, seed=3)
    for softcap in (None, CAP):
        assert ha.applicable(q, k, v, softcap=softcap)
        kw = dict(scale=c.d ** -0.5 if softcap is None else CAP_SCALE / c.d ** 0.5, softcap=softcap, **c.mask_kw())
        runs = {}
        for use in (True, False):
            o, l_ = out.clone(), lse.clone()
            ta.Tiles(hopper=use).fwd_step(q, k, v, o, l_, **kw)
            runs[use] = (o, l_)
        assert rel(runs[True][0], runs[False][0]) < 1e-2 + _cap_tol(softcap), softcap
        assert rel(runs[True][1], runs[False][1]) < 1e-3 + _cap_tol(softcap), softcap


@gpu
def test_cases_run_on_sm90() -> None:
    """On an sm_90 GPU with Gluon and the kernels on, the GPU cases run: a probe that stopped matching the
    applicability rules would skip every one of them."""
    if not (torch.cuda.is_available() and ha.ENABLED and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("not an sm_90 GPU with the Gluon kernels on")
    probe = torch.empty(1, 128, 1, 128, device="cuda", dtype=torch.bfloat16)
    assert ON_HOPPER, ha.why_not(probe, probe, probe, None)


def test_softcap_waits_for_its_gpu_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until ``SOFTCAP_CHECKED``, softcap calls are refused by the Hopper kernels (they run on ``tl``)."""
    from ds_burst.kernels import hopper_common

    monkeypatch.setattr(hopper_common, "ENABLED", True)
    monkeypatch.setattr(hopper_common, "SOFTCAP_CHECKED", False)
    t = torch.empty(1, 128, 1, 128)
    assert "not yet checked on a GPU" in hopper_common.why_not(t, t, t, 5.0)
    assert "not yet checked" not in hopper_common.why_not(t, t, t, None)


def test_attend_refuses_off_hopper() -> None:
    """Off an sm_90 GPU (here: CPU tensors) the one-rank entry points return ``None``, so ``burst_attn_func``
    runs its general path."""
    x = torch.randn(1, 256, 2, 64)
    assert ta.attend(x, x, x, scale=0.125, causal=True) is None
    lse = torch.zeros(1, 2, 256)
    assert ta.attend_bwd(x, x, x, x, x, lse, scale=0.125, causal=True) is None


def test_applicability_rules() -> None:
    """What the Hopper path refuses is named (and then runs on the ``tl`` kernels): wrong device or dtype,
    head dims other than 64/128, heads not side by side in a row; softcap is covered."""
    x = torch.empty(1, 8, 2, 128)
    assert ha.why_not(x, x, x, None) is not None  # CPU (or off, or no Gluon)
    if not ON_HOPPER:
        return
    cu = torch.empty(1, 256, 4, 128, device="cuda", dtype=torch.bfloat16)
    assert ha.why_not(cu, cu, cu, None) is None
    assert ha.why_not(cu, cu, cu, 20.0) is None
    assert "dtype" in ha.why_not(cu.float(), cu.float(), cu.float(), None)
    d96 = torch.empty(1, 256, 4, 96, device="cuda", dtype=torch.bfloat16)
    assert "head dims" in ha.why_not(d96, d96, d96, None)
    heads_first = torch.empty(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    assert "side by side" in ha.why_not(heads_first, cu, cu, None)
    short = torch.empty(1, 100, 4, 128, device="cuda", dtype=torch.bfloat16)
    assert "shorter" in ha.why_not(short, cu, cu, None) and "shorter" in ha.why_not(cu, short, short, None)
