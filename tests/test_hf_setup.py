"""``ds_burst.hf.setup(1)`` in one process without torch.distributed: registers ``attn_implementation="burst"`` and
returns ``None`` (what every ds-burst function takes for one process); the whole single-process HF path (setup,
shard_batch, the model, sequence_parallel_loss) then gives transformers' own sdpa loss. Refused where it would be
wrong: a launcher started several processes but no process group exists, or an SP size above 1."""

from __future__ import annotations

import pytest
import torch

import ds_burst.hf as bhf

pytest.importorskip("transformers")


def test_setup_one_process_without_distributed(monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not torch.distributed.is_initialized()
    assert bhf.setup(1, layout="contiguous") is None
    assert ALL_ATTENTION_FUNCTIONS["burst"] is bhf.burst_attention_forward
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, attention_dropout=0.0, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="burst", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = bhf.shard_batch({"input_ids": ids, "labels": ids}, None)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["position_ids"][0], torch.arange(16))
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = bhf.sequence_parallel_loss(logits, batch["shift_labels"], None)
    want = ref(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item()), (loss.item(), want.item())


def test_setup_refuses_what_one_process_cannot_do(monkeypatch):
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        bhf.setup(1)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RuntimeError, match="init_distributed"):
        bhf.setup(2)
