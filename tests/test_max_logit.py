"""``burst_attn_func(..., return_max_logit=True)`` and ``reduce_max_logits`` against float64 references.

Each rank's ``max_logit [Hq]`` must equal the maximum over *its own* queries (in the caller's layout) of the scaled
scores of the pairs they see, and the all-reduced value the full sequence's. Every group size is spawned once; the
cases run inside that launch (masks, documents from ``cu_seqlens`` and from ``position_ids``, GQA, softcap, sinks,
both layouts, both backwards, the CPU kernels, the double ring and Ulysses in a node, ``torch.compile``).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dist_utils import run_ranks, values
from kernel_utils import gpu, ref_grads, rel

HQ, D = 4, 8
DOCS = "docs"
MASKS = {"causal": (True, None), "full": (False, None), "window": (True, (0.75, 0.0)), "docs": (True, DOCS),
         "docs_pos": (True, DOCS), "window_full": (False, (0.5, 0.5))}
CASES = [
    (mask, layout, hkv, variant)
    for mask, layout, hkv in itertools.product(MASKS, ["zigzag", "contiguous"], [HQ, 2])
    for variant in (["plain", "softcap"] if hkv == HQ else ["sinks"])
]
TOL64 = 1e-12


def doc_bounds(s: int) -> tuple[int, ...]:
    """Uneven documents of a sequence of ``s`` tokens, one crossing the middle."""
    return (0, 3, s // 2 + 1, s - 2, s)


def row_max(q: torch.Tensor, k: torch.Tensor, causal: bool, window: tuple[int, int],
            docs: tuple[int, ...] | None, scale: float | None = None) -> torch.Tensor:
    """float64 ``[B, S, Hq]``: each query's largest visible scaled score (``-inf``: none)."""
    from ds_burst.kernels.reference import naive_row_max

    return naive_row_max(q.double(), k.double(), causal=causal, window=window, scale=scale,
                         docs=docs).transpose(1, 2)


def _inputs(world: int, idx: int, hkv: int, batch: int = 2, per_rank: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(900 + 31 * idx + world)
    s = per_rank * world
    q = torch.randn(batch, s, HQ, D, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(batch, s, hkv, D, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(batch, s, hkv, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask(mask: str, s: int, world: int):
    causal, w = MASKS[mask]
    if w is None:
        return causal, (-1, -1), None
    if w == DOCS:
        return causal, (-1, -1), doc_bounds(s)
    return causal, (int(w[0] * s / world), int(w[1] * s / world)), None


def _positions(docs: tuple[int, ...], batch: int) -> torch.Tensor:
    pos = torch.cat([torch.arange(e - s) for s, e in zip(docs, docs[1:])])
    return pos.expand(batch, -1).contiguous()


def _call(q, k, v, mask, docs, layout, group=None, **kw):
    """This rank's call on its shards: ``(out shard, max_logit)``."""
    import ds_burst

    ql, kl, vl = (ds_burst.shard_sequence(x, 1, layout=layout, group=group) for x in (q, k, v))
    extra = {}
    if docs is not None and mask == "docs_pos":
        extra["position_ids"] = ds_burst.shard_sequence(_positions(docs, q.shape[0]), 1, layout=layout, group=group)
    elif docs is not None:
        extra["cu_seqlens"] = list(docs)
    return ds_burst.burst_attn_func(ql, kl, vl, layout=layout, group=group, return_max_logit=True, **extra, **kw)


def _mine(full_rows: torch.Tensor, layout: str, group=None) -> torch.Tensor:
    """The maximum over this rank's queries of ``full_rows [B, S, Hq]``."""
    import ds_burst

    return ds_burst.shard_sequence(full_rows, 1, layout=layout, group=group).amax(dim=(0, 1))


def worker_cases(rank: int, world: int) -> dict:
    import ds_burst

    errs = {}
    for idx, (mask, layout, hkv, variant) in enumerate(CASES):
        q, k, v = _inputs(world, idx, hkv)
        causal, window, docs = _mask(mask, q.shape[1], world)
        softcap = 2.0 if variant == "softcap" else None
        sinks = torch.randn(HQ, dtype=torch.float64) if variant == "sinks" else None
        out, mx = _call(q, k, v, mask, docs, layout, causal=causal, window_size=window, softcap=softcap,
                        sinks=sinks)
        rows = row_max(q, k, causal, window, docs)
        total = ds_burst.reduce_max_logits([mx])[0]
        errs[f"{mask}-{layout}-{hkv}-{variant}"] = (float((mx - _mine(rows, layout)).abs().max()),
                                                    float((total - rows.amax(dim=(0, 1))).abs().max()),
                                                    str(mx.dtype), mx.requires_grad)
    if world == 2:  # the other two-rank checks, in the same launch
        return {"cases": errs, "kernels": worker_kernels(rank, world), "compile": worker_compile(rank, world),
                "mismatch": worker_mismatch(rank, world), "drop_in": worker_drop_in(rank, world)}
    # the topology schedules (node groups of 2) after the cases, which ran on the world
    return {"cases": errs, "schedules": {s: worker_schedules(rank, world, s) for s in ("double_ring", "ulysses_ring")}}


def worker_kernels(rank: int, world: int) -> dict:
    """The CPU kernels (torch, sdpa's fallback, Triton under the interpreter) with a backward through the call."""
    import ds_burst

    errs = {}
    for kernel, dtype in (("torch", torch.float32), ("sdpa", torch.float32), ("triton", torch.float32),
                          ("triton", torch.float16)):
        q, k, v = _inputs(world, 7, 2, batch=1, per_rank=8, dtype=dtype)
        for mask in ("causal", "docs"):
            causal, window, docs = _mask(mask, q.shape[1], world)
            ql, kl, vl = (ds_burst.shard_sequence(x, 1).requires_grad_() for x in (q, k, v))
            out, lse, mx = ds_burst.burst_attn_func(ql, kl, vl, causal=causal, kernel=kernel, return_lse=True,
                                                    return_max_logit=True,
                                                    cu_seqlens=None if docs is None else list(docs))
            out.float().sum().backward()  # the backward runs with the max logit asked for
            ref = _mine(row_max(q, k, causal, window, docs), "zigzag")
            errs[f"{kernel}-{dtype}-{mask}"] = (float(((mx.double() - ref).abs() / ref.abs().clamp_min(1)).max()),
                                                str(mx.dtype), tuple(lse.shape))
    return errs


def worker_schedules(rank: int, world: int, schedule: str) -> dict:
    import ds_burst

    topo = ds_burst.init_sequence_parallel(world, gpus_per_node=2, schedule=schedule)
    errs = {}
    for idx, (hkv, causal) in enumerate(((HQ, True), (2, True), (HQ, False))):
        q, k, v = _inputs(world, 40 + idx, hkv, per_rank=4)
        out, mx = _call(q, k, v, "causal" if causal else "full", None, "zigzag", group=topo, causal=causal)
        rows = row_max(q, k, causal, (-1, -1), None)
        total = ds_burst.reduce_max_logits([mx, mx * 2], group=topo)
        errs[f"{hkv}-{causal}"] = (float((mx - _mine(rows, "zigzag", topo)).abs().max()),
                                   float((total[0] - rows.amax(dim=(0, 1))).abs().max()),
                                   float((total[1] - 2 * rows.amax(dim=(0, 1))).abs().max()))
    return errs


def worker_compile(rank: int, world: int) -> dict:
    import ds_burst

    q, k, v = _inputs(world, 50, 2, per_rank=4)
    ql, kl, vl = (ds_burst.shard_sequence(x, 1).requires_grad_() for x in (q, k, v))
    f = torch.compile(lambda a, b, c: ds_burst.burst_attn_func(a, b, c, return_lse=True, return_max_logit=True),
                      backend="aot_eager", fullgraph=True)
    out, lse, mx = f(ql, kl, vl)
    out.sum().backward()
    eager = ds_burst.burst_attn_func(ql.detach(), kl.detach(), vl.detach(), return_max_logit=True)
    rows = row_max(q, k, True, (-1, -1), None)
    return {"compiled": float((mx - _mine(rows, "zigzag")).abs().max()),
            "eager_equal": bool(torch.equal(eager[1], mx) and torch.equal(eager[0], out.detach())),
            "grad": ql.grad is not None}


def worker_mismatch(rank: int, world: int) -> str:
    import ds_burst

    q = torch.randn(1, 4, HQ, D, dtype=torch.float64)
    try:
        ds_burst.burst_attn_func(q, q, q, return_max_logit=rank == 0)
    except ValueError as exc:
        return str(exc)
    return ""


@pytest.fixture(scope="module", params=[2, 4])
def case_results(request):
    return request.param, request.getfixturevalue("two_ranks" if request.param == 2 else "four_ranks")


def test_max_logit_every_case_on_every_rank(case_results):
    world, results = case_results
    assert len(results[0]["cases"]) == len(CASES)
    for rank, got in enumerate(results):
        for name, (local, total, dtype, grad) in got["cases"].items():
            assert local <= TOL64 and total <= TOL64, (world, rank, name, local, total)
            assert dtype == "torch.float64" and grad is False, (name, dtype, grad)


@pytest.fixture(scope="module")
def four_ranks():
    """The four-rank launch: the cases, then the double ring and Ulysses in nodes of 2."""
    return values(run_ranks(worker_cases, 4, timeout=600))


@pytest.fixture(scope="module")
def two_ranks():
    """The two-rank launch's extra results (kernels, compile, mismatch, drop-in)."""
    return values(run_ranks(worker_cases, 2, timeout=600))


def test_max_logit_cpu_kernels(two_ranks):
    tol = {"torch.float32": 1e-5, "torch.float16": 2e-3}
    for rank, got in enumerate(two_ranks):
        for name, (err, dtype, lse_shape) in got["kernels"].items():
            assert dtype == "torch.float32", (name, dtype)  # fp32 for 16-bit and fp32 inputs
            assert err <= tol["torch.float16" if "float16" in name else "torch.float32"], (rank, name, err)
            assert lse_shape[1] == HQ


@pytest.mark.parametrize("schedule", ["double_ring", "ulysses_ring"])
def test_max_logit_topology_schedules(four_ranks, schedule):
    for rank, res in enumerate(four_ranks):
        for name, got in res["schedules"][schedule].items():
            assert max(got) <= TOL64, (schedule, rank, name, got)


def test_max_logit_under_compile_in_the_ring(two_ranks):
    for got in two_ranks:
        got = got["compile"]
        assert got["compiled"] <= TOL64 and got["eager_equal"] and got["grad"], got


def test_ranks_disagreeing_on_max_logit_raise_on_every_rank(two_ranks):
    msgs = [got["mismatch"] for got in two_ranks]
    assert all("return_max_logit" in m for m in msgs), msgs


# ---------------------------------------------------------------------------------------------------------------
# One process


@pytest.mark.parametrize("mask", ["causal", "full", "window", "docs", "docs_pos"])
@pytest.mark.parametrize("kernel", ["torch", "sdpa", "auto"])
def test_one_rank_every_path(mask, kernel):
    import ds_burst

    q, k, v = _inputs(1, 60, 2, per_rank=21)
    causal, window, docs = _mask(mask, q.shape[1], 1)
    out, mx = _call(q, k, v, mask, docs, "zigzag", causal=causal, window_size=window, kernel=kernel)
    rows = row_max(q, k, causal, window, docs)
    assert (mx - rows.amax(dim=(0, 1))).abs().max() <= TOL64
    plain = ds_burst.burst_attn_func(q, k, v, causal=causal, window_size=window, kernel=kernel,
                                     cu_seqlens=None if docs is None else list(docs))
    assert rel(out, plain) <= 1e-12  # asking for the maximum changes nothing else


def test_return_order_and_gradients_unchanged():
    import ds_burst

    q, k, v = (x.requires_grad_() for x in _inputs(1, 61, 2, per_rank=16))
    do = torch.randn(q.shape[0], q.shape[1], HQ, D, dtype=torch.float64)
    out, lse, mx = ds_burst.burst_attn_func(q, k, v, return_lse=True, return_max_logit=True)
    assert lse.shape == (q.shape[0], HQ, q.shape[1]) and mx.shape == (HQ,)
    out.backward(do)
    ref = ref_grads(q, k, v, do, causal=True)
    for got, want in zip((out, q.grad, k.grad, v.grad), ref):
        assert rel(got, want) <= 1e-10
    only = ds_burst.burst_attn_func(q, k, v, return_max_logit=True)
    assert isinstance(only, tuple) and len(only) == 2 and torch.equal(only[1], mx)


def test_softcap_is_not_applied_to_the_maximum():
    import ds_burst

    q, k, v = _inputs(1, 62, HQ, per_rank=16)
    _, mx = ds_burst.burst_attn_func(q * 4, k * 4, v, softcap=1.0, return_max_logit=True)
    want = row_max(q * 4, k * 4, True, (-1, -1), None).amax(dim=(0, 1))
    assert (mx - want).abs().max() <= TOL64 and (mx > 1.0).all()  # capped scores would stay below 1


def test_selective_checkpointing_keeps_the_maximum():
    import ds_burst
    from ds_burst.attention.selective import AttentionKeep, region

    q, k, v = (x.requires_grad_() for x in _inputs(1, 63, 2, per_rank=16))
    want = row_max(q, k, True, (-1, -1), None).amax(dim=(0, 1))
    for tokens in ("all", "half"):
        seen = []

        def body(a, b, c, seen=seen):
            out, mx = ds_burst.burst_attn_func(a, b, c, return_max_logit=True)
            seen.append(mx.detach())
            return out

        fn = region(body, AttentionKeep(tokens))
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # the re-run runs the whole region
            out = torch.utils.checkpoint.checkpoint(fn, q, k, v, use_reentrant=False)
            out.sum().backward()
        assert len(seen) == 2, tokens  # the first run and the re-run
        for mx in seen:
            assert (mx - want).abs().max() <= TOL64, tokens


def test_reduce_max_logits_one_process_and_errors():
    import ds_burst

    a, b = torch.tensor([1.0, -math.inf]), torch.tensor([[3.0]])
    got = ds_burst.reduce_max_logits([a, b])
    assert torch.equal(got[0], a) and torch.equal(got[1], b) and got[0] is not a
    assert ds_burst.reduce_max_logits([]) == []
    with pytest.raises(ValueError, match="same dtype"):
        ds_burst.reduce_max_logits([a, b.double()])


def test_record_keeps_the_running_maximum():
    from ds_burst.attention.max_logit import MaxLogitRecord

    rec = MaxLogitRecord()
    rec.add(1, torch.tensor([1.0, 5.0]))
    rec.add(0, torch.tensor([2.0]))
    rec.add(1, torch.tensor([3.0, 4.0]))
    got = rec.pop()
    assert list(got) == [1, 0] and torch.equal(got[1], torch.tensor([3.0, 5.0]))  # first-call order
    assert rec.pop() == {}


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["auto", "triton", "sdpa"])
@pytest.mark.parametrize("mask", ["causal", "full", "window", "docs"])
def test_gpu_one_rank_against_float64(mask, kernel, dtype):
    """bf16/fp16 on CUDA, D=128, GQA 8:2: the whole block (the Hopper forward's one launch on sm_90), several tiles
    (documents: the ring of one, fwd_step with a carried state), sdpa (its fallback), with the backward."""
    import ds_burst

    g = torch.Generator(device="cuda").manual_seed(11)
    s = 1536
    q, k, v = (torch.randn(2, s, h, 128, device="cuda", generator=g, dtype=dtype) for h in (8, 2, 2))
    causal, window, docs = _mask(mask, s, 3)
    qg = q.clone().requires_grad_()
    out, mx = ds_burst.burst_attn_func(qg, k, v, causal=causal, window_size=window, kernel=kernel,
                                       cu_seqlens=None if docs is None else list(docs), return_max_logit=True)
    out.float().sum().backward()
    want = row_max(q, k, causal, window, docs).amax(dim=(0, 1))
    assert mx.dtype == torch.float32 and mx.shape == (8,)
    err = float(((mx.double() - want).abs() / want.abs().clamp_min(1)).max())
    assert err <= 1e-4, (mask, kernel, err)  # fp32 accumulation of exact 16-bit products


# ---------------------------------------------------------------------------------------------------------------
# The integrations: Hugging Face backend (record_max_logit) and the DeepSpeed drop-in


def _probe(seen: list):
    """An attention function for transformers that records the float64 maximum logit of each call from the mask
    transformers builds (sdpa's), then runs sdpa: the reference for the recorded values."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def probe(module, query, key, value, attention_mask, scaling=None, **kw):
        kk = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        s = (query.double() @ kk.double().transpose(-1, -2)) * scaling
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            s = s.masked_fill(~attention_mask, -math.inf)
        elif attention_mask is not None:
            s = s + attention_mask.double()
        else:  # no mask object: causal
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
        seen.append(s.amax(dim=(0, 2, 3)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    return probe


def worker_hf(rank: int, world: int) -> dict:
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, LlamaConfig
    from transformers.masking_utils import sdpa_mask

    import ds_burst
    import ds_burst.integrations.hf as bhf

    seen: list = []
    AttentionInterface.register("maxprobe", _probe(seen))
    AttentionMaskInterface.register("maxprobe", sdpa_mask)
    topo = bhf.setup(world, record_max_logit=True)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0)
    errs = {}
    for packed in (False, True):
        torch.manual_seed(0)
        ref = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation="maxprobe").double()
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation="burst").double()
        model.load_state_dict(ref.state_dict())
        s = 24
        ids = torch.randint(0, 64, (1, s), generator=torch.Generator().manual_seed(3))
        pos = _positions((0, 9, s), 1) if packed else torch.arange(s)[None]
        seen.clear()
        ref(input_ids=ids, position_ids=pos, use_cache=False)  # use_cache=False: the packed mask is applied
        local = bhf.shard_batch({"input_ids": ids, "labels": ids, "position_ids": pos}, topo)
        for _ in range(2):  # two micro-batches: the running maximum is the same
            model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False)
        got = ds_burst.pop_max_logits()
        keys = list(got)
        errs[f"packed={packed}"] = (len(got), len(seen), max(float((g - r).abs().max()) for g, r in
                                                              zip(got.values(), seen)),
                                    all(hasattr(k, "q_proj") for k in keys), ds_burst.pop_max_logits() == {})
    return errs


def worker_drop_in(rank: int, world: int) -> dict:
    import ds_burst

    q, k, v = _inputs(world, 70, 2, per_rank=5)
    attn = ds_burst.DistributedAttention(None, None, record_max_logit=True, causal=True)
    ql, kl, vl = (ds_burst.shard_sequence(x, 1, layout="contiguous") for x in (q, k, v))
    attn(ql, kl, vl, 0)
    got = ds_burst.pop_max_logits()
    want = row_max(q, k, True, (-1, -1), None).amax(dim=(0, 1))
    return {"keys": [type(m).__name__ for m in got], "err": float((got[attn] - want).abs().max())}


def test_hf_backend_records_every_layer():
    for errs in values(run_ranks(worker_hf, 2, timeout=600)):
        for name, (n_got, n_seen, err, modules, emptied) in errs.items():
            assert n_got == n_seen == 3 and modules and emptied, (name, n_got, n_seen)
            assert err <= 1e-10, (name, err)


def test_deepspeed_drop_in_records(two_ranks):
    for got in two_ranks:
        got = got["drop_in"]
        assert got["keys"] == ["DistributedAttention"] and got["err"] <= TOL64, got


def test_hf_record_under_compile():
    """A compiled model records what the eager one does (one process)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import ds_burst
    import ds_burst.hf as bhf

    bhf.setup(1, record_max_logit=True)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128), attn_implementation="burst")
        ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(5))
        model(input_ids=ids)
        eager = ds_burst.pop_max_logits()
        torch.compile(model)(input_ids=ids)
        compiled = ds_burst.pop_max_logits()
        assert list(eager) == list(compiled) and len(eager) == 2
        for a, b in zip(eager.values(), compiled.values()):
            assert (a - b).abs().max() <= 1e-5 * max(1.0, float(a.abs().max()))
    finally:
        bhf.register()  # the other tests' default: no recording
