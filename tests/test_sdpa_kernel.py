"""The ``sdpa`` local kernel (ds_burst.kernels.sdpa_attn) against the PyTorch reference in float64.

CPU tests run torch's flash-attention CPU op (fp64, fp32 and bf16); tests marked ``gpu`` (skipped without CUDA) run
the cuDNN and FlashAttention-2 ops in bf16 at S = 1024..4096. Errors are relative L2 against
``kernels/reference.py`` evaluated in float64 on the same (upcast) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from ds_burst.kernels import reference as ref
from ds_burst.kernels import sdpa_attn as sa
from kernel_utils import HAS_CUDA, Case, gen, gpu, randn, rel

CPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16]


CASES = [
    Case("full-gqa2-b2", 37, 29, 4, 2, 32, False, (-1, -1), 0, 0, b=2),
    Case("causal-coincident", 37, 37, 4, 4, 32, True, (-1, -1), 100, 100),
    Case("causal-coincident-mqa-d24", 48, 48, 4, 1, 24, True, (-1, -1), 0, 0),
    Case("causal-full-below-diag", 29, 37, 4, 2, 32, True, (-1, -1), 64, 0),
    Case("causal-offset-keys-first", 29, 45, 4, 1, 32, True, (-1, -1), 50, 40),
    Case("causal-offset-rows-empty", 45, 29, 4, 2, 32, True, (-1, -1), 40, 50, b=2),
    Case("causal-straddle", 37, 29, 4, 2, 32, True, (-1, -1), 10, 20),
    Case("right-window-only", 33, 40, 4, 1, 32, False, (-1, 4), 20, 0),
    Case("causal-wide-left-window", 37, 37, 4, 2, 32, True, (100, 0), 0, 0),
    Case("causal-d80", 37, 37, 4, 2, 80, True, (-1, -1), 0, 0),
    # masks the ops cannot express: fallback
    Case("causal-window-7", 45, 40, 4, 2, 32, True, (7, 0), 30, 20, fused=False),
    Case("window-5-3", 37, 45, 4, 4, 32, False, (5, 3), 0, 8, fused=False),
]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(c: Case, dtype: torch.dtype, seed: int, device: torch.device | str = "cpu"):
    g = gen(seed)
    q = randn((c.b, c.sq, c.hq, c.d), g, dtype, device)
    k = randn((c.b, c.sk, c.hkv, c.d), g, dtype, device)
    v = randn((c.b, c.sk, c.hkv, c.d), g, dtype, device)
    return q, k, v, g


def _state(c: Case, g: torch.Generator, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """Non-trivial running state: random normalised out, finite lse except every third row (no key yet)."""
    out = randn((c.b, c.sq, c.hq, c.d), g, _acc(dtype), device, 0.5)
    lse = randn((c.b, c.hq, c.sq), g, _acc(dtype), device) + 2.0
    lse[:, :, ::3] = -math.inf
    out[:, ::3] = 0.0
    return out, lse


def _chunks(sk: int, n: int) -> list[tuple[int, int]]:
    bounds = sorted({0, sk, *[sk * i // n for i in range(1, n)]})
    return list(zip(bounds[:-1], bounds[1:]))


def _fallbacks() -> int:
    return sum(n for (_, path), n in sa.STATS.items() if path.startswith("fallback"))


@pytest.fixture(autouse=True)
def _clean_stats():
    sa.STATS.clear()
    yield
    sa.STATS.clear()


# ---------------------------------------------------------------------------------------------------------------
# forward


def _check_fwd(c: Case, dtype: torch.dtype, n_chunks: int, device: torch.device | str = "cpu",
               seed: int = 0) -> None:
    q, k, v, g = _inputs(c, dtype, seed, device)
    out, lse = _state(c, g, dtype, device)
    out_r, lse_r = out.double().clone(), lse.double().clone()
    for k0, k1 in _chunks(c.sk, n_chunks):  # continue the state over adjacent key blocks
        sa.fwd_step(q, k[:, k0:k1], v[:, k0:k1], out, lse, scale=c.d**-0.5, **c.mask_kw(k0))
    ref.fwd_step(q.double(), k.double(), v.double(), out_r, lse_r, scale=c.d**-0.5, **c.mask_kw())
    tol = sa.KERNEL.tolerance[dtype][0]
    assert torch.equal(torch.isfinite(lse), torch.isfinite(lse_r))
    fin = torch.isfinite(lse_r)
    assert rel(out, out_r) < tol, rel(out, out_r)
    assert rel(lse[fin], lse_r[fin]) < tol
    if c.fused:
        assert _fallbacks() == 0, dict(sa.STATS)
    else:
        assert _fallbacks() > 0


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("c", CASES, ids=repr)
def test_fwd_one_call(c: Case, dtype: torch.dtype) -> None:
    _check_fwd(c, dtype, 1)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("c", CASES, ids=repr)
def test_fwd_continued_over_key_blocks(c: Case, dtype: torch.dtype) -> None:
    _check_fwd(c, dtype, 3, seed=1)


def test_fwd_rows_without_keys_keep_state_bitwise() -> None:
    c = CASES[5]  # causal-offset-rows-empty: the first 10 query rows see no key of this block
    q, k, v, g = _inputs(c, torch.float32, 3)
    out, lse = _state(c, g, torch.float32)
    out0, lse0 = out.clone(), lse.clone()
    sa.fwd_step(q, k, v, out, lse, scale=0.3, **c.mask_kw())
    assert torch.equal(out[:, :10], out0[:, :10]) and torch.equal(lse[:, :, :10], lse0[:, :, :10])
    assert not torch.equal(out[:, 10:], out0[:, 10:])


def test_fwd_strided_views() -> None:
    """q/k/v from packed buffers, out/lse as slices of bigger state buffers."""
    b, s, h, d = 2, 40, 4, 32
    g = gen(4)
    qkv = randn((b, s, 3, h, d), g, torch.bfloat16, "cpu")
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out_full = torch.zeros(b, s + 8, h, d)
    lse_full = torch.full((b, h, s + 8), -math.inf)
    out, lse = out_full[:, 4 : 4 + s], lse_full[:, :, 4 : 4 + s]
    sa.fwd_step(q, k, v, out, lse, scale=0.2, causal=True)
    out_r, lse_r = ref.naive_attention(q.double(), k.double(), v.double(), causal=True, scale=0.2)
    tol = sa.KERNEL.tolerance[torch.bfloat16][0]
    assert rel(out, out_r) < tol and rel(lse, lse_r) < tol
    assert torch.all(out_full[:, :4] == 0) and torch.all(out_full[:, 4 + s :] == 0)
    assert _fallbacks() == 0


def test_empty_block_is_untouched() -> None:
    c = Case("empty", 16, 16, 2, 2, 16, True, (-1, -1), 0, 32)
    q, k, v, g = _inputs(c, torch.float32, 5)
    out, lse = _state(c, g, torch.float32)
    out0, lse0 = out.clone(), lse.clone()
    sa.fwd_step(q, k, v, out, lse, scale=0.25, **c.mask_kw())
    do = randn(q.shape, g, torch.float32, "cpu")
    dq, dk, dv = torch.ones(q.shape), torch.ones(k.shape), torch.ones(v.shape)
    sa.bwd_step(q, k, v, do, lse0, lse0, dq, dk, dv, scale=0.25, out=q, **c.mask_kw())
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    assert all(torch.all(x == 1) for x in (dq, dk, dv))
    assert not sa.STATS


# ---------------------------------------------------------------------------------------------------------------
# backward


def _global_stats(c: Case, q, k, v, dout, g, device):
    """Global out/lse of these queries over an extra unmasked key block plus this block (float64)."""
    kx = randn((c.b, 11, c.hkv, c.d), g, q.dtype, device)
    vx = randn((c.b, 11, c.hkv, c.d), g, q.dtype, device)
    out = torch.zeros(q.shape, dtype=torch.float64, device=device)
    lse = torch.full((c.b, c.hq, c.sq), -math.inf, dtype=torch.float64, device=device)
    ref.fwd_step(q.double(), kx.double(), vx.double(), out, lse, scale=c.d**-0.5)
    ref.fwd_step(q.double(), k.double(), v.double(), out, lse, scale=c.d**-0.5, **c.mask_kw())
    return out, lse, ref.bwd_preprocess(out, dout.double())


def _check_bwd(c: Case, dtype: torch.dtype, n_chunks: int, device: torch.device | str = "cpu", seed: int = 0,
               deterministic: bool = False) -> None:
    q, k, v, g = _inputs(c, dtype, 100 + seed, device)
    dout = randn(q.shape, g, dtype, device)
    out, lse, delta = _global_stats(c, q, k, v, dout, g, device)
    dq_r, dk_r, dv_r = (torch.zeros(x.shape, dtype=torch.float64, device=device) for x in (q, k, v))
    ref.bwd_step(q.double(), k.double(), v.double(), dout.double(), lse, delta, dq_r, dk_r, dv_r,
                 scale=c.d**-0.5, **c.mask_kw())
    acc = _acc(dtype)
    init = [randn(x.shape, g, acc, device) for x in (q, k, v)]
    dq, dk, dv = (x.clone() for x in init)
    for k0, k1 in _chunks(c.sk, n_chunks):
        sa.bwd_step(q, k[:, k0:k1], v[:, k0:k1], dout, lse.to(acc), delta.to(acc), dq, dk[:, k0:k1], dv[:, k0:k1],
                    scale=c.d**-0.5, out=out.to(dtype), deterministic=deterministic, **c.mask_kw(k0))
    tol = sa.KERNEL.tolerance[dtype][1]
    for name, got, x0, want in zip("qkv", (dq, dk, dv), init, (dq_r, dk_r, dv_r)):
        err = rel(got.double() - x0.double(), want)
        assert err < tol, (name, err)
    if c.fused:
        assert _fallbacks() == 0, dict(sa.STATS)
    else:
        assert _fallbacks() > 0


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("c", CASES, ids=repr)
def test_bwd_one_call(c: Case, dtype: torch.dtype) -> None:
    _check_bwd(c, dtype, 1)


@pytest.mark.parametrize("c", [CASES[0], CASES[1], CASES[5], CASES[7], CASES[10]], ids=repr)
def test_bwd_over_key_blocks(c: Case) -> None:
    _check_bwd(c, torch.bfloat16, 3, seed=1)


@pytest.mark.parametrize("rows", [1, 8, 13])
@pytest.mark.parametrize("c", [CASES[0], CASES[1], CASES[3], CASES[4], CASES[6], CASES[7], CASES[10]], ids=repr)
def test_bwd_row_chunks(c: Case, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-chunked backward calls (BWD_ROWS < Sq): each chunk's mask comes from its own query offset."""
    monkeypatch.setattr(sa, "BWD_ROWS", rows)
    _check_bwd(c, torch.float64, 1, seed=rows)
    _check_bwd(c, torch.float32, 2, seed=rows)


def test_bwd_needs_out() -> None:
    assert sa.KERNEL.bwd_needs_out
    c = CASES[0]
    q, k, v, g = _inputs(c, torch.float32, 7)
    lse = torch.zeros(c.b, c.hq, c.sq)
    z = [torch.zeros(x.shape) for x in (q, k, v)]
    with pytest.raises(ValueError, match="needs out="):
        sa.bwd_step(q, k, v, q, lse, lse, *z, scale=0.1)
    with pytest.raises(ValueError, match="shape"):
        sa.bwd_step(q, k, v, q, lse, lse, *z, scale=0.1, out=k)


def test_bwd_deterministic_bitwise() -> None:
    c = CASES[2]
    q, k, v, g = _inputs(c, torch.bfloat16, 8)
    dout = randn(q.shape, g, torch.bfloat16, "cpu")
    out, lse, delta = _global_stats(c, q, k, v, dout, g, "cpu")
    res = []
    for _ in range(2):
        bufs = [torch.zeros(x.shape) for x in (q, k, v)]
        sa.bwd_step(q, k, v, dout, lse.float(), delta.float(), *bufs, scale=0.2, out=out.bfloat16(),
                    deterministic=True, **c.mask_kw())
        res.append(bufs)
    assert all(torch.equal(a, b) for a, b in zip(*res))
    assert _fallbacks() == 0


def test_bwd_preprocess_matches_reference() -> None:
    g = gen(9)
    o, do = randn((2, 13, 3, 16), g, torch.bfloat16, "cpu"), randn((2, 13, 3, 16), g, torch.bfloat16, "cpu")
    assert torch.equal(sa.bwd_preprocess(o, do), ref.bwd_preprocess(o, do))


# ---------------------------------------------------------------------------------------------------------------
# mask decomposition, GQA modes, self-check and failure handling


def _piece_mask(pieces, sq: int, sk: int) -> torch.Tensor:
    m = torch.zeros(sq, sk, dtype=torch.int32)
    for q0, q1, k0, k1, is_causal in pieces:
        blk = torch.ones(q1 - q0, k1 - k0, dtype=torch.int32)
        if is_causal:
            assert q1 - q0 == k1 - k0
            blk = blk.tril()
        m[q0:q1, k0:k1] += blk
    return m


def test_split_block_covers_visible_pairs_exactly() -> None:
    g = gen(10)
    windows = [(-1, -1), (-1, 0), (-1, 3), (2, 0), (40, 0), (5, 3), (0, -1), (200, -1)]
    n_split = n_none = 0
    for _ in range(400):
        sq, sk = (int(x) for x in torch.randint(1, 24, (2,), generator=g))
        q_off, k_off = (int(x) for x in torch.randint(0, 40, (2,), generator=g))
        causal = bool(torch.randint(0, 2, (1,), generator=g))
        window = windows[int(torch.randint(0, len(windows), (1,), generator=g))]
        pieces = sa.split_block(q_off, sq, k_off, sk, causal, window)
        if pieces is None:
            n_none += 1
            continue
        n_split += len(pieces) > 1
        vis = ref.visible_mask(q_off, sq, k_off, sk, causal, window, torch.device("cpu"))
        assert torch.equal(_piece_mask(pieces, sq, sk), vis.int()), (q_off, sq, k_off, sk, causal, window)
        single = sa.split_block(q_off, sq, k_off, sk, causal, window, split=False)
        assert single == (pieces if len(pieces) <= 1 else None)
    assert n_split > 20 and n_none > 20


def test_gqa_repeat_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repeat-K/V path (used if an op rejected GQA in the self-check) gives the same results."""
    monkeypatch.setattr(sa, "_mode", lambda *args: "repeat")
    _check_fwd(CASES[0], torch.float64, 2)
    _check_bwd(CASES[2], torch.float64, 1)
    _check_bwd(CASES[5], torch.bfloat16, 2)


def test_self_check_accepts_cpu_op_and_rejects_wrong_lse(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sa._mode.__wrapped__("cpu_flash", torch.device("cpu"), torch.bfloat16, 32) == "native"
    run_fwd = sa._run_fwd

    def log2_lse(*args, **kwargs):
        o, lse = run_fwd(*args, **kwargs)
        return o, lse / math.log(2.0)

    monkeypatch.setattr(sa, "_run_fwd", log2_lse)
    with pytest.warns(UserWarning, match="self-check"):
        assert sa._mode.__wrapped__("cpu_flash", torch.device("cpu"), torch.float32, 32) is None


def test_self_check_inside_checkpointed_region() -> None:
    """The first call's self-check runs inside the caller's non-reentrant checkpoint (the HF decoder layers of a
    training run): the recomputation, which skips the check, must save what the forward saved, and the gradients
    must be the reference's. Before the check kept its own saved tensors, backward raised CheckpointError
    (forward 70 tensors, recomputation 30, in a Llama layer)."""
    from torch.utils.checkpoint import checkpoint

    from ds_burst import burst_attn_func

    sa._mode.cache_clear()  # the check runs again, on this call
    g = gen(7)
    q, k, v = (randn((1, 96, h, 32), g, device="cpu").requires_grad_() for h in (4, 2, 2))
    w = torch.randn(96, 4, 32, generator=g)

    def region(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return burst_attn_func(torch.sin(q), k * 1.5, v, causal=True, kernel="sdpa") * w

    checkpoint(region, q, k, v, use_reentrant=False).sum().backward()
    assert sa._mode.cache_info().currsize > 0  # the check ran on this call
    wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, _ = ref.naive_attention(torch.sin(wide[0]), wide[1] * 1.5, wide[2], causal=True, scale=32**-0.5)
    (out * w.double()).sum().backward()
    for got, want in zip((q, k, v), wide, strict=True):
        assert rel(got.grad, want.grad) < 1e-5


def test_op_error_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("simulated unsupported configuration")

    monkeypatch.setattr(sa, "_run_fwd", boom)
    monkeypatch.setattr(sa, "_run_bwd", boom)
    monkeypatch.setattr(sa, "_FAILED", set())
    c = CASES[0]
    with pytest.warns(UserWarning, match="simulated"):
        _check_fwd(Case("full-fb", c.sq, c.sk, c.hq, c.hkv, c.d, fused=False), torch.float32, 1)
    with pytest.warns(UserWarning, match="simulated"):
        _check_bwd(Case("full-fb", c.sq, c.sk, c.hq, c.hkv, c.d, fused=False), torch.float32, 1)
    assert len(sa._FAILED) == 2


def test_available_and_describe() -> None:
    assert sa.available("cpu")
    text = sa.describe("cpu", torch.float32, 32)
    assert "_scaled_dot_product_flash_attention_for_cpu" in text and "GQA native" in text
    if not HAS_CUDA:
        assert not sa.available("cuda")


# ---------------------------------------------------------------------------------------------------------------
# GPU: cuDNN and FlashAttention-2 paths (bf16, long blocks)


GPU_CASES = [
    Case("gpu-full-gqa", 1024, 2048, 8, 2, 128, False, (-1, -1), 0, 0),
    Case("gpu-causal-coincident", 2048, 2048, 8, 8, 128, True, (-1, -1), 4096, 4096),
    Case("gpu-causal-coincident-d64-gqa", 4096, 4096, 8, 2, 64, True, (-1, -1), 0, 0),
    Case("gpu-causal-offset-split", 2048, 3072, 4, 1, 64, True, (-1, -1), 2048, 1024),
    Case("gpu-window-fallback", 1024, 1024, 4, 2, 128, True, (256, 0), 0, 0, fused=False),
]


def _force_backend(monkeypatch: pytest.MonkeyPatch, backend: str, dtype: torch.dtype, d: int) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    if not sa._backend_enabled(backend, dev) or sa._mode(backend, dev, dtype, d) is None:
        pytest.skip(f"{backend} not usable here: {sa.describe(dev, dtype, d)}")
    monkeypatch.setattr(sa, "CUDA_BACKENDS", (backend,))


@gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize("c", GPU_CASES, ids=repr)
def test_gpu_fwd_bwd(c: Case, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _force_backend(monkeypatch, backend, torch.bfloat16, c.d)
    _check_fwd(c, torch.bfloat16, 2, device="cuda")
    if c.fused:
        assert sa.STATS[("fwd", backend)] > 0
    sa.STATS.clear()
    _check_bwd(c, torch.bfloat16, 1, device="cuda")
    if c.fused:
        assert sa.STATS[("bwd", backend)] > 0


@gpu
def test_gpu_flash_deterministic_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    c = GPU_CASES[2]
    _force_backend(monkeypatch, "flash", torch.bfloat16, c.d)
    q, k, v, g = _inputs(c, torch.bfloat16, 11, "cuda")
    dout = randn(q.shape, g, torch.bfloat16, "cuda")
    out, lse, delta = _global_stats(c, q, k, v, dout, g, "cuda")
    res = []
    for _ in range(2):
        bufs = [torch.zeros(x.shape, device="cuda") for x in (q, k, v)]
        sa.bwd_step(q, k, v, dout, lse.float(), delta.float(), *bufs, scale=c.d**-0.5, out=out.bfloat16(),
                    deterministic=True, **c.mask_kw())
        res.append(bufs)
    assert all(torch.equal(a, b) for a, b in zip(*res))
    assert sa.STATS[("bwd", "flash")] == 2
    assert not torch.are_deterministic_algorithms_enabled()


@gpu
def test_gpu_describe() -> None:
    text = sa.describe("cuda", torch.bfloat16, 128)
    assert "cudnn" in text and "flash" in text
    assert sa.available("cuda")
