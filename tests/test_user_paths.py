"""What users pass, applied exactly or refused on every rank, quickly: packed documents given as ``position_ids``
that restart at 0 (against a per-document float64 reference at 1-3 ranks), ``group=None`` with data parallelism
(dp x sp), ranks whose inputs drift apart after a cached call (every rank fails within seconds, naming the
values, and the process group stays usable), and packed documents under ``torch.compile`` (default and
``fullgraph=True``, no graph break, equal to eager)."""

from __future__ import annotations

import time

import pytest
import torch
from test_documents import cu_of, inputs, reference

from dist_utils import run_ranks, values
from kernel_utils import rel

MASKS = {"causal": (True, (-1, -1)), "full": (False, (-1, -1)), "causal_window": (True, (4, 0))}


def _positions(cu: list[int], batch: int) -> torch.Tensor:
    pos = torch.cat([torch.arange(b - a) for a, b in zip(cu, cu[1:])])
    return pos.unsqueeze(0).expand(batch, -1).contiguous()


def _run_positions(q, k, v, do, cu, causal, window, layout, world):
    import ds_burst

    ql, kl, vl = (ds_burst.shard_sequence(x, 1, layout=layout).requires_grad_() for x in (q, k, v))
    pos = ds_burst.shard_sequence(_positions(cu, q.shape[0]), 1, layout=layout)
    out = ds_burst.burst_attn_func(ql, kl, vl, causal=causal, window_size=window, layout=layout, kernel="torch",
                                   position_ids=pos)
    again = ds_burst.burst_attn_func(ql, kl, vl, causal=causal, window_size=window, layout=layout, kernel="torch",
                                     position_ids=pos)  # the same tensor: the documents come from the cache
    out.backward(ds_burst.shard_sequence(do, 1, layout=layout))
    with torch.no_grad():
        got = [ds_burst.gather_sequence(t, 1, layout=layout) for t in (out, ql.grad, kl.grad, vl.grad)]
    return got, bool(torch.equal(out, again))


def worker_positions(rank: int, world: int) -> dict:
    s = 8 * world
    patterns = {"span": [3, s - 5, 2], "ones": [1, 1, s - 4, 1, 1], "one": [s]}
    errs, same = {}, True
    for idx, (mask, layout, pattern) in enumerate(
            (m, lay, p) for m in MASKS for lay in ("zigzag", "contiguous") for p in patterns):
        causal, window = MASKS[mask]
        cu = cu_of(patterns[pattern])
        q, k, v, do = inputs(world, idx, 4 if idx % 2 else 1)
        got, cached_same = _run_positions(q, k, v, do, cu, causal, window, layout, world)
        ref = reference(q, k, v, do, cu, causal, window)
        errs[(mask, layout, pattern)] = max(rel(a, b) for a, b in zip(got, ref))
        same &= cached_same
    return {"errs": errs, "cached same": same}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_position_only_packing_matches_per_document_reference(world: int):
    for res in values(run_ranks(worker_positions, world, timeout=300)):
        bad = {k: e for k, e in res["errs"].items() if e > 1e-10}
        assert not bad, bad
        assert res["cached same"]
        assert len(res["errs"]) == 18


def worker_positions_refused(rank: int, world: int) -> dict:
    import ds_burst

    q = torch.randn(2, 8, 2, 8, dtype=torch.float64)
    cases = {
        "jump": torch.tensor([[0, 1, 2, 3, 7, 8, 9, 10]] * 2) + 8 * rank,
        "rows differ": torch.stack([torch.arange(8), torch.tensor([0, 1, 2, 0, 1, 2, 3, 4])]) if rank == 0
        else torch.arange(8, 16).expand(2, 8),
        "both given": torch.arange(8).expand(2, 8),
        "float": torch.arange(8.0).expand(2, 8),
    }
    got = {}
    for name, pos in cases.items():
        extra = {"cu_seqlens": [0, 8 * world]} if name == "both given" else {}
        try:
            ds_burst.burst_attn_func(q, q, q, position_ids=pos, **extra)
            got[name] = "no error"
        except ValueError as exc:
            got[name] = str(exc)
    return got


def test_position_ids_refusals_on_every_rank():
    res = values(run_ranks(worker_positions_refused, 2, timeout=120))
    for name in res[0]:
        msgs = [r[name] for r in res]
        assert all(m != "no error" for m in msgs), (name, msgs)
        if name in ("jump", "rows differ"):  # read from the gathered positions: the same error everywhere
            assert msgs[0] == msgs[1] and "packed batch refused" in msgs[0], msgs


# ---------------------------------------------------------------------------------------------
# Hugging Face "burst" backend given packed position_ids only (what DataCollatorWithFlattening passes)


def _tiny_llama(attn: str):
    """A tiny float64 Llama; RMSNorm without its fp32 cast and, for the reference, eager attention with the softmax
    in float64 (tests/test_model_families.py: otherwise both sides round to fp32 and hide errors below 1e-7)."""
    from test_model_families import REF, _norms_in_dtype, _register_ref64
    from transformers import LlamaConfig, LlamaForCausalLM

    _register_ref64()
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=REF if attn == "ref" else attn).double()
    _norms_in_dtype(model)
    return cfg, model


def _per_document_logits(model, ids: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """Logits of each document run alone (eager attention over one document: nothing to cross)."""
    return torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits for a, b in zip(cu, cu[1:])], 1)


def worker_hf_positions(rank: int, world: int, layout: str) -> dict:
    import ds_burst
    import ds_burst.hf as bhf

    topo = bhf.setup(world, layout=layout) if world > 1 else None
    if world == 1:
        bhf.register(layout=layout)
    cfg, ref_model = _tiny_llama("ref")
    s = 12 * world
    cu = cu_of([5, s - 9, 4])
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, cfg.vocab_size, (1, s), generator=g)
    ref = _per_document_logits(ref_model, ids, cu)
    ref.square().sum().backward()
    _, model = _tiny_llama("burst")
    pos = _positions(cu, 1)
    batch = bhf.shard_batch({"input_ids": ids, "labels": ids, "position_ids": pos}, topo, layout=layout)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # no cu_seq_lens
    logits.square().sum().backward()
    full = ds_burst.gather_sequence(logits.detach(), 1, group=topo, layout=layout) if world > 1 else logits.detach()
    grad_err = 0.0
    for p, r in zip(model.parameters(), ref_model.parameters()):
        gsum = p.grad.clone()
        if world > 1:
            torch.distributed.all_reduce(gsum)
        grad_err = max(grad_err, rel(gsum, r.grad))
    return {"logits": rel(full, ref.detach()), "grads": grad_err}


@pytest.mark.parametrize("world,layout", [(1, "zigzag"), (2, "zigzag"), (2, "contiguous")])
def test_hf_backend_packed_position_ids_match_per_document(world: int, layout: str):
    for res in values(run_ranks(worker_hf_positions, world, layout, timeout=300)):
        assert res["logits"] < 1e-10 and res["grads"] < 1e-10, res


# ---------------------------------------------------------------------------------------------
# group=None with data parallelism: the topology's sequence-parallel group, never the world


def worker_dp_sp(rank: int, world: int) -> dict:
    import ds_burst

    topo = ds_burst.init_sequence_parallel(2)
    g = torch.Generator().manual_seed(100 + topo.dp_rank)  # each replica its own sequence
    q, k, v, do = (torch.randn(1, 16, 2, 8, generator=g, dtype=torch.float64) for _ in range(4))
    ql, kl, vl = (ds_burst.shard_sequence(x, 1).requires_grad_() for x in (q, k, v))  # group=None
    out = ds_burst.burst_attn_func(ql, kl, vl, causal=True)
    out.backward(ds_burst.shard_sequence(do, 1))
    got = [ds_burst.gather_sequence(t.detach(), 1) for t in (out, ql.grad, kl.grad, vl.grad)]
    ref = reference(q, k, v, do, [0, 16], True, (-1, -1))
    return {"err": max(rel(a, b) for a, b in zip(got, ref)), "sp": topo.get_sequence_parallel_world_size()}


def test_group_none_is_the_topology_sequence_parallel_group():
    for res in values(run_ranks(worker_dp_sp, 4, timeout=180)):
        assert res["sp"] == 2 and res["err"] < 1e-12, res


# ---------------------------------------------------------------------------------------------
# Drift: one rank's input changes while the others reuse their cached plan


def worker_drift(rank: int, world: int, twin: bool = False) -> dict:
    import torch.distributed as dist

    import ds_burst
    from ds_burst.dist import comm

    ds_burst.set_comm_timeout(300.0)  # a drift must not need the timeout to be found
    q = torch.randn(1, 8, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    s = 8 * world
    good = [0, 5, s]
    if twin:  # the group's backend reads as NCCL once: the header channel is then a gloo twin of the group
        real = dist.get_backend
        comm.dist.get_backend = lambda group=None: "nccl"  # type: ignore[assignment]
        try:
            chan = comm.header_channel(comm.resolve_group(None))
        finally:
            comm.dist.get_backend = real  # type: ignore[assignment]
        assert chan is not None and chan.group is not dist.group.WORLD and chan.world == world
    ds_burst.burst_attn_func(q, q, q, cu_seqlens=good)  # every rank caches this plan
    drifted = [0, 3, 9, s] if rank == world - 1 else good  # a loader bug: the last rank alone gets new boundaries
    t0 = time.monotonic()
    try:
        ds_burst.burst_attn_func(q, q, q, cu_seqlens=drifted)
        msg = "no error"
    except ValueError as exc:
        msg = str(exc)
    elapsed = time.monotonic() - t0
    out = ds_burst.burst_attn_func(q, q, q, cu_seqlens=good)  # the group is still usable
    shape = q[:, :6] if rank == 0 else q[:, :8]  # and again with a shape change on one rank
    try:
        ds_burst.burst_attn_func(shape, shape, shape, layout="contiguous")
        shape_msg = "no error"
    except ValueError as exc:
        shape_msg = str(exc)
    return {"msg": msg, "elapsed": elapsed, "usable": bool(torch.isfinite(out).all()), "shape": shape_msg}


@pytest.mark.parametrize("twin", [False, True], ids=["gloo", "gloo-twin-of-nccl"])
def test_drift_fails_on_every_rank_quickly_and_the_group_stays_usable(twin: bool):
    res = values(run_ranks(worker_drift, 3, twin, timeout=120))
    for r in res:
        assert r["elapsed"] < 10, r
        assert "documents differs" in r["msg"] and "rank 2: 3" in r["msg"] and "rank 0: 2" in r["msg"], r
        assert r["msg"] == res[0]["msg"]
        assert r["usable"], r
        assert "S_local differs" in r["shape"] and "rank 0: 6" in r["shape"] and "rank 1: 8" in r["shape"], r


# ---------------------------------------------------------------------------------------------
# Packed documents under torch.compile


class DocAttention(torch.nn.Module):
    """Projections around burst_attn_func with packed documents passed through."""

    def __init__(self, dim: int = 16, hq: int = 4, hkv: int = 2) -> None:
        super().__init__()
        self.hq, self.hkv, self.d = hq, hkv, dim // hq
        self.qkv = torch.nn.Linear(dim, (hq + 2 * hkv) * self.d, dtype=torch.float64)
        self.out = torch.nn.Linear(hq * self.d, dim, dtype=torch.float64)

    def forward(self, x: torch.Tensor, cu_seqlens: object = None, position_ids: object = None) -> torch.Tensor:
        import ds_burst

        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        q = q.view(b, s, self.hq, self.d)
        k, v = k.view(b, s, self.hkv, self.d), v.view(b, s, self.hkv, self.d)
        o = ds_burst.burst_attn_func(q, k, v, causal=True, layout="zigzag", cu_seqlens=cu_seqlens,
                                     position_ids=position_ids)
        return self.out(o.reshape(b, s, -1)).square().mean()


def _compile_documents(x: torch.Tensor, docs: dict[str, dict]) -> dict[str, float]:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = DocAttention()
    out = {}
    for how, kwargs in docs.items():
        results = {}
        for name in ("eager", "default", "fullgraph"):
            model.zero_grad()
            torch._dynamo.reset()
            counters.clear()
            fn = model if name == "eager" else torch.compile(model, fullgraph=name == "fullgraph")
            loss = fn(x, **kwargs)
            loss.backward()
            breaks = sum(counters["graph_break"].values())
            results[name] = (loss.detach().clone(), [p.grad.clone() for p in model.parameters()], breaks)
        ref_loss, ref_grads, _ = results["eager"]
        for name in ("default", "fullgraph"):
            loss, grads, breaks = results[name]
            out[f"{how}/{name}"] = max([rel(loss, ref_loss)] + [rel(g, r) for g, r in zip(grads, ref_grads)])
            out[f"{how}/{name}/breaks"] = float(breaks)
    return out


def _doc_inputs(rank: int, world: int) -> tuple[torch.Tensor, dict[str, dict]]:
    import ds_burst

    s = 16 * world
    cu = cu_of([5, s - 9, 4])
    x = torch.randn(1, s, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_loc = ds_burst.shard_sequence(x, dim=1, layout="zigzag") if world > 1 else x
    pos = ds_burst.shard_sequence(_positions(cu, 1), 1, layout="zigzag") if world > 1 else _positions(cu, 1)
    return x_loc, {"list": {"cu_seqlens": cu}, "tensor": {"cu_seqlens": torch.tensor(cu)},
                   "positions": {"position_ids": pos}}


def worker_compile_documents(rank: int, world: int) -> dict:
    return _compile_documents(*_doc_inputs(rank, world))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", [1, 2])
def test_compile_with_documents_matches_eager_without_graph_breaks(world: int):
    for res in values(run_ranks(worker_compile_documents, world, timeout=840)):
        for name, value in res.items():
            if name.endswith("/breaks"):
                assert value == 0, (name, res)
            else:
                assert value < 1e-12, (name, res)


def test_compile_refusal_is_ds_bursts_own_message():
    model = DocAttention()
    x = torch.randn(1, 16, 16, dtype=torch.float64)
    for fullgraph in (False, True):
        torch._dynamo.reset()
        with pytest.raises(ValueError, match="cu_seqlens must end at the full sequence length"):
            torch.compile(model, fullgraph=fullgraph)(x, cu_seqlens=[0, 5, 17])
