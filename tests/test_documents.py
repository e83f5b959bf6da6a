"""Packed documents (``cu_seqlens``): outputs and every gradient against a float64 block-diagonal reference on
gloo ranks, bad boundaries raising on every rank, ring bytes that follow the documents, the step plan and the
balance of the compute layout.

Each group size is spawned once; every case runs inside that launch.
"""

from __future__ import annotations

import functools
import itertools
import os
import random

import pytest
import torch

from dist_utils import run_ranks, values
from kernel_utils import rel

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton tiles on CPU (fp32 only: see test_triton_kernels)

HQ, D, PER_RANK, BATCH = 4, 8, 8, 2
WORLDS = [1, 2, 3, 4]
MASKS = {"causal": (True, (-1, -1)), "full": (False, (-1, -1)), "causal_window": (True, (5, 0)),
         "window": (False, (3, 6))}


def doc_patterns(world: int) -> dict[str, list[int]]:
    """Document lengths per pattern, summing to ``world * PER_RANK``."""
    s = world * PER_RANK
    rng = random.Random(world)
    cuts = sorted(rng.sample(range(1, s), min(s - 1, max(1, s // 5))))
    out = {
        "ones": [1, 1, 1, s - 5, 1, 1] if s > 5 else [1] * s,  # one-token documents around a long one
        "span": [3, s - 5, 2] if s > 5 else [s],  # one document across several ranks
        "short": [PER_RANK // 2 - 1, 1, PER_RANK // 2] * world,  # shorter than a shard, never spanning ranks
        "random": [b - a for a, b in zip([0, *cuts], [*cuts, s])],
    }
    assert all(sum(v) == s for v in out.values())
    return out


def cu_of(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


def cases(world: int) -> list[tuple]:
    got = []
    for i, (mask, layout, pattern) in enumerate(itertools.product(MASKS, ["zigzag", "contiguous"],
                                                                  doc_patterns(world))):
        hkv = HQ if i % 2 == 0 else 1
        backward = "burst" if (i // 2) % 2 == 0 else "ring"
        got.append((mask, layout, pattern, hkv, backward, "torch"))
    for mask, layout in itertools.product(MASKS, ["zigzag", "contiguous"]):  # the fused-SDPA kernel's tiles
        got.append((mask, layout, "random", 1, "ring", "sdpa"))
    return got


def reference(q, k, v, do, cu, causal, window):
    """float64 attention document by document (the block-diagonal mask), with gradients."""
    from ds_burst.kernels.reference import naive_attention

    qf, kf, vf = (x.double().requires_grad_() for x in (q, k, v))
    outs = [naive_attention(qf[:, a:b], kf[:, a:b], vf[:, a:b], causal=causal, window=window)[0]
            for a, b in zip(cu, cu[1:])]
    out = torch.cat(outs, 1)
    out.backward(do.double())
    return [out.detach(), qf.grad, kf.grad, vf.grad]


def run_case(q, k, v, do, cu, causal, window, layout, backward, kernel="torch"):
    import ds_burst

    ql, kl, vl = (ds_burst.shard_sequence(x, 1, layout=layout).requires_grad_() for x in (q, k, v))
    out = ds_burst.burst_attn_func(ql, kl, vl, causal=causal, window_size=window, layout=layout,
                                   backward=backward, kernel=kernel, cu_seqlens=torch.tensor(cu))
    out.backward(ds_burst.shard_sequence(do, 1, layout=layout))
    with torch.no_grad():
        return [ds_burst.gather_sequence(t, 1, layout=layout) for t in (out, ql.grad, kl.grad, vl.grad)]


def inputs(world, idx, hkv, dtype=torch.float64):
    g = torch.Generator().manual_seed(500 + 31 * idx + world)
    s = PER_RANK * world
    mk = lambda h: torch.randn(BATCH, s, h, D, generator=g, dtype=torch.float64).to(dtype)
    return mk(HQ), mk(hkv), mk(hkv), mk(HQ)


def worker_float64(rank, world):
    pats = doc_patterns(world)
    errs = {}
    for idx, (mask, layout, pattern, hkv, backward, kernel) in enumerate(cases(world)):
        causal, window = MASKS[mask]
        cu = cu_of(pats[pattern])
        q, k, v, do = inputs(world, idx, hkv)
        got = run_case(q, k, v, do, cu, causal, window, layout, backward, kernel)
        ref = reference(q, k, v, do, cu, causal, window)
        errs[(mask, layout, pattern, hkv, backward, kernel)] = max(rel(a, b) for a, b in zip(got, ref))
    return errs


@functools.cache
def float64_results(world):
    return values(run_ranks(worker_float64, world, timeout=600))


@pytest.mark.parametrize("world", WORLDS)
def test_documents_float64(world):
    per_rank = float64_results(world)
    for errs in per_rank:
        worst = max(errs.values())
        bad = {k: e for k, e in errs.items() if e > 1e-10}
        assert not bad, f"P={world}: cases over 1e-10: {bad}"
        print(f"P={world}: {len(errs)} cases, worst relative error {worst:.2e}")


def worker_bad(rank, world):
    """Each bad call must raise the same exception class on every rank (and not hang)."""
    import ds_burst

    s = PER_RANK * world
    q = torch.randn(1, PER_RANK, HQ, D, dtype=torch.float64)
    bad = {
        "start": [1, 5, s],
        "end": [0, 5, s - 1],
        "order": [0, 6, 5, s],
        "per-row boundaries": [[0, 5, s]],
        "float": torch.tensor([0.0, 5.0, float(s)]),
        "2d": torch.tensor([[0, 5, s]]),
        "one boundary": [0],
        "ranks disagree": [0, 4 + rank, s],
        "one rank bad": [0, 5, s] if rank else [0, 5, s + 1],
        "not ints": [0, 5.0, s],
    }
    got = {}
    for name, cu in bad.items():
        try:
            ds_burst.burst_attn_func(q, q, q, causal=True, cu_seqlens=cu)
            got[name] = "no error"
        except (ValueError, TypeError) as exc:
            got[name] = f"{type(exc).__name__}: {exc}"
    out = ds_burst.burst_attn_func(q, q, q, causal=True, cu_seqlens=[0, 5, s])  # still works afterwards
    got["afterwards"] = bool(torch.isfinite(out).all())
    # an empty document (a repeated boundary, which flash-attn's varlen convention allows) holds no token
    empty = ds_burst.burst_attn_func(q, q, q, causal=True, cu_seqlens=[0, 5, 5, s, s])
    got["afterwards"] &= bool(torch.equal(empty, out))
    got["distributed attention"] = distributed_attention_error(rank, world)
    return got


def distributed_attention_error(rank, world):
    """ds-burst's DistributedAttention drop-in with ``cu_seqlens`` (contiguous shards, both batch dims)."""
    from ds_burst.integrations.deepspeed import DistributedAttention

    cu = cu_of([3, 1, PER_RANK * world - 9, 5])
    q, k, v, do = inputs(world, 7, 2)
    ref = reference(q, k, v, do, cu, True, (-1, -1))
    worst = 0.0
    for bdim in (0, 1):
        layer = DistributedAttention(torch.nn.Identity(), None, causal=True)
        loc = [x.detach().chunk(world, 1)[rank].clone().requires_grad_() for x in (q, k, v)]
        args = [x.transpose(0, 1) if bdim else x for x in loc]
        out = layer(*args, bdim, cu_seqlens=cu)
        out = out.transpose(0, 1) if bdim else out
        out.backward(do.chunk(world, 1)[rank])
        for got, want in zip([out, *(x.grad for x in loc)], ref):
            worst = max(worst, rel(got.detach(), want.chunk(world, 1)[rank]))
    return worst


def test_bad_boundaries_raise_on_every_rank():
    per_rank = values(run_ranks(worker_bad, 2, timeout=300))
    for name in per_rank[0]:
        if name == "afterwards":
            assert all(r[name] is True for r in per_rank)
            continue
        if name == "distributed attention":
            print(f"DistributedAttention(cu_seqlens=...): worst relative error {max(r[name] for r in per_rank):.2e}")
            assert all(r[name] < 1e-10 for r in per_rank)
            continue
        kinds = {r[name].split(":")[0] for r in per_rank}
        assert len(kinds) == 1 and "no error" not in kinds, (name, [r[name] for r in per_rank])
        print(f"{name}: {per_rank[0][name]}")
    assert per_rank[0]["float"].startswith("TypeError")
    assert "differs across the ranks" in per_rank[0]["ranks disagree"]


def worker_bytes(rank, world):
    """Ring bytes per phase for documents inside the ranks, one document spanning ranks, and one document."""
    import ds_burst

    s = PER_RANK * world
    q, k, v, do = inputs(world, 0, HQ, torch.float32)
    half = PER_RANK // 2
    docs = {
        "inside ranks": cu_of([3, PER_RANK - 3] * world),
        "pairs of ranks": cu_of([half, PER_RANK, half] * (world // 2)),  # documents across ranks 0|1 and 2|3
        "one document": [0, s],
    }
    got = {}
    for (name, cu), causal, layout in itertools.product(docs.items(), (True, False), ("contiguous", "zigzag")):
        ql, kl, vl = (ds_burst.shard_sequence(x, 1, layout=layout).requires_grad_() for x in (q, k, v))
        ds_burst.reset_comm_stats()
        out = ds_burst.burst_attn_func(ql, kl, vl, causal=causal, layout=layout, backward="burst", cu_seqlens=cu)
        out.backward(ds_burst.shard_sequence(do, 1, layout=layout))
        got[(name, "causal" if causal else "full", layout)] = ds_burst.comm_stats()
    return got


def test_ring_bytes_follow_documents():
    world = 4
    per_rank = values(run_ranks(worker_bytes, world, timeout=300))
    for key in per_rank[0]:
        total = {}
        for stats in per_rank:
            for phase, n in stats[key].items():
                total[phase] = total.get(phase, 0) + n
        print(f"P={world} {key[0]:>24} {key[1]:>6} {key[2]:>10}: bytes per call (all ranks) {total}")
    ring = lambda key: sum(r[key].get(ph, 0) for r in per_rank for ph in ("fwd", "bwd"))  # noqa: E731
    for mask, layout in itertools.product(("causal", "full"), ("contiguous", "zigzag")):
        assert ring(("inside ranks", mask, layout)) == 0
        if mask == "full":  # causal: the balance rule may trade hops for balance here (see docs/API.md)
            assert 0 < ring(("pairs of ranks", mask, layout)) < ring(("one document", mask, layout))
    assert all(sum(r[("inside ranks", m, "contiguous")].values()) == 0 for r in per_rank for m in ("causal", "full"))


def test_step_plan_skips_cross_document_tiles_and_hops():
    from ds_burst.core.documents import chunk_segments, layout_assignment
    from ds_burst.core.layout import segments
    from ds_burst.core.step_plan import pair_ops, ring_passes

    world, s_local = 4, 16
    table = [segments("contiguous", r, world, s_local) for r in range(world)]
    inside = tuple(range(0, world * s_local + 1, 8))  # every document inside one rank
    assert ring_passes(table, True, (-1, -1), docs=inside) == []
    assert ring_passes(table, False, (-1, -1), docs=inside) == []
    assert len(ring_passes(table, True, (-1, -1))) == 1
    spans = (0, 8, 24, 64)  # 8..24 spans ranks 0 and 1; 24..64 spans ranks 1, 2, 3
    passes = ring_passes(table, True, (-1, -1), docs=spans)
    assert sum(p.steps for p in passes) == 2  # offset 1 and 2 only, never 3
    for op in pair_ops(table[1], table[0], True, (-1, -1), docs=spans):
        assert (op.k0, op.k1) == (8, 16) and (op.q0, op.q1) == (0, 8)  # only document 8..24 meets
    assert pair_ops(table[3], table[0], True, (-1, -1), docs=spans) == []
    pos = lambda segs: [sg.global_start + i for sg in segs for i in range(sg.length)]  # noqa: E731
    for m in (2, 4):
        zig = layout_assignment("zigzag", world, m)
        assert [pos(chunk_segments(c, s_local // m)) for c in zig] == [pos(segments("zigzag", r, world, s_local))
                                                                       for r in range(world)]


def test_query_work_matches_brute_force():
    from ds_burst.core.documents import query_work
    from ds_burst.core.mask import window_bounds

    rng = random.Random(0)
    for _ in range(200):
        total = rng.randint(1, 30)
        cuts = sorted(rng.sample(range(1, total), min(4, total - 1))) if total > 1 else []
        docs = (0, *cuts, total)
        causal = rng.random() < 0.5
        window = (rng.choice([-1, 0, 2, 5]), 0 if causal else rng.choice([-1, 0, 3]))
        lo, hi = window_bounds(causal, window)
        start = rng.randint(0, total - 1)
        end = rng.randint(start + 1, total)
        brute = sum(1 for p in range(start, end) for kk in range(total)
                    if max(d for d in docs if d <= p) == max(d for d in docs if d <= kk) and p - lo <= kk <= p + hi)
        assert query_work(start, end, docs, causal, window, total) == brute


def balance_numbers(world: int, total: int, n_mix: int = 20, seed: int = 0) -> dict[str, float]:
    """Worst rank's causal work over the mean for random document mixes: caller's zigzag, contiguous and the
    plan's balanced layout (mean over mixes, and the worst mix)."""
    from ds_burst.core.documents import balanced_layout, layout_assignment, rank_work

    rng = random.Random(seed)
    ratios: dict[str, list[float]] = {"zigzag": [], "contiguous": [], "balanced": []}
    s_local = total // world
    for _ in range(n_mix):
        lengths, left = [], total
        while left:
            n = min(left, int(rng.lognormvariate(0, 1.0) * total / 12) + 1)
            lengths.append(n)
            left -= n
        rng.shuffle(lengths)
        docs = tuple(cu_of(lengths))
        for name in ("zigzag", "contiguous"):
            w = rank_work(layout_assignment(name, world, 2), s_local // 2, docs, True, (-1, -1), total)
            ratios[name].append(max(w) / (sum(w) / world))
        _, _, w = balanced_layout("zigzag", docs, True, (-1, -1), world, s_local)
        ratios["balanced"].append(max(w) / (sum(w) / world))
    return {f"{k} mean": sum(v) / len(v) for k, v in ratios.items()} | {f"{k} worst": max(v) for k, v in
                                                                         ratios.items()}


@pytest.mark.parametrize("world", [2, 4, 8])
def test_balance_worst_rank_against_mean(world):
    got = balance_numbers(world, 64 * 1024)
    print(f"P={world}: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()))
    assert got["balanced mean"] <= min(got["zigzag mean"], got["contiguous mean"]) + 1e-9


HF_S = 32
HF_DOCS = [5, 11, 1, 15]


def _hf_config(kind):
    from transformers import LlamaConfig, MistralConfig

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0)
    return LlamaConfig(**common) if kind == "llama" else MistralConfig(**common, sliding_window=6)


def worker_hf(rank, world):
    """A packed batch (position_ids restarting at 0, or the collator's cu_seq_lens) through
    attn_implementation="burst" at SP=2 against eager attention run document by document."""
    from transformers import AutoModelForCausalLM

    import ds_burst.integrations.hf as bhf

    topo = bhf.setup(world)
    cu = cu_of(HF_DOCS)
    res = {}
    for kind, layout, source in [("llama", "zigzag", "position_ids"), ("llama", "contiguous", "cu_seq_lens"),
                                 ("mistral", "zigzag", "position_ids")]:
        bhf.register(layout, topo)
        torch.manual_seed(0)
        ref_model = AutoModelForCausalLM.from_config(_hf_config(kind), attn_implementation="eager")
        model = AutoModelForCausalLM.from_config(_hf_config(kind), attn_implementation="burst")
        model.load_state_dict(ref_model.state_dict())
        batch_size = 2 if source == "position_ids" else 1
        ids = torch.randint(0, 64, (batch_size, HF_S), generator=torch.Generator().manual_seed(3))
        pos = torch.cat([torch.arange(n) for n in HF_DOCS])[None].expand(batch_size, -1).contiguous()
        shift = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        shift[:, [b - 1 for b in cu[1:]]] = -100  # no target across a document boundary
        # reference: every document on its own, eager attention
        logits = torch.cat([ref_model(input_ids=ids[:, a:b]).logits for a, b in zip(cu, cu[1:])], 1)
        ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), shift.reshape(-1), ignore_index=-100)
        ref_loss.backward()
        batch = {"input_ids": ids, "shift_labels": shift, "position_ids": pos}
        if source == "cu_seq_lens":
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor(cu, dtype=torch.int32)
        local = bhf.shard_batch(batch, topo)
        assert local["cu_seq_lens_q"] == cu, local["cu_seq_lens_q"]
        out = model(input_ids=local["input_ids"], position_ids=local["position_ids"],
                    cu_seq_lens_q=local["cu_seq_lens_q"], cu_seq_lens_k=local["cu_seq_lens_k"]).logits
        loss = bhf.sequence_parallel_loss(out, local["shift_labels"], topo)
        loss.backward()
        worst = 0.0
        for p, rp in zip(model.parameters(), ref_model.parameters()):
            g = p.grad.clone()
            torch.distributed.all_reduce(g, group=topo.get_sequence_parallel_group())
            worst = max(worst, float((g - rp.grad).abs().max()) / max(float(rp.grad.abs().max()), 1e-12))
        res[(kind, layout, source)] = {"loss": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
                                       "grad": worst}
    return res


def test_hf_packed_batch_matches_eager_per_document():
    pytest.importorskip("transformers")
    for rank, res in enumerate(values(run_ranks(worker_hf, 2, timeout=300))):
        for case, errs in res.items():
            print(f"rank {rank} {case}: loss rel {errs['loss']:.2e}, worst grad rel {errs['grad']:.2e}")
            assert errs["loss"] < 1e-5 and errs["grad"] < 1e-5, (case, errs)


def test_boundaries_from_position_ids_and_cu_seq_lens():
    from ds_burst.training.data import boundaries_from_cu_seq_lens, boundaries_from_position_ids

    pos = torch.cat([torch.arange(n) for n in HF_DOCS])
    assert boundaries_from_position_ids(pos[None].expand(3, -1)) == cu_of(HF_DOCS)
    assert boundaries_from_position_ids(torch.arange(HF_S)[None]) is None
    with pytest.raises(ValueError, match="different documents"):
        boundaries_from_position_ids(torch.stack([pos, torch.arange(HF_S)]))
    flat = cu_of(HF_DOCS * 2)  # two rows flattened, as a collator packs them
    assert boundaries_from_cu_seq_lens(flat, 2, HF_S) == cu_of(HF_DOCS)
    with pytest.raises(ValueError, match="different documents"):
        boundaries_from_cu_seq_lens(cu_of(HF_DOCS + [16, 16]), 2, HF_S)


@pytest.mark.parametrize("mask", ["causal", "full", "causal_window"])
def test_triton_tiles_on_documents(mask):
    """One process, Triton tiles (interpreter on CPU, fp32): documents of 1 token, short and long ones."""
    pytest.importorskip("triton")
    import ds_burst

    causal, window = MASKS[mask]
    cu = cu_of([1, 6, 1, 9, 7])
    q, k, v, do = inputs(3, 3, 2, torch.float32)  # S = 24
    q, k, v = (x[:1, :24].clone().requires_grad_() for x in (q, k, v))
    out = ds_burst.burst_attn_func(q, k, v, causal=causal, window_size=window, kernel="triton", cu_seqlens=cu)
    out.backward(do[:1, :24])
    ref = reference(q.detach(), k.detach(), v.detach(), do[:1, :24], cu, causal, window)
    errs = [rel(a, b) for a, b in zip([out, q.grad, k.grad, v.grad], ref)]
    print(f"triton fp32 {mask}: relative errors {', '.join(f'{e:.1e}' for e in errs)}")
    assert max(errs) < 1e-5


def test_bench_documents_shapes():
    """The GPU benchmark's shapes and FLOP count (the script itself runs with --dry-run on the CPU)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "launch" / "bench_documents.py"
    spec = importlib.util.spec_from_file_location("bench_documents", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert sum(mod.SHAPES["32k"]) == 32 * 1024 and len(mod.SHAPES["32k"]) == 8
    assert all(1024 <= n <= 8192 for n in mod.SHAPES["32k"])
    assert sum(mod.SHAPES["128k"]) == 128 * 1024 and all(2048 <= n <= 32768 for n in mod.SHAPES["128k"])
    assert mod.useful_flops([4], 1, 1, 1) == 3.5 * 4 * 10
