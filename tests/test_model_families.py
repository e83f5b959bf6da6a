"""Model-family matrix: tiny transformers models of today's open families with attn_implementation="burst" at
SP=2 and SP=3 on gloo ranks against the same model on the full sequence in one process: logits, loss and every
parameter gradient (summed over the SP ranks). Llama, Qwen2, Qwen3, Mistral, Phi3 (sliding window), Gemma2 (logit
softcapping 2.0 and 50), Gemma3, GPT-OSS (non-zero attention sinks, MoE) and DeepSeek-V3 (MLA: value head dim !=
q/k head dim). One spawn per SP size runs every family. Tiny configs built here, no downloads.

The one-process reference is "ref64" (registered below), transformers' eager attention of each family with the
softmax kept in the input dtype: transformers' eager_attention_forward computes
``softmax(..., dtype=torch.float32).to(query.dtype)`` (Llama, Qwen2, Qwen3, Mistral, Phi3, Gemma2, Gemma3,
DeepSeek-V3; GPT-OSS already keeps the dtype), so in a float64 model the reference itself was only fp32-accurate
(about 1e-7 relative on logits and gradients). Every family runs in float64, the MoE ones with
experts_implementation="eager" (the default grouped_mm has no float64 kernel on CPU), and is compared at 1e-10.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dist_utils import run_ranks, values
from kernel_utils import TOL, rel

pytest.importorskip("transformers")

SPS = [2, 3]
S = 12  # divisible by 2 * SP for SP = 2 and 3
V = 64
REF = "ref64"


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
    "gpt_oss": torch.float64, "deepseek_v3": torch.float64,
}
MOE = {"gpt_oss"}  # families with MoE layers here (DeepSeek-V3: first_k_dense_replace=2 keeps both layers dense)


def _ref64_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                     s_aux=None, sliding_window=None, **kwargs):
    """transformers' eager_attention_forward of the families above (Llama-style; Gemma2/3 softcap; GPT-OSS sinks),
    the softmax in the input dtype instead of float32. The causal / sliding-window mask is the additive one
    transformers builds for eager (registered for "ref64" below), so ``sliding_window`` is not used here, as in
    eager."""
    assert not dropout and attention_mask is not None
    if scaling is None:
        scaling = module.head_dim**-0.5
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # = transformers' repeat_kv
    value = value.repeat_interleave(groups, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    w = w + attention_mask
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)
        w = torch.cat([w, sinks], dim=-1)
        w = w - w.max(dim=-1, keepdim=True).values
        p = torch.softmax(w, dim=-1)[..., :-1]
    else:
        p = torch.softmax(w, dim=-1)
    out = torch.matmul(p.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), p


def _rmsnorm_in_dtype(module, x):
    """transformers' RMSNorm of these families without its float32 cast (``x.to(torch.float32)``; Gemma also
    ``weight.float()``), on both sides: in a float64 model the cast rounds the residual stream to fp32 before every
    norm, which makes the logits equal bit for bit whatever the attention error below ~1e-8 (the last norm rounds
    both sides alike) and leaves fp32 summation-order noise (~1e-7) in the Gemma norm weight gradients (summed in
    fp32 over this rank's tokens, then over the ranks in float64)."""
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module._rms_eps)
    return n * (1.0 + module.weight) if type(module).__name__.startswith("Gemma") else module.weight * n


def _norms_in_dtype(model: torch.nn.Module) -> None:
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m._rms_eps = m.variance_epsilon if hasattr(m, "variance_epsilon") else m.eps
            m.forward = functools.partial(_rmsnorm_in_dtype, m)


def _register_ref64() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(REF, _ref64_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(REF, eager_mask)


def _models(family: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    _register_ref64()
    kw = {"experts_implementation": "eager"} if family in MOE else {}
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(_config(family), attn_implementation=REF, **kw).to(dtype)
    model = AutoModelForCausalLM.from_config(_config(family), attn_implementation="burst", **kw).to(dtype)
    model.load_state_dict(ref.state_dict())
    for m in (ref, model):
        _norms_in_dtype(m)
    if family == "gpt_oss":  # non-zero sinks (they are initialised to zero)
        with torch.no_grad():
            for m1, m2 in zip(ref.modules(), model.modules()):
                if hasattr(m1, "sinks"):
                    m1.sinks.copy_(torch.randn(m1.sinks.shape, generator=torch.Generator().manual_seed(5)) * 2)
                    m2.sinks.copy_(m1.sinks)
    ref.eval()
    model.eval()
    return ref, model


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
        errs = {"logits": rel(full, logits.detach()), "loss": abs(float(loss) - float(ref_loss)) / float(ref_loss)}
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
    tol = TOL[FAMILIES[family]][0]
    for rank, res in enumerate(_results(sp)):
        e = res[family]
        if rank == 0:
            print(f"\nSP={sp} {family}: logits {e['logits']:.1e} loss {e['loss']:.1e} grad {e['grad']:.1e} "
                  f"({e['grad_name']}, {e['n_grads']} grads)")
        assert e["n_grads"] > 0
        assert e["logits"] < tol and e["loss"] < tol and e["grad"] < tol, f"rank {rank} SP={sp} {family}: {e}"


def test_ref64_is_eager_but_for_the_fp32_softmax():
    """The reference mirrors transformers' eager attention: in float64 it differs from eager only by eager's fp32
    softmax (~1e-7 relative; a wrong mask, scale, softcap or sink would be O(1)); GPT-OSS's eager keeps the input
    dtype, so there the two agree to rounding."""
    from transformers import AutoModelForCausalLM

    _register_ref64()
    ids = torch.randint(3, V, (2, S), generator=torch.Generator().manual_seed(1))
    for family in FAMILIES:
        kw = {"experts_implementation": "eager"} if family in MOE else {}
        torch.manual_seed(0)
        eager = AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager", **kw).double()
        ref = AutoModelForCausalLM.from_config(_config(family), attn_implementation=REF, **kw).double()
        ref.load_state_dict(eager.state_dict())
        with torch.no_grad():
            for m in eager.modules():
                if hasattr(m, "sinks"):
                    m.sinks.normal_(0, 2)
            ref.load_state_dict(eager.state_dict())
            e = rel(ref(input_ids=ids).logits, eager(input_ids=ids).logits)
        print(f"\nref64 vs eager, float64, {family}: logits {e:.1e}")
        assert e < (1e-12 if family == "gpt_oss" else 1e-5), (family, e)


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
    one_doc = {"cu_seq_lens_q": torch.tensor([0, 8]), "cu_seq_lens_k": torch.tensor([0, 8]), "max_length_q": 8,
               "max_length_k": 8}  # packed documents: applied (here one document, the whole sequence)
    out, _ = bhf.burst_attention_forward(M(), q, k, v, None, scaling=0.3, position_ids=pos, **one_doc)
    assert torch.equal(out, base)
    two_docs = {"cu_seq_lens_q": torch.tensor([0, 3, 8]), "cu_seq_lens_k": torch.tensor([0, 3, 8])}
    out, _ = bhf.burst_attention_forward(M(), q, k, v, None, scaling=0.3, position_ids=pos, **two_docs)
    assert (out - base).abs().max() > 1e-6, "cu_seq_lens_q/k were not applied"
    with pytest.raises(ValueError, match="differ"):
        bhf.burst_attention_forward(M(), q, k, v, None, scaling=0.3, position_ids=pos,
                                    cu_seq_lens_q=torch.tensor([0, 3, 8]), cu_seq_lens_k=torch.tensor([0, 4, 8]))
    refused = {"dropout": 0.1, "output_attentions": True, "made_up": 1}
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
