"""One conformance suite for every local kernel (the PyTorch reference, Triton, torch's fused SDPA ops): the
tile contract of :mod:`ds_burst.kernels.reference` against plain float64 attention.

Each case is a block with global offsets and a mask. ``fwd_step`` runs it as two key chunks continuing one online
softmax state (what the ring does across steps), ``bwd_step`` adds the block's gradients given the global lse and
delta; outputs, lse and every gradient are compared with autograd through :func:`naive_attention` in float64.
Tolerances are per (kernel, dtype). Triton runs under its interpreter on CPU (fp32/fp16 only: the interpreter's
bf16 ``tl.dot`` is wrong), so the shapes are small; kernel-specific behaviour lives in each kernel's own tests.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ds_burst.kernels import (
    reference,  # noqa: E402
    sdpa_attn,  # noqa: E402
)
from ds_burst.kernels.reference import naive_attention  # noqa: E402

try:
    from ds_burst.kernels import triton_attn
except ImportError:  # pragma: no cover - triton is in requirements-cpu.txt
    triton_attn = None

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: kernel -> {dtype: (forward tolerance, gradient tolerance)}, relative L2 against float64
KERNELS = {
    "reference": (reference, {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5)}),
    "triton": (triton_attn, {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 3e-3)}),
    "sdpa": (sdpa_attn, {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}),
}
#: name -> (Sq, Sk, Hq, Hkv, D, causal, window, q_offset, k_offset)
CASES = {
    "full-gqa": (24, 20, 4, 2, 16, False, (-1, -1), 0, 0),
    "causal-diagonal": (24, 24, 4, 4, 16, True, (-1, -1), 40, 40),
    "causal-offset-mqa": (20, 24, 4, 1, 16, True, (-1, -1), 30, 16),
    "window-left": (24, 24, 2, 2, 16, True, (5, 0), 8, 8),
    "window-both-noncausal": (20, 28, 2, 1, 16, False, (3, 6), 10, 4),
    "rows-without-keys": (16, 16, 2, 2, 16, True, (-1, -1), 0, 8),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(b)
    if not bool(finite.all()):  # lse of rows without keys: -inf on both sides
        assert torch.equal(torch.isfinite(a), finite) and torch.equal(a[~finite], b[~finite])
        a, b = a[finite], b[finite]
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _params():
    for kname, (mod, tols) in KERNELS.items():
        for dtype in tols:
            for cname in CASES:
                marks = [pytest.mark.skipif(mod is None, reason="triton not installed")]
                yield pytest.param(kname, dtype, cname, id=f"{kname}-{str(dtype)[6:]}-{cname}", marks=marks)


@pytest.mark.parametrize("kname,dtype,cname", list(_params()))
def test_tile_contract(kname: str, dtype: torch.dtype, cname: str):
    mod, tols = KERNELS[kname]
    sq, sk, hq, hkv, d, causal, window, q_off, k_off = CASES[cname]
    g = torch.Generator().manual_seed(zlib.crc32(cname.encode()))
    q64, k64, v64 = (torch.randn(2, n, h, d, generator=g, dtype=torch.float64)
                     for n, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    do64 = torch.randn(2, sq, hq, d, generator=g, dtype=torch.float64)
    scale = d**-0.5
    ref_in = [x.clone().requires_grad_() for x in (q64, k64, v64)]
    ref_out, ref_lse = naive_attention(*ref_in, causal=causal, window=window, scale=scale, q_offset=q_off,
                                       k_offset=k_off)
    ref_out.backward(do64)

    q, k, v, do = (x.to(DEVICE, dtype) for x in (q64, k64, v64, do64))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.zeros(2, sq, hq, d, dtype=acc, device=DEVICE)
    lse = torch.full((2, hq, sq), -torch.inf, dtype=acc, device=DEVICE)
    cut = sk // 2 + 1  # two key chunks: the second continues the state of the first
    mask = dict(causal=causal, window=window, q_offset=q_off)
    mod.fwd_step(q, k[:, :cut], v[:, :cut], out, lse, scale=scale, k_offset=k_off, **mask)
    mod.fwd_step(q, k[:, cut:], v[:, cut:], out, lse, scale=scale, k_offset=k_off + cut, **mask)
    tol_f, tol_b = tols[dtype]
    assert _rel(out, ref_out) < tol_f and _rel(lse, ref_lse) < tol_f

    out_in = out.to(dtype)
    delta = mod.bwd_preprocess(out_in, do)
    dq = torch.zeros(q.shape, dtype=acc, device=DEVICE)
    dk, dv = (torch.zeros(k.shape, dtype=acc, device=DEVICE) for _ in range(2))
    extra = {"out": out_in} if getattr(mod, "BWD_NEEDS_OUT", False) else {}
    mod.bwd_step(q, k, v, do, lse, delta, dq, dk, dv, scale=scale, k_offset=k_off, **mask, **extra)
    for name, got, want in (("dq", dq, ref_in[0].grad), ("dk", dk, ref_in[1].grad), ("dv", dv, ref_in[2].grad)):
        assert _rel(got, want) < tol_b, (name, _rel(got, want))


def test_a_wrong_kernel_fails_the_contract(monkeypatch: pytest.MonkeyPatch):
    """The suite can fail: a kernel whose forward drops the scale is caught."""
    def bad_fwd(q, k, v, out, lse, *, scale, **kw):
        reference.fwd_step(q, k, v, out, lse, scale=scale * 1.01, **kw)

    monkeypatch.setitem(KERNELS, "reference", (type("Bad", (), {"fwd_step": staticmethod(bad_fwd)}),
                                               {torch.float64: (1e-12, 1e-12)}))
    with pytest.raises(AssertionError):
        test_tile_contract("reference", torch.float64, "full-gqa")


def _span_cases(n: int, seed: int):
    """Random spans: lengths, offsets, mask, tile sizes, direction."""
    g = torch.Generator().manual_seed(seed)
    windows = [(-1, -1), (-1, 0), (5, 0), (0, 3), (7, 8), (-1, 3), (5, -1), (40, 0), (0, 0)]

    def pick(hi: int) -> int:
        return int(torch.randint(0, hi, (1,), generator=g))

    for _ in range(n):
        sq, sk = 1 + pick(90), 1 + pick(90)
        yield (sq, sk, pick(120) - 60, bool(pick(2)), windows[pick(len(windows))], (16, 32, 64)[pick(3)],
               (16, 32)[pick(2)], bool(pick(2)))


@pytest.mark.parametrize("align", [1, 16])
def test_span_arithmetic_matches_the_mask(align: int):
    """``tile_math.span`` (the source the tl and Gluon kernels compile), as plain Python, against the mask of
    ``core.mask``: every visible pair lies in a visited tile, every mask-free tile is visible to every row, and no
    visited tile is invisible to every row, in both directions (``align=16``, the Hopper backward's: a start
    rounded down may add one masked tile nobody sees)."""
    from ds_burst.kernels import tile_math

    for sq, sk, d0, causal, window, block_r, block_o, bwd in _span_cases(300, 11 + align):
        if align > 1 and not bwd:
            continue
        if causal and window[1] > 0:
            window = (window[0], 0)
        vis = reference.visible_mask(d0, sq, 0, sk, causal, window, torch.device("cpu"))
        if bwd:
            vis = vis.T  # rows are keys
        n_rows, n_other = vis.shape
        flags = tile_math.mask_args(causal, window)
        for r0 in range(0, n_rows, block_r):
            rows = vis[r0:r0 + block_r]
            start, n_a, n_b, n_c = tile_math.span(r0, n_rows, n_other, d0, flags[2], flags[3], flags[0], flags[1],
                                                  bwd, align, block_r, block_o)
            tiles = [start + t * block_o for t in range(n_a + n_b + n_c)]
            where = (sq, sk, d0, causal, window, block_r, block_o, bwd, r0, start, n_a, n_b, n_c)
            seen = torch.zeros(n_other, dtype=torch.bool)
            for i, t in enumerate(tiles):
                seen[max(t, 0):t + block_o] = True
                masked = i < n_a or i >= n_a + n_b
                assert rows[:, max(t, 0):t + block_o].any() or (align > 1 and masked), ("a tile nobody sees", where)
            assert not (rows.any(0) & ~seen).any(), ("a visible pair outside the span", where)
            for t in tiles[n_a:n_a + n_b]:
                assert t + block_o <= n_other and rows[:, t:t + block_o].all(), ("a partly visible mask-free", where)
                assert not (bwd and r0 + block_r > n_rows), ("a mask-free tile of an overhanging key tile", where)
