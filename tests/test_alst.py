"""ds-burst behind DeepSpeed ALST's Ulysses switch (Accelerate ``ParallelismConfig(sp_backend="deepspeed")``, the HF
Trainer, TRL's SFTTrainer), on 2 CPU gloo ranks.

* examples/hf_trainer_sp.py (tiny Llama from a config, fp32, ZeRO-3, 3 steps) run by torchrun: the losses after
  ``ds_burst.patch_deepspeed()`` equal DeepSpeed's own ALST run within 1e-5 relative and ds-burst's ring sent
  bytes in "fwd" and "bwd" (ALST's run sends none through ds-burst);
* 3 query heads / 1 KV head at SP=2: ALST refuses, ds-burst's losses equal an SP=1 run;
* TRL SFTTrainer: equal to ALST without packing; with ``packing=True`` (documents spanning the SP ranks) equal to
  the one-process run (transformers' sdpa with its packed block-diagonal mask): ALST itself cannot run TRL's
  padding-free batches (its adapter fails on the 1-D ``cu_seq_lens_q``);
* ``unpatch_deepspeed()`` restores DeepSpeed's classes; the drop-ins keep ALST's signatures;
* in-process 2-rank checks: the data loader adapter's shards and full-sequence document boundaries, what cannot be
  honoured refused on every rank (adapter and attention function); a packed batch through the adapter and the
  registered attention at SP=2 equal to eager attention run document by document (losses and gradients, fp32);
  the token-weighted loss with a rank without labelled tokens (finite, equal to SP=1 and to transformers'
  ``deepspeed_sp_compute_loss`` aggregation, value and gradients).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from launch_utils import REPO, free_port

from dist_utils import run_ranks, values
from kernel_utils import TOL, max_rel

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLE = str(REPO / "examples" / "hf_trainer_sp.py")


def _torchrun(nproc: int, args: list[str], tmp_path, check: bool = True, timeout: float = 240.0) -> tuple[dict, str]:
    """Run the example under torchrun; returns (rank 0's JSON result, combined output)."""
    out = tmp_path / f"result_{free_port()}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), EXAMPLE, *args, "--out", str(out), "--output-dir", str(tmp_path / "trainer")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{text[-6000:]}")
    if not check:
        assert proc.returncode != 0, "expected the run to fail"
        return {}, text
    return json.loads(out.read_text()), text


def test_trainer_matches_alst(tmp_path):
    alst, _ = _torchrun(2, ["--backend", "alst"], tmp_path)
    burst, _ = _torchrun(2, ["--backend", "burst"], tmp_path)
    print("ALST", alst["losses"], "ds-burst", burst["losses"], "ring bytes", burst["comm"])
    assert max_rel(burst["losses"], alst["losses"], 3) < TOL[torch.float32][0]
    assert len(set(burst["losses"])) == 3  # the model trained: three different losses
    assert burst["comm"].get("fwd", 0) > 0 and burst["comm"].get("bwd", 0) > 0
    assert not alst["comm"].get("fwd") and not alst["comm"].get("bwd")  # ALST's run did not use ds-burst


def test_gqa_fewer_kv_heads_than_sp(tmp_path):
    """3 query heads, 1 KV head at SP=2: Ulysses needs Hq % P == 0 and refuses; ds-burst matches SP=1."""
    _, text = _torchrun(2, ["--backend", "alst", "--heads", "3", "--kv-heads", "1"], tmp_path, check=False)
    assert "Attention head count 3 is not divisible by SP size 2" in text
    sp2, _ = _torchrun(2, ["--backend", "burst", "--heads", "3", "--kv-heads", "1"], tmp_path)
    sp1, _ = _torchrun(1, ["--backend", "burst", "--heads", "3", "--kv-heads", "1"], tmp_path)
    print("SP=2", sp2["losses"], "SP=1", sp1["losses"], "ring bytes", sp2["comm"])
    assert sp2["sp"] == 2 and sp1["sp"] == 1
    assert max_rel(sp2["losses"], sp1["losses"], 3) < TOL[torch.float32][0]
    assert sp2["comm"].get("fwd", 0) > 0 and sp2["comm"].get("bwd", 0) > 0


def test_trl_sft_trainer(tmp_path):
    pytest.importorskip("trl")
    alst, _ = _torchrun(2, ["--backend", "alst", "--trainer", "trl"], tmp_path)
    burst, _ = _torchrun(2, ["--backend", "burst", "--trainer", "trl"], tmp_path)
    print("TRL ALST", alst["losses"], "ds-burst", burst["losses"], "ring bytes", burst["comm"])
    assert max_rel(burst["losses"], alst["losses"], 3) < TOL[torch.float32][0]
    assert burst["comm"].get("fwd", 0) > 0 and burst["comm"].get("bwd", 0) > 0


def test_trl_packing(tmp_path):
    """TRL packing=True (BFD, padding-free: position_ids restart per document, cu_seq_lens_q of the flattened batch)
    trains through the ALST path at SP=2 with the documents kept apart: equal to the one-process run. DeepSpeed's
    own ALST cannot run these batches (its adapter indexes dim 1 of the 1-D cu_seq_lens_q; on GPUs it would need
    flash-attention's varlen path), so the one-process run (plain transformers sdpa, which builds a block-diagonal
    mask from the packed position_ids) is the reference."""
    pytest.importorskip("trl")
    _, text = _torchrun(2, ["--backend", "alst", "--trainer", "trl", "--packing"], tmp_path, check=False)
    assert "IndexError: tuple index out of range" in text, text[-3000:]
    sp2, _ = _torchrun(2, ["--backend", "burst", "--trainer", "trl", "--packing"], tmp_path)
    sp1, _ = _torchrun(1, ["--backend", "burst", "--trainer", "trl", "--packing"], tmp_path)
    print("TRL packing SP=2", sp2["losses"], "SP=1", sp1["losses"], "ring bytes", sp2["comm"])
    assert sp2["sp"] == 2 and sp1["sp"] == 1
    assert max_rel(sp2["losses"], sp1["losses"], 3) < TOL[torch.float32][0]
    assert len(set(sp2["losses"])) == 3
    assert sp2["comm"].get("fwd", 0) > 0 and sp2["comm"].get("bwd", 0) > 0  # documents span the two ranks


# ---------------------------------------------------------------------------------------------
# patch / unpatch


def test_unpatch_restores_deepspeed_classes():
    import deepspeed.runtime.sequence_parallel.ulysses_sp as ulysses_sp
    import deepspeed.sequence.layer as ds_layer

    import ds_burst
    from ds_burst.integrations import alst

    orig = (ds_layer.DistributedAttention, ulysses_sp.UlyssesSPAttentionHF, ulysses_sp.UlyssesSPDataLoaderAdapter)
    # a module that bound the names at import time (``from ... import UlyssesSPAttentionHF``)
    fake = types.ModuleType("fake_alst_user")
    fake.UlyssesSPAttentionHF, fake.UlyssesSPDataLoaderAdapter = orig[1], orig[2]
    sys.modules["fake_alst_user"] = fake
    try:
        ds_burst.patch_deepspeed()
        ds_burst.patch_deepspeed()  # idempotent
        assert ds_layer.DistributedAttention is ds_burst.DistributedAttention
        assert ulysses_sp.UlyssesSPAttentionHF is alst.BurstSPAttentionHF is fake.UlyssesSPAttentionHF
        assert ulysses_sp.UlyssesSPDataLoaderAdapter is alst.BurstSPDataLoaderAdapter is fake.UlyssesSPDataLoaderAdapter
        ds_burst.unpatch_deepspeed()
        assert (ds_layer.DistributedAttention, ulysses_sp.UlyssesSPAttentionHF,
                ulysses_sp.UlyssesSPDataLoaderAdapter) == orig
        assert (fake.UlyssesSPAttentionHF, fake.UlyssesSPDataLoaderAdapter) == orig[1:]
        assert ulysses_sp.UlyssesSPAttentionHF.__module__ == "deepspeed.runtime.sequence_parallel.ulysses_sp"
        ds_burst.unpatch_deepspeed()  # no-op
        assert ulysses_sp.UlyssesSPAttentionHF is orig[1]
    finally:
        del sys.modules["fake_alst_user"]
        ds_burst.unpatch_deepspeed()


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def test_drop_ins_keep_alst_signatures():
    import deepspeed.runtime.sequence_parallel.ulysses_sp as ulysses_sp

    from ds_burst.integrations import alst

    ds, ours = ulysses_sp.UlyssesSPAttentionHF, alst.BurstSPAttentionHF
    for name in ("__init__", "forward", "register_with_transformers"):
        assert _params(getattr(ours, name)) == _params(getattr(ds, name)), name
    assert _params(alst.BurstSPDataLoaderAdapter.__init__) == _params(ulysses_sp.UlyssesSPDataLoaderAdapter.__init__)
    assert _params(alst.register_with_transformers) == _params(ds.register_with_transformers)


def test_documents_from_position_ids_and_batch():
    from ds_burst.integrations.alst import documents_from_batch, documents_from_position_ids, positions_from_documents

    assert documents_from_position_ids(torch.arange(8)[None]) is None
    assert documents_from_position_ids(torch.arange(5, 13)[None].expand(2, -1)) is None  # offset, no restart
    packed = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4])
    assert documents_from_position_ids(packed[None].expand(2, -1)) == [0, 3, 8]
    assert documents_from_position_ids(torch.tensor([[5, 6, 0, 1, 0, 0]])) == [0, 2, 4, 5, 6]  # right padding: 1 each
    with pytest.raises(ValueError, match="packed batch refused.*rows of the batch hold different documents"):
        documents_from_position_ids(torch.stack([packed, torch.arange(8)]))
    with pytest.raises(ValueError, match="packed batch refused.*jump from 2 to 7 at token 3 without restarting at 0"):
        documents_from_position_ids(torch.tensor([[0, 1, 2, 7, 8, 9, 10, 11]]))
    assert positions_from_documents([0, 3, 8], 2).tolist() == [packed.tolist()] * 2
    ids = torch.zeros(2, 8, dtype=torch.long)
    # flash-attn varlen offsets into the flattened [B * S] batch, or one row's boundaries
    assert documents_from_batch({"input_ids": ids, "cu_seq_lens_q": [0, 3, 8, 11, 16]}) == [0, 3, 8]
    assert documents_from_batch({"input_ids": ids, "cu_seq_lens_k": torch.tensor([0, 3, 8], dtype=torch.int32),
                                 "position_ids": packed[None].expand(2, -1)}) == [0, 3, 8]
    assert documents_from_batch({"input_ids": ids, "cu_seq_lens_q": [0, 8], "position_ids": torch.arange(8)}) is None
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        documents_from_batch({"input_ids": ids, "cu_seq_lens_q": [0, 3, 8], "cu_seq_lens_k": [0, 4, 8]})
    with pytest.raises(ValueError, match="the documents of cu_seq_lens .* and of position_ids .* differ"):
        documents_from_batch({"input_ids": ids, "cu_seq_lens_q": [0, 3, 8], "position_ids": torch.arange(8)})
    with pytest.raises(ValueError, match="rows of the batch hold different documents"):
        documents_from_batch({"input_ids": ids, "cu_seq_lens_q": [0, 3, 8, 12, 16]})
    with pytest.raises(ValueError, match="not strictly increasing boundaries"):
        documents_from_batch({"input_ids": ids[:1], "cu_seq_lens_q": [0, 5, 3, 8]})


# ---------------------------------------------------------------------------------------------
# 2 gloo ranks in-process


def _adapter_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from ds_burst.integrations.alst import BurstSPDataLoaderAdapter

    S = 8
    res: dict = {}
    # each rank loads its own sample (rank r: tokens 100r + t), no position_ids given
    own = [{"input_ids": torch.arange(S)[None] + 100 * rank + 10 * i, "labels": torch.arange(S)[None] + 100 * rank,
            "tag": f"r{rank}b{i}"} for i in range(2)]
    ad = BurstSPDataLoaderAdapter(own, sp_rank=rank, sp_group=dist.group.WORLD, sp_world_size=world,
                                  device=torch.device("cpu"))
    res["len"] = len(ad)
    res["batches"] = [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in b.items()} for b in ad]
    # packed sample on rank 1 only (position_ids restarting at 0): both ranks get its full-sequence boundaries
    pos = torch.arange(S)[None] if rank == 0 else torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    packed = [{"input_ids": torch.arange(S)[None], "labels": torch.arange(S)[None], "position_ids": pos}]
    res["packed"] = [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in b.items()}
                     for b in BurstSPDataLoaderAdapter(packed, rank, dist.group.WORLD, world, torch.device("cpu"))]
    # TRL's padding-free keys without position_ids: per-document positions are filled in
    trl = [{"input_ids": torch.arange(S)[None], "labels": torch.arange(S)[None],
            "cu_seq_lens_q": torch.tensor([0, 5, S], dtype=torch.int32),
            "cu_seq_lens_k": torch.tensor([0, 5, S], dtype=torch.int32), "max_length_q": 5, "max_length_k": 5,
            "seq_idx": torch.tensor([[0] * 5 + [1] * 3], dtype=torch.int32)}]
    res["trl"] = [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in b.items()}
                  for b in BurstSPDataLoaderAdapter(trl, rank, dist.group.WORLD, world, torch.device("cpu"))]
    # what one set of boundaries cannot express, on one rank only: both ranks must refuse
    rows = torch.stack([torch.arange(S), torch.tensor([0, 1, 2, 0, 1, 2, 3, 4])])
    bad = {
        "rows": {"input_ids": torch.zeros(2, S, dtype=torch.long), "labels": torch.zeros(2, S, dtype=torch.long),
                 "position_ids": rows if rank == 0 else torch.arange(S).expand(2, -1)},
        "jump": {"input_ids": torch.zeros(1, S, dtype=torch.long), "labels": torch.zeros(1, S, dtype=torch.long),
                 "position_ids": torch.tensor([[0, 1, 2, 3, 9, 10, 11, 12]]) if rank == 1 else torch.arange(S)[None]},
    }
    for name, batch in bad.items():
        try:
            next(iter(BurstSPDataLoaderAdapter([batch], rank, dist.group.WORLD, world, torch.device("cpu"))))
            res[f"refused_{name}"] = "no error"
        except ValueError as e:
            res[f"refused_{name}"] = str(e)
    return res


def test_dataloader_adapter_shards_and_documents():
    res = values(run_ranks(_adapter_worker, 2, timeout=120))
    for rank, r in enumerate(res):
        assert r["len"] == 4
        assert [b["tag"] for b in r["batches"]] == ["r0b0", "r1b0", "r0b1", "r1b1"]  # rank 0's sample, then rank 1's
        lo, hi = 4 * rank, 4 * rank + 4
        for b in r["batches"]:
            src, i = int(b["tag"][1]), int(b["tag"][3])
            full_ids = [100 * src + 10 * i + t for t in range(8)]
            full_shift = [100 * src + t for t in range(1, 8)] + [-100]
            assert b["input_ids"] == [full_ids[lo:hi]]
            assert b["shift_labels"] == [full_shift[lo:hi]]
            assert b["position_ids"] == [list(range(lo, hi))]  # global positions (RoPE)
            assert "labels" not in b and "cu_seq_lens_q" not in b  # one document: no boundaries
        # rank 0's sample is one document; rank 1's holds two: both ranks' shards carry the full-sequence boundaries
        p0, p1 = r["packed"]
        assert "cu_seq_lens_q" not in p0 and p0["position_ids"] == [list(range(lo, hi))]
        assert p1["cu_seq_lens_q"] == p1["cu_seq_lens_k"] == [0, 3, 8]
        assert p1["position_ids"] == [[0, 1, 2, 0, 1, 2, 3, 4][lo:hi]]  # per-document positions (RoPE)
        for b in r["trl"]:
            assert b["cu_seq_lens_q"] == b["cu_seq_lens_k"] == [0, 5, 8], b
            assert b["position_ids"] == [[0, 1, 2, 3, 4, 0, 1, 2][lo:hi]]  # filled in from cu_seq_lens_q
            assert b["seq_idx"] == [[0, 0, 0, 0, 0, 1, 1, 1][lo:hi]]
            assert "max_length_q" not in b and "max_length_k" not in b
        assert "packed batch refused (data loader batch of SP rank 0" in r["refused_rows"], r
        assert "rows of the batch hold different documents" in r["refused_rows"], r
        assert "packed batch refused (data loader batch of SP rank 1" in r["refused_jump"], r
        assert "jump from 3 to 9 at token 4" in r["refused_jump"], r


def _attention_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ds_burst.integrations.alst import BurstSPAttentionHF

    res: dict = {}
    attn = BurstSPAttentionHF(sdpa_attention_forward, batch_size=1, attn_head_count=4, attn_head_size=8,
                              kv_head_count=1, num_hidden_layers=1, process_group=dist.group.WORLD,
                              seq_length_is_variable=True)
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 4
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 16, 8, generator=g), torch.randn(1, 1, 16, 8, generator=g), torch.randn(
        1, 1, 16, 8, generator=g)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=True, scaling=8 ** -0.5)
    sl = slice(8 * rank, 8 * rank + 8)
    out, _ = attn(module, q[:, :, sl], k[:, :, sl], v[:, :, sl], None, position_ids=torch.arange(16)[None, sl],
                  scaling=8 ** -0.5)
    res["err"] = float((out - ref[:, sl]).abs().max())
    # packed, the restart in rank 1's half only and no cu_seq_lens: the boundaries come from the gathered
    # position_ids (both ranks), equal to sdpa run document by document
    docs = [0, 11, 16]
    ref_docs = torch.cat([sdpa_attention_forward(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, is_causal=True,
                                                 scaling=8 ** -0.5)[0] for a, b in zip(docs[:-1], docs[1:])], dim=1)
    pos = torch.arange(8)[None] + 8 * rank if rank == 0 else torch.tensor([[8, 9, 10, 0, 1, 2, 3, 4]])
    out, _ = attn(module, q[:, :, sl], k[:, :, sl], v[:, :, sl], None, position_ids=pos, scaling=8 ** -0.5)
    res["docs_err"] = float((out - ref_docs[:, sl]).abs().max())
    res["docs_vs_one_doc"] = float((ref_docs - ref).abs().max())
    # the adapter's form: full-sequence boundaries as lists (position_ids are not gathered then); TRL's seq_idx
    out, _ = attn(module, q[:, :, sl], k[:, :, sl], v[:, :, sl], None, position_ids=pos, scaling=8 ** -0.5,
                  cu_seq_lens_q=docs, cu_seq_lens_k=list(docs), max_length_q=11, max_length_k=11,
                  seq_idx=torch.zeros(1, 8, dtype=torch.int32))
    res["cu_err"] = float((out - ref_docs[:, sl]).abs().max())
    # B=2 whose rows hold different documents (the restart in rank 1's half of row 1 only): both ranks refuse
    q2, k2, v2 = (torch.cat([x, x]) for x in (q, k, v))
    pos2 = torch.cat([torch.arange(8)[None] + 8 * rank, pos])
    try:
        attn(module, q2[:, :, sl], k2[:, :, sl], v2[:, :, sl], None, position_ids=pos2, scaling=8 ** -0.5)
        res["refused_rows"] = "no error"
    except ValueError as e:
        res["refused_rows"] = str(e)
    # register_with_transformers takes over the model's key; unpatch_deepspeed gives it back
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import ds_burst
    from ds_burst.integrations.alst import register_with_transformers

    cfg = LlamaConfig(vocab_size=16, hidden_size=24, intermediate_size=8, num_hidden_layers=1, num_attention_heads=3,
                      num_key_value_heads=1, head_dim=8)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    mpu = register_with_transformers(model, "sdpa", sequence_parallel_size=world, micro_batch_size=1)
    res["mpu"] = (type(mpu).__name__, mpu.get_sequence_parallel_world_size())
    res["replaced"] = ALL_ATTENTION_FUNCTIONS["sdpa"] is not before
    ids = torch.arange(16)[None] % 16
    with torch.no_grad():
        ref = model(input_ids=ids[:, :8] if rank == 0 else ids[:, 8:], position_ids=torch.arange(16)[None, sl])
    res["ran"] = bool(torch.isfinite(ref.logits).all())
    ds_burst.unpatch_deepspeed()
    res["restored"] = ALL_ATTENTION_FUNCTIONS["sdpa"] is before is sdpa_attention_forward
    return res


def test_attention_matches_sdpa_with_documents():
    res = values(run_ranks(_attention_worker, 2, timeout=120))
    for r in res:
        assert r["err"] < 1e-5, r
        assert r["docs_err"] < 1e-5 and r["cu_err"] < 1e-5 and r["docs_vs_one_doc"] > 1e-2, r
        assert "packed batch refused (attention position_ids)" in r["refused_rows"], r
        assert "rows of the batch hold different documents" in r["refused_rows"], r
        assert r["mpu"] == ("ParallelStateSP", 2) and r["replaced"] and r["ran"] and r["restored"], r


def _packed_model_worker(rank: int, world: int) -> dict:
    """A packed batch through the adapter and the registered attention at SP=2 vs eager attention document by
    document: the loss of each micro batch and the gradients (summed over the SP ranks), fp32."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    import ds_burst
    from ds_burst.integrations.alst import (
        BurstSPDataLoaderAdapter,
        positions_from_documents,
        register_with_transformers,
    )
    from ds_burst.training.losses import sequence_parallel_loss

    S, V, B = 24, 32, 2
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, attention_dropout=0.0, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager", dtype=torch.float32)
    ref_model.load_state_dict(model.state_dict())
    # rank 0's sample: position_ids restarting at 0 (a 10-token document spans both ranks' 12-token shards);
    # rank 1's: TRL-style cu_seq_lens_q of the flattened [B * S] batch, no position_ids
    all_docs = [[0, 5, 15, 24], [0, 13, 24]]
    g = torch.Generator().manual_seed(7)
    samples = []
    for docs in all_docs:
        ids = torch.randint(0, V, (B, S), generator=g)
        labels = ids.clone()
        labels[:, torch.tensor(docs[:-1])] = -100  # no target across a boundary (TRL does the same)
        labels[:, 1:3] = -100  # a prompt
        samples.append({"input_ids": ids, "labels": labels, "docs": docs})
    own = samples[rank]
    batch = {"input_ids": own["input_ids"], "labels": own["labels"]}
    if rank == 0:
        batch["position_ids"] = positions_from_documents(own["docs"], B)
    else:
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor(
            [0] + [r * S + e for r in range(B) for e in own["docs"][1:]], dtype=torch.int32)
    mpu = register_with_transformers(model, "sdpa", sequence_parallel_size=world, micro_batch_size=B)
    res: dict = {"losses": [], "ref_losses": [], "packed_mask_losses": [], "one_doc_losses": []}
    try:
        for shard in BurstSPDataLoaderAdapter([batch], rank, mpu, world, torch.device("cpu")):
            shift = shard.pop("shift_labels")
            out = model(**shard)  # input_ids, position_ids, cu_seq_lens_q/_k: what the Trainer passes
            loss = sequence_parallel_loss(out.logits, shift, mpu)
            loss.backward()
            res["losses"].append(loss.item())
            res.setdefault("cu", []).append(shard["cu_seq_lens_q"])
    finally:
        ds_burst.unpatch_deepspeed()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    # reference: eager attention on every document alone (positions 0..len-1), one token mean per sample
    for smp in samples:
        ids, labels, docs = smp["input_ids"], smp["labels"], smp["docs"]
        shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        ce = 0.0
        for a, b in zip(docs[:-1], docs[1:]):
            logits = ref_model(input_ids=ids[:, a:b], position_ids=torch.arange(b - a)[None].expand(B, -1)).logits
            ce = ce + torch.nn.functional.cross_entropy(logits.reshape(-1, V), shift[:, a:b].reshape(-1),
                                                        ignore_index=-100, reduction="sum")
        loss = ce / (shift != -100).sum()
        loss.backward()
        res["ref_losses"].append(loss.item())
        pos = positions_from_documents(docs, B)
        with torch.no_grad():  # SP=1 with the packed positions: transformers' block-diagonal mask (B=1, no cache)
            logits = torch.cat([ref_model(input_ids=ids[i:i + 1], position_ids=pos[i:i + 1], use_cache=False).logits
                                for i in range(B)])
            res["packed_mask_losses"].append(torch.nn.functional.cross_entropy(
                logits.reshape(-1, V), shift.reshape(-1), ignore_index=-100).item())
            logits = ref_model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits
            res["one_doc_losses"].append(torch.nn.functional.cross_entropy(  # documents not kept apart
                logits.reshape(-1, V), shift.reshape(-1), ignore_index=-100).item())
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
    res["grad_rel"] = max(float((p.grad - ref_grads[n]).norm() / ref_grads[n].norm())
                          for n, p in model.named_parameters())
    res["comm"] = ds_burst.comm_stats()
    return res


def test_packed_batch_through_alst_path_matches_per_document():
    res = values(run_ranks(_packed_model_worker, 2, timeout=180))
    for r in res:
        print("SP=2", r["losses"], "per document", r["ref_losses"], "grad rel", r["grad_rel"])
        assert r["cu"] == [[0, 5, 15, 24], [0, 13, 24]], r
        assert max_rel(r["losses"], r["ref_losses"], 2) < TOL[torch.float32][0], r
        assert max_rel(r["packed_mask_losses"], r["ref_losses"], 2) < TOL[torch.float32][0], r
        assert max_rel(r["one_doc_losses"], r["ref_losses"], 2) > 1e-3, r  # the documents matter
        assert r["grad_rel"] < 1e-5, r
        assert r["comm"].get("fwd", 0) > 0 and r["comm"].get("bwd", 0) > 0, r
    assert res[0]["losses"] == res[1]["losses"]


def _loss_worker(rank: int, world: int) -> dict:
    """A sequence whose first half (rank 0's shard) holds no labelled token, logits ``hidden @ W`` with ``W`` a
    parameter shared by the SP ranks (what DeepSpeed reduces). For each case (no ZeRO and ZeRO-3 with the
    installed DeepSpeed, ZeRO-3 as DeepSpeed 0.20.2 reduces): ds-burst's loss with
    ``sp_grads_averaged(config, version)`` and transformers' ``deepspeed_sp_compute_loss`` on this rank's shard
    (ZeRO-3 seen through an ``HfDeepSpeedConfig``, the DeepSpeed version through ``importlib.metadata``, as
    transformers reads them), ``W``'s gradient reduced over the SP ranks as that DeepSpeed does (a sum, or an
    average when ``sp_grads_averaged``) and with the other convention, and the SP=1 gradient of the full mean."""
    import importlib.metadata

    import deepspeed.utils.groups as ds_groups
    import torch.distributed as dist
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        deepspeed_sp_compute_loss,
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )
    from transformers.loss.loss_utils import ForCausalLMLoss

    from ds_burst import init_sequence_parallel
    from ds_burst.training.losses import sequence_parallel_loss, sp_grads_averaged

    topo = init_sequence_parallel(world)
    V, S, H = 11, 12, 5
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, S, H, generator=g, dtype=torch.float64)
    w0 = torch.randn(H, V, generator=g, dtype=torch.float64)
    full_shift = torch.randint(0, V, (1, S), generator=g)
    full_shift[:, : S // 2 + 1] = -100  # prompt: rank 0's half has no labelled token
    sl = slice(6 * rank, 6 * rank + 6)
    w_ref = w0.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(hidden[0] @ w_ref, full_shift[0], ignore_index=-100)
    ref.backward()
    assert w_ref.grad is not None and bool(w_ref.grad.abs().sum() > 0)

    def reduced(grad: torch.Tensor, averaged: bool) -> torch.Tensor:
        """DeepSpeed's reduction over the SP ranks (dp = 1): the sum, divided by P when it averages."""
        r = grad.clone()
        dist.all_reduce(r, group=topo.get_sequence_parallel_group())
        return r / world if averaged else r

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    cases = {  # name -> (DeepSpeed config, DeepSpeed version to answer for: None = the installed one)
        "no_zero": ({"zero_optimization": {"stage": 0}}, None),
        "zero3": ({"zero_optimization": {"stage": 3}}, None),
        "zero3_deepspeed_0.20.2": ({"zero_optimization": {"stage": 3}}, "0.20.2"),
    }
    real_version = importlib.metadata.version
    old_mpu = ds_groups.mpu

    def _lm_head_model(h: torch.Tensor, weight: torch.Tensor, loss_fn):
        """What the Trainer calls: ``model(**inputs).loss``, the model's loss on this rank's ``shift_labels``."""
        def model(**inputs):
            return types.SimpleNamespace(loss=loss_fn(h @ weight, None, V, shift_labels=inputs["shift_labels"]))
        return model

    ds_groups.mpu = topo  # transformers takes the SP group from deepspeed.utils.groups
    out: dict = {"ref": ref.item()}
    try:
        for name, (cfg, ds_version) in cases.items():
            averaged = sp_grads_averaged(cfg, ds_version)
            w = w0.clone().requires_grad_(True)
            ours = sequence_parallel_loss(hidden[:, sl] @ w, full_shift[:, sl], topo, sp_grads_averaged=averaged)
            ours.backward()
            w_t = w0.clone().requires_grad_(True)
            model = _lm_head_model(hidden[:, sl], w_t, ForCausalLMLoss)
            hf_config = HfDeepSpeedConfig(copy.deepcopy(cfg)) if cfg["zero_optimization"]["stage"] == 3 else None
            if hf_config is None:
                unset_hf_deepspeed_config()
            if ds_version is not None:
                importlib.metadata.version = (  # type: ignore[assignment]
                    lambda pkg, v=ds_version: v if pkg == "deepspeed" else real_version(pkg))
            try:
                zero3_seen = is_deepspeed_zero3_enabled()
                pc = types.SimpleNamespace(sp_backend="deepspeed", sp_size=world)
                theirs = deepspeed_sp_compute_loss(None, model, {"shift_labels": full_shift[:, sl]}, False, pc)
            finally:
                importlib.metadata.version = real_version  # type: ignore[assignment]
                unset_hf_deepspeed_config()
                del hf_config
            theirs.backward()
            out[name] = {
                "averaged": averaged, "zero3_seen": zero3_seen, "ours": ours.item(), "theirs": theirs.item(),
                "local_diff": float((w.grad - w_t.grad).abs().max()), "local_norm": float(w.grad.abs().sum()),
                "ours_vs_sp1": rel(reduced(w.grad, averaged), w_ref.grad),
                "theirs_vs_sp1": rel(reduced(w_t.grad, averaged), w_ref.grad),
                "other_convention_vs_sp1": rel(reduced(w.grad, not averaged), w_ref.grad),
            }
    finally:
        ds_groups.mpu = old_mpu
    return out


def test_loss_with_a_rank_without_labels():
    """ds-burst's SP loss and transformers' Trainer loss (the installed version) give the same value and the same
    per-rank gradients, and after the DeepSpeed reduction of each case the SP=1 gradient, for no ZeRO, ZeRO-3 of
    the installed DeepSpeed and ZeRO-3 as DeepSpeed >= 0.20.2 sums it; the other convention would be off by P."""
    res = values(run_ranks(_loss_worker, 2, timeout=120))
    names = ("no_zero", "zero3", "zero3_deepspeed_0.20.2")
    for r in res:
        assert set(r) == {"ref", *names}, r
        assert r["no_zero"]["averaged"] is False and r["zero3_deepspeed_0.20.2"]["averaged"] is False, r
        for name in names:
            c = r[name]
            assert c["zero3_seen"] is (name != "no_zero"), (name, c)
            assert abs(c["ours"] - r["ref"]) < 1e-9 * abs(r["ref"]), (name, c)
            assert abs(c["theirs"] - r["ref"]) < 1e-6 * abs(r["ref"]), (name, c)
            assert c["local_diff"] < 1e-6, (name, c)  # transformers computes in fp32
            assert c["ours_vs_sp1"] < 1e-9 and c["theirs_vs_sp1"] < 1e-6, (name, c)
            assert c["other_convention_vs_sp1"] > 0.4, (name, c)  # off by a factor 2: the check can fail
    for name in names:  # rank 0 has no labelled token: no gradient, never NaN
        assert res[0][name]["local_norm"] == 0.0 and res[1][name]["local_norm"] > 0, name
