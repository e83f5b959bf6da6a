"""Single-process unit tests: masks, step plan, layouts, the online-softmax merge, cost model, gradcheck."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import ds_burst
from ds_burst.core.cost import backward_bytes_per_token, choose_backward
from ds_burst.core.layout import global_index, segments
from ds_burst.core.mask import BlockKind, classify_block
from ds_burst.core.step_plan import RingPass, pair_needed, pair_ops, ring_passes
from ds_burst.kernels import reference as R

# ------------------------------------------------------------------------------------------ masks


def _brute_kind(q0, ql, k0, kl, causal, window):
    ok = R.visible_mask(q0, ql, k0, kl, causal, window, torch.device("cpu"))
    if not ok.any():
        return BlockKind.EMPTY
    return BlockKind.FULL if ok.all() else BlockKind.PARTIAL


def test_classify_block_matches_element_mask():
    rng = random.Random(0)
    for _ in range(3000):
        q0, k0 = rng.randrange(0, 40), rng.randrange(0, 40)
        ql, kl = rng.randrange(1, 12), rng.randrange(1, 12)
        causal = rng.random() < 0.5
        left = rng.choice([-1, 0, 1, 3, 7, 20])
        right = rng.choice([-1, 0, 2, 5]) if not causal else rng.choice([-1, 0])
        got = classify_block(q0, ql, k0, kl, causal, (left, right))
        assert got is _brute_kind(q0, ql, k0, kl, causal, (left, right)), (q0, ql, k0, kl, causal, left, right)


# ------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_layout_covers_sequence_once(world, layout):
    seq = 2 * world * 5
    seen = sorted(p for r in range(world) for p in global_index(layout, r, world, seq))
    assert seen == list(range(seq))


def test_zigzag_segments():
    assert [(s.global_start, s.local_start, s.length) for s in segments("zigzag", 1, 4, 6)] == [(3, 0, 3), (18, 3, 3)]
    with pytest.raises(ValueError, match="even local length"):
        segments("zigzag", 0, 2, 5)
    with pytest.raises(ValueError, match="unknown layout"):
        segments("diagonal", 0, 2, 4)


def test_shard_and_gather_single_process():
    x = torch.randn(2, 12, 3)
    assert torch.equal(ds_burst.shard_sequence(x, 1, layout="zigzag"), x)
    assert torch.equal(ds_burst.gather_sequence(x, 1, layout="contiguous"), x)


# ------------------------------------------------------------------------------------------ step plan


def _tile_area(ops):
    return sum((o.q1 - o.q0) * (o.k1 - o.k0) for o in ops)


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_causal_steps_are_balanced(world):
    s = 8
    table = [segments("zigzag", r, world, s) for r in range(world)]
    for i in range(world):
        for j in range(world):
            ops = pair_ops(table[i], table[j], True, (-1, 0))
            if i == j:
                # both diagonal chunks masked, chunk (2P-1-i) x chunk i full
                assert sorted(o.masked for o in ops) == [False, True, True]
            elif j < i:
                assert len(ops) == 1 and not ops[0].masked
                assert (ops[0].q0, ops[0].q1, ops[0].k0, ops[0].k1) == (0, s, 0, s // 2)
            else:
                assert len(ops) == 1 and not ops[0].masked
                assert (ops[0].q0, ops[0].q1, ops[0].k0, ops[0].k1) == (s // 2, s, 0, s)
            if i != j:
                assert _tile_area(ops) == s * s // 2  # every off-diagonal step is exactly half a block


def _visible_pairs(table, causal, window, i, j):
    qpos = [sg.global_start + t for sg in table[i] for t in range(sg.length)]
    kpos = [sg.global_start + t for sg in table[j] for t in range(sg.length)]
    ok = R.visible_mask(0, 1, 0, 1, causal, window, torch.device("cpu"))  # warm the helper
    del ok
    q = torch.tensor(qpos)[:, None]
    k = torch.tensor(kpos)[None, :]
    lo = math.inf if window[0] < 0 else window[0]
    hi = math.inf if window[1] < 0 else window[1]
    if causal:
        hi = min(hi, 0)
    return ((k - q <= hi) & (k - q >= -lo)).to(torch.int64)


def test_pair_ops_cover_exactly_the_visible_pairs():
    """Every visible (query, key) pair is computed exactly once, no invisible pair unmasked."""
    rng = random.Random(1)
    for _ in range(300):
        world = rng.choice([2, 3, 4, 5])
        s = 2 * rng.randrange(1, 6)
        layout = rng.choice(["contiguous", "zigzag"])
        causal = rng.random() < 0.5
        window = (rng.choice([-1, 0, 2, 5, 13]), rng.choice([-1, 0]) if causal else rng.choice([-1, 0, 3, 9]))
        table = [segments(layout, r, world, s) for r in range(world)]
        i, j = rng.randrange(world), rng.randrange(world)
        want = _visible_pairs(table, causal, window, i, j)
        got = torch.zeros(s, s, dtype=torch.int64)
        qpos = [sg.global_start + t for sg in table[i] for t in range(sg.length)]
        kpos = [sg.global_start + t for sg in table[j] for t in range(sg.length)]
        for op in pair_ops(table[i], table[j], causal, window):
            block = torch.ones(op.q1 - op.q0, op.k1 - op.k0, dtype=torch.int64)
            if op.masked:
                # a masked op must be a contiguous run of global positions
                assert qpos[op.q0 : op.q1] == list(range(op.q_offset, op.q_offset + op.q1 - op.q0))
                assert kpos[op.k0 : op.k1] == list(range(op.k_offset, op.k_offset + op.k1 - op.k0))
                block = R.visible_mask(op.q_offset, op.q1 - op.q0, op.k_offset, op.k1 - op.k0, causal, window,
                                       torch.device("cpu")).to(torch.int64)
            got[op.q0 : op.q1, op.k0 : op.k1] += block
        assert torch.equal(got, want), (world, s, layout, causal, window, i, j)


def test_ring_passes_cover_needed_pairs_and_stop_early():
    rng = random.Random(2)
    for _ in range(300):
        world = rng.choice([2, 3, 4, 6, 8])
        s = 2 * rng.randrange(1, 5)
        layout = rng.choice(["contiguous", "zigzag"])
        causal = rng.random() < 0.5
        window = (rng.choice([-1, 0, 1, 4, 9, 30]), rng.choice([-1, 0]) if causal else rng.choice([-1, 0, 2, 7]))
        table = [segments(layout, r, world, s) for r in range(world)]
        passes = ring_passes(table, causal, window)
        covered = {0}
        for p in passes:
            covered |= {(p.direction * t) % world for t in range(1, p.steps + 1)}
        for i, j in itertools.product(range(world), repeat=2):
            if pair_needed(table[i], table[j], causal, window):
                assert (i - j) % world in covered
    # a causal window no longer than a shard: one hop only, whatever P is
    table = [segments("contiguous", r, 8, 16) for r in range(8)]
    assert ring_passes(table, True, (16, 0)) == [RingPass(+1, 1)]
    assert ring_passes(table, False, (5, 5)) == [RingPass(+1, 1), RingPass(-1, 1)]
    assert ring_passes(table, True, (-1, 0)) == [RingPass(+1, 7)]


# ------------------------------------------------------------------------------------------ merge


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, 0)), (True, (6, 0)), (False, (4, 3))])
def test_online_softmax_continuation_is_exact(causal, window):
    """fwd_step continued over key blocks in any order equals one softmax over all keys."""
    g = torch.Generator().manual_seed(3)
    b, sq, sk, hq, hkv, d = 2, 13, 31, 4, 2, 8
    q = torch.randn(b, sq, hq, d, dtype=torch.float64, generator=g)
    k = torch.randn(b, sk, hkv, d, dtype=torch.float64, generator=g)
    v = torch.randn(b, sk, hkv, d, dtype=torch.float64, generator=g)
    ref, ref_lse = R.naive_attention(q, k, v, causal=causal, window=window, q_offset=10)
    out = torch.zeros(b, sq, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq, sq), -math.inf, dtype=torch.float64)
    for a, e in [(20, 31), (0, 4), (4, 20)]:
        R.fwd_step(q, k[:, a:e], v[:, a:e], out, lse, scale=d**-0.5, q_offset=10, k_offset=a, causal=causal,
                   window=window, block_k=5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12
    assert (lse[finite] - ref_lse[finite]).abs().max().item() < 1e-12


def test_empty_block_leaves_state_untouched():
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    k = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    out = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    lse = torch.randn(1, 2, 4, dtype=torch.float64)
    o0, l0 = out.clone(), lse.clone()
    R.fwd_step(q, k, k, out, lse, scale=0.3, q_offset=0, k_offset=100, causal=True)
    assert torch.equal(out, o0) and torch.equal(lse, l0)


# ------------------------------------------------------------------------------------------ cost model


def test_backward_bytes_and_auto_choice():
    # MHA, D=128, bf16: Burst sends about a third less per hop than the K/V/dK/dV ring.
    burst = backward_bytes_per_token("burst", 32, 32, 128, 2)
    ring = backward_bytes_per_token("ring", 32, 32, 128, 2)
    assert burst < ring
    assert choose_backward(32, 32, 128, 2) == "burst"
    assert choose_backward(32, 8, 128, 2) == "ring"  # GQA g=4: the ring pattern is cheaper
    assert choose_backward(32, 16, 128, 2) == "ring"


# ------------------------------------------------------------------------------------------ single process API


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (3, 0)), (False, (2, 1))])
def test_gradcheck_float64(causal, window):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 7, 4, 5, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.randn(2, 7, 2, 5, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(2, 7, 2, 5, dtype=torch.float64, generator=g).requires_grad_()
    fn = lambda a, b_, c: ds_burst.burst_attn_func(a, b_, c, causal=causal, window_size=window, kernel="torch")
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_return_lse_matches_reference():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 9, 2, 8, dtype=torch.float64, generator=g) for _ in range(3))
    out, lse = ds_burst.burst_attn_func(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = R.naive_attention(q, k, v, causal=True)
    assert lse.shape == (1, 2, 9) and lse.dtype == torch.float64
    assert (lse - ref_lse).abs().max() < 1e-12 and (out - ref).abs().max() < 1e-12
    q32 = q.float()
    _, lse32 = ds_burst.burst_attn_func(q32, k.float(), v.float(), return_lse=True)
    assert lse32.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(layout="diagonal"), ValueError, "unknown layout"),
        (dict(backward="sideways"), ValueError, "unknown backward"),
        (dict(kernel="cuda-magic"), ValueError, "unknown kernel"),
        (dict(causal=True, window_size=(4, 2)), ValueError, "conflicts with causal"),
        (dict(window_size=(4,)), ValueError, "window_size"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
        (dict(kernel="sdpa", backward="burst"), ValueError, "kernel='sdpa' needs the output"),
        (dict(schedule="spiral"), ValueError, "unknown schedule"),
    ],
)
def test_bad_arguments_single_process(kwargs, exc, match):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(exc, match=match):
        ds_burst.burst_attn_func(q, q, q, **kwargs)


def test_bad_tensors_single_process():
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        ds_burst.burst_attn_func(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match="dtypes differ"):
        ds_burst.burst_attn_func(q, q.double(), q.double())
    with pytest.raises(ValueError, match="4 dims"):
        ds_burst.burst_attn_func(q[0], q, q)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ds_burst.burst_attn_func(q, "k", q)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty input"):
        ds_burst.burst_attn_func(q[:, :0], q[:, :0], q[:, :0])
    with pytest.raises(ValueError, match="devices differ"):
        ds_burst.burst_attn_func(q, q.to("meta"), q)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(2, 4, 11, 8, dtype=torch.float64, generator=g)  # [B, H, S, D]
    q = base.transpose(1, 2)  # [B, S, H, D] view, not contiguous
    kv = torch.randn(2, 11, 2, 16, dtype=torch.float64, generator=g)[..., ::2]  # strided last dim
    assert not q.is_contiguous() and not kv.is_contiguous()
    out = ds_burst.burst_attn_func(q, kv, kv, causal=True)
    ref, _ = R.naive_attention(q.contiguous(), kv.contiguous(), kv.contiguous(), causal=True)
    assert (out - ref).abs().max().item() < 1e-12


def test_triton_kernel_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ds_burst.burst_attn_func(q, q, q, kernel="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="float64"):
        ds_burst.burst_attn_func(q.double(), q.double(), q.double(), kernel="triton")
