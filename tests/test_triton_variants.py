"""Triton attention tiles with the variants: logit softcapping and a value head dim ``Dv != D`` (MLA), against the
float64 PyTorch reference (ds_burst.kernels.reference: ``fwd_step`` / ``bwd_step`` / ``naive_attention``).

Without CUDA the kernels run under Triton's interpreter on CPU tensors (``kernel_utils`` sets TRITON_INTERPRET=1
before Triton is imported), so shapes stay tiny. Tests marked ``gpu`` run only where CUDA is available.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernel_utils as ku
from kernel_utils import DEVICE, Case, gen, gpu, rel

pytest.importorskip("triton")

from ds_burst.kernels import reference as ref  # noqa: E402
from ds_burst.kernels import triton_attn as ta  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ku.HAS_CUDA else [])
SOFTCAPS = [2.0, 50.0]

CASES = [
    Case("full-gqa2-d16v8", 37, 29, 4, 2, 16, False, (-1, -1), 0, 0, b=2, dv=8),
    Case("causal-diag-d24v16", 33, 33, 4, 4, 24, True, (-1, -1), 100, 100, dv=16),
    Case("causal-straddle-mqa-d16v8", 37, 29, 4, 1, 16, True, (-1, -1), 10, 20, dv=8),
    Case("causal-above-diag-rows-empty-d24v16", 29, 23, 2, 1, 24, True, (-1, -1), 0, 15, dv=16),
    Case("causal-window-7-d24v16", 40, 35, 4, 2, 24, True, (7, 0), 30, 20, dv=16),
    Case("window-5-3-d16v8", 31, 40, 2, 2, 16, False, (5, 3), 0, 8, dv=8),
    Case("window-right-only-d24v16", 19, 33, 4, 2, 24, False, (-1, 4), 20, 0, dv=16),
    Case("causal-d24", 35, 35, 4, 2, 24, True, (-1, -1), 0, 0, dv=24),  # Dv == D: softcap alone
]


# ------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", SOFTCAPS, ids=lambda s: f"cap{s:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fwd_step_variants(case: Case, dtype: torch.dtype, softcap: float) -> None:
    ku.check_fwd(ta.TILES, case, dtype, gen(1000 + CASES.index(case)), ta.KERNEL.tolerance[dtype][0], softcap=softcap,
              amp=2.0)


@pytest.mark.parametrize("softcap", [None, *SOFTCAPS], ids=lambda s: "nocap" if s is None else f"cap{s:g}")
def test_fwd_fresh_state_matches_naive(softcap: float | None) -> None:
    """From the empty ku.state the result is plain (softcapped) attention; Dv != D."""
    c = Case("fresh", 30, 27, 4, 2, 24, True, (9, 0), 3, 0, dv=16)
    g = gen(8)
    q, k, v = ku.qkv(c, torch.float32, g, 2.0)
    out = ku.randn((1, c.sq, c.hq, c.dv), g)
    lse = torch.full((1, c.hq, c.sq), -math.inf, device=DEVICE)
    ta.fwd_step(q, k, v, out, lse, scale=0.2, softcap=softcap, **c.mask_kw())
    rout, rlse = ref.naive_attention(q.double(), k.double(), v.double(), scale=0.2, softcap=softcap, **c.mask_kw())
    assert rel(out, rout.to(DEVICE)) < 1e-5
    assert rel(lse, rlse.to(DEVICE)) < 1e-5


def test_fwd_continuation_softcap_mla() -> None:
    """Two calls over adjacent key ranges equal one reference call over both (softcap, Dv != D)."""
    c = Case("cont", 41, 50, 4, 2, 16, True, (-1, -1), 30, 0, dv=8)
    g = gen(7)
    q, k, v = ku.qkv(c, torch.float32, g, 2.0)
    out, lse = ku.state(c, g)
    rout, rlse = out.double(), lse.double()
    split = 23
    kw = dict(scale=0.3, softcap=5.0, causal=True, q_offset=30)
    ta.fwd_step(q, k[:, :split], v[:, :split], out, lse, k_offset=0, **kw)
    ta.fwd_step(q, k[:, split:], v[:, split:], out, lse, k_offset=split, **kw)
    ref.fwd_step(q.double(), k.double(), v.double(), rout, rlse, k_offset=0, **kw)
    assert rel(out, rout) < 1e-5
    assert rel(lse, rlse) < 1e-5


# ------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------


def _check_bwd(c: Case, dtype: torch.dtype, softcap: float | None, deterministic: bool, seed: int,
               tiles: ta.Tiles = ta.TILES) -> list[float]:
    return ku.check_bwd(tiles, c, dtype, gen(seed), ta.KERNEL.tolerance[dtype][1], softcap=softcap, amp=2.0,
                     deterministic=deterministic)[0]


@pytest.mark.parametrize("softcap", SOFTCAPS, ids=lambda s: f"cap{s:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_bwd_step_variants(case: Case, dtype: torch.dtype, softcap: float) -> None:
    _check_bwd(case, dtype, softcap, True, 2000 + CASES.index(case))


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "cap2"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[6]], ids=repr)
def test_bwd_step_variants_atomic_dq(case: Case, softcap: float | None) -> None:
    """The atomic-dQ path of the dK/dV kernel (deterministic=False with atomics switched on), fp32."""
    _check_bwd(case, torch.float32, softcap, False, 3000 + CASES.index(case), ta.Tiles(atomic_dq=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=repr)
def test_bwd_step_mla_without_softcap(case: Case, dtype: torch.dtype) -> None:
    _check_bwd(case, dtype, None, True, 4000 + CASES.index(case))


@pytest.mark.parametrize("softcap", [None, 2.0, 50.0], ids=lambda s: "nocap" if s is None else f"cap{s:g}")
def test_gradients_match_autograd(softcap: float | None) -> None:
    """Forward then backward through the Triton tiles equal float64 autograd of naive (softcapped) attention."""
    c = Case("grad", 27, 35, 4, 2, 24, True, (11, 0), 8, 0, dv=16)
    g = gen(17)
    q, k, v = ku.qkv(c, torch.float32, g, 2.0)
    dout = ku.randn((1, c.sq, c.hq, c.dv), g)
    scale = 0.3
    rout, *rgrads = ku.ref_grads(q, k, v, dout, scale=scale, softcap=softcap, **c.mask_kw())
    out = torch.zeros(1, c.sq, c.hq, c.dv, device=DEVICE)
    lse = torch.full((1, c.hq, c.sq), -math.inf, device=DEVICE)
    ta.fwd_step(q, k, v, out, lse, scale=scale, softcap=softcap, **c.mask_kw())
    assert rel(out, rout) < 1e-5
    delta = ta.bwd_preprocess(out, dout)
    dq, dk, dv = (torch.zeros(t.shape, device=DEVICE) for t in (q, k, v))
    ta.bwd_step(q, k, v, dout, lse, delta, dq, dk, dv, scale=scale, softcap=softcap, deterministic=True,
                **c.mask_kw())
    for x, r in zip((dq, dk, dv), rgrads):
        assert rel(x, r) < 1e-5


# ------------------------------------------------------------------------------------------------------------
# tanh, non-finite values, head-dim padding, errors, plan choice
# ------------------------------------------------------------------------------------------------------------


def test_tanh_helper_matches_torch() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def kern(X, Y, N: tl.constexpr, LIB: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(Y + o, ta._tanh(tl.load(X + o), LIB))

    x = torch.cat([torch.linspace(-12, 12, 4000, dtype=torch.float64), torch.logspace(-9, 0, 90, dtype=torch.float64),
                   -torch.logspace(-9, 0, 90, dtype=torch.float64)]).float()
    x = torch.cat([x, torch.tensor([0.0, -0.0, 0.1249, 0.1251, math.inf, -math.inf, math.nan])])
    n = triton.next_power_of_2(x.numel())
    xs = torch.zeros(n)
    xs[: x.numel()] = x
    xs = xs.to(DEVICE)
    y = torch.empty_like(xs)
    kern[(1,)](xs, y, N=n, LIB=ku.HAS_CUDA)
    y, r = y[: x.numel()].cpu().double(), torch.tanh(x.double())
    fin = torch.isfinite(r)
    assert torch.isnan(y[~fin]).all()
    err = ((y[fin] - r[fin]).abs() / r[fin].abs().clamp_min(1e-30)).max()
    assert err < 1e-6, float(err)
    assert y[-3] == 1.0 and y[-2] == -1.0


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "cap2"])
@pytest.mark.parametrize("bad", ["q-nan", "k-nan", "k-inf", "v-nan"])
def test_non_finite_pattern_matches_reference(bad: str, softcap: float | None) -> None:
    """NaN / Inf inputs give the same non-finite rows as the reference (softcap maps an Inf score to +-softcap)."""
    c = Case("nan", 20, 20, 2, 1, 16, True, (-1, -1), 0, 0, dv=8)
    g = gen(31)
    q, k, v = ku.qkv(c, torch.float32, g, 2.0)
    t = {"q": q, "k": k, "v": v}[bad[0]]
    t[0, 5, 0, 3] = math.nan if bad.endswith("nan") else math.inf
    out = torch.zeros(1, c.sq, c.hq, c.dv, device=DEVICE)
    lse = torch.full((1, c.hq, c.sq), -math.inf, device=DEVICE)
    rout, rlse = out.double(), lse.double()
    ta.fwd_step(q, k, v, out, lse, scale=0.25, softcap=softcap, causal=True)
    ref.fwd_step(q.double(), k.double(), v.double(), rout, rlse, scale=0.25, softcap=softcap, causal=True)
    assert torch.equal(torch.isfinite(out), torch.isfinite(rout))
    assert torch.equal(torch.isfinite(lse), torch.isfinite(rlse))  # an Inf score: lse inf (reference) or NaN
    ok = torch.isfinite(rout)
    assert rel(out[ok], rout[ok]) < 1e-5


@pytest.mark.parametrize("d,dv", [(16, 8), (24, 16), (40, 24), (8, 40), (96, 64)], ids=lambda x: str(x))
def test_head_dim_pairs(d: int, dv: int) -> None:
    """Non-power-of-two D and Dv padded independently (BLOCK_D / BLOCK_DV), Dv < D and Dv > D, fwd and bwd."""
    c = Case(f"d{d}v{dv}", 21, 26, 2, 1, d, True, (-1, -1), 10, 0, dv=dv)
    ku.check_fwd(ta.TILES, c, torch.float32, gen(6 + d + dv), 1e-5, softcap=3.0, amp=2.0)
    _check_bwd(c, torch.float32, 3.0, True, 5000 + d + dv)


def test_empty_block_leaves_state_untouched() -> None:
    c = Case("empty", 20, 20, 2, 1, 16, True, (-1, -1), 0, 40, dv=8)
    g = gen(5)
    q, k, v, dout, lse_g, delta, dq, dk, dv = ku.bwd_inputs(c, torch.float32, g, None, 2.0)
    out, lse = ku.state(c, g)
    snap = [t.clone() for t in (out, lse, dq, dk, dv)]
    ta.fwd_step(q, k, v, out, lse, scale=0.2, softcap=2.0, **c.mask_kw())
    ta.bwd_step(q, k, v, dout, lse_g, delta, dq, dk, dv, scale=0.2, softcap=2.0, deterministic=True, **c.mask_kw())
    for t, s in zip((out, lse, dq, dk, dv), snap):
        assert torch.equal(t, s)


def test_record_variants_and_errors() -> None:
    q = torch.zeros(1, 8, 4, 64, device=DEVICE)
    k = torch.zeros(1, 8, 2, 64, device=DEVICE)
    v = torch.zeros(1, 8, 2, 48, device=DEVICE)
    why = ta.KERNEL.why_not
    assert why(q, k, v) is None and why(q, k, v, softcap=50.0) is None and why(q, k, k, softcap=2) is None
    assert "dtypes" in why(q, k, v.half())
    assert "value head dim 512" in why(q, k, torch.zeros(1, 8, 2, 512, device=DEVICE))
    assert "shape" in why(q, k, torch.zeros(1, 9, 2, 48, device=DEVICE))
    assert "dtype" in why(q.double(), k.double(), v.double())
    out, lse = torch.zeros(1, 8, 4, 48, device=DEVICE), torch.zeros(1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out"):
        ta.fwd_step(q, k, v, torch.zeros_like(q), lse, scale=1.0)
    with pytest.raises(ValueError, match="softcap"):
        ta.fwd_step(q, k, v, out, lse, scale=1.0, softcap=-1.0)
    with pytest.raises(ValueError, match="dv"):
        ta.bwd_step(q, k, v, out, lse, lse, torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(k), scale=1.0)


def _args(kernel: str, softcap: float | None):
    from ds_burst.attention.validate import AttnArgs

    return AttnArgs(causal=True, softmax_scale=None, window_size=(-1, -1), layout="zigzag", backward="auto",
                    kernel=kernel, return_lse=False, softcap=softcap)


@pytest.mark.parametrize("softcap,dv", [(2.0, 16), (None, 8), (50.0, 8)], ids=["softcap", "mla", "both"])
def test_plan_picks_triton_for_variants(softcap: float | None, dv: int) -> None:
    from ds_burst.attention.call_plan import choose_kernel
    from ds_burst.dist.comm import GroupInfo

    def pick(name: str, *xs: torch.Tensor) -> str:
        return choose_kernel(*xs, _args(name, softcap), (-1, 0), False, GroupInfo(None, 0, 1)).name

    q = torch.zeros(1, 16, 4, 16, device=DEVICE)
    k = torch.zeros(1, 16, 2, 16, device=DEVICE)
    v = torch.zeros(1, 16, 2, dv, device=DEVICE)
    assert pick("triton", q, k, v) == "triton"
    assert pick("torch", q, k, v) == "torch"
    if ku.HAS_CUDA:
        for name in ("auto", "sdpa"):
            assert pick(name, q, k, v) == "triton"
    else:  # CPU: only an explicit kernel="triton" (under the interpreter) runs the Triton tiles
        for name in ("auto", "sdpa"):
            assert pick(name, q, k, v) == "torch"
        assert pick("triton", q.double(), k.double(), v.double()) == "torch"


def test_burst_attn_func_runs_triton_variant() -> None:
    """End to end on one rank: kernel='triton' with softcap and Dv != D runs the Triton tiles, matches float64."""
    from ds_burst.attention.api import burst_attn_func
    from ds_burst.attention.lookup import lookup_plan

    g = gen(41)
    q, k, v = (torch.randn(1, 24, h, dd, generator=g, dtype=torch.float64) for h, dd in ((4, 16), (2, 16), (2, 8)))
    do = torch.randn(1, 24, 4, 8, generator=g, dtype=torch.float64)
    rout, *rgrads = ku.ref_grads(q, k, v, do, causal=True, softcap=2.0)
    xs = [t.float().to(DEVICE).requires_grad_() for t in (q, k, v)]
    plan = lookup_plan(*(x.detach() for x in xs), True, None, (-1, -1), None, "zigzag", "auto", "triton", False,
                       False, "once", None, False, 2.0, None)
    assert plan.setup.kernel.name == "triton"
    out = burst_attn_func(*xs, causal=True, kernel="triton", softcap=2.0)
    out.backward(do.float().to(DEVICE))
    assert rel(out.detach(), rout) < 2e-5
    for x, r in zip(xs, rgrads):
        assert rel(x.grad, r) < 2e-5


# ------------------------------------------------------------------------------------------------------------
# GPU: bigger sizes, bf16 (skipped without CUDA)
# ------------------------------------------------------------------------------------------------------------


GPU_CASES = [
    Case("gpu-causal-d192v128", 2048, 2048, 8, 2, 192, True, (-1, -1), 0, 0, dv=128),
    Case("gpu-full-d192v128", 1024, 2048, 4, 4, 192, False, (-1, -1), 0, 0, dv=128),
    Case("gpu-causal-straddle-d128", 2048, 1024, 8, 2, 128, True, (-1, -1), 1000, 1500, dv=128),
    Case("gpu-window-d128", 2048, 2048, 4, 2, 128, True, (300, 0), 5000, 4500, dv=128),
]


@gpu
@pytest.mark.parametrize("softcap", [None, 50.0], ids=["nocap", "cap50"])
@pytest.mark.parametrize("case", GPU_CASES, ids=repr)
def test_gpu_variants_bf16(case: Case, softcap: float | None) -> None:
    if softcap is None and case.d == case.dv:
        pytest.skip("the plain case is tests/test_triton_kernels.py's")
    dtype = torch.bfloat16
    ku.check_fwd(ta.TILES, case, dtype, gen(6000 + GPU_CASES.index(case)), ta.KERNEL.tolerance[dtype][0],
              softcap=softcap)
    runs = []
    for det, atomic in ((True, False), (True, False), (False, True)):
        runs.append(_check_bwd(case, dtype, softcap, det, 7000 + GPU_CASES.index(case), ta.Tiles(atomic_dq=atomic)))
    assert runs[0] == runs[1], "deterministic=True must be reproducible"
