"""One conformance suite for every registered local kernel (reference, Triton, SDPA, and a stub fourth kernel
registered here): the tile contract of :mod:`ds_burst.kernels.contract` against float64 attention, tolerances from
the records. ``fwd_step`` runs each block as two key chunks continuing one state (as the ring does), ``bwd_step``
adds its gradients from the global lse and delta (twice with ``deterministic=True``: bitwise the same); a variant
(softcap, ``Dv != D``) runs where the record declares it. The stub also runs ``burst_attn_func`` on two gloo ranks.
"""

from __future__ import annotations

import collections
import functools
import types
import zlib

import pytest
import torch

from dist_utils import run_ranks, values
from ds_burst.kernels import reference, registry
from ds_burst.kernels.contract import KernelSpec
from ds_burst.kernels.reference import naive_attention
from kernel_utils import DEVICE, Case, rel, stub_kernel

STUB = stub_kernel()
CASES = {c.name: c for c in [
    Case("full-gqa", 24, 20, 4, 2, 16),
    Case("causal-diagonal", 24, 24, 4, 4, 16, True, q_off=40, k_off=40),
    Case("causal-offset-mqa", 20, 24, 4, 1, 16, True, q_off=30, k_off=16),
    Case("window-left", 24, 24, 2, 2, 16, True, (5, 0), 8, 8),
    Case("window-both-noncausal", 20, 28, 2, 1, 16, False, (3, 6), 10, 4),
    Case("rows-without-keys", 16, 16, 2, 2, 16, True, k_off=8),
    Case("mla-causal-offset", 20, 24, 4, 2, 16, True, q_off=30, k_off=16, dv=8),
]}
SOFTCAP = {"mla-causal-offset": 3.0, "window-left": 2.0}


def _params():
    for kname in [*registry.names()[1:], STUB.name]:
        try:
            spec = STUB if kname == STUB.name else registry.get(kname)
        except ValueError as exc:  # triton not installed
            yield pytest.param(kname, torch.float32, "full-gqa", marks=pytest.mark.skip(reason=str(exc)))
            continue
        for dtype in spec.tolerance:
            for cname in CASES:
                yield pytest.param(kname, dtype, cname, id=f"{kname}-{str(dtype)[6:]}-{cname}")


@pytest.fixture(autouse=True)
def _stub_registered():
    registry.register(STUB)
    yield
    registry.unregister(STUB.name)


@pytest.mark.parametrize("kname,dtype,cname", list(_params()))
def test_tile_contract(kname: str, dtype: torch.dtype, cname: str):
    spec = registry.get(kname)
    c = CASES[cname]
    softcap = SOFTCAP.get(cname)
    g = torch.Generator().manual_seed(zlib.crc32(cname.encode()))
    q64, k64, v64 = (torch.randn(2, n, h, d, generator=g, dtype=torch.float64)
                     for n, h, d in ((c.sq, c.hq, c.d), (c.sk, c.hkv, c.d), (c.sk, c.hkv, c.dv)))
    do64 = torch.randn(2, c.sq, c.hq, c.dv, generator=g, dtype=torch.float64)
    q, k, v, do = (x.to(DEVICE, dtype) for x in (q64, k64, v64, do64))
    why = spec.why_not(q, k, v, softcap=softcap)
    if why is not None:
        pytest.skip(f"kernel {kname!r} declares it does not run this: {why}")
    scale = c.d**-0.5
    ref_in = [x.clone().requires_grad_() for x in (q64, k64, v64)]
    mask = dict(causal=c.causal, window=c.window, q_offset=c.q_off, softcap=softcap)
    ref_out, ref_lse = naive_attention(*ref_in, scale=scale, k_offset=c.k_off, **mask)
    ref_out.backward(do64)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.zeros(2, c.sq, c.hq, c.dv, dtype=acc, device=DEVICE)
    lse = torch.full((2, c.hq, c.sq), -torch.inf, dtype=acc, device=DEVICE)
    cut = c.sk // 2 + 1  # two key chunks: the second continues the state of the first
    spec.impl.fwd_step(q, k[:, :cut], v[:, :cut], out, lse, scale=scale, k_offset=c.k_off, **mask)
    spec.impl.fwd_step(q, k[:, cut:], v[:, cut:], out, lse, scale=scale, k_offset=c.k_off + cut, **mask)
    tol_f, tol_b = spec.tolerance[dtype]
    assert rel(out, ref_out) < tol_f and rel(lse, ref_lse) < tol_f

    out_in = out.to(dtype)
    delta = spec.impl.bwd_preprocess(out_in, do)
    runs = []
    for _ in range(2 if spec.deterministic else 1):  # deterministic=True: bitwise the same twice
        grads = [torch.zeros(x.shape, dtype=acc, device=DEVICE) for x in (q, k, v)]
        spec.impl.bwd_step(q, k, v, do, lse, delta, *grads, scale=scale, k_offset=c.k_off, deterministic=True,
                           out=out_in, **mask)
        runs.append(grads)
    for name, got, want in zip(("dq", "dk", "dv"), runs[0], (x.grad for x in ref_in)):
        assert rel(got, want) < tol_b, (name, rel(got, want))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[-1]))


def test_a_wrong_kernel_fails_the_contract():
    """The suite can fail: a registered kernel whose forward drops the scale is caught."""
    def bad_fwd(q, k, v, out, lse, *, scale, **kw):
        reference.fwd_step(q, k, v, out, lse, scale=scale * 1.01, **kw)

    impl = types.SimpleNamespace(fwd_step=functools.wraps(reference.fwd_step)(bad_fwd),
                                 bwd_preprocess=reference.bwd_preprocess, bwd_step=reference.bwd_step)
    registry.register(KernelSpec("bad", impl, dtypes=(torch.float64,), devices=("cpu", "cuda"),
                                 tolerance={torch.float64: (1e-12, 1e-12)}))
    try:
        with pytest.raises(AssertionError):
            test_tile_contract("bad", torch.float64, "full-gqa")
    finally:
        registry.unregister("bad")


def test_a_kernel_off_the_contract_is_refused():
    """A record whose step functions miss a keyword of the contract, or order the tensors differently, is refused
    when it is made; so is a name taken by another kernel."""
    def fwd_step(q, k, v, out, lse, *, scale, q_offset=0, k_offset=0, causal=False, window=(-1, -1)):
        pass

    def bwd_step(q, k, v, dout, lse, delta, dk, dq, dv, **kw):
        pass

    impl = types.SimpleNamespace(fwd_step=fwd_step, bwd_preprocess=reference.bwd_preprocess, bwd_step=bwd_step)
    with pytest.raises(TypeError, match="softcap") as err:
        KernelSpec("off", impl, dtypes=(torch.float32,), devices=("cpu",))
    assert "out of order: ['dq', 'dk']" in str(err.value)
    with pytest.raises(TypeError, match="attend"):
        KernelSpec("off", reference, dtypes=(torch.float32,), devices=("cpu",), whole=True)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(stub_kernel("torch"))


def _stub_ring_worker(rank: int, world: int) -> dict:
    """Two ranks: the stub kernel, registered in this process, runs burst_attn_func (both backward patterns,
    causal and a window) against float64 attention over the whole sequence."""
    from ds_burst import burst_attn_func
    from ds_burst.kernels import registry
    from kernel_utils import ref_grads, rel, stub_kernel

    calls: collections.Counter = collections.Counter()
    registry.register(stub_kernel(calls=calls))
    errs = {}
    for backward, causal, window in (("burst", True, (-1, -1)), ("ring", False, (6, 3))):
        g = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(1, 16 * world, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
        do = torch.randn(q.shape, generator=g, dtype=torch.float64)
        ref = ref_grads(q, k, v, do, causal=causal, window=window)
        mine = slice(16 * rank, 16 * (rank + 1))
        xs = [x[:, mine].clone().requires_grad_() for x in (q, k, v)]
        out = burst_attn_func(*xs, causal=causal, window_size=window, layout="contiguous", backward=backward,
                              kernel="stub")
        out.backward(do[:, mine])
        errs[backward] = [rel(a, b[:, mine]) for a, b in zip([out, *(x.grad for x in xs)], ref)]
    return {"errs": errs, "calls": dict(calls)}


def test_stub_kernel_runs_burst_attn_func_on_two_ranks():
    for res in values(run_ranks(_stub_ring_worker, 2, timeout=240)):
        assert res["calls"]["fwd_step"] > 0 and res["calls"]["bwd_step"] > 0, res
        for backward, errs in res["errs"].items():
            assert max(errs) < 1e-12, (backward, errs)


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
        vis = vis.T if bwd else vis  # backward: rows are keys
        n_rows, n_other = vis.shape
        has_lo, has_hi, win_l, win_r = tile_math.mask_args(causal, window)
        for r0 in range(0, n_rows, block_r):
            rows = vis[r0:r0 + block_r]
            start, n_a, n_b, n_c = tile_math.span(r0, n_rows, n_other, d0, win_l, win_r, has_lo, has_hi, bwd, align,
                                                  block_r, block_o)
            tiles = [start + t * block_o for t in range(n_a + n_b + n_c)]
            where = (sq, sk, d0, causal, window, block_r, block_o, bwd, r0, start, n_a, n_b, n_c)
            seen = torch.zeros(n_other, dtype=torch.bool)
            for i, t in enumerate(tiles):
                seen[max(t, 0):t + block_o] = True
                masked = i < n_a or i >= n_a + n_b  # align: the rounded-down start may be a tile nobody sees
                assert rows[:, max(t, 0):t + block_o].any() or (align > 1 and masked), ("a tile nobody sees", where)
            assert not (rows.any(0) & ~seen).any(), ("a visible pair outside the span", where)
            for t in tiles[n_a:n_a + n_b]:
                assert t + block_o <= n_other and rows[:, t:t + block_o].all(), ("a partly visible mask-free", where)
                assert not (bwd and r0 + block_r > n_rows), ("a mask-free tile of an overhanging key tile", where)
