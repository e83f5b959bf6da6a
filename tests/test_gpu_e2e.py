"""One GPU, end to end: the documented user paths in bf16 on CUDA at world size 1, against float64 references.

1. Hugging Face models (Llama, Qwen3, Mistral with a sliding window, Gemma2 with logit softcapping, GPT-OSS with
   attention sinks, DeepSeek-V3 with MLA: tiny configs, random weights) with ``attn_implementation="burst"``,
   forward and backward over packed documents given three ways (``position_ids`` restarting at 0 alone,
   ``cu_seq_lens_q/_k`` as device tensors, as Python lists) and through ``ds_burst.hf.shard_batch`` on device
   tensors, against each document run alone through the same weights in float64 (``ref64``: transformers' eager
   attention with the softmax and RMSNorm in float64, from tests/test_model_families.py). A control run that ignores
   the documents (one document over the whole row) must miss the reference by far more than the tolerance.
2. The HF ``Trainer`` (``DataCollatorWithFlattening``) and TRL's ``SFTTrainer`` (``packing=True``, padding-free)
   under ZeRO-3 with ``ds_burst.patch_deepspeed()`` (examples/hf_trainer_sp.py, one process): the per-step losses of
   ``attn_implementation="burst"`` against the same run with transformers' sdpa (its block-diagonal packed mask).
3. launch/train.py: run by launch/gpu_session.sh (stage ``e2e``), not here.
4. ``ds_burst.DistributedAttention`` and ``deepspeed.sequence.layer.DistributedAttention`` after
   ``ds_burst.patch_deepspeed()``: ``rotary_pos_emb`` in DeepSpeed's convention, ``batch_dim_idx`` 0 and 1.
5. ``torch.compile`` (default, ``fullgraph=True``, ``mode="reduce-overhead"``) of a tiny HF Llama with packed
   documents as lists, against eager and float64; under CUDA graphs, documents given as tensors are refused with
   ds-burst's own ``ValueError``.

Every GPU test is marked ``gpu`` and skipped without CUDA. The helpers take the device and dtype, so the same code
runs on the CPU in float32 (the ``*_cpu_dry_run`` tests below, a few seconds) to debug the harness.

Tolerances (bf16, relative norms ``|x - ref| / |ref|`` of the whole tensor, gradients per parameter or input):
``TOL`` below. Measured values are printed and, with ``DS_BURST_E2E_JSON=path``, written to that JSON file (a
record per test) for launch/gpu_session.sh's summary. ``DS_BURST_E2E_SEED`` changes every random draw.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kernel_utils import rel

pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
SEED = int(os.environ.get("DS_BURST_E2E_SEED", "0"))

# bf16 tolerances (GPU), relative norms. The HF models: (floor, ratio, cap): the error may reach
# max(floor, ratio * the error of transformers' own eager attention in bf16 on the same weights, documents run one at
# a time), never more than cap; gradients: every parameter on its own. "leak": the least error the no-documents
# control must show (the test can fail). The rest: plain bounds.
TOL: dict[str, Any] = {
    "logits": (1e-2, 2.0, 5e-2),  # HF model logits
    "grad": (3e-2, 3.0, 1.0),  # every parameter gradient of the HF models (sums over tokens cancel: GPT-OSS sinks)
    "loss": (1e-3, 2.0, 1e-2),  # shard_batch + sequence_parallel_loss
    "leak": 0.1,
    "attn_out": 2e-2,  # DistributedAttention output
    "attn_grad": 3e-2,  # DistributedAttention dq, dk, dv
    "trainer": 1e-4,  # per-step loss, burst vs sdpa, fp32 training (documents ignored: > 1e-3)
}
# the same harness on the CPU in float32 (dry runs): float32 rounding only
TOL_FP32: dict[str, Any] = {"logits": (1e-5, 10.0, 1e-4), "grad": (1e-4, 10.0, 1e-3), "loss": (1e-6, 10.0, 1e-5),
                            "leak": 0.1, "attn_out": 1e-5, "attn_grad": 1e-5}

FAMILIES = ["llama", "qwen3", "mistral", "gemma2", "gpt_oss", "deepseek_v3"]
MODES = ["positions", "cu_tensor", "cu_list", "shard_batch"]
# Model and packed-row sizes: "gpu" for the GPU tests, "cpu" (smaller) for the CPU dry runs. docs: packed
# document lengths (a 1-token document; several longer than the sliding window of Mistral, Gemma2 and GPT-OSS).
SIZES = {
    "gpu": {"hidden": 256, "head_dim": 64, "vocab": 512, "docs": [61, 1, 130, 96, 32], "window": 48,
            "compile_docs": [77, 3, 100, 76]},
    "cpu": {"hidden": 64, "head_dim": 16, "vocab": 128, "docs": [13, 1, 30, 20], "window": 8,
            "compile_docs": [17, 3, 20, 8]},
}


def _record(key: str, **values: Any) -> None:
    """Print ``values`` and keep them under ``key`` in the JSON file named by ``DS_BURST_E2E_JSON``."""
    print(f"\n[e2e] {key}: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in values.items()))
    path = os.environ.get("DS_BURST_E2E_JSON")
    if not path:
        return
    data: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.setdefault("seed", SEED)
    data.setdefault("tol", TOL)
    data.setdefault("tests", {})[key] = values
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _check_and_record(key: str, res: dict[str, Any], check: Callable[[dict[str, Any]], None]) -> None:
    """Run ``check(res)``; record ``res`` with ``ok`` (whether it passed) either way."""
    try:
        check(res)
    except AssertionError:
        _record(key, ok=False, **res)
        raise
    _record(key, ok=True, **res)


def _cu(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _positions(lengths: list[int], device: torch.device | str) -> torch.Tensor:
    return torch.cat([torch.arange(n, device=device) for n in lengths])[None]


# ---------------------------------------------------------------------------------------------
# 1. Hugging Face models with attn_implementation="burst", packed documents


def family_config(family: str, size: str = "gpu") -> Any:
    """A tiny config of ``family`` (2 layers; "gpu" size: hidden 256, head dim 64; DeepSeek-V3: MLA, q/k head dim
    3/4 of it, value head dim 1/2).
    ``initializer_range=0.1`` keeps attention far from uniform, so a wrong mask or score shows; GPT-OSS runs both
    of its 2 experts on every token so that bf16 rounding cannot flip a top-k routing choice."""
    import transformers as tf

    z = SIZES[size]
    hd, window = z["head_dim"], z["window"]
    common = dict(vocab_size=z["vocab"], hidden_size=z["hidden"], intermediate_size=2 * z["hidden"],
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hd,
                  max_position_embeddings=1024,
                  attention_dropout=0.0, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=window)
    if family == "gemma2":
        return tf.Gemma2Config(**common, attn_logit_softcapping=5.0, final_logit_softcapping=None,
                               sliding_window=window, query_pre_attn_scalar=hd)
    if family == "gpt_oss":
        return tf.GptOssConfig(**common, num_local_experts=2, num_experts_per_tok=2, sliding_window=window)
    if family == "deepseek_v3":
        common.update(num_key_value_heads=4, head_dim=hd // 4)  # MLA: a K/V head per query head; rope dim
        return tf.DeepseekV3Config(**common, q_lora_rank=None, kv_lora_rank=hd, qk_nope_head_dim=hd // 2,
                                   qk_rope_head_dim=hd // 4, v_head_dim=hd // 2, n_routed_experts=4,
                                   num_experts_per_tok=2, first_k_dense_replace=2, n_group=1, topk_group=1,
                                   moe_intermediate_size=hd)
    raise ValueError(family)


def family_models(family: str, device: str, dtype: torch.dtype, size: str = "gpu") -> dict[str, torch.nn.Module]:
    """``{"burst": model, "base": ..., "ref": ...}``: the user's model (``attn_implementation="burst"``, built in
    ``dtype``, transformers' own RMSNorm); the baseline, the same model with transformers' eager attention (what
    transformers itself computes in ``dtype``); the float64 ``ref64`` model. All three hold the same weights (the
    model's, rounded to ``dtype``) and buffers."""
    from test_model_families import REF, _norms_in_dtype, _register_ref64
    from transformers import AutoModelForCausalLM

    import ds_burst.hf as bhf

    bhf.setup(1)  # one process: registers attn_implementation="burst"
    _register_ref64()
    kw = {"experts_implementation": "eager"} if family == "gpt_oss" else {}
    torch.manual_seed(SEED + FAMILIES.index(family))
    model = AutoModelForCausalLM.from_config(family_config(family, size), attn_implementation="burst", dtype=dtype,
                                             **kw).to(device)
    if family == "gpt_oss":  # non-zero attention sinks (initialised to zero)
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "sinks"):
                    m.sinks.copy_(torch.randn(m.sinks.shape, generator=torch.Generator().manual_seed(SEED + 5)))
    out = {"burst": model}
    for name, attn, dt in (("base", "eager", dtype), ("ref", REF, torch.float64)):
        other = AutoModelForCausalLM.from_config(family_config(family, size), attn_implementation=attn, dtype=dt,
                                                 **kw).to(device)
        other.load_state_dict(model.state_dict())
        with torch.no_grad():  # the rotary tables etc. (not in the state dict) exactly as the model has them
            for (bn, b), (on, ob) in zip(model.named_buffers(), other.named_buffers()):
                assert bn == on, (bn, on)
                ob.copy_(b)
        out[name] = other
    _norms_in_dtype(out["ref"])
    return out


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def _grad_errors(got: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """Relative error of every parameter gradient that the reference has (a parameter without a reference gradient,
    or with a zero one, must have none or zero)."""
    errs = {}
    for name, r in ref.items():
        g = got[name]
        if r is None or float(r.abs().max()) == 0.0:
            assert g is None or float(g.abs().max()) == 0.0, f"{name}: a gradient where the reference has none"
            continue
        assert g is not None, f"{name}: no gradient"
        errs[name] = rel(g, r)
    return errs


def _per_document(model: torch.nn.Module, ids: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """Logits of each document run alone (default positions 0..n-1), concatenated."""
    return torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits for a, b in zip(cu, cu[1:])], 1)


def _objectives(model: torch.nn.Module, ids: torch.Tensor, cu: list[int], dout: torch.Tensor, shift: torch.Tensor
                ) -> dict[str, Any]:
    """Per-document logits, the gradients of ``sum(logits * dout)``, the mean cross-entropy over ``shift`` and its
    gradients (in float64 for the float64 model, else float32)."""
    acc = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    model.zero_grad(set_to_none=True)
    logits = _per_document(model, ids, cu)
    (logits.to(acc) * dout.to(acc)).sum().backward()
    res = {"logits": logits.detach(), "grads_dout": _grads(model)}
    model.zero_grad(set_to_none=True)
    logits = _per_document(model, ids, cu).to(acc)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1))
    loss.backward()
    res.update(loss=float(loss.detach()), grads_loss=_grads(model))
    model.zero_grad(set_to_none=True)
    return res


@functools.cache
def family_reference(family: str, device: str, dtype: torch.dtype, size: str = "gpu") -> dict[str, Any]:
    """The models and inputs of one family, the float64 per-document reference (``ref``: logits, the gradients of
    ``sum(logits * dout)``, the mean cross-entropy over ``shift_labels`` and its gradients) and the errors of
    transformers' own eager attention in ``dtype`` against it (``base``), documents run one at a time."""
    models = family_models(family, device, dtype, size)
    docs, vocab = SIZES[size]["docs"], SIZES[size]["vocab"]
    s, cu = sum(docs), _cu(docs)
    g = torch.Generator().manual_seed(SEED + 100 + FAMILIES.index(family))
    ids = torch.randint(3, vocab, (1, s), generator=g).to(device)
    dout = torch.randn(1, s, vocab, generator=g, dtype=torch.float64).to(device)
    shift = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)  # shard_batch's labels -> shift_labels
    ref = _objectives(models["ref"], ids, cu, dout, shift)
    base = _objectives(models["base"], ids, cu, dout, shift)
    base_err = {"logits": rel(base["logits"], ref["logits"]), "loss": abs(base["loss"] - ref["loss"]) / ref["loss"],
                "grads_dout": _grad_errors(base["grads_dout"], ref["grads_dout"]),
                "grads_loss": _grad_errors(base["grads_loss"], ref["grads_loss"])}
    return {"model": models["burst"], "ids": ids, "dout": dout, "cu": cu, "shift": shift, "ref": ref,
            "base": base_err}


def run_family(family: str, mode: str, device: str, dtype: torch.dtype, size: str = "gpu") -> dict[str, Any]:
    """Forward + backward of ``family``'s burst model on the packed row, documents given as ``mode``; returns the
    errors against the float64 reference, transformers' own (``base_*``), and, for ``positions``, the error of the
    no-documents control (``leak``)."""
    import ds_burst.hf as bhf

    r = family_reference(family, device, dtype, size)
    model, ids, cu, ref, base = r["model"], r["ids"], r["cu"], r["ref"], r["base"]
    docs = SIZES[size]["docs"]
    pos = _positions(docs, device)
    res: dict[str, Any] = {}
    model.zero_grad(set_to_none=True)
    if mode == "shard_batch":
        batch = bhf.shard_batch({"input_ids": ids, "labels": ids, "position_ids": pos})
        assert batch["cu_seq_lens_q"] == cu and batch["cu_seq_lens_k"] == cu, batch
        for key in ("input_ids", "position_ids", "shift_labels"):
            assert batch[key].device == ids.device, (key, batch[key].device)
        assert torch.equal(batch["shift_labels"], r["shift"]) and torch.equal(batch["position_ids"], pos)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"]).logits
        loss = bhf.sequence_parallel_loss(logits, batch["shift_labels"], None)
        loss.backward()
        res.update(loss=abs(float(loss.detach()) - ref["loss"]) / ref["loss"], base_loss=base["loss"])
        grads, base_grads = _grad_errors(_grads(model), ref["grads_loss"]), base["grads_loss"]
    else:
        kw: dict[str, Any] = {"position_ids": pos}
        if mode != "positions":
            cu_arg: Any = torch.tensor(cu, dtype=torch.int32, device=device) if mode == "cu_tensor" else list(cu)
            kw.update(cu_seq_lens_q=cu_arg, cu_seq_lens_k=cu_arg, max_length_q=max(docs), max_length_k=max(docs))
        logits = model(input_ids=ids, **kw).logits
        (logits.float() * r["dout"].float()).sum().backward()
        res.update(logits=rel(logits, ref["logits"]), base_logits=base["logits"])
        grads, base_grads = _grad_errors(_grads(model), ref["grads_dout"]), base["grads_dout"]
        if mode == "positions":  # control: the same positions, one document over the whole row
            with torch.no_grad():
                one = [0, ids.shape[1]]
                leak = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=one, cu_seq_lens_k=one).logits
            res["leak"] = rel(leak, ref["logits"])
    model.zero_grad(set_to_none=True)
    assert set(grads) == set(base_grads), (sorted(grads), sorted(base_grads))
    worst = max(grads, key=grads.get)  # the worst gradient, and the one furthest above transformers' own error
    over = max(grads, key=lambda n: grads[n] / max(base_grads[n], 1e-30))
    res.update(grad=grads[worst], base_grad=base_grads[worst], grad_name=worst, n_grads=len(grads),
               grad_over=over, grad_over_err=grads[over], grad_over_base=base_grads[over])
    return res


def _bound(tol: dict[str, Any], key: str, base: float) -> float:
    """What an error may reach: ``max(floor, ratio * transformers' own error)``, at most ``cap``."""
    floor, ratio, cap = tol[key]
    return min(cap, max(floor, ratio * base))


def check_family(res: dict[str, Any], tol: dict[str, Any]) -> None:
    assert res["n_grads"] > 0, res
    assert res["grad_over_err"] <= _bound(tol, "grad", res["grad_over_base"]), res  # every parameter
    for key in ("logits", "loss"):
        if key in res:
            assert res[key] <= _bound(tol, key, res[f"base_{key}"]), res
    if "leak" in res:  # the comparison can fail: documents ignored are far outside the tolerance
        assert res["leak"] > max(tol["leak"], 5 * tol["logits"][2]), res


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_hf_family_packed_bf16_gpu(family: str, mode: str):
    res = run_family(family, mode, "cuda", torch.bfloat16)
    _check_and_record(f"hf/{family}/{mode}", res, lambda r: check_family(r, TOL))


def test_hf_families_cpu_dry_run():
    """The harness of the GPU test above on the CPU in float32 (every family, every way of giving documents)."""
    worst: dict[str, float] = {}
    for family in FAMILIES:
        for mode in MODES:
            res = run_family(family, mode, "cpu", torch.float32, "cpu")
            check_family(res, TOL_FP32)
            for k in ("logits", "grad", "loss", "base_logits", "base_grad", "base_loss"):
                if k in res:
                    worst[k] = max(worst.get(k, 0.0), res[k])
            if "leak" in res:
                worst["leak_min"] = min(worst.get("leak_min", 1e9), res["leak"])
    family_reference.cache_clear()
    _record("cpu_dry_run/hf_families_fp32", **worst)


# ---------------------------------------------------------------------------------------------
# 2. HF Trainer / TRL SFTTrainer through patch_deepspeed(), burst against sdpa (examples/hf_trainer_sp.py)

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "hf_trainer_sp.py")
TRAINER_STEPS = 4


def run_examples(runs: dict[str, list[str]], tmp_dir: str, timeout: float = 300.0) -> dict[str, dict[str, Any]]:
    """examples/hf_trainer_sp.py under torchrun with one process, one run per entry of ``runs`` (name -> arguments),
    all at once (they share the GPU; each is tiny); returns each run's JSON result."""
    from launch_utils import free_port

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    procs = {}
    for name, args in runs.items():
        out = os.path.join(tmp_dir, f"{name}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(free_port()), EXAMPLE, *args, "--steps", str(TRAINER_STEPS), "--out", out, "--output-dir",
               os.path.join(tmp_dir, f"trainer_{name}")]
        log = open(os.path.join(tmp_dir, f"{name}.log"), "w")  # closed after the run
        procs[name] = (subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(EXAMPLE)), env=env, stdout=log,
                                        stderr=subprocess.STDOUT, text=True), log, cmd, out)
    results, failures = {}, []
    for name, (proc, log, cmd, out) in procs.items():
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        with open(log.name) as f:
            text = f.read()
        if rc != 0 or not os.path.exists(out):
            failures.append(f"{name}: exit code {rc}: {' '.join(cmd)}\n{text[-5000:]}")
            continue
        with open(out) as f:
            results[name] = json.load(f)
    assert not failures, "\n".join(failures)
    return results


def compare_trainers(trainer: str, tmp_dir: str) -> dict[str, Any]:
    """Packed training with ``attn_implementation="burst"`` and with sdpa (fp32, ZeRO-3, ``patch_deepspeed()``):
    the worst relative per-step loss difference. The HF Trainer's collator gives the documents as ``position_ids``
    alone, TRL's as ``position_ids`` and ``cu_seq_lens_q/_k`` tensors (and ``seq_idx``)."""
    extra = ["--trainer", trainer, "--packing"]
    res = run_examples({attn: [*extra, "--attn", attn] for attn in ("burst", "sdpa")}, tmp_dir)
    burst, sdpa = res["burst"], res["sdpa"]
    assert burst["attn_implementation"] == "burst" and sdpa["attn_implementation"] == "sdpa", (burst, sdpa)
    assert len(burst["losses"]) == len(sdpa["losses"]) == TRAINER_STEPS, (burst, sdpa)
    diff = max(abs(a - b) / abs(b) for a, b in zip(burst["losses"], sdpa["losses"]))
    return {"loss_diff": diff, "burst": burst["losses"], "sdpa": sdpa["losses"], "device": burst["device"]}


def check_trainers(res: dict[str, Any]) -> None:
    assert res["device"].startswith("cuda"), res
    assert all(math.isfinite(x) for x in res["burst"] + res["sdpa"]), res
    assert res["loss_diff"] < TOL["trainer"], res


@pytest.mark.parametrize("trainer", ["hf", "trl"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.timeout(600)
def test_trainer_packed_burst_matches_sdpa_gpu(trainer: str, tmp_path):
    pytest.importorskip("deepspeed")
    if trainer == "trl":
        pytest.importorskip("trl")
    _check_and_record(f"trainer/{trainer}", compare_trainers(trainer, str(tmp_path)), check_trainers)


# ---------------------------------------------------------------------------------------------
# 4. DistributedAttention (the Megatron-DeepSpeed drop-in) with DeepSpeed's rotary_pos_emb


class LocalAttention(torch.nn.Module):
    """What a Megatron-style model hands to DistributedAttention: only its attributes are read by ds-burst."""

    def __init__(self, causal: bool, softmax_scale: float | None, window_size: tuple[int, int] | None) -> None:
        super().__init__()
        self.causal, self.softmax_scale, self.window_size = causal, softmax_scale, window_size

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("ds-burst must not call the local attention")


def _rotate_half_tables(seq: int, rot: int, batch_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-sequence cos/sin (float64) as DeepSpeed's DistributedAttention takes them: it permutes ``(1, 0, 2, 3)``
    and broadcasts over ``[b, s, h, d]`` (``batch_dim_idx=0``) or ``[s, b, h, d]`` (``1``)."""
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64, device=device) / rot))
    ang = torch.arange(seq, dtype=torch.float64, device=device)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    shape = (seq, 1, 1, rot) if batch_dim == 0 else (1, seq, 1, rot)
    return ang.cos().reshape(shape), ang.sin().reshape(shape)


def _rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``rot`` channels of ``x [b, s, h, d]``; ``cos/sin [s, rot]``."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    c, s = cos[None, :, None], sin[None, :, None]
    return torch.cat([xr * c + torch.cat([-x2, x1], -1) * s, xp], -1)


def _attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                 window: tuple[int, int]) -> torch.Tensor:
    """Exact attention ``[b, s, h, d]`` (GQA by repeating K/V heads), flash-attn ``window`` ``(left, right)``."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    n = q.shape[1]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None]
    ok = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        ok &= j <= i
    if window[0] >= 0:
        ok &= j >= i - window[0]
    if window[1] >= 0:
        ok &= j <= i + window[1]
    return torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~ok, float("-inf")).softmax(-1), v)


LAYER_CASES = {  # name: (batch_dim, causal, softmax_scale, window_size, rotary channels of the head dim 128)
    "b0_causal_gqa_rope": (0, True, None, None, 128),
    "b1_window_partial_rope": (1, True, 0.07, (200, 0), 64),
    "b1_full_rope": (1, False, None, None, 128),
}


def run_layer(case: str, patched: bool, device: str, dtype: torch.dtype, seq: int = 1024) -> dict[str, float]:
    """One DistributedAttention call (group: the single process) and its backward against float64."""
    import ds_burst

    batch_dim, causal, scale, window, rot = LAYER_CASES[case]
    b, hq, hkv, d = 2, 8, 2, 128
    g = torch.Generator().manual_seed(SEED + 200 + list(LAYER_CASES).index(case) + 10 * patched)
    q, k, v, do = (torch.randn(b, seq, h, d, generator=g, dtype=torch.float64).to(device) for h in (hq, hkv, hkv, hq))
    cos, sin = _rotate_half_tables(seq, rot, batch_dim, device)
    local = LocalAttention(causal, scale, window)
    if patched:
        import deepspeed.sequence.layer as ds_layer

        ds_burst.patch_deepspeed()
        try:
            assert ds_layer.DistributedAttention is ds_burst.DistributedAttention
            layer = ds_layer.DistributedAttention(local, None)
        finally:
            ds_burst.unpatch_deepspeed()
    else:
        layer = ds_burst.DistributedAttention(local, None)
    to_layout = (lambda x: x) if batch_dim == 0 else (lambda x: x.transpose(0, 1))
    xs = [to_layout(x).to(dtype).contiguous().requires_grad_() for x in (q, k, v)]
    out = layer(*xs, batch_dim, (cos.float(), sin.float()))  # fp32 tables, as Megatron-style models keep them
    out.backward(to_layout(do).to(dtype))
    got = [to_layout(t.detach()) for t in (out, *(x.grad for x in xs))]
    rq, rk, rv = (x.clone().requires_grad_() for x in (q, k, v))
    c2, s2 = cos.reshape(seq, rot), sin.reshape(seq, rot)
    ref = _attention64(_rope64(rq, c2, s2), _rope64(rk, c2, s2), rv, causal, scale or d**-0.5, window or (-1, -1))
    ref.backward(do)
    names = ["out", "dq", "dk", "dv"]
    return {n: rel(a, r) for n, a, r in zip(names, got, [ref.detach(), rq.grad, rk.grad, rv.grad])}


def check_layer(res: dict[str, float], tol: dict[str, float]) -> None:
    assert res["out"] < tol["attn_out"], res
    assert max(res["dq"], res["dk"], res["dv"]) < tol["attn_grad"], res


@pytest.mark.parametrize("patched", [False, True], ids=["ds_burst", "deepspeed_patched"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_distributed_attention_bf16_gpu(case: str, patched: bool):
    if patched:
        pytest.importorskip("deepspeed")
    res = run_layer(case, patched, "cuda", torch.bfloat16)
    _check_and_record(f"layer/{case}/{'patched' if patched else 'ds_burst'}", res, lambda r: check_layer(r, TOL))


def test_distributed_attention_cpu_dry_run():
    pytest.importorskip("deepspeed")
    for case in LAYER_CASES:
        for patched in (False, True):
            check_layer(run_layer(case, patched, "cpu", torch.float32, seq=96), TOL_FP32)


# ---------------------------------------------------------------------------------------------
# 5. torch.compile of a tiny HF Llama with packed documents (lists)

def _compile_model(device: str, dtype: torch.dtype, size: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama with ``attn_implementation="burst"`` in ``dtype`` and its float64 ``ref64`` twin."""
    from test_model_families import REF, _norms_in_dtype, _register_ref64
    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_burst.hf as bhf

    bhf.setup(1)
    _register_ref64()
    z = SIZES[size]
    cfg = dict(vocab_size=z["vocab"], hidden_size=z["hidden"], intermediate_size=2 * z["hidden"], num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=z["head_dim"], max_position_embeddings=1024,
               attention_dropout=0.0, initializer_range=0.1)
    torch.manual_seed(SEED + 300)
    model = LlamaForCausalLM._from_config(LlamaConfig(**cfg), attn_implementation="burst", dtype=dtype).to(device)
    ref = LlamaForCausalLM._from_config(LlamaConfig(**cfg), attn_implementation=REF, dtype=torch.float64).to(device)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for (name, b), (ref_name, rb) in zip(model.named_buffers(), ref.named_buffers()):
            assert name == ref_name, (name, ref_name)
            rb.copy_(b)
    _norms_in_dtype(ref)
    return model, ref


def _step(forward: Callable[[], torch.Tensor], model: torch.nn.Module, dout: torch.Tensor
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """One forward + backward of ``sum(logits * dout)`` (in ``dout``'s dtype); returns the logits and every
    gradient, cloned (CUDA graph outputs are overwritten by the next replay)."""
    model.zero_grad(set_to_none=True)
    logits = forward()
    (logits.to(dout.dtype) * dout).sum().backward()
    return logits.detach().clone(), _grads(model)


def run_compile(device: str, dtype: torch.dtype, modes: tuple[str, ...], size: str = "gpu") -> dict[str, Any]:
    """Eager, then each compile mode, on the same packed row (documents: ``cu_seq_lens_q/_k`` lists and restarting
    ``position_ids``): errors against the float64 per-document reference (with eager's own as the baseline, per
    parameter for the gradients) and against eager, and the graph breaks."""
    from torch._dynamo.utils import counters

    model, ref = _compile_model(device, dtype, size)
    docs, vocab = SIZES[size]["compile_docs"], SIZES[size]["vocab"]
    s, cu = sum(docs), _cu(docs)
    g = torch.Generator().manual_seed(SEED + 301)
    ids = torch.randint(3, vocab, (1, s), generator=g).to(device)
    dout = torch.randn(1, s, vocab, generator=g).to(device)
    kw = {"position_ids": _positions(docs, device), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    ref_logits, ref_grads = _step(lambda: _per_document(ref, ids, cu), ref, dout.double())
    eager_logits, eager_grads = _step(lambda: model(input_ids=ids, **kw).logits, model, dout)
    eager_err = _grad_errors(eager_grads, ref_grads)
    res: dict[str, Any] = {"eager_logits": rel(eager_logits, ref_logits), "eager_grad": max(eager_err.values())}
    for mode in modes:
        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(model, fullgraph=True) if mode == "fullgraph" else \
            torch.compile(model, mode="reduce-overhead") if mode == "reduce-overhead" else torch.compile(model)
        runs = 3 if mode == "reduce-overhead" else 1  # warm-up, recording, replay of the CUDA graph
        for _ in range(runs):
            torch.compiler.cudagraph_mark_step_begin()
            logits, grads = _step(lambda f=fn: f(input_ids=ids, **kw).logits, model, dout)
        err = _grad_errors(grads, ref_grads)
        over = max(err, key=lambda n: err[n] / max(eager_err[n], 1e-30))  # furthest above eager's own error
        res.update({f"{mode}_logits": rel(logits, ref_logits), f"{mode}_grad": max(err.values()),
                    f"{mode}_grad_over": over, f"{mode}_grad_over_err": err[over],
                    f"{mode}_grad_over_eager": eager_err[over],
                    f"{mode}_vs_eager_logits": rel(logits, eager_logits),
                    f"{mode}_vs_eager_grad": max(rel(grads[n], eager_grads[n]) for n in err),
                    f"{mode}_graph_breaks": int(sum(counters["graph_break"].values()))})
    torch._dynamo.reset()
    return res


def check_compile(res: dict[str, Any], tol: dict[str, Any], modes: tuple[str, ...]) -> None:
    """Eager within the caps; each compiled mode within ``max(floor, ratio * eager's error)`` of the float64
    reference (logits, every parameter gradient); fullgraph without graph breaks."""
    assert res["eager_logits"] < tol["logits"][2] and res["eager_grad"] < tol["grad"][2], res
    for mode in modes:
        assert res[f"{mode}_logits"] <= _bound(tol, "logits", res["eager_logits"]), (mode, res)
        assert res[f"{mode}_grad_over_err"] <= _bound(tol, "grad", res[f"{mode}_grad_over_eager"]), (mode, res)
    if "fullgraph" in modes:
        assert res["fullgraph_graph_breaks"] == 0, res


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.timeout(600)
def test_compile_hf_llama_packed_lists_bf16_gpu():
    modes = ("default", "fullgraph", "reduce-overhead")
    res = run_compile("cuda", torch.bfloat16, modes)
    _check_and_record("compile/llama", res, lambda r: check_compile(r, TOL, modes))


def run_graph_refusal(device: str, size: str = "gpu") -> str:
    """Under ``mode="reduce-overhead"``, documents given as a tensor: ds-burst's ValueError (when the CUDA graph is
    recorded, the second call), never a silently frozen graph; returns ``"<exception type>: <message>"`` or
    ``"no error"``."""
    model, _ = _compile_model(device, torch.bfloat16, size)
    docs = SIZES[size]["compile_docs"]
    s, cu = sum(docs), _cu(docs)
    ids = torch.randint(3, SIZES[size]["vocab"], (1, s), generator=torch.Generator().manual_seed(SEED + 302)).to(device)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    torch._dynamo.reset()
    fn = torch.compile(model, mode="reduce-overhead")
    try:
        for _ in range(3):  # warm-up, recording (refused here), replay
            torch.compiler.cudagraph_mark_step_begin()
            fn(input_ids=ids, position_ids=_positions(docs, device), cu_seq_lens_q=cu_t,
               cu_seq_lens_k=cu_t).logits.float().sum().backward()
    except Exception as exc:  # noqa: BLE001 - the type is part of the answer
        return f"{type(exc).__name__}: {exc}"
    finally:
        torch._dynamo.reset()
    return "no error"


def check_refusal(res: dict[str, Any]) -> None:
    msg = res["message"]
    assert msg.startswith("ValueError") and "inside a CUDA graph" in msg and "frozen at capture" in msg, msg


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.timeout(600)
def test_cuda_graph_refuses_tensor_documents_gpu():
    """Last in the module: a refused CUDA graph recording may leave the graph trees' state behind."""
    _check_and_record("compile/reduce_overhead_tensor_refusal", {"message": run_graph_refusal("cuda")[:300]},
                      check_refusal)
