"""Model-family matrix: tiny transformers models of today's open families with attn_implementation="burst" at
SP=2 and SP=3 on gloo ranks against the same model with eager attention on the full sequence in one process:
logits, loss and every parameter gradient (summed over the SP ranks). Llama, Qwen2, Qwen3, Mistral, Phi3 (sliding
window), Gemma2 (logit softcapping 2.0 and 50), Gemma3, GPT-OSS (non-zero attention sinks) and DeepSeek-V3 (MLA:
value head dim != q/k head dim). Float64 models (exact up to rounding: 1e-9), fp32 for the ones whose eager path
needs fp32 (1e-5). One spawn per SP size runs every family. Tiny configs built here, no downloads.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dist_utils import run_ranks, values

pytest.importorskip("transformers")

SPS = [2, 3]
S = 12  # divisible by 2 * SP for SP = 2 and 3
V = 64
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}  # float64: transformers keeps some paths in fp32 (see the report)


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                              layer_types=["sliding_attention", "full_attention"])
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=5)
    if family == "phi3":
        return tf.Phi3Config(**common, sliding_window=5)
    if family.startswith("gemma2"):
        cap = 2.0 if family == "gemma2_cap2" else 50.0
        return tf.Gemma2Config(**common, head_dim=8, attn_logit_softcapping=cap, final_logit_softcapping=None,
                               sliding_window=5, query_pre_attn_scalar=8)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=5, query_pre_attn_scalar=8)
    if family == "gpt_oss":
        return tf.GptOssConfig(**common, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=5)
    if family == "deepseek_v3":
        common["num_key_value_heads"] = 4  # MLA: one K/V head per query head
        return tf.DeepseekV3Config(**common, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                                   qk_rope_head_dim=4, v_head_dim=8, head_dim=4, n_routed_experts=4,
                                   num_experts_per_tok=2, first_k_dense_replace=2, n_group=1, topk_group=1,
                                   moe_intermediate_size=16)
    raise ValueError(family)


FAMILIES = {  # family -> dtype of the comparison
    "llama": torch.float64, "qwen2": torch.float64, "qwen3": torch.float64, "mistral": torch.float64,
    "phi3": torch.float64, "gemma2_cap2": torch.float64, "gemma2_cap50": torch.float64, "gemma3": torch.float64,
    "gpt_oss": torch.float32, "deepseek_v3": torch.float32,  # MoE grouped matmuls: no float64
}


def _models(family: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager").to(dtype)
    model = AutoModelForCausalLM.from_config(_config(family), attn_implementation="burst").to(dtype)
    model.load_state_dict(ref.state_dict())
    if family == "gpt_oss":  # non-zero sinks (they are initialised to zero)
        with torch.no_grad():
            for m1, m2 in zip(ref.modules(), model.modules()):
                if hasattr(m1, "sinks"):
                    m1.sinks.copy_(torch.randn(m1.sinks.shape, generator=torch.Generator().manual_seed(5)) * 2)
                    m2.sinks.copy_(m1.sinks)
    ref.eval()
    model.eval()
    return ref, model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    n = float(b.double().norm())
    return float((a.double() - b.double()).norm()) / (n if n > 0 else 1.0)


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    import ds_burst.integrations.hf as bhf
    from ds_burst.dist.relayout import gather_sequence

    topo = bhf.setup(world)
    res = {}
    for family, dtype in FAMILIES.items():
        ref, model = _models(family, dtype)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, V, (2, S), generator=gen)
        logits = ref(input_ids=ids, position_ids=torch.arange(S)[None].expand(2, -1)).logits
        shift = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), shift.reshape(-1))
        ref_loss.backward()
        local = bhf.shard_batch({"input_ids": ids, "labels": ids.clone()}, topo)
        out = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        loss = bhf.sequence_parallel_loss(out, local["shift_labels"], topo)
        loss.backward()
        full = gather_sequence(out.detach(), 1, topo, layout="zigzag")
        errs = {"logits": _rel(full, logits.detach()), "loss": abs(float(loss) - float(ref_loss)) / float(ref_loss)}
        worst, worst_name, n_grads = 0.0, "", 0
        for (name, p), rp in zip(model.named_parameters(), ref.parameters()):
            if rp.grad is None:
                assert p.grad is None or float(p.grad.abs().max()) == 0.0, name
                continue
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(rp.grad)
            dist.all_reduce(g, group=topo.get_sequence_parallel_group())
            n_grads += 1
            e = float((g - rp.grad).abs().max()) / max(float(rp.grad.abs().max()), 1e-30)
            if e > worst:
                worst, worst_name = e, name
        errs.update(grad=worst, grad_name=worst_name, n_grads=n_grads)
        res[family] = errs
    return res


@functools.cache
def _results(world: int) -> list[dict]:
    return values(run_ranks(_worker, world, timeout=600))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("sp", SPS)
def test_family_matches_eager(sp, family):
    tol = TOL[FAMILIES[family]]
    for rank, res in enumerate(_results(sp)):
        e = res[family]
        assert e["n_grads"] > 0
        assert e["logits"] < tol and e["loss"] < tol and e["grad"] < tol, f"rank {rank} SP={sp} {family}: {e}"


def test_hf_backend_applies_or_refuses_every_keyword():
    """Every keyword transformers' models pass to the attention function is applied or refused."""
    import ds_burst.integrations.hf as bhf

    class M(torch.nn.Module):
        is_causal = True

    q = torch.randn(1, 4, 8, 8, dtype=torch.float64)  # [B, H, S, D]
    k = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    pos = torch.arange(8)[None]
    base, _ = bhf.burst_attention_forward(M(), q, k, v, None, scaling=0.3, position_ids=pos)
    applied = {
        "sliding_window": 3, "softcap": 1.5, "s_aux": torch.randn(4, dtype=torch.float64), "is_causal": False,
        "scaling": 0.5,
    }
    for name, val in applied.items():
        kw = {"scaling": 0.3, "position_ids": pos, name: val}
        out, _ = bhf.burst_attention_forward(M(), q, k, v, None, **kw)
        assert (out - base).abs().max() > 1e-6, f"{name} was not applied"
    for name in bhf._NO_EFFECT:
        out, _ = bhf.burst_attention_forward(M(), q, k, v, None, scaling=0.3, position_ids=pos, **{name: True})
        assert torch.equal(out, base)
    refused = {"dropout": 0.1, "output_attentions": True, "cu_seq_lens_q": torch.tensor([0, 8]),
               "cu_seq_lens_k": torch.tensor([0, 8]), "max_length_q": 8, "max_length_k": 8, "made_up": 1}
    for name, val in refused.items():
        with pytest.raises(ValueError):
            bhf.burst_attention_forward(M(), q, k, v, None, scaling=0.3, position_ids=pos, **{name: val})
    with pytest.raises(ValueError, match="mask"):
        bhf.burst_attention_forward(M(), q, k, v, torch.zeros(1, 1, 8, 8), position_ids=pos)


def _no_positions_worker(rank: int, world: int) -> str:
    import ds_burst.integrations.hf as bhf

    bhf.setup(world)
    q = torch.randn(1, 4, 8, 8)
    try:
        bhf.burst_attention_forward(torch.nn.Module(), q, q[:, :2], q[:, :2], None)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_hf_without_position_ids_at_sp2_raises():
    for msg in values(run_ranks(_no_positions_worker, 2, timeout=120)):
        assert "position_ids are required" in msg
