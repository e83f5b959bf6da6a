"""Memory on one GPU: DeepSpeed ALST (as DeepSpeed ships it) against ds-burst, same Hugging Face Llama model.

    python launch/bench_alst_memory.py --model llama-3.2-3b --seqs 8K 16K 32K --steps 3 \\
        --out results/alst_memory.json

Both methods train the same ``transformers`` ``LlamaForCausalLM`` (random weights, one sequence of random
tokens per step) under DeepSpeed ZeRO-3 with the optimizer offloaded to host memory, with activation
checkpointing (``use_reentrant=False``), at sequence-parallel size 1:

* ``alst``: DeepSpeed's own ALST pieces (``deepspeed/runtime/sequence_parallel/ulysses_sp.py``, the
  "Ulysses / ALST" tutorial): every ``LlamaMLP.forward`` runs through ``TiledMLP`` with the tutorial's shard
  count ``ceil(S / hidden)``; the loss runs through ``TiledFusedLogitsLoss`` (``output_reduction="sum"``,
  divided by the number of labelled tokens, as in the tutorial) over ``ceil(S * vocab * 4 B / 1 GiB)`` shards
  (ArcticTraining's 1 GiB-of-fp32-logits slices); checkpointed layer inputs go to host memory through
  ``deepspeed.runtime.activation_checkpointing.offload_activations.get_checkpoint_hidden_states_offloading_ctx_manager``
  (wrapping forward and backward of each step, as documented). Attention is transformers' ``sdpa``: at SP=1
  Ulysses' all-to-all is the identity, so ``UlyssesSPAttentionHF`` (which wraps the ``sdpa`` core) is not
  registered. Not shipped by DeepSpeed and therefore not used: Liger-Kernel (a separate package; the tutorial
  names ``TiledFusedLogitsLoss`` as DeepSpeed's replacement) and ArcticTraining's reentrant-checkpoint CPU offload
  monkey patch. ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (the tutorial's last item) is set for both
  methods.
* ``alst-offloaded``: ``alst`` with the checkpointed layer inputs moved to host memory by ds-burst's offload
  (the adapter below) instead of DeepSpeed's context. Under ZeRO-3 DeepSpeed's context offloads nothing: it
  marks the tensor ``GradientCheckpointingLayer.__call__`` receives and offloads it when a saved tensor is that
  same object, but ZeRO-3's forward pre-hook hands the layer a new tensor (the output of its
  ``PostBackwardFunctionModule``), so the mark is never matched (its counters on CPU and GPU: every layer
  marked, ``skipped_marked_tensors`` and ``offloaded_tensors`` 0; ``ckpt_stats`` in each row). This variant
  separates what the offload is worth from the rest of the comparison.
* ``ds-burst``: ds-burst's attention (``ds_burst.hf.setup(1)``, ``attn_implementation="burst"``), its MLP tiles
  (``ds_burst.training.memory.tiled_mlp``, the same tile count), its chunked LM head and loss
  (``chunked_lm_head_loss``, the same chunk length), and its offload of checkpointed layer inputs
  (``ds_burst.attention.selective.ActivationOffload`` / ``region``, the machinery of ``BurstLlama``'s
  ``offload_checkpoints``, attached here to the HF decoder layers' checkpoint function by
  :func:`burst_checkpoint_offload`, a small adapter: ds-burst ships that offload for its own model only). ds-burst
  offloads only the inputs of the first ``k`` layers, ``k`` chosen per length by :func:`offload_plan`
  (``ds_burst.training.estimate.plan_offload``: the fewest layers with which the estimate fits the GPU, the card's
  memory less :data:`MARGIN_FRACTION`, and the host, ``MemTotal`` of ``/proc/meminfo``, holding the offloaded inputs,
  the optimizer states and ``--host-fixed-gib`` of the process's own); all ``L`` when nothing fits, and on CPU, where
  there is no GPU memory to balance; ``--offload-layers K`` fixes ``k``. ``alst-offloaded`` offloads every layer,
  as DeepSpeed's context would.

Tied embeddings: Llama-3.2-3B ties the LM head to the embedding; the presets untie them (0.39B more parameters,
0.73 GiB more in bf16, in both methods' fixed part). ``TiledFusedLogitsLoss`` runs the LM head's backward inside
the forward, so under ZeRO-3 the tied weight gets two gradient contributions that DeepSpeed reduces separately:
with the tutorial's ``compute_params=[lm_head.weight]`` the tiny model stops at ZeRO-3's duplicate-parameter
assertion in ``__reduce_and_partition_ipg_grads``; holding ``ds_grad_is_ready`` until the embedding's backward
ran, but then the step-2 loss differed from the plain model's (5.49929 against 5.49751, fp32, tiny model), so a
part of the gradient was lost. ds-burst's chunked loss with the same hold matched the plain model. Untied, both
methods match the plain model (the check in ``tests/test_bench_alst_memory.py``).

Both use the same optimizer: ``torch`` AdamW over the fp32 states in host memory (``"torch_adam": true``,
``"zero_force_ds_cpu_optimizer": false``), since DeepSpeed's CPUAdam op needs a compiler at run time.

Each (method, S) runs as its own process (``--worker``; a fresh process, so an out-of-memory run does not disturb
the next) with a wall-clock limit (``--timeout``), a one-rank process group on a free port (nccl on GPU, gloo on
CPU). ``--in-process`` runs them in this process instead (the CPU test). Measured per run: peak GPU memory
(``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the whole run; null on CPU), peak host RSS
(``getrusage``), mean step time of the steps after the first, tokens/s, TFLOP/s and MFU, and the bytes of
checkpointed layer inputs moved to host memory (``ckpt_offloaded_bytes``: ``alst``: DeepSpeed's count of the last
step, which is 0 on CPU, where DeepSpeed's offload skips tensors that are not on an accelerator; ``ckpt_marked``:
the layer inputs it saw; ``ds-burst``: all steps), and for the methods with ds-burst's offload the layers offloaded
(``offload_layers``, of ``layers``) and the plan that chose them (``offload_plan``: the GPU and host budgets, the
fixed host part, whether the plan fit).

Model FLOPs per step (no recomputation counted): ``6 * N * S + 6 * L * Hq * D * S^2`` with ``N`` all parameters
(the tied embedding counts once: it is the LM head's matmul) and the second term the causal attention
(``4 * S^2 * Hq * D / 2`` forward per layer, times 3 for forward and backward). MFU divides by the card's dense
bf16 peak (:data:`PEAK_TFLOPS`, by GPU name; null on CPU and on unknown cards).

The parent fits, per method, ``peak = fixed + slope * S`` (least squares over the runs that finished) on the
peak reserved GPU memory (what must fit; host RSS on CPU), and reports the fixed part (GiB), the memory per token
(KiB/token), the projected longest sequence ``(total - margin - fixed) / slope`` with ``total`` the card's
memory and ``margin`` = :data:`MARGIN_FRACTION` of it (CUDA context, fragmentation), tokens/s and MFU at the
longest length both methods ran, and the ratios ds-burst / ALST. ds-burst's offloaded layer count may change with
the length, and then its line is not one configuration (``offload_layers_varied``); its entry adds the estimator's
longest sequence with the per-length plan within the same GPU and host budgets (``planned_max_S``, at
``planned_offload_layers``; :func:`planned_longest`). ``ds_burst.training.estimate.estimate_model_memory``
(through :func:`estimator_config`, a ``ModelConfig`` of the same shape) predicts each run's allocated peak; its
relative error is reported. Prints a table, writes JSON (``{"meta", "rows", "fits"}``) and, with matplotlib, a PNG
next to it. ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import device_meta, free_port, parse_tokens, print_table, pyplot, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("alst", "alst-offloaded", "ds-burst")
#: ``plain``: the model with none of either method's options (sdpa, no tiling, no checkpointing, HF's loss), the
#: reference of the checks; not a default method
ALL_METHODS = (*METHODS, "plain")
#: methods built from DeepSpeed's ALST pieces (tiled MLP, tiled logits + loss, sdpa attention)
ALST_METHODS = ("alst", "alst-offloaded")
GIB = float(1 << 30)
#: dense bf16 peak TFLOP/s by a substring of the GPU name
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
#: part of the card's memory kept free in the projection (CUDA context, allocator fragmentation)
MARGIN_FRACTION = 0.05
OOM_MARKS = ("OutOfMemoryError", "CUDA out of memory", "out of memory")
RESULT_TAG = "BENCH_ALST_RESULT "

PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3.2-3B's shape (no llama3 RoPE scaling: it changes no memory or FLOPs), embeddings untied: see the
    # module docstring ("Tied embeddings")
    "llama-3.2-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                         head_dim=128, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0,
                         tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=256, rope_theta=500000.0, tie_word_embeddings=False,
                 max_position_embeddings=8192, rms_norm_eps=1e-5),
}


def parse_seq(text: str) -> int:
    """``4096``, ``16K`` (16384) or ``1M``."""
    try:
        value = parse_tokens(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad sequence length {text!r}") from exc
    if value < 2:
        raise argparse.ArgumentTypeError(f"sequence length must be at least 2, got {text!r}")
    return value


def model_shape(name: str, layers: int | None) -> dict[str, Any]:
    shape = dict(PRESETS[name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return shape


def mlp_tiles(seq: int, hidden: int) -> int:
    """The tutorial's TiledMLP shard count ``ceil(S / hidden)``, used by both methods."""
    return max(1, math.ceil(seq / hidden))


def loss_shards(seq: int, vocab: int) -> int:
    """Shards of the tiled loss: 1 GiB of fp32 logits each (ArcticTraining's choice)."""
    return max(1, math.ceil(seq * vocab * 4 / GIB))


def loss_chunk_tokens(seq: int, vocab: int) -> int:
    """Positions per loss chunk (the chunk length of ``alst``'s shards, also given to ds-burst)."""
    return math.ceil(seq / loss_shards(seq, vocab))


def model_flops(shape: dict[str, Any], params: int, seq: int) -> float:
    """Model FLOPs of one step on one sequence of ``seq`` tokens (module docstring)."""
    layers, hq, d = shape["num_hidden_layers"], shape["num_attention_heads"], shape["head_dim"]
    return 6.0 * params * seq + 6.0 * layers * hq * d * seq * seq


def peak_tflops(gpu_name: str | None) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if gpu_name and key in gpu_name:
            return value
    return None


def estimator_config(shape: dict[str, Any], seq: int, offload: bool | float = True) -> Any:
    """A ``ds_burst.training.model.ModelConfig`` of the HF Llama shape with this run's memory options (``offload``:
    its ``offload_checkpoints``), for ``estimate_model_memory`` (same parameter count: both are RMSNorm/SwiGLU/GQA
    decoders)."""
    from ds_burst.training.model import ModelConfig

    if shape["head_dim"] * shape["num_attention_heads"] != shape["hidden_size"]:
        raise ValueError("the estimator needs head_dim * heads == hidden")
    return ModelConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                       num_layers=shape["num_hidden_layers"], num_heads=shape["num_attention_heads"],
                       num_kv_heads=shape["num_key_value_heads"], intermediate_size=shape["intermediate_size"],
                       tie_embeddings=shape["tie_word_embeddings"],
                       lm_head_chunk_tokens=loss_chunk_tokens(seq, shape["vocab_size"]),
                       mlp_tiles=mlp_tiles(seq, shape["hidden_size"]), offload_checkpoints=offload)


#: estimate_memory's layout and options of every run (one GPU, ZeRO-3, optimizer offload, checkpointing)
ESTIMATE_KWARGS: dict[str, Any] = dict(sp=1, zero_stage=3, dp=1, activation_checkpointing=True,
                                       offload_optimizer=True)


def estimate(shape: dict[str, Any], seq: int, dtype_bytes: int, offload: bool | float = True) -> dict[str, float]:
    from ds_burst.training.estimate import estimate_model_memory

    return estimate_model_memory(estimator_config(shape, seq, offload), seq, dtype_bytes=dtype_bytes,
                                 **ESTIMATE_KWARGS)


def offload_plan(shape: dict[str, Any], seq: int, dtype_bytes: int, gpu_budget_gib: float, host_budget_gib: float,
                 host_fixed_gib: float) -> float | None:
    """``ds_burst.training.estimate.plan_offload`` for this run: the smallest fraction of the layers whose
    checkpointed inputs go to host memory with which the estimate fits ``gpu_budget_gib`` and the host's
    ``host_budget_gib`` (offloaded inputs + optimizer states + ``host_fixed_gib``); ``None`` when none does."""
    from ds_burst.training.estimate import plan_offload

    cfg = estimator_config(shape, seq)
    return plan_offload(cfg, seq, gpu_budget_gib, host_budget_gib, host_fixed_gib, dtype_bytes=dtype_bytes,
                        lm_head_chunk_tokens=cfg.lm_head_chunk_tokens, mlp_tiles=cfg.mlp_tiles, **ESTIMATE_KWARGS)


def planned_longest(shape: dict[str, Any], dtype_bytes: int, gpu_budget_gib: float, host_budget_gib: float,
                    host_fixed_gib: float, step: int = 1024) -> tuple[int, int | None]:
    """The longest sequence (a multiple of ``step``) for which :func:`offload_plan` finds a fraction, and the
    layers it offloads there (``None`` when not even ``step`` fits; ``estimate.largest_fitting``'s search: the
    run's memory options change with the length, so ``estimate.longest_sequence``'s fixed config does not fit)."""
    from ds_burst.training.estimate import largest_fitting

    def layers_at(n: int) -> int | None:
        frac = offload_plan(shape, n * step, dtype_bytes, gpu_budget_gib, host_budget_gib, host_fixed_gib)
        return None if frac is None else offloaded_layers(shape, frac)

    n = largest_fitting(lambda n: layers_at(n) is not None)
    return (0, None) if n == 0 else (n * step, layers_at(n))


def offloaded_layers(shape: dict[str, Any], fraction: bool | float) -> int:
    """Layers whose inputs an ``offload_checkpoints`` value offloads (``ModelConfig.offloads_input``'s rule)."""
    from ds_burst.training.model import offloaded_layer_count

    return offloaded_layer_count(fraction, shape["num_hidden_layers"])


def host_total_gib() -> float | None:
    """``MemTotal`` of ``/proc/meminfo`` in GiB (``None`` where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def ds_config(bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1 << 30,
        "bf16": {"enabled": bf16},
        "zero_force_ds_cpu_optimizer": False,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                              "stage3_param_persistence_threshold": 100000},
    }


# ------------------------------------------------------------------------------------------------------------
# one run


def _init_dist(cuda: bool) -> None:
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)


def alst_tiled_mlp(mlp: Any) -> None:
    """Route this ``LlamaMLP``'s forward through DeepSpeed's ``TiledMLP`` (the tutorial's monkey patch, set on
    the instance instead of the class so other models in the process are untouched)."""
    import deepspeed.comm as dist
    import torch
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def tiled_forward(x: torch.Tensor) -> torch.Tensor:
        _, seqlen, hidden = x.shape
        shards = torch.tensor(math.ceil(seqlen / hidden), device=x.device)
        dist.all_reduce(shards, op=dist.ReduceOp.MAX)
        compute_params = [mlp.down_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight]
        return TiledMLP.apply(mlp_forward, mlp, x, int(shards.item()), compute_params)

    mlp.forward = tiled_forward


def burst_tiled_mlp(mlp: Any, tiles: int) -> None:
    """Route this ``LlamaMLP``'s forward through ``ds_burst.training.memory.tiled_mlp`` (``tiles`` tiles)."""
    import torch

    from ds_burst.training.memory import tiled_mlp

    cls_forward = type(mlp).forward

    class _Plain(torch.nn.Module):  # calls the class forward; holds mlp in a closure, not as a child module
        def parameters(self, recurse: bool = True) -> Any:  # type: ignore[override]
            return mlp.parameters(recurse)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return cls_forward(mlp, x)

    plain = _Plain()
    mlp.forward = lambda x: tiled_mlp(plain, x, tiles)


def burst_checkpoint_offload(model: Any, state: dict[str, Any], offload_layers: int | None = None) -> None:
    """Attach ds-burst's offload of checkpointed layer inputs (``ds_burst.attention.selective``) to the HF
    decoder layers: each layer's checkpoint function wraps the layer in ``region`` (its re-run first brings its
    input back and prefetches the previous layer's) and, after the forward, hands the layer input to
    ``state["offload"]`` (an ``ActivationOffload`` per step; ``None`` turns it off), as ``BurstLlama`` does. Only
    the first ``offload_layers`` layers (``None``: all) hand it over; the others keep their input on the device
    and take an empty slot (``ActivationOffload.skip``), so the prefetch chain still reaches the offloaded ones."""
    from torch.utils.checkpoint import checkpoint

    from ds_burst.attention.selective import region

    layers = len(model.model.layers)
    k = layers if offload_layers is None else offload_layers
    if not 0 <= k <= layers:
        raise ValueError(f"offload_layers: expected 0..{layers}, got {offload_layers!r}")

    def make(index: int) -> Any:
        def ckpt(fn: Any, *args: Any) -> Any:
            off = state.get("offload")
            out = checkpoint(fn if off is None else region(fn, None, off, index), *args, use_reentrant=False)
            if off is not None:
                if index < k:
                    off.add(args[0])
                else:
                    off.skip()
            return out
        return ckpt

    for i, layer in enumerate(model.model.layers):
        layer._gradient_checkpointing_func = make(i)


def run_point(method: str, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build, train ``args.steps`` steps and measure one (method, S)."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    _init_dist(cuda)
    dtype = torch.bfloat16 if (cuda or args.dtype == "bf16") else torch.float32
    shape = model_shape(args.model, args.layers)
    tiles, chunk = mlp_tiles(seq, shape["hidden_size"]), loss_chunk_tokens(seq, shape["vocab_size"])
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, shape["vocab_size"], (1, seq), generator=gen)
    shift = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
        torch.cuda.reset_peak_memory_stats()

    ref_loss = None
    if args.check_loss:  # the plain model (sdpa, no tiling, no checkpointing) on the same weights and tokens
        torch.manual_seed(args.seed)
        ref = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to(device, dtype)
        with torch.no_grad():
            ref_loss = float(ref(input_ids=ids.to(device), labels=ids.to(device)).loss)
        del ref

    from ds_burst.attention.selective import reset_selective_stats

    reset_selective_stats()
    attn = "sdpa"
    if method == "ds-burst":
        import ds_burst.hf as bhf

        bhf.setup(1)
        attn = bhf.ATTN_NAME
    config = ds_config(dtype == torch.bfloat16)
    torch.manual_seed(args.seed)
    hf_cfg = LlamaConfig(**shape, attn_implementation=attn, use_cache=False)
    if args.check_loss:  # same weights as the reference: built on the host from the same seed
        model = LlamaForCausalLM(hf_cfg).to(dtype)
    else:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = LlamaForCausalLM(hf_cfg).to(dtype)
    if method != "plain":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())

    state: dict[str, Any] = {}
    burst_offload = method in ("alst-offloaded", "ds-burst")  # ds-burst's offload of the checkpointed layer inputs
    n_layers = shape["num_hidden_layers"]
    n_offload, plan = (n_layers, None) if burst_offload else (None, None)
    if method == "ds-burst" and args.offload_layers != "auto":
        n_offload = int(args.offload_layers)
    elif method == "ds-burst" and cuda:  # the fewest layers with which the estimate fits GPU and host
        plan = {"gpu_budget_gib": torch.cuda.get_device_properties(0).total_memory / GIB * (1 - MARGIN_FRACTION),
                "host_budget_gib": host_total_gib(), "host_fixed_gib": args.host_fixed_gib}
        frac = None
        if plan["host_budget_gib"] is not None:
            frac = offload_plan(shape, seq, 2 if dtype == torch.bfloat16 else 4, plan["gpu_budget_gib"],
                                plan["host_budget_gib"], args.host_fixed_gib)
        plan["fits"] = frac is not None
        n_offload = n_layers if frac is None else offloaded_layers(shape, frac)
    if method in ALST_METHODS:
        for layer in model.model.layers:
            alst_tiled_mlp(layer.mlp)
    elif method == "ds-burst":
        for layer in model.model.layers:
            burst_tiled_mlp(layer.mlp, tiles)
    if burst_offload:
        burst_checkpoint_offload(model, state, n_offload)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ids, shift = ids.to(device), shift.to(device)
    position_ids = torch.arange(seq, device=device)[None]

    if method in ALST_METHODS:
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager,
        )
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        offload_ctx = None
        if method == "alst":
            offload_ctx = get_checkpoint_hidden_states_offloading_ctx_manager(use_pin_memory=cuda, use_streams=cuda)
        shards = loss_shards(seq, shape["vocab_size"])

        def loss_fn(module: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = module.lm_head(x).float()
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1),
                                                     ignore_index=-100, reduction="sum")

        def step_loss() -> torch.Tensor:
            hidden = engine.module.model(input_ids=ids, position_ids=position_ids).last_hidden_state
            total = TiledFusedLogitsLoss.apply(loss_fn, engine.module, hidden, shift, None, shards,
                                               [engine.module.lm_head.weight], "sum")
            return total / (shift != -100).sum().clamp(min=1)
    elif method == "plain":
        offload_ctx = None

        def step_loss() -> torch.Tensor:
            return engine(input_ids=ids, position_ids=position_ids, labels=ids).loss
    else:
        from ds_burst.training.memory import chunked_lm_head_loss

        offload_ctx = None

        def step_loss() -> torch.Tensor:
            hidden = engine.module.model(input_ids=ids, position_ids=position_ids).last_hidden_state
            ce, count = chunked_lm_head_loss(hidden, engine.module.lm_head, shift, chunk)
            return ce / count.clamp(min=1).to(ce.dtype)

    from ds_burst.attention.selective import ActivationOffload

    losses, times = [], []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if burst_offload:  # one offload per step, as BurstLlama keeps it
            state["offload"] = ActivationOffload()
        if offload_ctx is not None:
            with offload_ctx:
                loss = step_loss()
                engine.backward(loss)
        else:
            loss = step_loss()
            engine.backward(loss)
        state["offload"] = None
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    step_time = sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0]
    gpu = torch.cuda.get_device_name(0) if cuda else None
    flops = model_flops(shape, params, seq)
    peak = peak_tflops(gpu)
    tflops = flops / step_time / 1e12
    row = {
        "method": method, "S": seq, "status": "ok", "params": params, "mlp_tiles": tiles, "loss_chunk_tokens": chunk,
        "losses": losses, "loss_ref": ref_loss,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "total_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None,
        "host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "step_time_s": step_time, "first_step_time_s": times[0], "tokens_per_s": seq / step_time,
        "tflops": tflops, "mfu": tflops / peak if peak else None, "gpu": gpu, "dtype": str(dtype).split(".")[-1],
        "layers": n_layers, "offload_layers": n_offload, "offload_plan": plan, "host_total_gib": host_total_gib(),
    }
    row["ckpt_marked"] = None
    if method == "alst" and offload_ctx is not None:  # DeepSpeed's stats of the last step
        row["ckpt_offloaded_bytes"] = int(offload_ctx.stats.offloaded_bytes)
        row["ckpt_marked"] = int(offload_ctx.stats.marked_tensors)
        row["ckpt_stats"] = {k: int(v) for k, v in vars(offload_ctx.stats).items()}  # every counter DeepSpeed keeps
    else:
        from ds_burst.attention.selective import selective_stats

        row["ckpt_offloaded_bytes"] = int(selective_stats()["offloaded_bytes"])
    engine.destroy()
    return row


# ------------------------------------------------------------------------------------------------------------
# parent


def worker_command(method: str, seq: int, args: argparse.Namespace, result: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{method}:{seq}", "--model", args.model,
           "--steps", str(args.steps), "--seed", str(args.seed), "--dtype", args.dtype, "--result-file", result]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    if args.check_loss:
        cmd.append("--check-loss")
    cmd += ["--offload-layers", str(args.offload_layers), "--host-fixed-gib", str(args.host_fixed_gib)]
    return cmd


def run_subprocess(method: str, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "row.json")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(worker_command(method, seq, args, result), cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"method": method, "S": seq, "status": "timeout", "wall_s": time.perf_counter() - t0}
        wall = time.perf_counter() - t0
        if proc.returncode == 0 and os.path.exists(result):
            with open(result) as f:
                return {**json.load(f), "wall_s": wall}
        out = proc.stdout + proc.stderr
        status = "OOM" if any(m in out for m in OOM_MARKS) else f"failed ({proc.returncode})"
        print(f"[{method} S={seq}] {status}:\n{out[-3000:]}", file=sys.stderr)
        return {"method": method, "S": seq, "status": status, "wall_s": wall}


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares ``y = fixed + slope * S``; ``None`` below two distinct lengths."""
    if len({s for s, _ in points}) < 2:
        return None
    n = len(points)
    ms = sum(s for s, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((s - ms) * (y - my) for s, y in points) / sum((s - ms) ** 2 for s, _ in points)
    return my - slope * ms, slope


def summarize(rows: list[dict[str, Any]], methods: list[str], shape: dict[str, Any] | None = None,
              dtype_bytes: int = 2) -> dict[str, Any]:
    """Per-method fits and projections (with ``shape``, also the estimator's for a method whose rows carry an
    offload plan), and the ds-burst / ALST ratios."""
    ok = [r for r in rows if r.get("status") == "ok"]
    on_gpu = any(r.get("peak_reserved_gib") is not None for r in ok)
    key = "peak_reserved_gib" if on_gpu else "host_rss_gib"
    common = [s for s in sorted({r["S"] for r in ok}) if all(any(r["S"] == s and r["method"] == m for r in ok)
                                                            for m in methods)]
    at = common[-1] if common else None
    fits: dict[str, Any] = {"fit_on": key, "margin_fraction": MARGIN_FRACTION, "common_S": at, "methods": {}}
    for m in methods:
        mine = [r for r in ok if r["method"] == m]
        line = fit([(r["S"], r[key]) for r in mine])
        entry: dict[str, Any] = {"fixed_gib": None, "kib_per_token": None, "projected_max_S": None,
                                 "tokens_per_s": None, "mfu": None, "points": len(mine)}
        if line is not None:
            fixed, slope = line
            entry["fixed_gib"], entry["kib_per_token"] = fixed, slope * GIB / 1024
            total = next((r["total_gib"] for r in mine if r.get("total_gib")), None)
            if on_gpu and total and slope > 0:
                entry["projected_max_S"] = int((total * (1 - MARGIN_FRACTION) - fixed) / slope)
        at_row = next((r for r in mine if r["S"] == at), None)
        if at_row is not None:
            entry["tokens_per_s"], entry["mfu"] = at_row["tokens_per_s"], at_row["mfu"]
        entry["offload_layers_varied"] = len({r.get("offload_layers") for r in mine}) > 1
        plans = [r["offload_plan"] for r in mine if r.get("offload_plan") and r["offload_plan"]["host_budget_gib"]]
        if plans and shape is not None:  # the estimator's longest length with the per-length plan, same budgets
            p = plans[0]
            entry["planned_max_S"], entry["planned_offload_layers"] = planned_longest(
                shape, dtype_bytes, p["gpu_budget_gib"], p["host_budget_gib"], p["host_fixed_gib"])
        fits["methods"][m] = entry
    b = fits["methods"].get("ds-burst")
    for peer, name in (("alst", "ratio_ds_burst_over_alst"), ("alst-offloaded", "ratio_ds_burst_over_alst_offloaded")):
        a = fits["methods"].get(peer)
        ratios: dict[str, Any] = {"projected_max_S": None, "tokens_per_s": None}
        if a and b:
            for k in ratios:
                if a[k] and b[k] is not None:
                    ratios[k] = b[k] / a[k]
        fits[name] = ratios
    return fits


def add_estimates(rows: list[dict[str, Any]], shape: dict[str, Any], dtype_bytes: int) -> None:
    """The estimator's GPU and host GiB for each row, with the row's offloaded layers where it has them (else with
    every layer's input offloaded)."""
    for r in rows:
        k = r.get("offload_layers")
        layers = shape["num_hidden_layers"]
        est = estimate(shape, r["S"], dtype_bytes, True if k is None or k == layers else k / layers)
        r["estimate_gib"] = est["total"]
        r["estimate_host_gib"] = est.get("host_optimizer", 0.0) + est.get("host_offload", 0.0)
        meas = r.get("peak_alloc_gib")
        r["estimate_error"] = (est["total"] - meas) / meas if meas else None


def plot(path: str, rows: list[dict[str, Any]], fits: dict[str, Any], title: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    key = fits["fit_on"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, entry in fits["methods"].items():
        pts = sorted((r["S"], r[key]) for r in rows if r["method"] == m and r.get("status") == "ok")
        if not pts:
            continue
        line = ax.plot([s for s, _ in pts], [y for _, y in pts], "o", label=m)[0]
        if entry["fixed_gib"] is not None:
            xs = [0, max(s for s, _ in pts) * 1.2]
            ax.plot(xs, [entry["fixed_gib"] + entry["kib_per_token"] * 1024 / GIB * x for x in xs], "--",
                    color=line.get_color(), label=f"{m} fit: {entry['fixed_gib']:.2f} GiB + "
                                                   f"{entry['kib_per_token']:.1f} KiB/token")
    ax.set_xlabel("sequence length S (tokens)")
    ax.set_ylabel("peak reserved GPU memory (GiB)" if key == "peak_reserved_gib" else "peak host RSS (GiB)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    png = os.path.splitext(path)[0] + ".png"
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _offload_layers_arg(text: str) -> str:
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected auto or a layer count, got {text!r}")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="llama-3.2-3b")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--seqs", type=parse_seq, nargs="+", default=[parse_seq(s) for s in ("8K", "16K", "32K")])
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (timing averages steps 2..)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--out", default="results/alst_memory.json")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32", help="on CPU (the GPU always uses bf16)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--check-loss", action="store_true",
                   help="also compute the plain model's loss on the same weights and tokens (builds the model on the "
                        "host, without zero.Init)")
    p.add_argument("--offload-layers", default="auto", type=_offload_layers_arg, metavar="auto|K",
                   help="ds-burst: offload the checkpointed inputs of the first K layers; auto (default): the fewest "
                        "with which the estimate fits the GPU and the host memory (all layers on CPU)")
    p.add_argument("--host-fixed-gib", type=float, default=16.0, metavar="GIB",
                   help="for the auto offload plan: host memory of the process's own beside the optimizer states and "
                        "the offloaded layer inputs (runtime, model copies, pinned buffers); each run records "
                        "host_rss_gib to check it against")
    p.add_argument("--in-process", action="store_true", help="run every point in this process (CPU tests)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | list[list[str]]:
    args = parse_args(argv)
    if args.worker:
        method, _, seq = args.worker.partition(":")
        row = run_point(method, int(seq), args)
        with open(args.result_file, "w") as f:
            json.dump(row, f)
        return row
    points = [(m, s) for s in sorted(args.seqs) for m in args.methods]
    if args.dry_run:
        cmds = [worker_command(m, s, args, "ROW.json") for m, s in points]
        for c in cmds:
            print(" ".join(c))
        return cmds
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rows = []
    for m, s in points:
        if args.in_process:
            row = run_point(m, s, args)
        else:
            row = run_subprocess(m, s, args)
        rows.append(row)
        print(f"[{m} S={s}] {row.get('status')} step {row.get('step_time_s')}", flush=True)
        print(RESULT_TAG + json.dumps(row), flush=True)  # every row in the log too: a run stopped later keeps it
    shape = model_shape(args.model, args.layers)
    on_gpu = any(r.get("peak_alloc_gib") is not None for r in rows)
    add_estimates(rows, shape, 2 if (on_gpu or args.dtype == "bf16") else 4)
    dtype_bytes = 2 if (on_gpu or args.dtype == "bf16") else 4
    fits = summarize(rows, args.methods, shape, dtype_bytes)
    print_table(rows, ["method", "S", "status", "offload_layers", "peak_alloc_gib", "peak_reserved_gib",
                       "host_rss_gib", "estimate_gib", "estimate_error", "step_time_s", "tokens_per_s", "mfu",
                       "losses"])
    print_table([{"method": m, **e} for m, e in fits["methods"].items()],
                ["method", "points", "fixed_gib", "kib_per_token", "projected_max_S", "planned_max_S",
                 "planned_offload_layers", "tokens_per_s", "mfu"])
    print("ds-burst / alst:", json.dumps(fits["ratio_ds_burst_over_alst"]),
          "ds-burst / alst-offloaded:", json.dumps(fits["ratio_ds_burst_over_alst_offloaded"]),
          f"(fit on {fits['fit_on']})")
    import deepspeed
    import torch

    meta = {
        **device_meta(), "deepspeed": deepspeed.__version__, "model": args.model, "shape": shape,
        "steps": args.steps, "seqs": sorted(args.seqs), "methods": args.methods,
        "optimizer": "torch AdamW over fp32 states in host memory (ZeRO-3 offload_optimizer cpu, torch_adam, "
                     "zero_force_ds_cpu_optimizer false), every method",
        "alst": "DeepSpeed TiledMLP (ceil(S/hidden) shards) + TiledFusedLogitsLoss (1 GiB fp32-logit shards, sum / "
                "labelled tokens) + get_checkpoint_hidden_states_offloading_ctx_manager (non-reentrant HF "
                "checkpointing); sdpa attention (Ulysses all-to-all is the identity at SP=1, not registered)",
        "alst_offloaded": "alst with ds-burst's offload of checkpointed layer inputs instead of DeepSpeed's context, "
                          "which offloads nothing under ZeRO-3 (see ckpt_stats)",
        "alst_not_shipped_by_deepspeed": "Liger-Kernel (separate package); ArcticTraining's reentrant-checkpoint CPU "
                                         "offload monkey patch",
        "ds_burst": "ds_burst.hf attention (setup(1)), ds_burst.training.memory.tiled_mlp (same tiles), "
                    "chunked_lm_head_loss (same chunk), ds_burst.attention.selective offload of checkpointed layer "
                    "inputs (attached to the HF layers by this script) of the first offload_layers layers",
        "offload_layers": args.offload_layers, "host_fixed_gib": args.host_fixed_gib,
        "offload_policy": "ds-burst: auto = ds_burst.training.estimate.plan_offload per length (GPU: the card's "
                          "memory less margin_fraction; host: /proc/meminfo MemTotal holding the offloaded inputs, "
                          "the optimizer states and host_fixed_gib; all layers when nothing fits and on CPU); "
                          "alst-offloaded: every layer",
        "flops": "6*N*S + 6*L*Hq*D*S^2 per step (causal attention, no recompute)",
        "peak_tflops": PEAK_TFLOPS, "margin_fraction": MARGIN_FRACTION,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "cuda": torch.cuda.is_available(),
        "estimator": "ds_burst.training.estimate.estimate_model_memory on a ModelConfig of the same shape "
                     "(offload_checkpoints: the row's offload_layers, else every layer; offload_optimizer, "
                     "activation checkpointing), against peak_alloc_gib",
    }
    write_json(args.out, meta, rows)
    with open(args.out) as f:
        doc = json.load(f)
    doc["fits"] = fits
    png = plot(args.out, rows, fits, f"{args.model}: peak memory vs S (ZeRO-3, optimizer offload)")
    doc["meta"]["plot"] = png
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return doc


if __name__ == "__main__":
    main()
