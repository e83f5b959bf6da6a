"""The light hot path: a call plan built once per key, no collective in steady state (only the ring's P2P), a rank
that changes its input alone fails on every rank with a message naming the difference, and the op under
``torch.compile`` (default and ``fullgraph=True``) gives eager's outputs and gradients, on 1 process and 2 ranks."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks, values

COLLECTIVES = ("all_gather", "all_gather_object", "all_reduce", "broadcast", "barrier", "all_to_all_single",
               "reduce_scatter", "all_gather_into_tensor", "reduce_scatter_tensor", "gather", "scatter")


def _count_calls():
    """Wrap torch.distributed's collectives and batch_isend_irecv; returns the counter dict."""
    import torch.distributed as dist

    counts = {"collective": 0, "p2p": 0}

    def wrap(name, kind):
        fn = getattr(dist, name)

        def counted(*a, **kw):
            counts[kind] += 1
            return fn(*a, **kw)

        setattr(dist, name, counted)

    for name in COLLECTIVES:
        if hasattr(dist, name):
            wrap(name, "collective")
    wrap("batch_isend_irecv", "p2p")
    return counts


def _inputs(rank: int, world: int, s_local: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(1, s_local * world, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2)]
    import ds_burst

    return [ds_burst.shard_sequence(x, dim=1, layout="zigzag").requires_grad_() for x in full]


def worker_counts(rank: int, world: int):
    import ds_burst
    from ds_burst.attention import validate
    from ds_burst.attention.call_plan import PLANS

    counts = _count_calls()  # installed before ds_burst's first call: the wrappers are what it calls
    headers = [0]
    exchange = validate.exchange_header

    def counted_header(*a, **kw):
        headers[0] += 1
        return exchange(*a, **kw)

    validate.exchange_header = counted_header
    q, k, v = _inputs(rank, world)
    out = {}
    for mode, finite in ((True, False), ("always", False), (True, True)):
        ds_burst.burst_attn_func(q, k, v, check_inputs=mode, check_finite=finite).sum().backward()  # warm-up
        misses = PLANS.misses
        counts.update(collective=0, p2p=0)
        headers[0] = 0
        for _ in range(3):
            o = ds_burst.burst_attn_func(q, k, v, check_inputs=mode, check_finite=finite)
            o.sum().backward()
        out[f"{mode}-{finite}"] = dict(counts, misses=PLANS.misses - misses, headers=headers[0])
    return out


def test_no_collectives_after_warmup_only_ring_p2p():
    for res in values(run_ranks(worker_counts, 2, timeout=120)):
        steady = res["True-False"]
        assert steady["collective"] == 0, res
        assert steady["headers"] == 3, res  # one header round per call, the same on every rank
        assert steady["p2p"] > steady["headers"], res  # the ring ran besides the headers
        assert steady["misses"] == 0, res
        # the debugging mode checks and plans on every call (still no collective)
        assert res["always-False"]["collective"] == 0 and res["always-False"]["headers"] == 3, res
        # the backward's NaN check is a collective per call: the counter sees it (so the first check can fail)
        assert res["True-True"]["collective"] >= 3, res


def worker_shape_change(rank: int, world: int):
    import ds_burst

    ds_burst.set_comm_timeout(4.0)
    q, k, v = _inputs(rank, world)
    ds_burst.burst_attn_func(q, k, v)  # warm-up: both ranks validated S_local=16
    s_local = 32 if rank == 0 else 16  # rank 0 changes its shape, rank 1 does not
    q, k, v = _inputs(rank, world, s_local, seed=1)
    try:
        ds_burst.burst_attn_func(q, k, v)
    except ValueError as exc:
        return ("ValueError", str(exc))
    except Exception as exc:  # noqa: BLE001
        return (type(exc).__name__, str(exc))
    return ("returned", "")


def test_shape_change_after_warmup_raises_on_every_rank():
    res = values(run_ranks(worker_shape_change, 2, timeout=120))
    for rank, (kind, msg) in enumerate(res):
        assert kind == "ValueError", (rank, kind, msg)
        assert "S_local" in msg and "32" in msg and "16" in msg, (rank, msg)


# ---------------------------------------------------------------------------------------------
# torch.compile


class TinyAttention(torch.nn.Module):
    """Projections around burst_attn_func: the smallest model that exercises the op's autograd in a graph."""

    def __init__(self, dim: int = 16, hq: int = 4, hkv: int = 2, group: object = None) -> None:
        super().__init__()
        self.hq, self.hkv, self.d, self.group = hq, hkv, dim // hq, group
        self.qkv = torch.nn.Linear(dim, (hq + 2 * hkv) * self.d, dtype=torch.float64)
        self.out = torch.nn.Linear(hq * self.d, dim, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import ds_burst

        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        q = q.view(b, s, self.hq, self.d)
        k, v = k.view(b, s, self.hkv, self.d), v.view(b, s, self.hkv, self.d)
        o = ds_burst.burst_attn_func(q, k, v, causal=True, group=self.group, layout="zigzag")
        return self.out(o.reshape(b, s, -1)).square().mean()


def _compiled_vs_eager(group: object, x: torch.Tensor) -> dict[str, float]:
    torch.manual_seed(0)
    model = TinyAttention(group=group)
    results = {}
    for name, fn in (("eager", model), ("default", torch.compile(model)),
                     ("fullgraph", torch.compile(model, fullgraph=True))):
        model.zero_grad()
        torch._dynamo.reset()
        loss = fn(x)
        loss.backward()
        results[name] = (loss.detach().clone(), [p.grad.clone() for p in model.parameters()])
    ref_loss, ref_grads = results["eager"]
    diffs = {}
    for name in ("default", "fullgraph"):
        loss, grads = results[name]
        diffs[name] = max([float((loss - ref_loss).abs() / ref_loss.abs())]
                          + [float((g - r).norm() / r.norm()) for g, r in zip(grads, ref_grads)])
    return diffs


def test_compile_matches_eager_one_process():
    x = torch.randn(1, 24, 16, dtype=torch.float64)
    for name, rel in _compiled_vs_eager(None, x).items():
        assert rel < 1e-12, (name, rel)


def worker_compile(rank: int, world: int):
    import torch.distributed as dist

    import ds_burst

    x = torch.randn(1, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_loc = ds_burst.shard_sequence(x, dim=1, layout="zigzag")
    diffs = _compiled_vs_eager(dist.group.WORLD, x_loc)
    ring_bytes = sum(ds_burst.comm_stats().values())
    return diffs, ring_bytes


@pytest.mark.timeout(600)
def test_compile_matches_eager_two_ranks():
    for diffs, ring_bytes in values(run_ranks(worker_compile, 2, timeout=540)):
        assert ring_bytes > 0
        for name, rel in diffs.items():
            assert rel < 1e-12, (name, rel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_one_rank_direct_path_matches_the_ring_path_gpu(causal: bool):
    """P=1, bf16, GQA: the one-call fused path (the plan's ``direct``) against float64, next to the general ring
    path (the same kernel through ds-burst's autograd function); both within 2x of each other's error."""
    import ds_burst
    from ds_burst.attention.call_plan import clear_plans
    from ds_burst.kernels import sdpa_attn
    from ds_burst.kernels.reference import naive_attention

    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v, do = (torch.randn(1, 1024, h, 128, device="cuda", generator=g) for h in (16, 4, 4, 16))
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = naive_attention(*ref_in, causal=causal)
    ref_out.backward(do.double())
    errs = {}
    for name in ("direct", "ring"):
        clear_plans()
        binds = sdpa_attn.STATS[("bind", "cudnn")] + sdpa_attn.STATS[("bind", "flash")]
        xs = [x.bfloat16().requires_grad_() for x in (q, k, v)]
        if name == "ring":  # deterministic=True keeps the fused ops but not the direct path
            out = ds_burst.burst_attn_func(*xs, causal=causal, kernel="sdpa", deterministic=True)
        else:
            out = ds_burst.burst_attn_func(*xs, causal=causal, kernel="sdpa")
        out.backward(do.bfloat16())
        bound = sdpa_attn.STATS[("bind", "cudnn")] + sdpa_attn.STATS[("bind", "flash")] - binds
        assert bound == (1 if name == "direct" else 0), (name, bound)
        errs[name] = [float((a.double() - b).norm() / b.norm()) for a, b in
                      zip([out, *(x.grad for x in xs)], [ref_out, *(x.grad for x in ref_in)])]
    for d, r in zip(errs["direct"], errs["ring"]):
        assert d < 2 * r + 1e-3 and d < 2e-2, errs


def test_one_rank_direct_path_per_document(monkeypatch: pytest.MonkeyPatch):
    """The one-rank direct path over packed documents (one fused call per document, outputs concatenated) equals
    the block-diagonal float64 reference; the fused op is replaced by differentiable naive attention on the CPU so
    the tiling and concatenation are what is tested (the fused op itself: the GPU tests)."""
    import ds_burst
    from ds_burst.attention.call_plan import clear_plans
    from ds_burst.kernels import sdpa_attn
    from ds_burst.kernels.reference import naive_attention

    calls = []

    def fake_bind(q, k, v, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0):
        calls.append((q.shape[1], causal, q_offset))

        def run(qq, kk, vv):
            return naive_attention(qq, kk, vv, causal=causal, window=window, scale=scale, q_offset=q_offset,
                                   k_offset=k_offset)
        return run

    monkeypatch.setattr(sdpa_attn, "bind_whole", fake_bind)
    clear_plans()
    cu = [0, 5, 6, 20, 32]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 32, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    out = ds_burst.burst_attn_func(q, k, v, causal=True, kernel="sdpa", cu_seqlens=cu)
    assert [c[0] for c in calls] == [5, 1, 14, 12]  # one fused call per document
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    refs, ref_out = [], []
    for a, b in zip(cu, cu[1:]):  # document by document
        o, _ = naive_attention(q[:, a:b], k[:, a:b], v[:, a:b], causal=True)
        ref_out.append(o)
    ref = torch.cat(ref_out, 1)
    refs = torch.autograd.grad(ref, (q, k, v), do)
    assert float((out - ref).norm() / ref.norm()) < 1e-12
    for gg, rr in zip(grads, refs):
        assert float((gg - rr).norm() / rr.norm()) < 1e-12
    clear_plans()
