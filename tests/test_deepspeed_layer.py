"""ds-burst's DistributedAttention against DeepSpeed-Ulysses' on the same inputs (2 gloo ranks).

The local attention handed to both is an exact float64 attention; outputs and the gradients of the local
q/k/v shards must agree to 1e-9 (float64). Cases Ulysses refuses (KV heads < P) and odd head counts are
checked against a full-sequence float64 reference instead. All cases run inside one spawn of 2 ranks.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dist_utils import run_ranks, values
from kernel_utils import TOL

S, B, D = 16, 2, 8


class ExactAttention(torch.nn.Module):
    """Full attention in float64 on ``[b, S, h, d]`` (``batch_dim=0``) or ``[S, b, h, d]`` (``1``); GQA by
    repeating K/V heads; ``window_size=(left, right)`` as in flash-attn."""

    def __init__(self, causal: bool = True, softmax_scale: float | None = None, batch_dim: int = 0,
                 window_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.batch_dim = batch_dim
        self.window_size = window_size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.batch_dim == 1:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        out = reference(q, k, v, self.causal, self.softmax_scale, self.window_size)
        return out if self.batch_dim == 0 else out.transpose(0, 1)


def reference(q, k, v, causal, scale, window):
    """``[b, S, h, d]`` exact attention with global positions 0..S-1."""
    g = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(g, dim=2) for x in (k, v))
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    n = q.shape[1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        if window[0] >= 0:
            allowed &= j >= i - window[0]
        if window[1] >= 0:
            allowed &= j <= i + window[1]
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def rotary_tables(seq: int, dim: int, batch_dim: int):
    """Full-sequence cos/sin in the shape DeepSpeed's ``permute(1, 0, 2, 3)`` expects."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos(), ang.sin()
    shape = (seq, 1, 1, dim) if batch_dim == 0 else (1, seq, 1, dim)
    return cos.reshape(shape), sin.reshape(shape)


def _full_inputs(hq, hkv, seed):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, S, h, D, generator=gen, dtype=torch.float64)
    return mk(hq), mk(hkv), mk(hkv), mk(hq)


def _shard(x, rank, world, batch_dim):
    s = x.shape[1] // world
    part = x[:, rank * s:(rank + 1) * s]
    return (part if batch_dim == 0 else part.transpose(0, 1)).contiguous().requires_grad_(True)


def _run(layer, q, k, v, dout, batch_dim, rope=None, **kw):
    out = layer(q, k, v, batch_dim, rope, **kw)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


# (name, hq, hkv, causal, scale, window, rope, compare_with_deepspeed)
CASES = [
    ("mha_causal", 4, 4, True, None, None, False, True),
    ("gqa_causal_rope", 4, 2, True, None, None, True, True),
    ("mha_full_scale", 2, 2, False, 0.3, None, False, True),
    ("gqa_window", 4, 2, True, None, (5, 0), False, True),
    ("odd_heads", 3, 3, True, None, None, True, False),
    ("mqa_kv_lt_p", 4, 1, True, None, None, False, False),
]


def _layer_worker(rank: int, world: int) -> dict:
    import deepspeed
    import deepspeed.sequence.layer as ds_layer

    import ds_burst
    from ds_burst.integrations.deepspeed import DistributedAttention

    deepspeed.init_distributed(dist_backend="gloo")
    topo = ds_burst.init_sequence_parallel(world)
    group = topo.get_sequence_parallel_group()
    res: dict = {}
    for ci, (name, hq, hkv, causal, scale, window, rope, with_ds) in enumerate(CASES):
        for batch_dim in (0, 1):
            fq, fk, fv, fdo = _full_inputs(hq, hkv, seed=10 * ci + batch_dim)
            local = ExactAttention(causal, scale, batch_dim, window)
            rot = rotary_tables(S, D, batch_dim) if rope else None
            shard = functools.partial(_shard, rank=rank, world=world, batch_dim=batch_dim)
            ours = _run(DistributedAttention(local, group), *(shard(x) for x in (fq, fk, fv)),
                        shard(fdo).detach(), batch_dim, rot)
            errs = {}
            if with_ds:
                theirs = _run(ds_layer.DistributedAttention(local, group), *(shard(x) for x in (fq, fk, fv)),
                              shard(fdo).detach(), batch_dim, rot)
                errs["deepspeed"] = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
                ds_burst.patch_deepspeed()
                try:
                    assert ds_layer.DistributedAttention is DistributedAttention
                    patched = _run(ds_layer.DistributedAttention(local, group), *(shard(x) for x in (fq, fk, fv)),
                                   shard(fdo).detach(), batch_dim, rot)
                finally:
                    ds_burst.unpatch_deepspeed()
                errs["patched"] = max(float((a - b).abs().max()) for a, b in zip(ours, patched))
            # full-sequence float64 reference with autograd
            rq, rk, rv = (x.clone().requires_grad_(True) for x in (fq, fk, fv))
            xq, xk = rq, rk
            if rope:
                c, s_ = rotary_tables(S, D, 0)
                c, s_ = c.permute(1, 0, 2, 3), s_.permute(1, 0, 2, 3)
                xq, xk = (ds_burst.integrations.deepspeed.apply_rotary(x, c, s_) for x in (rq, rk))
            ro = reference(xq, xk, rv, causal, scale, window)
            ro.backward(fdo)
            ref = [shard(t).detach() for t in (ro.detach(), rq.grad, rk.grad, rv.grad)]
            errs["reference"] = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
            res[(name, batch_dim)] = errs
    # Ulysses refuses fewer KV heads than P
    fq, fk, fv, _ = _full_inputs(4, 1, 0)
    try:
        ds_layer.DistributedAttention(ExactAttention(), group)(*(_shard(x, rank, world, 0) for x in (fq, fk, fv)), 0)
        res["ulysses_mqa"] = "ran"
    except Exception as e:  # noqa: BLE001
        res["ulysses_mqa"] = f"{type(e).__name__}: {e}"
    # bad options
    q, k, v = (_shard(x, rank, world, 0) for x in (fq, fk, fv))
    errors = {}
    mask = torch.ones(S, S, dtype=torch.bool)
    attempts = {
        "attn_mask": lambda: DistributedAttention(ExactAttention(), group)(q, k, v, 0, None, attn_mask=mask),
        "positional_mask": lambda: DistributedAttention(ExactAttention(), group)(q, k, v, mask),
        "dropout_attr": lambda: DistributedAttention(_with(ExactAttention(), dropout_p=0.1), group)(q, k, v, 0),
        "dropout_kw": lambda: DistributedAttention(ExactAttention(), group)(q, k, v, 0, dropout_p=0.2),
        "unknown_option": lambda: DistributedAttention(ExactAttention(), group, flash=True),
    }
    for key, fn in attempts.items():
        try:
            fn()
            errors[key] = "no error"
        except ValueError as e:
            errors[key] = str(e)
    res["errors"] = errors
    # dropout attribute is fine in eval mode
    out = DistributedAttention(_with(ExactAttention(), dropout_p=0.1).eval(), group)(q, k, v, 0)
    res["eval_dropout_ok"] = tuple(out.shape)
    return res


def _with(module, **attrs):
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


@pytest.fixture(scope="module")
def layer_results():
    return values(run_ranks(_layer_worker, 2, timeout=240))


@pytest.mark.parametrize("batch_dim", [0, 1])
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_matches_deepspeed_and_reference(layer_results, case, batch_dim):
    for rank, res in enumerate(layer_results):
        errs = res[(case, batch_dim)]
        for what, err in errs.items():
            assert err < TOL[torch.float64][1] and not math.isnan(err), \
                f"rank {rank} {case} batch_dim={batch_dim}: {what} err {err}"


def test_ulysses_refuses_what_burst_runs(layer_results):
    for res in layer_results:
        assert res["ulysses_mqa"] != "ran" and "key-value heads" in res["ulysses_mqa"]


def test_bad_options_raise(layer_results):
    for res in layer_results:
        e = res["errors"]
        assert "attn_mask" in e["attn_mask"]
        assert "attention mask" in e["positional_mask"]
        assert "dropout_p=0.1" in e["dropout_attr"]
        assert "dropout_p=0.2" in e["dropout_kw"]
        assert "flash" in e["unknown_option"]
        assert res["eval_dropout_ok"] == (B, S // 2, 4, D)


def test_option_resolution_single_process():
    from ds_burst.integrations.deepspeed import DistributedAttention

    m = ExactAttention(causal=False, softmax_scale=0.5)
    m.sliding_window = 4
    layer = DistributedAttention(m, None)
    o = layer.resolve_options((), {})
    assert o["causal"] is False and o["softmax_scale"] == 0.5 and o["window_size"] == (3, 3)
    o = DistributedAttention(m, None, causal=True, window_size=(7, 0)).resolve_options((), {"scale": 0.25})
    assert o["causal"] is True and o["softmax_scale"] == 0.25 and o["window_size"] == (7, 0)
    o = DistributedAttention(m, None).resolve_options((), {"is_causal": True, "sliding_window": 2})
    assert o["causal"] is True and o["window_size"] == (1, 0) and o["layout"] == "contiguous"


# ---------------------------------------------------------------------------------------------
# The built-in model's attention="ulysses" (the peer the training runs compare with)


def _model_attention_worker(rank: int, world: int) -> dict:
    from ds_burst.dist.relayout import shard_sequence
    from ds_burst.training.model import BurstLlama, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    ref = BurstLlama(cfg, attention="local").double()
    n = 24
    ids = torch.randint(0, 50, (2, n))
    pos = torch.arange(n)
    full = ref(ids, pos)
    full.sum().backward()
    errs = {}
    for attention in ("ulysses", "burst"):
        from ds_burst.attention.config import BurstConfig

        burst = BurstConfig(layout="contiguous", kernel="torch")
        m = BurstLlama(cfg, attention=attention, burst=burst).double()
        m.load_state_dict(ref.state_dict())
        ids_l, pos_l = (shard_sequence(x, -1, None, "contiguous") for x in (ids, pos))
        out = m(ids_l, pos_l)
        want = shard_sequence(full.detach(), 1, None, "contiguous")
        out.backward(torch.ones_like(out))
        errs[attention] = ((out - want).norm() / want.norm()).item()
        g = torch.cat([p.grad.flatten() for p in m.parameters()])
        torch.distributed.all_reduce(g)  # each rank holds its tokens' share of every gradient
        gref = torch.cat([p.grad.flatten() for p in ref.parameters()])
        errs[attention + "_grad"] = ((g - gref).norm() / gref.norm()).item()
    return errs


def test_model_ulysses_and_burst_match_full_sequence():
    """BurstLlama(attention='ulysses') and ('burst') on 2 ranks equal the full-sequence model in float64."""
    for errs in values(run_ranks(_model_attention_worker, 2, timeout=180)):
        assert all(e < 1e-10 for e in errs.values()), errs


def test_model_ulysses_rejects_heads_it_cannot_split():
    from ds_burst.training.model import ulysses_attention

    q = torch.zeros(1, 4, 3, 8)
    k = torch.zeros(1, 4, 1, 8)

    class FakeGroup:
        pass

    with pytest.raises((ValueError, TypeError)):
        ulysses_attention(q, k, k, FakeGroup(), (-1, -1))
