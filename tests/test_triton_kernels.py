"""Triton attention tiles (ds_burst.kernels.triton_attn) against the PyTorch reference in float64.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (``kernel_utils`` sets TRITON_INTERPRET=1
before Triton is imported), so shapes stay small. Tests marked ``gpu`` run only where CUDA is available. The GPU
benchmark of the tiles is ``launch/bench_tiles.py``.
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
ATOMIC = ta.Tiles(atomic_dq=True)  # deterministic=False runs the atomic dQ kernel path

CASES = [
    Case("full-gqa2", 37, 29, 4, 2, 32, False, (-1, -1), 0, 0, b=2),
    Case("causal-diag", 37, 37, 4, 4, 32, True, (-1, -1), 100, 100),
    Case("causal-below-diag-mqa", 29, 37, 4, 1, 32, True, (-1, -1), 64, 0),
    Case("causal-straddle", 37, 29, 4, 2, 32, True, (-1, -1), 10, 20),
    Case("causal-above-diag-rows-empty", 37, 29, 4, 2, 32, True, (-1, -1), 0, 20),
    Case("causal-window-7", 45, 40, 4, 2, 32, True, (7, 0), 30, 20),
    Case("window-5-3", 37, 45, 4, 4, 32, False, (5, 3), 0, 8),
    Case("window-right-only", 33, 40, 4, 1, 32, False, (-1, 4), 20, 0),
    Case("causal-d80", 37, 37, 4, 2, 80, True, (-1, -1), 0, 0),
]


# ------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fwd_step_matches_reference(case: Case, dtype: torch.dtype) -> None:
    (out0, lse0), (out, lse) = ku.check_fwd(ta.TILES, case, dtype, gen(1000 + CASES.index(case)),
                                         ta.KERNEL.tolerance[dtype][0])
    # Rows that see no key keep their ku.state bitwise (out rows whose lse is -inf become 0, as in the reference).
    idle = ~ref.visible_mask(case.q_off, case.sq, case.k_off, case.sk, case.causal, case.window, DEVICE).any(1)
    if idle.any():
        had = torch.isfinite(lse0[:, :, idle])
        assert torch.equal(lse[:, :, idle], lse0[:, :, idle])
        o_idle, o0_idle = out[:, idle].transpose(1, 2), out0[:, idle].transpose(1, 2)  # [B, Hq, rows, D]
        assert torch.equal(o_idle[had], o0_idle[had])
        assert (o_idle[~had] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fwd_step_continuation(dtype: torch.dtype) -> None:
    """Two calls over adjacent key ranges, from a non-trivial ku.state, equal one reference call over both."""
    c = Case("cont", 41, 50, 4, 2, 32, True, (-1, -1), 30, 0)
    g = gen(7)
    q, k, v = ku.qkv(c, dtype, g)
    out, lse = ku.state(c, g)
    rout, rlse = out.double(), lse.double()
    scale = 0.3
    split = 23
    ta.fwd_step(q, k[:, :split], v[:, :split], out, lse, scale=scale, q_offset=30, k_offset=0, causal=True)
    ta.fwd_step(q, k[:, split:], v[:, split:], out, lse, scale=scale, q_offset=30, k_offset=split, causal=True)
    ref.fwd_step(q.double(), k.double(), v.double(), rout, rlse, scale=scale, q_offset=30, k_offset=0, causal=True)
    tol = ta.KERNEL.tolerance[dtype][0]
    assert rel(out, rout) < tol
    assert rel(lse, rlse) < tol


def test_fwd_step_fresh_state_matches_naive() -> None:
    """From the empty ku.state (lse = -inf) the result is plain attention."""
    c = Case("fresh", 30, 30, 4, 2, 32, True, (9, 0), 0, 0)
    g = gen(8)
    q, k, v = ku.qkv(c, torch.float32, g)
    out = ku.randn((1, c.sq, c.hq, c.d), g)
    lse = torch.full((1, c.hq, c.sq), -math.inf, device=DEVICE)
    ta.fwd_step(q, k, v, out, lse, scale=0.2, causal=True, window=(9, 0))
    rout, rlse = ref.naive_attention(q.double(), k.double(), v.double(), causal=True, window=(9, 0), scale=0.2)
    assert rel(out, rout) < 1e-5
    assert rel(lse, rlse) < 1e-5


# ------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_bwd_step_matches_reference(case: Case, dtype: torch.dtype, deterministic: bool) -> None:
    if not deterministic and dtype != torch.float32 and not ku.HAS_CUDA:
        pytest.skip("atomic dQ path covered in fp32 on CPU (interpreter time)")
    ku.check_bwd(ATOMIC, case, dtype, gen(2000 + CASES.index(case)), ta.KERNEL.tolerance[dtype][1],
              deterministic=deterministic)


SWEEP_MASKS = [
    (True, (-1, -1)),  # causal
    (True, (12, 0)),  # causal sliding window
    (False, (7, 8)),  # two-sided window, L + R + 1 = 16 (tile-size boundary)
    (False, (-1, 3)),  # right bound only
    (False, (5, -1)),  # left bound only
]


@pytest.mark.parametrize("block_m", [16, 32] if ta.INTERPRET else [0], ids=lambda b: f"bm{b}")
@pytest.mark.parametrize("causal,window", SWEEP_MASKS, ids=["causal", "causal-w12", "w7-8", "right3", "left5"])
def test_offset_sweep(causal: bool, window: tuple[int, int], block_m: int) -> None:
    """Many q/k offset differences (all residues that matter for 16-wide tiles): catches off-by-one errors in
    the masked / mask-free tile ranges. Small shapes, fp32, forward and both backward modes."""
    tiles = ta.Tiles(atomic_dq=True, interpret_blocks=(block_m, 16)) if ta.INTERPRET else ATOMIC
    scale = 0.3
    # Every residue mod 16 of q_offset - k_offset (tile bounds shift with it), plus far-apart blocks.
    d0s = list(range(-8, 8)) + [-33, 30] if block_m != 32 else [-17, -2, 0, 7, 14, 29]
    for i, d0 in enumerate(d0s):
        # Sq = 34: last query tile has 2 rows (bm16); Sq = 33: last tile has a single row (bm32).
        c = Case("sweep", 34 if block_m != 32 else 33, 35, 1, 1, 16, causal, window, 50 + d0, 50)
        g = gen(100 * i + int(causal))
        ku.check_fwd(tiles, c, torch.float32, g, 1e-5, scale=scale)
        for det in (True, False) if i % 4 == 0 else (True,):
            ku.check_bwd(tiles, c, torch.float32, g, 1e-5, scale=scale, deterministic=det)


def test_bwd_preprocess() -> None:
    g = gen(3)
    for dtype in (torch.float32, torch.float16):
        out = ku.randn((2, 40, 3, 48), g, dtype).narrow(1, 5, 33)
        dout = ku.randn((2, 33, 3, 48), g, dtype)
        delta = ta.bwd_preprocess(out, dout)
        rdelta = ref.bwd_preprocess(out.double(), dout.double())
        assert delta.dtype == torch.float32 and delta.shape == (2, 3, 33)
        assert rel(delta, rdelta) < 1e-5


def test_bwd_deterministic_bitwise() -> None:
    c = Case("det", 45, 40, 4, 2, 32, True, (-1, -1), 20, 10)
    g = gen(4)
    q, k, v, dout, lse, delta, dq, dk, dv = ku.bwd_inputs(c, torch.float16, g)
    results = []
    for _ in range(2):
        a, b_, c_ = dq.clone(), dk.clone(), dv.clone()
        ta.bwd_step(q, k, v, dout, lse, delta, a, b_, c_, scale=0.2, deterministic=True, **c.mask_kw())
        results.append((a, b_, c_))
    for x, y in zip(*results):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------------------
# Empty blocks, head dims, strides, errors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "causal,window,q_off,k_off",
    [(True, (-1, -1), 0, 40), (False, (4, 2), 100, 0), (True, (5, 0), 200, 100)],
    ids=["causal-future", "window-far-left", "causal-window-far"],
)
def test_empty_block_leaves_state_untouched(causal: bool, window: tuple[int, int], q_off: int, k_off: int) -> None:
    c = Case("empty", 30, 30, 4, 2, 32, causal, window, q_off, k_off)
    g = gen(5)
    q, k, v, dout, lse_g, delta, dq, dk, dv = ku.bwd_inputs(c, torch.float32, g)
    out, lse = ku.state(c, g)
    snap = [t.clone() for t in (out, lse, dq, dk, dv)]
    ta.fwd_step(q, k, v, out, lse, scale=0.2, **c.mask_kw())
    ta.bwd_step(q, k, v, dout, lse_g, delta, dq, dk, dv, scale=0.2, **c.mask_kw())
    ta.bwd_step(q, k, v, dout, lse_g, delta, dq, dk, dv, scale=0.2, deterministic=True, **c.mask_kw())
    for t, s in zip((out, lse, dq, dk, dv), snap):
        assert torch.equal(t, s)


@pytest.mark.parametrize("d", [16, 24, 96, 256] if not ku.HAS_CUDA else [16, 24, 32, 64, 80, 96, 128, 256])
def test_head_dims(d: int) -> None:
    c = Case(f"d{d}", 21, 26, 2, 1, d, True, (-1, -1), 10, 0)
    g = gen(6 + d)
    ku.check_fwd(ta.TILES, c, torch.float32, g, 1e-5)
    ku.check_bwd(ta.TILES, c, torch.float32, g, 1e-5)


def test_head_dim_stride_and_block_shapes() -> None:
    """Inner-dim strides != 1, and (in the interpreter) BLOCK_M != BLOCK_N tiles."""
    tiles = ta.Tiles(interpret_blocks=(32, 16))
    c = Case("dstride", 35, 52, 4, 2, 32, True, (11, 0), 40, 0)
    g = gen(9)
    q = ku.randn((1, c.sq, c.hq, 2 * c.d), g)[..., ::2]
    k = ku.randn((1, c.sk, c.hkv, 2 * c.d), g)[..., 1::2]
    v = ku.randn((1, c.sk, c.hkv, c.d), g)
    assert q.stride(-1) == 2 and k.stride(-1) == 2
    out, lse = ku.state(c, g)
    rout, rlse = out.double(), lse.double()
    tiles.fwd_step(q, k, v, out, lse, scale=0.25, **c.mask_kw())
    ref.fwd_step(q.double(), k.double(), v.double(), rout, rlse, scale=0.25, **c.mask_kw())
    assert rel(out, rout) < 1e-5
    assert rel(lse, rlse) < 1e-5
    dout = ku.randn((1, c.sq, c.hq, c.d), g)
    lse_g = torch.where(torch.isfinite(rlse), rlse, torch.zeros_like(rlse)).float()
    delta = ku.randn((1, c.hq, c.sq), g)
    for det in (True, False):
        dq, dk, dv = (torch.zeros_like(x, dtype=torch.float32) for x in (q, k, v))
        rdq, rdk, rdv = ku.ref_bwd(c, q, k, v, dout, lse_g, delta, dq, dk, dv, 0.25)
        tiles.bwd_step(q, k, v, dout, lse_g, delta, dq, dk, dv, scale=0.25, deterministic=det, **c.mask_kw())
        for x, r in ((dq, rdq), (dk, rdk), (dv, rdv)):
            assert rel(x, r) < 1e-5


def test_record_and_errors() -> None:
    q = torch.zeros(1, 8, 4, 64, device=DEVICE)
    k = torch.zeros(1, 8, 2, 64, device=DEVICE)
    assert ta.KERNEL.why_not(q, k) is None
    assert "dtype" in ta.KERNEL.why_not(q.double(), k.double())
    assert "multiple" in ta.KERNEL.why_not(q, torch.zeros(1, 8, 3, 64, device=DEVICE))
    big_q, big_k = torch.zeros(1, 8, 4, 512, device=DEVICE), torch.zeros(1, 8, 2, 512, device=DEVICE)
    assert "head dim" in ta.KERNEL.why_not(big_q, big_k)
    if not ku.HAS_CUDA:  # the interpreter's bf16 dot is wrong: refused
        assert "bf16" in ta.KERNEL.why_not(q.bfloat16(), k.bfloat16())
    out, lse = torch.zeros_like(big_q), torch.zeros(1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        ta.fwd_step(big_q, big_k, big_k, out, lse, scale=1.0)
    with pytest.raises(ValueError, match="multiple"):
        ta.fwd_step(q, k[:, :, :1].expand(1, 8, 3, 64), k[:, :, :1].expand(1, 8, 3, 64), q.clone(),
                    torch.zeros(1, 4, 8, device=DEVICE), scale=1.0)
    with pytest.raises(ValueError, match="lse"):
        ta.fwd_step(q, k, k, q.clone(), torch.zeros(1, 8, 4, device=DEVICE), scale=1.0)


# ------------------------------------------------------------------------------------------------------------
# GPU: bigger sizes, bf16 (skipped without CUDA)
# ------------------------------------------------------------------------------------------------------------


GPU_CASES = [
    Case("gpu-causal-diag-d128", 2048, 2048, 8, 8, 128, True, (-1, -1), 4096, 4096),
    Case("gpu-full-gqa4-d64", 1024, 4096, 8, 2, 64, False, (-1, -1), 0, 0, b=2),
    Case("gpu-causal-straddle-d128", 4096, 2048, 4, 1, 128, True, (-1, -1), 1000, 3000),
    Case("gpu-window-d64", 2048, 2048, 4, 2, 64, True, (300, 0), 5000, 4500),
    Case("gpu-causal-d80", 1536, 1536, 4, 4, 80, True, (-1, -1), 0, 0),
]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=repr)
def test_gpu_large(case: Case, dtype: torch.dtype) -> None:
    seed = 3000 + GPU_CASES.index(case)
    tol_f, tol_b = ta.KERNEL.tolerance[dtype]
    ku.check_fwd(ta.TILES, case, dtype, gen(seed), tol_f)
    runs = [ku.check_bwd(ta.Tiles(atomic_dq=atomic), case, dtype, gen(seed + 1), tol_b, deterministic=det)[1]
            for det, atomic in ((True, False), (True, False), (False, True))]  # the same inputs each time
    for x, y in zip(runs[0], runs[1]):
        assert torch.equal(x, y), "deterministic=True must be bitwise reproducible"



def test_span_in_tl_matches_python() -> None:
    """The ``tl`` copy of ``tile_math.span`` (what the kernels run) returns what its plain Python source returns
    (checked against the mask in tests/test_kernel_conformance.py), both directions, for every row tile."""
    import triton
    import triton.language as tl

    from ds_burst.kernels import tile_math

    @triton.jit
    def kern(Out, n_rows, n_other, d0, win_l, win_r, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
             BWD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
        start, n_a, n_b, n_c = ta._span(tl.program_id(0) * BLOCK_R, n_rows, n_other, d0, win_l, win_r, HAS_LO,
                                        HAS_HI, BWD, 1, BLOCK_R, BLOCK_O)
        p = Out + tl.program_id(0) * 4
        tl.store(p, start)
        tl.store(p + 1, n_a)
        tl.store(p + 2, n_b)
        tl.store(p + 3, n_c)

    cases = [(37, 29, 10, True, (-1, -1), False), (40, 45, -8, False, (5, 3), True),
             (33, 40, 20, False, (-1, 4), False), (45, 40, 10, True, (7, 0), True)]
    for n_rows, n_other, d0, causal, window, bwd in cases:
        has_lo, has_hi, win_l, win_r = tile_math.mask_args(causal, window)
        tiles = -(-n_rows // 16)
        got = torch.zeros(tiles, 4, dtype=torch.int32, device=DEVICE)
        kern[(tiles,)](got, n_rows, n_other, d0, win_l, win_r, has_lo, has_hi, bwd, BLOCK_R=16, BLOCK_O=32)
        want = [tile_math.span(t * 16, n_rows, n_other, d0, win_l, win_r, has_lo, has_hi, bwd, 1, 16, 32)
                for t in range(tiles)]
        assert got.cpu().tolist() == [list(w) for w in want], (n_rows, n_other, d0, causal, window, bwd)
