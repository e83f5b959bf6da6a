"""transformers models with attn_implementation="burst" on 2 gloo ranks against the same model with eager
attention on the full sequence: loss and every parameter gradient (summed over the SP ranks, which is
what the loss helper's gradients are meant for) within 1e-5 relative (fp32). Llama (GQA), Mistral
(GQA + sliding window) and Qwen2 (GQA + sliding window on some layers), zigzag and contiguous layouts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks, values
from kernel_utils import TOL

pytest.importorskip("transformers")

S = 32


def _config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=11)
    return Qwen2Config(**common, use_sliding_window=True, sliding_window=9, max_window_layers=1)


CASES = [("llama", "zigzag"), ("mistral", "zigzag"), ("qwen2", "zigzag"), ("mistral", "contiguous")]


def _hf_worker(rank: int, world: int) -> dict:
    from transformers import AutoModelForCausalLM

    import ds_burst.integrations.hf as bhf

    topo = bhf.setup(world)
    res = {}
    for kind, layout in CASES:
        bhf.register(layout, topo)
        torch.manual_seed(0)  # separate config objects: from_config records the implementation on the config
        ref_model = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="eager")
        model = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="burst")
        assert ref_model.config._attn_implementation == "eager"
        model.load_state_dict(ref_model.state_dict())
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 64, (2, S), generator=gen)
        batch = {"input_ids": ids, "labels": ids.clone()}
        # reference: full sequence, one process
        logits = ref_model(input_ids=ids, position_ids=torch.arange(S)[None].expand(2, -1)).logits
        shift = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), shift.reshape(-1), ignore_index=-100)
        ref_loss.backward()
        # sequence parallel
        local = bhf.shard_batch(batch, topo)
        out = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        loss = bhf.sequence_parallel_loss(out, local["shift_labels"], topo)
        loss.backward()
        errs = {"loss": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))}
        worst = 0.0
        for p, rp in zip(model.parameters(), ref_model.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g, group=topo.get_sequence_parallel_group())
            worst = max(worst, float((g - rp.grad).abs().max()) / max(float(rp.grad.abs().max()), 1e-12))
        errs["grad"] = worst
        res[(kind, layout)] = errs
    try:
        bhf.shard_batch({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids).tril()}, topo)
        res["padding"] = "no error"
    except ValueError as e:
        res["padding"] = str(e)
    return res


@pytest.fixture(scope="module")
def hf_results():
    return values(run_ranks(_hf_worker, 2, timeout=300))


@pytest.mark.parametrize("kind, layout", CASES)
def test_hf_model_matches_full_sequence(hf_results, kind, layout):
    for rank, res in enumerate(hf_results):
        errs = res[(kind, layout)]
        tol = TOL[torch.float32][0]
        assert errs["loss"] < tol and errs["grad"] < tol, f"rank {rank} {kind} {layout}: {errs}"


def test_padding_mask_rejected(hf_results):
    for res in hf_results:
        assert "padding" in res["padding"]


def test_shard_batch_single_process():
    import ds_burst.integrations.hf as bhf

    ids = torch.arange(8)[None]
    out = bhf.shard_batch({"input_ids": ids, "labels": ids}, None, layout="contiguous")
    assert out["shift_labels"].tolist() == [[1, 2, 3, 4, 5, 6, 7, -100]]
    assert out["position_ids"].tolist() == [list(range(8))]
    with pytest.raises(ValueError, match="shift_labels"):
        bhf.shard_batch({"input_ids": ids}, None)
