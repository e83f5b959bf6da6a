"""ds_burst.training.memory: the chunked LM-head loss and the tiled MLP give the same loss and gradients as the plain
computation (float64, tight tolerance), at unit and model level, and the chunked loss never holds [B, s, V]."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dist_utils import run_ranks, values
from ds_burst.training.losses import sequence_parallel_loss
from ds_burst.training.memory import chunked_lm_head_loss, tiled_mlp
from ds_burst.training.model import MLP, BurstLlama, ModelConfig

RTOL = 1e-10


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"max abs err {err:.3e} vs scale {scale:.3e}"


def _labels(b: int, s: int, v: int, gen: torch.Generator) -> torch.Tensor:
    lab = torch.randint(0, v, (b, s), generator=gen)
    lab[torch.rand(b, s, generator=gen) < 0.3] = -100
    lab[0, :3] = -100
    return lab


# ---------------------------------------------------------------------------------------------
# chunked LM head + loss


@pytest.mark.parametrize("chunk", [1, 4, 7, 13, 100])
@pytest.mark.parametrize("as_module", [False, True])
def test_chunked_loss_matches_full(chunk, as_module):
    gen = torch.Generator().manual_seed(chunk)
    b, s, h, v = 2, 13, 10, 37
    hidden = torch.randn(b, s, h, dtype=torch.float64, generator=gen, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, dtype=torch.float64, generator=gen))
    labels = _labels(b, s, v, gen)
    go = torch.tensor(0.7, dtype=torch.float64)

    ref = F.cross_entropy(F.linear(hidden, head.weight).reshape(-1, v), labels.reshape(-1), reduction="sum")
    gh_ref, gw_ref = torch.autograd.grad(ref, (hidden, head.weight), go)

    total, count = chunked_lm_head_loss(hidden, head if as_module else head.weight, labels, chunk)
    assert count.dtype == torch.float64 and int(count) == int((labels != -100).sum())
    assert not count.requires_grad
    _close(total.detach(), ref.detach())
    if as_module:  # the module's parameter gradients accumulate into .grad through a nested backward
        total.backward(go)
        gh, gw = hidden.grad, head.weight.grad
    else:
        gh, gw = torch.autograd.grad(total, (hidden, head.weight), go)
    _close(gh, gh_ref)
    _close(gw, gw_ref)

    mean, _ = chunked_lm_head_loss(hidden, head.weight, labels, chunk, reduction="mean")
    _close(mean.detach(), (ref / (labels != -100).sum()).detach())


def test_chunked_loss_plugs_into_sequence_parallel_loss():
    from ds_burst.training.losses import sequence_parallel_loss_from_sum

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 11, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(29, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = _labels(3, 11, 29, gen)
    for averaged in (False, True):
        ref = sequence_parallel_loss(F.linear(hidden, w), labels, sp_grads_averaged=averaged)
        g_ref = torch.autograd.grad(ref, (hidden, w))
        ce, count = chunked_lm_head_loss(hidden, w, labels, 4)
        got = sequence_parallel_loss_from_sum(ce, count, sp_grads_averaged=averaged)
        _close(got.detach(), ref.detach())
        for a, b in zip(torch.autograd.grad(got, (hidden, w)), g_ref):
            _close(a, b)


def test_chunked_loss_all_ignored_and_validation():
    hidden = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.full((1, 5), -100)
    total, count = chunked_lm_head_loss(hidden, w, labels, 2)
    assert float(total.detach()) == 0.0 and float(count) == 0.0
    total.backward()
    assert torch.all(hidden.grad == 0) and torch.all(w.grad == 0)
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="chunk_tokens"):
            chunked_lm_head_loss(hidden, w, labels, bad)
    with pytest.raises(ValueError, match="reduction"):
        chunked_lm_head_loss(hidden, w, labels, 2, reduction="none")
    with pytest.raises(ValueError, match="labels"):
        chunked_lm_head_loss(hidden, w, labels[:, :4], 2)


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("as_module", [False, True])
def test_chunked_loss_never_materialises_full_logits(as_module):
    b, s, h, v, chunk = 2, 64, 8, 50, 8
    hidden = torch.randn(b, s, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False)
    labels = torch.randint(0, v, (b, s))
    rec = _ShapeRecorder()
    with rec:
        total, _ = chunked_lm_head_loss(hidden, head if as_module else head.weight, labels, chunk)
        total.backward()
    # the largest tensor is one chunk's logits (or the [V, H] weight gradient / [B, s, H] hidden gradient)
    bound = max(b * chunk * v, v * h, b * s * h)
    assert rec.max_numel <= bound < b * s * v
    # the plain path does create [B, s, V]
    rec = _ShapeRecorder()
    with rec:
        F.cross_entropy(head(hidden).reshape(-1, v), labels.reshape(-1)).backward()
    assert rec.max_numel >= b * s * v


# ---------------------------------------------------------------------------------------------
# tiled MLP


@pytest.mark.parametrize("tiles", [1, 2, 3, 5, 40])
def test_tiled_mlp_matches_plain(tiles):
    torch.manual_seed(tiles)
    cfg = ModelConfig(hidden_size=12, num_heads=2, num_kv_heads=1, intermediate_size=20)
    mlp = MLP(cfg).double()
    x = torch.randn(2, 17, 12, dtype=torch.float64, requires_grad=True)
    go = torch.randn(2, 17, 12, dtype=torch.float64)
    params = list(mlp.parameters())
    ref = mlp(x)
    g_ref = torch.autograd.grad(ref, [x, *params], go)
    out = tiled_mlp(mlp, x, tiles)
    _close(out.detach(), ref.detach())
    # parameter grads accumulate (into .grad, on top of what is there) over the tiles
    for p in params:
        p.grad = torch.ones_like(p)
    out.backward(go)
    _close(x.grad, g_ref[0])
    for p, g in zip(params, g_ref[1:]):
        _close(p.grad, g + 1)


def test_tiled_mlp_saves_only_input_and_validates():
    mlp = MLP(ModelConfig(hidden_size=8, num_heads=2, num_kv_heads=1, intermediate_size=64))
    x = torch.randn(1, 32, 8, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tiled_mlp(mlp, x, 4)
    assert sizes == [x.numel()]  # only x is kept for backward, nothing of [B, s, intermediate]
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in mlp.parameters())
    with torch.no_grad():
        _close(tiled_mlp(mlp, x, 4), mlp(x), 1e-6)
    for bad in (0, 1.5, False):
        with pytest.raises(ValueError, match="tiles"):
            tiled_mlp(mlp, x, bad)


# ---------------------------------------------------------------------------------------------
# model level


def _model_pair(cfg_kwargs: dict, attention: str = "local", group=None, burst=None):
    base = dict(vocab_size=61, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=24)
    base.update(cfg_kwargs.pop("base", {}))
    torch.manual_seed(0)
    ref = BurstLlama(ModelConfig(**base), attention=attention, group=group, burst=burst).double()
    feat = BurstLlama(ModelConfig(**base, **cfg_kwargs), attention=attention, group=group, burst=burst).double()
    feat.load_state_dict(ref.state_dict())
    return ref, feat


def _loss_and_grads(model, ids, pos, labels, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(ids, pos, labels, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("features", [
    {"lm_head_chunk_tokens": 5},
    {"mlp_tiles": 3},
    {"lm_head_chunk_tokens": 64, "mlp_tiles": 4},
    {"lm_head_chunk_tokens": 7, "mlp_tiles": 2, "base": {"tie_embeddings": True}},
])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_features_same_loss_and_grads(features, checkpointing):
    ref, feat = _model_pair(dict(features))
    ref.activation_checkpointing = feat.activation_checkpointing = checkpointing
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (2, 23), generator=gen)
    labels = _labels(2, 23, 61, gen)
    pos = torch.arange(23)
    loss_ref, g_ref = _loss_and_grads(ref, ids, pos, labels)
    # the labels path without the features is exactly sequence_parallel_loss on the logits
    _close(loss_ref, sequence_parallel_loss(ref(ids, pos), labels).detach())
    loss, g = _loss_and_grads(feat, ids, pos, labels, sp_grads_averaged=False)
    _close(loss, loss_ref)
    assert g.keys() == g_ref.keys()
    for n in g_ref:
        _close(g[n], g_ref[n])
    # logits (no labels) are unaffected by the options
    with torch.no_grad():
        _close(feat(ids, pos), ref(ids, pos))


def test_model_config_memory_options_validation():
    ModelConfig(lm_head_chunk_tokens=None, mlp_tiles=1)
    ModelConfig.from_dict({"lm_head_chunk_tokens": 1024, "mlp_tiles": 8})
    for bad in (0, -3, 1.5, True, "8"):
        with pytest.raises(ValueError, match="lm_head_chunk_tokens"):
            ModelConfig(lm_head_chunk_tokens=bad)
        with pytest.raises(ValueError, match="mlp_tiles"):
            ModelConfig(mlp_tiles=bad)


def _two_rank_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from ds_burst.attention.config import BurstConfig
    from ds_burst.training.data import shard_batch_local

    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 61, (1, 32), generator=gen)
    labels = _labels(1, 32, 61, gen)
    labels[:, 16:] = -100  # rank 1 (contiguous layout) holds fewer labelled tokens
    labels[0, 20] = 7
    shard = shard_batch_local(ids, labels, rank, world, "contiguous")
    out = {}
    for averaged in (False, True):
        ref, feat = _model_pair({"lm_head_chunk_tokens": 5, "mlp_tiles": 3}, attention="burst",
                                group=dist.group.WORLD, burst=BurstConfig(layout="contiguous"))
        args = (shard["input_ids"], shard["position_ids"], shard["labels"])
        loss_ref, g_ref = _loss_and_grads(ref, *args, sp_grads_averaged=averaged)
        loss, g = _loss_and_grads(feat, *args, sp_grads_averaged=averaged)
        out[averaged] = (loss_ref, loss, g_ref, g)
    return out


def test_model_features_two_ranks():
    results = run_ranks(_two_rank_worker, 2, timeout=120)
    for status, val in results:
        assert status == "ok", val
    for averaged in (False, True):
        losses = []
        for _, val in results:
            loss_ref, loss, g_ref, g = val[averaged]
            _close(loss, loss_ref)
            for n in g_ref:
                _close(g[n], g_ref[n])
            losses.append(float(loss))
        assert losses[0] == pytest.approx(losses[1], rel=1e-12)  # the full-sequence mean on every rank


# ---------------------------------------------------------------------------------------------
# memory estimator


def _saved_activation_bytes(model, ids, pos, labels) -> int:
    """Bytes of the distinct storages saved for backward by the forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, pos, labels)
    return sum(seen.values())


def _opts_id(opts: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in opts.items()) or "defaults"


@pytest.mark.parametrize("opts", ids=_opts_id, argvalues=[
    {},
    {"lm_head_chunk_tokens": 16},
    {"mlp_tiles": 4},
    {"lm_head_chunk_tokens": 32, "mlp_tiles": 2, "ckpt": True},
    {"ckpt": True, "batch": 2},
])
def test_estimate_memory_activations_match_saved_tensors(opts):
    from ds_burst.training.estimate import GIB, estimate_memory

    opts = dict(opts)
    ckpt, batch = opts.pop("ckpt", False), opts.pop("batch", 1)
    cfg = ModelConfig(vocab_size=300, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                      intermediate_size=80, **opts)
    model = BurstLlama(cfg, attention="local", activation_checkpointing=ckpt)
    s = 96
    ids = torch.randint(0, 300, (batch, s))
    measured = _saved_activation_bytes(model, ids, torch.arange(s), ids)
    est = estimate_memory(cfg, s, dtype_bytes=4, activation_checkpointing=ckpt, micro_batch=batch,
                          lm_head_chunk_tokens=cfg.lm_head_chunk_tokens, mlp_tiles=cfg.mlp_tiles)
    # fp32 and local attention: the formula is exact up to a few scalars
    assert abs(est["activations"] * GIB - measured) <= 0.01 * measured, (est["activations"] * GIB, measured)


def _persistent_plus_transient(est: dict) -> float:
    persistent = sum(est[k] for k in ("params", "grads", "optimizer", "activations", "kept_attention", "zero_bucket"))
    return persistent + max(est["logits_peak"] + est["zero_gathered_head"],
                            est["recompute_peak"] + est["attn_buffers"] + est["zero_gathered_layer"])


def test_estimate_memory_consistency():
    from ds_burst.training.estimate import GIB, estimate_memory

    cfg = ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      intermediate_size=14336)
    base = estimate_memory(cfg, 131072, sp=8, zero_stage=3, dp=1, dtype_bytes=2, activation_checkpointing=True)
    assert base["total"] == pytest.approx(_persistent_plus_transient(base))
    # ZeRO stages shrink params / grads / optimizer in turn
    st = [estimate_memory(cfg, 131072, sp=8, zero_stage=z) for z in range(4)]
    assert st[0]["optimizer"] > st[1]["optimizer"] and st[1]["grads"] > st[2]["grads"]
    assert st[2]["params"] > st[3]["params"] and st[3]["params"] == pytest.approx(st[0]["params"] / 8)
    # more SP ranks: fewer tokens per rank, less activation memory (exactly proportional)
    a4 = estimate_memory(cfg, 131072, sp=4, zero_stage=3, activation_checkpointing=True)
    assert a4["activations"] == pytest.approx(2 * base["activations"])
    # the features only ever reduce memory; checkpointing reduces the saved activations
    chunked = estimate_memory(cfg, 131072, sp=8, zero_stage=3, activation_checkpointing=True,
                              lm_head_chunk_tokens=4096)
    assert chunked["logits_peak"] < base["logits_peak"] and chunked["activations"] < base["activations"]
    no_ckpt = estimate_memory(cfg, 131072, sp=8, zero_stage=3)
    tiled = estimate_memory(cfg, 131072, sp=8, zero_stage=3, mlp_tiles=8)
    assert base["activations"] < tiled["activations"] < no_ckpt["activations"]
    assert tiled["total"] < no_ckpt["total"] and chunked["total"] < base["total"]
    # optimizer offload: states and fp32 gradients go to the host, the rest is unchanged
    off = estimate_memory(cfg, 131072, sp=8, zero_stage=3, activation_checkpointing=True, offload_optimizer=True)
    assert off["optimizer"] == off["grads"] == 0.0
    assert off["host_optimizer"] == pytest.approx(base["optimizer"] + cfg.num_params() * 4 / 8 / GIB)
    assert off["total"] == pytest.approx(base["total"] - base["optimizer"] - base["grads"])
    # longer sequences cost more
    assert estimate_memory(cfg, 262144, sp=8, zero_stage=3)["total"] > no_ckpt["total"]
    for bad in ({"sp": 0}, {"zero_stage": 4}, {"mlp_tiles": 0}, {"lm_head_chunk_tokens": 0}, {"sp": 3}):
        with pytest.raises(ValueError):
            estimate_memory(cfg, 131072, **bad)


# ---------------------------------------------------------------------------------------------
# buffer pool (ds_burst.ring.pool)


def _attn_calls(rank: int, world: int, group, schedule: str | None) -> list[tuple]:
    """Outputs and gradients of burst attention for several dtypes / backward patterns, on fixed inputs."""
    import ds_burst

    res = []
    for dtype, backward, hq, hkv in ((torch.float32, "burst", 4, 2), (torch.bfloat16, "ring", 4, 2),
                                     (torch.bfloat16, "burst", 2, 2)):
        gen = torch.Generator().manual_seed(7)
        full = [torch.randn(1, 8 * world, h, 8, generator=gen) for h in (hq, hkv, hkv, hq)]
        q, k, v, do = (ds_burst.shard_sequence(t, 1, group).to(dtype) for t in full)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = ds_burst.burst_attn_func(q, k, v, causal=True, group=group, backward=backward, schedule=schedule)
        out.backward(do)
        res.append((out.detach(), q.grad, k.grad, v.grad))
    return res


def _pool_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    import ds_burst
    from ds_burst.ring.pool import _POOL, buffer_pool_stats, release_buffers, set_buffer_pool

    groups = {"ring": (dist.group.WORLD, None),
              "double_ring": (ds_burst.init_sequence_parallel(4, gpus_per_node=2, schedule="double_ring"), None)}
    out = {}
    for name, (group, sched) in groups.items():
        set_buffer_pool(False)
        plain = _attn_calls(rank, world, group, sched)
        set_buffer_pool(True)
        release_buffers()
        first = _attn_calls(rank, world, group, sched)
        warm = _attn_calls(rank, world, group, sched)  # the mix of shapes settles the best-fit choice
        s1, blocks1 = buffer_pool_stats(), _POOL.blocks()
        second = _attn_calls(rank, world, group, sched)  # must not overwrite what the first call returned
        s2, blocks2 = buffer_pool_stats(), _POOL.blocks()
        second = [tuple(a for a in call) for call in second]
        assert all(torch.equal(a, b) for x, y in zip(first, warm) for a, b in zip(x, y))
        owned = any(_POOL.owns(t) for call in first + second for t in call)
        same = all(torch.equal(a, b) and a.dtype == b.dtype for x, y, z in zip(plain, first, second)
                   for a, b, c in zip(x, y, z) for a, b in ((a, b), (a, c)))
        out[name] = dict(same=same, owned=owned, s1=s1, s2=s2, blocks_same=blocks1 == blocks2,
                         in_use=any(u for _, _, u in blocks2), n_blocks=len(blocks2))
    # a model over several layers and steps: pooled equals unpooled bit for bit
    out["model"] = [_model_steps(rank, world, pooled) for pooled in (False, True)]
    set_buffer_pool(None)
    return out


def test_buffer_pool_reuses_storage_and_is_bitwise_identical():
    """Flat ring and double ring (2 nodes x 2) on 4 gloo ranks: pooled calls equal unpooled ones bitwise and,
    once warm, reuse the same storages without allocating; a 3-layer bf16 model trained 3 SGD steps with the
    pool gives the unpooled losses and gradients bit for bit."""
    for rank, res in enumerate(values(run_ranks(_pool_worker, 4, timeout=180))):
        plain, pooled = res.pop("model")
        for (la, ga), (lb, gb) in zip(plain, pooled):
            assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
        for name, r in res.items():
            assert r["same"], (rank, name)  # pooled results equal the unpooled ones bit for bit
            assert not r["owned"], (rank, name)  # outputs and gradients never live in pooled blocks
            assert r["n_blocks"] > 0 and not r["in_use"], (rank, name, r)  # all blocks back after the calls
            # warm-up allocates; the repeated calls only reuse the same storages
            assert r["s1"]["allocated"] > 0 and r["s2"]["allocated"] == r["s1"]["allocated"], (rank, name, r)
            assert r["s2"]["reused"] > r["s1"]["reused"] and r["blocks_same"], (rank, name, r)


def test_buffer_pool_unit():
    from ds_burst.ring.pool import BufferPool, set_buffer_pool

    pool = BufferPool()
    a = pool.take((3, 5), torch.float32, "cpu")
    ptr = a.data_ptr()
    assert pool.owns(a) and a.shape == (3, 5)
    pool.give(a, None, torch.zeros(2))  # foreign tensors and None are ignored
    b = pool.zeros((15,), torch.float32, "cpu")  # same bytes: the same block, zeroed
    assert b.data_ptr() == ptr and torch.all(b == 0)
    c = pool.take((4, 4), torch.bfloat16, "cpu")  # a new block while b is in use
    assert c.data_ptr() != ptr and pool.stats()["allocated"] == 2
    kept = pool.export(b, torch.float32)  # a copy the caller may keep; b goes back
    assert not pool.owns(b) and kept.data_ptr() != ptr
    pool.give(c)
    assert pool.take((1000,), torch.float32, "cpu").data_ptr() not in (ptr, c.data_ptr())  # too small: new
    assert pool.release() > 0
    with pytest.raises(TypeError):
        set_buffer_pool("yes")


def _model_steps(rank: int, world: int, pooled: bool) -> list:
    import torch.distributed as dist

    from ds_burst.attention.config import BurstConfig
    from ds_burst.ring.pool import set_buffer_pool
    from ds_burst.training.data import shard_batch_local

    set_buffer_pool(pooled)
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=61, hidden_size=16, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=24)
    model = BurstLlama(cfg, group=dist.group.WORLD, attention="burst", burst=BurstConfig(layout="zigzag")).bfloat16()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(3):
        ids = torch.randint(0, 61, (1, 32), generator=gen)
        shard = shard_batch_local(ids, _labels(1, 32, 61, gen), rank, world, "zigzag")
        loss = model(shard["input_ids"], shard["position_ids"], shard["labels"])
        opt.zero_grad()
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return out


# ---------------------------------------------------------------------------------------------
# selective checkpointing and offload (ds_burst.attention.selective)

SELECTIVE_VARIANTS = {  # name: (checkpoint_impl, ModelConfig memory options)
    "plain": ("torch", {}),
    "keep_all": ("torch", {"keep_attention_layers": 1.0}),
    "keep_half": ("torch", {"keep_attention_layers": 1.0, "keep_attention_tokens": "half"}),
    "keep_some": ("torch", {"keep_attention_layers": 0.5}),  # 1 of 3 layers
    "offload": ("torch", {"offload_checkpoints": True}),
    "ds_plain": ("deepspeed", {}),
    "ds_keep_half_offload": ("deepspeed", {"keep_attention_layers": 1.0, "keep_attention_tokens": "half",
                                           "offload_checkpoints": True}),
    "ds_keep_all_offload": ("deepspeed", {"keep_attention_layers": 1.0, "offload_checkpoints": True}),
}


def _counting_fwd_kernel() -> list[int]:
    """Count the forward attention work (query rows x keys per kernel call) of the torch kernel."""
    from ds_burst.kernels import registry

    mod = registry.get("torch").impl
    work = [0]
    orig = mod.fwd_step

    def counting(q, k, v, *args, **kwargs):
        work[0] += q.shape[0] * q.shape[1] * k.shape[1]
        return orig(q, k, v, *args, **kwargs)

    mod.fwd_step = counting
    return work


def _selective_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from ds_burst import comm_stats, reset_comm_stats
    from ds_burst.attention.config import BurstConfig
    from ds_burst.attention.selective import reset_selective_stats, selective_stats
    from ds_burst.training.data import shard_batch_local

    work = _counting_fwd_kernel()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 61, (1, 32), generator=gen)
    shard = shard_batch_local(ids, _labels(1, 32, 61, gen), rank, world, "zigzag")
    args = (shard["input_ids"], shard["position_ids"], shard["labels"])
    base = dict(vocab_size=61, hidden_size=16, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=24)
    torch.manual_seed(0)
    state = BurstLlama(ModelConfig(**base)).double().state_dict()
    out = {}
    for name, (impl, opts) in [("forward_only", ("torch", {})), *SELECTIVE_VARIANTS.items()]:
        model = BurstLlama(ModelConfig(**base, **opts), group=dist.group.WORLD, burst=BurstConfig(layout="zigzag"),
                           activation_checkpointing=name != "forward_only", checkpoint_impl=impl).double()
        model.load_state_dict(state)
        work[0] = 0
        reset_comm_stats()
        reset_selective_stats()
        if name == "forward_only":
            with torch.no_grad():
                model(*args)
            out[name] = {"work": work[0], "fwd_bytes": comm_stats().get("fwd", 0)}
            continue
        loss = model(*args)
        fwd_work = work[0]
        loss.backward()
        out[name] = {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
                     "work": work[0], "fwd_work": fwd_work, "fwd_bytes": comm_stats().get("fwd", 0),
                     "stats": selective_stats()}
    out["zero3"] = _zero3_runs(rank, world)
    return out


def test_selective_checkpointing_and_offload_same_grads_less_recompute():
    """2 gloo ranks, float64, ring attention, 3 layers: every variant gives plain checkpointing's loss and
    gradients; the counted attention-forward work and bytes show the kept outputs were used. Then under
    DeepSpeed ZeRO-3 (fp32, deepspeed checkpointing, 2 optimizer steps): selective checkpointing (half) with
    offload gives plain checkpointing's losses and gradients."""
    for rank, res in enumerate(values(run_ranks(_selective_worker, 2, timeout=300))):
        zero3 = res.pop("zero3")
        z_ref, z = zero3["plain"], zero3["keep_half_offload"]
        assert z["stats"]["replayed"] == 2 * 2 and z["stats"]["offloaded_bytes"] > 0, (rank, z["stats"])
        for step in range(2):
            _close(z["losses"][step], z_ref["losses"][step], 1e-5)
            for n, g in z_ref["grads"][step].items():
                _close(z["grads"][step][n], g, 1e-4)
        w1, b1 = res["forward_only"]["work"], res["forward_only"]["fwd_bytes"]
        ref = res["plain"]
        for name, r in res.items():
            if name == "forward_only":
                continue
            _close(r["loss"], ref["loss"])
            for n in ref["grads"]:
                _close(r["grads"][n], ref["grads"][n])
            assert r["fwd_work"] == w1, (rank, name)  # the first forward is unchanged
        for name in ("plain", "offload", "ds_plain"):  # plain checkpointing re-runs the whole ring forward
            assert res[name]["work"] == 2 * w1 and res[name]["fwd_bytes"] == 2 * b1, (rank, name)
            assert res[name]["stats"]["replayed"] == 0
        for name in ("keep_all", "ds_keep_all_offload"):  # no ring forward in the re-run at all
            assert res[name]["work"] == w1 and res[name]["fwd_bytes"] == b1, (rank, name)
            assert res[name]["stats"]["recorded"] == res[name]["stats"]["replayed"] == 3
        for name in ("keep_half", "ds_keep_half_offload"):  # the re-run computes the early half's rows only
            r = res[name]
            assert w1 < r["work"] <= 1.45 * w1 and r["fwd_bytes"] == 2 * b1, (rank, name, r["work"], w1)
            assert r["stats"]["replayed"] == 3 and r["stats"]["replayed_rows"] == 3 * 16 // 2 // 2 * 2
        some = res["keep_some"]
        assert some["work"] == w1 + 2 * w1 // 3 and some["stats"]["replayed"] == 1, (rank, some["work"], w1)
        for name in ("offload", "ds_keep_half_offload", "ds_keep_all_offload"):
            st = res[name]["stats"]
            assert st["offloaded_bytes"] > 0 and st["restored_bytes"] == st["offloaded_bytes"], (rank, name, st)


def _zero3_runs(rank: int, world: int) -> dict:
    import os
    import warnings

    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    import ds_burst
    from ds_burst.attention.config import BurstConfig
    from ds_burst.attention.selective import reset_selective_stats, selective_stats
    from ds_burst.training.data import shard_batch_local
    from ds_burst.training.losses import sp_grads_averaged

    warnings.filterwarnings("ignore")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    topo = ds_burst.init_sequence_parallel(world)
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    base = dict(vocab_size=61, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=24)
    gen = torch.Generator().manual_seed(6)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 61, (1, 32), generator=gen)
        batches.append(shard_batch_local(ids, _labels(1, 32, 61, gen), rank, world, "zigzag"))
    out = {}
    for name, impl, opts in (("plain", "deepspeed", {}),
                             ("keep_half_offload", "deepspeed", {"keep_attention_layers": 1.0,
                                                                 "keep_attention_tokens": "half",
                                                                 "offload_checkpoints": True})):
        torch.manual_seed(0)
        model = BurstLlama(ModelConfig(**base, **opts), group=topo, burst=BurstConfig(layout="zigzag"),
                           activation_checkpointing=True, checkpoint_impl=impl)
        if impl == "deepspeed":
            deepspeed.checkpointing.configure(topo, deepspeed_config=config)
        engine, *_ = ds_burst.deepspeed_initialize(model, config, topo)
        reset_selective_stats()
        losses, grads = [], []
        for b in batches:
            loss = engine(b["input_ids"], b["position_ids"], b["labels"],
                          sp_grads_averaged=sp_grads_averaged(config))
            engine.backward(loss)
            grads.append({n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()})
            engine.step()
            losses.append(loss.detach())
        out[name] = {"losses": losses, "grads": grads, "stats": selective_stats()}
        engine.destroy() if hasattr(engine, "destroy") else None
    return out


def test_selective_options_validation_and_layer_choice():
    cfg = ModelConfig(num_layers=4, keep_attention_layers=0.5, keep_attention_tokens="half", offload_checkpoints=True)
    assert [cfg.keeps_attention(i) for i in range(4)] == [False, True, False, True]
    assert all(ModelConfig(keep_attention_layers=1).keeps_attention(i) for i in range(2))
    assert not any(ModelConfig().keeps_attention(i) for i in range(2))
    for bad in (-0.1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="keep_attention_layers"):
            ModelConfig(keep_attention_layers=bad)
    with pytest.raises(ValueError, match="keep_attention_tokens"):
        ModelConfig(keep_attention_tokens="quarter")
    with pytest.raises(ValueError, match="offload_checkpoints"):
        ModelConfig(offload_checkpoints=1)
    with pytest.raises(ValueError, match="attention='burst'"):
        BurstLlama(ModelConfig(keep_attention_layers=1.0), attention="local")


@pytest.mark.parametrize("opts", ids=_opts_id, argvalues=[
    {"keep_attention_layers": 0.5, "keep_attention_tokens": "half"},
    {"keep_attention_layers": 0.34, "offload_checkpoints": True, "mlp_tiles": 2},
])
def test_estimate_memory_kept_and_offloaded_bytes_match_the_model(opts):
    """Single process, fp32: the estimator's kept-attention and host-offload bytes are what the model keeps and
    offloads, and the loss and gradients equal plain checkpointing's."""
    from ds_burst.attention.selective import reset_selective_stats, selective_stats
    from ds_burst.training.estimate import GIB, estimate_model_memory

    base = dict(vocab_size=50, hidden_size=24, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=32)
    cfg = ModelConfig(**base, **opts)
    torch.manual_seed(0)
    ref = BurstLlama(ModelConfig(**base), activation_checkpointing=True)
    model = BurstLlama(cfg, activation_checkpointing=True)
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 50, (2, 20))
    loss_ref, g_ref = _loss_and_grads(ref, ids, torch.arange(20), ids)
    reset_selective_stats()
    loss, g = _loss_and_grads(model, ids, torch.arange(20), ids)
    st = selective_stats()
    _close(loss, loss_ref, 1e-6)
    for n in g_ref:
        _close(g[n], g_ref[n], 1e-5)
    est = estimate_model_memory(cfg, 20, dtype_bytes=4, activation_checkpointing=True, micro_batch=2)
    if cfg.offload_checkpoints:
        assert est["kept_attention"] == 0 and est["host_offload"] * GIB == st["offloaded_bytes"] > 0
        assert st["restored_bytes"] == st["offloaded_bytes"]
    else:
        assert "host_offload" not in est and est["kept_attention"] * GIB == st["kept_bytes"] > 0
    assert est["total"] == pytest.approx(_persistent_plus_transient(est))


def _bench_memory_worker(rank: int, world: int, out: str) -> list:
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))
    import bench_memory

    args = bench_memory.parse_args(["--cpu", "--seq", "64", "--no-peers", "--warmup", "0", "--out", out,
                                    "--variants", "ckpt", "keep_half_offload", "no_pool"])
    return bench_memory.run(args)


def test_bench_memory_cpu_mode(tmp_path):
    """launch/bench_memory.py's CPU mode on 2 gloo ranks: every part runs, the variants agree on the loss,
    and rank 0 writes the JSON with the predictions."""
    import json

    out = str(tmp_path / "memory.json")
    rows = values(run_ranks(_bench_memory_worker, 2, out, timeout=180))[0]
    assert [r["method"] for r in rows] == ["ds-burst", "ds-burst-no-pool", "ckpt", "keep_half_offload", "no_pool"]
    assert all("error" not in r for r in rows), rows
    model = [r for r in rows if r["part"] == "model"]
    assert all(r["loss_rel_diff"] < 1e-6 and r["predicted_gib"] > 0 for r in model)
    assert model[1]["predicted_host_gib"] > 0 == model[0]["predicted_host_gib"]
    with open(out) as f:
        data = json.load(f)
    assert data["meta"]["world"] == 2 and len(data["rows"]) == len(rows)


@pytest.mark.parametrize("sp, opts", [(1, {}), (4, {"activation_checkpointing": True, "mlp_tiles": 4,
                                                      "lm_head_chunk_tokens": 512, "zero_stage": 3})])
def test_longest_sequence_is_the_boundary_of_the_estimate(sp, opts):
    """``longest_sequence`` (``python -m ds_burst.plan --memory --gpu-memory GIB``) returns the last multiple of its
    step whose estimate fits the budget: the next step does not fit; 0 when the first does not."""
    from ds_burst.training.estimate import estimate_memory, longest_sequence

    cfg = ModelConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                      intermediate_size=512)
    step = 2 * sp * 1024
    for budget in (0.3, 1.0, 3.7):
        n = longest_sequence(cfg, budget, sp=sp, **opts)
        assert n % step == 0
        if n:
            assert estimate_memory(cfg, n, sp=sp, **opts)["total"] <= budget
        assert estimate_memory(cfg, n + step, sp=sp, **opts)["total"] > budget
    assert longest_sequence(cfg, 1e-6, sp=sp, **opts) == 0


# ---------------------------------------------------------------------------------------------
# offload of the first layers only (offload_checkpoints as a fraction) and the offload plan


def test_offload_fraction_picks_the_first_layers_round_down():
    from ds_burst.training.model import offloaded_layer_count

    cfg = ModelConfig(num_layers=4, offload_checkpoints=0.5)
    assert [cfg.offloads_input(i) for i in range(4)] == [True, True, False, False]
    assert ModelConfig(num_layers=4, offload_checkpoints=0.3).offloaded_layers() == 1  # floor(1.2)
    assert ModelConfig(num_layers=4, offload_checkpoints=0.2).offloaded_layers() == 0
    assert ModelConfig(num_layers=4, offload_checkpoints=True).offloaded_layers() == 4
    assert ModelConfig(num_layers=4, offload_checkpoints=1.0).offloaded_layers() == 4
    assert ModelConfig(num_layers=4).offloaded_layers() == 0
    assert [offloaded_layer_count(k / 28, 28) for k in range(29)] == list(range(29))  # k / L gives back k
    for bad in (1, 0, -0.1, 1.5, "0.5", None):
        with pytest.raises(ValueError, match="model.offload_checkpoints"):
            ModelConfig(offload_checkpoints=bad)


def test_activation_offload_skipped_slots_keep_the_prefetch_chain():
    """Slots 0, 1 offloaded, 2, 3 skipped: re-running region 3 fetches nothing, region 2 (the last re-run with its
    input on the device) starts fetching region 1's input, region 1 waits for it and starts region 0's."""
    from ds_burst.attention.selective import ActivationOffload

    off = ActivationOffload()
    xs = [torch.full((3, 5), float(i)) for i in range(4)]
    assert [off.add(xs[0]), off.add(xs[1]), off.skip(), off.skip()] == [0, 1, 2, 3]
    assert off.offloaded() == [0, 1] and all(x.untyped_storage().nbytes() == 0 for x in xs[:2])

    def back() -> list[bool]:
        return [x.untyped_storage().nbytes() > 0 for x in xs[:2]]

    off.before_rerun(3)
    assert back() == [False, False]
    off.before_rerun(2)
    assert back() == [False, True] and torch.equal(xs[1], torch.full((3, 5), 1.0))
    off.before_rerun(1)
    assert back() == [True, True] and torch.equal(xs[0], torch.zeros(3, 5))
    off.before_rerun(0)


class _RecordingOffload:
    """Stands in for ``ActivationOffload`` in the model: remembers the instance and the order of the re-runs."""

    made: list = []

    def __new__(cls):
        from ds_burst.attention.selective import ActivationOffload

        class Rec(ActivationOffload):
            def __init__(self):
                super().__init__()
                self.reruns = []
                self.added_keeps = []  # the chain lets go of each slot's keep at its re-run
                self.live_at_rerun = []  # per re-run: regions above i+1 whose input storage is still alive

            def add(self, x, keep=None):
                self.added_keeps.append(keep)
                self.added_inputs = getattr(self, "added_inputs", []) + [weakref.ref(x)]
                return super().add(x, keep)

            def skip(self):
                self.added_keeps.append(None)
                self.added_inputs = getattr(self, "added_inputs", []) + [None]
                return super().skip()

            def before_rerun(self, i):
                self.reruns.append(i)
                alive = [j for j, r in enumerate(getattr(self, "added_inputs", [])) if j > i + 1 and r is not None
                         and r() is not None and r().untyped_storage().nbytes() > 0]
                self.live_at_rerun.append(alive)
                super().before_rerun(i)

        inst = Rec()
        cls.made.append(inst)
        return inst


@pytest.mark.parametrize("opts", ids=_opts_id, argvalues=[
    {"offload_checkpoints": 0.5},
    {"offload_checkpoints": 0.3, "keep_attention_layers": 1.0},
    {"offload_checkpoints": 0.75, "keep_attention_layers": 0.5, "keep_attention_tokens": "half"},
])
def test_offload_fraction_same_loss_and_grads_first_layers_only(opts, monkeypatch):
    """Single process, fp32 (the estimator's lse is fp32), 4 layers: offloading the first k layers gives the loss and
    every gradient of the same options without offload (and of plain checkpointing); exactly slots 0..k-1 go to
    host (and their kept attention), every layer re-runs through the chain (last to first), and the estimator's
    host_offload / kept_attention are the bytes offloaded / kept on the device."""
    import ds_burst.training.model as model_mod
    from ds_burst.attention.selective import reset_selective_stats, selective_stats
    from ds_burst.training.estimate import GIB, estimate_model_memory

    base = dict(vocab_size=50, hidden_size=24, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=32)
    cfg = ModelConfig(**base, **opts)
    k = cfg.offloaded_layers()
    assert 0 < k < 4
    torch.manual_seed(0)
    ref = BurstLlama(ModelConfig(**base), activation_checkpointing=True)
    keep_only = {n: v for n, v in opts.items() if n != "offload_checkpoints"}
    on_device = BurstLlama(ModelConfig(**base, **keep_only), activation_checkpointing=True)
    model = BurstLlama(cfg, activation_checkpointing=True)
    on_device.load_state_dict(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(20)
    loss_ref, g_ref = _loss_and_grads(ref, ids, pos, ids)
    reset_selective_stats()
    loss_dev, g_dev = _loss_and_grads(on_device, ids, pos, ids)
    kept_all = selective_stats()["kept_bytes"]
    monkeypatch.setattr(model_mod, "ActivationOffload", _RecordingOffload)
    _RecordingOffload.made.clear()
    reset_selective_stats()
    loss, g = _loss_and_grads(model, ids, pos, ids)
    st = selective_stats()
    _close(loss, loss_dev, 1e-7)
    _close(loss, loss_ref, 1e-6)
    assert g.keys() == g_ref.keys()
    for n in g_ref:
        _close(g[n], g_dev[n], 1e-7)
        _close(g[n], g_ref[n], 1e-5)
    (off,) = _RecordingOffload.made
    assert off.offloaded() == list(range(k)) and len(off.inputs) == 4
    assert [kp is not None and kp.offload for kp in off.added_keeps[:k]] == [cfg.keeps_attention(i) for i in range(k)]
    assert off.added_keeps[k:] == [None] * (4 - k)
    assert off.inputs == [None] * 4 and off.keeps == [None] * 4  # let go of at each re-run
    assert off.reruns == [3, 2, 1, 0]
    assert st["kept_bytes"] == kept_all  # the same attention is kept, part of it on the host
    kept_host = sum(kept_all // sum(cfg.keeps_attention(i) for i in range(4)) for i in range(k)
                    if cfg.keeps_attention(i))
    inputs = k * 2 * 20 * 24 * 4
    assert st["offloaded_bytes"] == st["restored_bytes"] == inputs + kept_host
    est = estimate_model_memory(cfg, 20, dtype_bytes=4, activation_checkpointing=True, micro_batch=2)
    assert est["host_offload"] * GIB == inputs + kept_host
    assert est["kept_attention"] * GIB == kept_all - kept_host


@pytest.mark.parametrize("checkpoint_impl", ["torch", "deepspeed"])
def test_offload_restored_inputs_freed_after_their_region(checkpoint_impl, monkeypatch):
    """A restored layer input lives only until its region's backward is done: when region ``i`` re-runs, the
    inputs of regions ``i+2`` and above (their backward finished) are gone, not kept on the device by the offload
    chain until the step ends (which held every restored input, all L of them by the end of backward)."""
    import ds_burst.training.model as model_mod

    cfg = ModelConfig(vocab_size=50, hidden_size=24, num_layers=5, num_heads=4, num_kv_heads=2,
                      offload_checkpoints=True, keep_attention_layers=0.5)
    model = BurstLlama(cfg, activation_checkpointing=True, checkpoint_impl=checkpoint_impl)
    monkeypatch.setattr(model_mod, "ActivationOffload", _RecordingOffload)
    _RecordingOffload.made.clear()
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(5))
    _loss_and_grads(model, ids, torch.arange(16), ids)
    (off,) = _RecordingOffload.made
    assert off.reruns == [4, 3, 2, 1, 0] and off.offloaded() == [0, 1, 2, 3, 4]
    assert off.live_at_rerun == [[]] * 5


def _resident_saved_bytes_after_forward(model, ids, pos, labels) -> int:
    """Bytes still held, once the forward returned, by the distinct storages it saved for backward (parameters
    excluded): an offloaded storage has been freed (0 bytes) by then. Storages are told apart by their storage
    object (``_cdata``), not their address, which a freed one hands on to a later tensor."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, torch.UntypedStorage] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen.setdefault(st._cdata, st)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, pos, labels)
    held = sum(st.nbytes() for st in seen.values())
    del loss
    return held


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_estimate_memory_gpu_activations_with_offload_fraction(fraction):
    """fp32, local attention, 4 layers, the first k offloaded: the layer inputs on the device after the forward are
    the last 4 - k (>= 2 here, so the estimator's max(L - k, 2) is that count), as the estimator counts them."""
    from ds_burst.training.estimate import GIB, estimate_memory

    cfg = ModelConfig(vocab_size=300, hidden_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
                      intermediate_size=80, offload_checkpoints=fraction)
    model = BurstLlama(cfg, attention="local", activation_checkpointing=True)
    s = 96
    ids = torch.randint(0, 300, (1, s))
    held = _resident_saved_bytes_after_forward(model, ids, torch.arange(s), ids)
    est = estimate_memory(cfg, s, dtype_bytes=4, activation_checkpointing=True, offload_checkpoints=fraction)
    none = estimate_memory(cfg, s, dtype_bytes=4, activation_checkpointing=True)
    k = cfg.offloaded_layers()
    assert none["activations"] - est["activations"] == pytest.approx(k * s * 48 * 4 / GIB, rel=1e-12)
    assert abs(est["activations"] * GIB - held) <= 0.01 * held, (est["activations"] * GIB, held)
    assert est["host_offload"] * GIB == k * s * 48 * 4


def _big_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8,
                       intermediate_size=8192)


PLAN_KW = dict(zero_stage=3, activation_checkpointing=True, offload_optimizer=True, lm_head_chunk_tokens=8192,
               mlp_tiles=64)


def test_plan_offload_smallest_fitting_fraction():
    from ds_burst.training.estimate import estimate_memory, host_bytes, plan_offload

    cfg, seq = _big_cfg(), 262144
    est = [estimate_memory(cfg, seq, offload_checkpoints=k / 28, **PLAN_KW) for k in range(29)]
    gpu = [e["total"] for e in est]
    assert all(a >= b for a, b in zip(gpu, gpu[1:])) and gpu[0] > gpu[-1]  # offloading more never costs GPU memory
    host = [host_bytes(e, 16.0) for e in est]
    assert all(a < b for a, b in zip(host, host[1:]))
    budget = (gpu[9] + gpu[10]) / 2  # 10 layers is the fewest that fit
    assert gpu[10] <= budget < gpu[9]
    assert plan_offload(cfg, seq, budget, 1e9, 16.0, **PLAN_KW) == 10 / 28
    assert plan_offload(cfg, seq, budget, host[10], 16.0, **PLAN_KW) == 10 / 28  # the host just fits
    assert plan_offload(cfg, seq, budget, host[10] - 0.01, 16.0, **PLAN_KW) is None  # more layers only need more
    assert plan_offload(cfg, seq, budget, 2 * host[10], 16.0, ranks_per_host=2, **PLAN_KW) == 10 / 28
    assert plan_offload(cfg, seq, budget, 2 * host[10] - 0.01, 16.0, ranks_per_host=2, **PLAN_KW) is None
    assert plan_offload(cfg, seq, gpu[0], 1e9, **PLAN_KW) == 0.0  # the GPU holds everything: nothing offloaded
    assert plan_offload(cfg, seq, gpu[-1] - 0.01, 1e9, **PLAN_KW) is None  # not even offloading every layer fits
    # an offload_checkpoints given along is ignored; without checkpointing nothing can be offloaded
    assert plan_offload(cfg, seq, budget, 1e9, 16.0, offload_checkpoints=True, **PLAN_KW) == 10 / 28
    no_ckpt = {**PLAN_KW, "activation_checkpointing": False}
    plain = estimate_memory(cfg, seq, **no_ckpt)["total"]
    assert plan_offload(cfg, seq, plain, 1e9, **no_ckpt) == 0.0
    assert plan_offload(cfg, seq, plain - 0.01, 1e9, **no_ckpt) is None
    with pytest.raises(ValueError, match="ranks_per_host"):
        plan_offload(cfg, seq, budget, 1e9, ranks_per_host=0, **PLAN_KW)
    for bad in (1, 2.0, -0.5, "all"):
        with pytest.raises(ValueError, match="offload_checkpoints"):
            estimate_memory(cfg, seq, offload_checkpoints=bad, **PLAN_KW)


def test_longest_sequence_with_a_host_budget():
    """GPU 76 GiB: with ample host memory the longest sequence is the GPU-only one with every layer offloaded; with
    128 GiB of host (16 GiB fixed) it is shorter, and it is the boundary of plan_offload."""
    from ds_burst.training.estimate import estimate_memory, host_bytes, longest_sequence, plan_offload

    cfg, step = _big_cfg(), 2048
    gpu_only = longest_sequence(cfg, 76.0, offload_checkpoints=True, **PLAN_KW)
    assert gpu_only > 0
    assert longest_sequence(cfg, 76.0, host_budget_gib=1e6, **PLAN_KW) == gpu_only
    assert longest_sequence(cfg, 76.0, host_budget_gib=1e6, offload_checkpoints=False, **PLAN_KW) == gpu_only
    tight = longest_sequence(cfg, 76.0, host_budget_gib=128.0, host_fixed_gib=16.0, **PLAN_KW)
    assert 0 < tight < gpu_only and tight % step == 0
    frac = plan_offload(cfg, tight, 76.0, 128.0, 16.0, **PLAN_KW)
    assert frac is not None and 0 < frac < 1
    e = estimate_memory(cfg, tight, offload_checkpoints=frac, **PLAN_KW)
    assert e["total"] <= 76.0 and host_bytes(e, 16.0) <= 128.0
    assert plan_offload(cfg, tight + step, 76.0, 128.0, 16.0, **PLAN_KW) is None
    # the GPU-only answer without offload is shorter still: the host is what the plan trades against
    assert longest_sequence(cfg, 76.0, **PLAN_KW) < tight
    assert longest_sequence(cfg, 76.0, host_budget_gib=50.0, **PLAN_KW) == 0  # the optimizer alone is 54 GiB


def test_plan_memory_command_line_with_host_memory(capsys):
    from ds_burst.cli.plan import main

    argv = ["--memory", "--seq", "524288", "--gpus-per-node", "1", "--heads", "24", "--kv-heads", "8", "--layers", "28",
            "--intermediate", "8192", "--checkpointing", "--lm-head-chunk", "8192", "--mlp-tiles", "64",
            "--offload-optimizer", "--gpu-memory", "76"]
    main(argv + ["--offload-checkpoints", "0.5"])
    out = capsys.readouterr().out
    assert "host_offload" in out and "longest sequence within 76 GiB per GPU: S=" in out
    main(argv + ["--host-memory", "128", "--host-fixed", "16"])
    out = capsys.readouterr().out
    assert "at S=524288: offload_checkpoints=0.6786 (the first 19 of 28 layers" in out
    assert "longest sequence within 76 GiB per GPU and 128 GiB per node: S=" in out
    for bad in (["--offload-checkpoints", "1.5"], ["--host-memory", "128"]):
        with pytest.raises(SystemExit):
            main(["--memory", "--seq", "131072", *bad])
