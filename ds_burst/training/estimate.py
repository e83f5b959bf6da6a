"""Memory estimator: per-GPU bytes of training the built-in Llama-style model (``python -m ds_burst.plan --memory``),
the host bytes beside them, the offload fraction that fits both (:func:`plan_offload`), and the working set of the
attention ring's buffers. Pure arithmetic over the config."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ds_burst.core.cost import choose_backward
from ds_burst.training.model import offloaded_layer_count

GIB = float(1 << 30)
PERSISTENT = ("params", "grads", "optimizer", "activations", "kept_attention", "zero_bucket")
"""The :func:`estimate_memory` terms held for the whole step (``total`` adds the larger transient phase)."""


def estimate_memory(
    cfg: Any,
    seq_len: int,
    sp: int = 1,
    zero_stage: int = 0,
    dp: int = 1,
    dtype_bytes: int = 2,
    activation_checkpointing: bool = False,
    micro_batch: int = 1,
    lm_head_chunk_tokens: int | None = None,
    mlp_tiles: int = 1,
    keep_attention_layers: float = 0.0,
    keep_attention_tokens: str = "all",
    offload_checkpoints: bool | float = False,
    backward: str = "auto",
    offload_optimizer: bool = False,
    zero_reduce_bucket: int = 500_000_000,
) -> dict[str, float]:
    """Per-GPU memory of training :class:`ds_burst.training.model.BurstLlama` (``cfg``: its ``ModelConfig``), in GiB.

    ``lm_head_chunk_tokens`` / ``mlp_tiles`` / ``keep_attention_layers`` / ``keep_attention_tokens`` /
    ``offload_checkpoints`` default to off here (pass the ``cfg`` fields of the same names to use the model's
    settings; :func:`estimate_model_memory` does). Each rank holds ``n = micro_batch * seq_len / sp`` tokens;
    ``N = dp * sp`` ranks share ZeRO partitions (DeepSpeed partitions over the sequence-data-parallel group).
    With ``P`` parameters, ``b = dtype_bytes``, ``H`` hidden, ``I`` intermediate, ``V`` vocab, ``nh`` heads,
    ``D`` head dim, ``L`` layers:

    * ``params = P*b / (N if stage 3 else 1)``; ``grads = P*b / (N if stage >= 2 else 1)``;
      ``optimizer = P*k / (N if stage >= 1 else 1)`` with Adam ``k = 8`` (m, v) in fp32 and ``k = 12``
      (fp32 master, m, v) for 16-bit training.
    * ``offload_optimizer`` (ZeRO ``offload_optimizer: {"device": "cpu"}``): the optimizer states and the fp32
      gradient partitions live in host memory, so ``optimizer = grads = 0`` on the GPU; the host bytes
      (``optimizer`` plus ``4P / N`` fp32 gradients) are reported as ``host_optimizer``, not part of ``total``.
    * ``activations`` (tensors saved for backward; counted exactly for fp32 and ``attention="local"`` by
      ``tests/test_memory.py``): per token, per layer ``10H + nh + 2 + 4I`` elements (``4I``: the SwiGLU
      gate, up, silu and product; with ``mlp_tiles > 1`` only ``x`` is saved, which is already counted), or
      ``H`` (the layer input) under activation checkpointing; outside the layers ``3H + 2D + 3`` (final norm,
      rotary tables) plus ``V`` fp32 log-probabilities unless the LM head is chunked. Elements count
      ``b`` bytes each except the fp32 log-probabilities (4 bytes).
    * ``logits_peak``: transient LM-head working set ``T*V*(b + 8)`` (the logits, their fp32 softmax and its
      gradient) with ``T = n`` or ``T = micro_batch * lm_head_chunk_tokens`` when chunked.
    * ``recompute_peak``: transient re-forward of one layer under checkpointing (its full activations,
      ``10H + nh + 2 + 4I/mlp_tiles`` per token), and with ``mlp_tiles > 1`` one tile's ``4I*n/mlp_tiles``.
    * ``kept_attention`` (selective checkpointing, ``ds_burst.attention.selective``; only with activation
      checkpointing):
      the attention output and lse kept for the re-run, ``n*nh*(D*b + 4)`` per kept layer (half of it with
      ``keep_attention_tokens="half"``), for ``keep_attention_layers`` of the ``L`` layers (as
      ``ModelConfig.keeps_attention`` picks them); only the layers that keep their input on the GPU count here
      (the offloaded layers' kept attention is host memory, below).
    * ``offload_checkpoints`` (with checkpointing): ``True`` every layer, ``False`` none, or a fraction ``f``:
      the inputs of the first ``k = floor(f*L)`` layers (and their kept attention) live in host memory
      (``ModelConfig.offloads_input``), the last ``L - k`` keep theirs on the GPU. The GPU then holds
      ``max(L - k, min(L, 2))`` layer inputs instead of ``L``: the ``L - k`` device-kept ones until backward has
      passed them (they are re-run first), then at most two offloaded ones at a time (the one re-run and the one
      being fetched), never both groups at once. The reported ``host_offload`` entry (host bytes: the ``k``
      offloaded inputs, ``k*n*H*b``, and their kept attention) is present when ``k > 0`` and is **not** part of
      ``total``. :func:`plan_offload` picks the smallest ``k`` that fits a GPU and a host budget.
    * ``attn_buffers``: the ring's working set, held by the buffer pool (``ds_burst.ring.pool``) between calls:
      the larger of the forward's (K/V receive buffers, double-buffered, ``4*n*Hkv*D*b``, plus the fp32 output
      accumulator ``4*n*nh*D`` for 16-bit inputs) and the backward's. Burst backward: travelling
      q, dO, lse, delta double-buffered ``2*n*nh*(2*D*b + 8)``, three fp32 dQ partials (computed, in flight,
      received) and the one coming home ``16*n*nh*D``; ring backward: K/V double-buffered ``4*n*Hkv*D*b``,
      fp32 dK/dV partials ``32*n*Hkv*D``; both plus the fp32 dq/dk/dv accumulators ``4*n*(nh + 2*Hkv)*D``.
      ``backward="auto"`` picks the pattern as :func:`ds_burst.core.cost.choose_backward` does. 0 when ``sp == 1``.

    * ``zero_bucket`` (ZeRO stage 2 and 3): DeepSpeed's contiguous gradient reduce bucket, allocated once on the
      GPU, ``zero_reduce_bucket`` elements (its ``reduce_bucket_size``, default ``5e8``) of ``b`` bytes.
    * ``zero_gathered_head`` / ``zero_gathered_layer`` (ZeRO-3): parameters are whole on the GPU only while their
      module runs (gathered beside their partition) and their gradient is whole until it is copied into the
      bucket, so each phase adds its module's ``2 * params * b``: the LM head's ``V*H`` parameters in the loss
      phase, one decoder layer's in a layer's re-run and backward.

    ``total`` is the persistent terms (``params``, ``grads``, ``optimizer``, ``activations``,
    ``kept_attention``, ``zero_bucket``) plus the larger of two transient phases that never overlap in time: the
    LM head and loss (``logits_peak + zero_gathered_head``) and one layer's re-forward and backward
    (``recompute_peak + attn_buffers + zero_gathered_layer``; the attention scratch is freed after each call, the
    buffer pool being off by default).

    Not counted: the allocator's fragmentation (``peak_reserved`` above ``peak_allocated``), ZeRO-3's prefetch
    of the next module's parameters, kernel workspaces; with ``attention="burst"`` the saved attention tensors
    differ a little (no GQA repeat, fp32 lse) and 16-bit RMSNorm keeps an fp32 copy of its input (about ``2H``
    elements more per layer in bf16).
    """
    for name, v in (("seq_len", seq_len), ("sp", sp), ("dp", dp), ("dtype_bytes", dtype_bytes),
                    ("micro_batch", micro_batch), ("mlp_tiles", mlp_tiles)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: expected 0, 1, 2 or 3, got {zero_stage!r}")
    c = lm_head_chunk_tokens
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
        raise ValueError(f"lm_head_chunk_tokens: expected a positive integer or None, got {c!r}")
    if seq_len % sp:
        raise ValueError(f"seq_len={seq_len} is not divisible by sp={sp}")
    f = keep_attention_layers
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
        raise ValueError(f"keep_attention_layers: expected a fraction in [0, 1], got {f!r}")
    if keep_attention_tokens not in ("all", "half"):
        raise ValueError(f"keep_attention_tokens: expected 'all' or 'half', got {keep_attention_tokens!r}")
    if backward not in ("auto", "burst", "ring"):
        raise ValueError(f"backward: expected 'auto', 'burst' or 'ring', got {backward!r}")
    if isinstance(zero_reduce_bucket, bool) or not isinstance(zero_reduce_bucket, int) or zero_reduce_bucket < 1:
        raise ValueError(f"zero_reduce_bucket: expected a positive integer (elements), got {zero_reduce_bucket!r}")
    n_off = offloaded_layer_count(offload_checkpoints, cfg.num_layers)  # validates it too
    n_off = n_off if activation_checkpointing else 0
    b = dtype_bytes
    n_ranks = dp * sp
    p = cfg.num_params()
    h, i, v, nh, d, layers = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads,
                              cfg.head_dim, cfg.num_layers)
    n = micro_batch * seq_len // sp
    k_opt = 8 if b >= 4 else 12
    out = {
        "params": p * b / (n_ranks if zero_stage == 3 else 1),
        "grads": p * b / (n_ranks if zero_stage >= 2 else 1),
        "optimizer": p * k_opt / (n_ranks if zero_stage >= 1 else 1),
    }
    layer_full = 10 * h + nh + 2 + (4 * i if mlp_tiles == 1 else 0)
    if activation_checkpointing:
        act = n * max(layers - n_off, min(layers, 2) if n_off else 0) * h * b
    else:
        act = n * layers * layer_full * b
    act += n * (3 * h + 2 * d + 3) * b
    if c is None:
        act += n * v * 4
    out["activations"] = act
    t = n if c is None else micro_batch * min(c, seq_len // sp)
    out["logits_peak"] = t * v * (b + 8)
    rec = 0.0
    if activation_checkpointing:
        rec += n * (10 * h + nh + 2 + 4 * i / mlp_tiles) * b
    elif mlp_tiles > 1:
        rec += n * 4 * i / mlp_tiles * b
    out["recompute_peak"] = rec
    out["attn_buffers"] = attention_buffer_bytes(n, nh, cfg.num_kv_heads, d, b, backward) if sp > 1 else 0.0
    kept = 0.0
    host = n * n_off * h * b  # the first n_off layers' inputs
    if activation_checkpointing:
        per_layer = n * nh * (d * b + 4) * (0.5 if keep_attention_tokens == "half" else 1.0)
        for j in range(layers):  # as ModelConfig.keeps_attention; the first n_off layers keep theirs on the host
            if math.floor((j + 1) * f + 1e-9) > math.floor(j * f + 1e-9):
                if j < n_off:
                    host += per_layer
                else:
                    kept += per_layer
    out["kept_attention"] = kept
    host_opt = 0.0
    if offload_optimizer:
        host_opt = out["optimizer"] + p * 4 / (n_ranks if zero_stage >= 2 else 1)
        out["optimizer"] = out["grads"] = 0.0
    out["zero_bucket"] = zero_reduce_bucket * b if zero_stage >= 2 else 0.0
    head = v * h
    layer_params = (p - head * (1 if cfg.tie_embeddings else 2) - h) / layers
    out["zero_gathered_head"] = 2 * head * b if zero_stage == 3 else 0.0
    out["zero_gathered_layer"] = 2 * layer_params * b if zero_stage == 3 else 0.0
    out = {k: val / GIB for k, val in out.items()}
    transient = max(out["logits_peak"] + out["zero_gathered_head"],
                    out["recompute_peak"] + out["attn_buffers"] + out["zero_gathered_layer"])
    out["total"] = sum(out[k] for k in PERSISTENT) + transient
    if n_off:
        out["host_offload"] = host / GIB
    if offload_optimizer:
        out["host_optimizer"] = host_opt / GIB
    return out


def host_bytes(est: dict[str, float], host_fixed_gib: float = 0.0, ranks_per_host: int = 1) -> float:
    """Host memory (GiB) of one host for an :func:`estimate_memory` result: ``ranks_per_host`` processes, each with
    its ``host_offload`` and ``host_optimizer`` entries (0 when absent) and ``host_fixed_gib`` of its own (the
    runtime, the pinned buffers of the data path, ...: whatever the process holds beside those two)."""
    return ranks_per_host * (est.get("host_offload", 0.0) + est.get("host_optimizer", 0.0) + host_fixed_gib)


def plan_offload(cfg: Any, seq_len: int, gpu_budget_gib: float, host_budget_gib: float, host_fixed_gib: float = 0.0,
                 ranks_per_host: int = 1, **kwargs: Any) -> float | None:
    """The smallest ``offload_checkpoints`` fraction ``k / L`` (``k = 0 .. L`` layers, ``L = cfg.num_layers``) with
    which training ``seq_len`` tokens fits both memories: :func:`estimate_memory`'s ``total`` (with ``kwargs``) within
    ``gpu_budget_gib`` per GPU, and :func:`host_bytes` (``ranks_per_host`` processes' ``host_offload`` +
    ``host_optimizer`` + ``host_fixed_gib``) within ``host_budget_gib`` per host; ``None`` when no ``k`` fits.

    Offloading one more layer never raises the GPU total and never lowers the host bytes, so the answer is the
    smallest ``k`` whose GPU total fits, if its host bytes fit too (a larger ``k`` only needs more host memory).
    Without activation checkpointing nothing is offloaded: ``0.0`` when the estimate fits, else ``None``. An
    ``offload_checkpoints`` in ``kwargs`` is ignored (it is what this function picks)."""
    if isinstance(ranks_per_host, bool) or not isinstance(ranks_per_host, int) or ranks_per_host < 1:
        raise ValueError(f"ranks_per_host: expected a positive integer, got {ranks_per_host!r}")
    kwargs.pop("offload_checkpoints", None)
    layers = cfg.num_layers
    for k in range(layers + 1):
        est = estimate_memory(cfg, seq_len, offload_checkpoints=k / layers, **kwargs)
        if est["total"] > gpu_budget_gib:
            continue
        return k / layers if host_bytes(est, host_fixed_gib, ranks_per_host) <= host_budget_gib else None
    return None


def longest_sequence(cfg: Any, budget_gib: float, sp: int = 1, step: int | None = None,
                     host_budget_gib: float | None = None, host_fixed_gib: float = 0.0, ranks_per_host: int = 1,
                     **kwargs: Any) -> int:
    """The longest sequence (a multiple of ``step``, default ``2 * sp * 1024`` tokens) whose estimated ``total``
    (:func:`estimate_memory` with ``kwargs``) fits in ``budget_gib`` GiB per GPU; 0 when not even ``step`` does.

    With ``host_budget_gib`` (GiB per host, shared by ``ranks_per_host`` processes with ``host_fixed_gib`` each) the
    host must hold the offloaded layer inputs and the offloaded optimizer too, and the offload fraction is chosen
    per length by :func:`plan_offload` (``kwargs``' ``offload_checkpoints`` is ignored): a length fits when some
    fraction fits both memories; call :func:`plan_offload` at the answer for the fraction. The estimate grows with
    the length for every fraction, so "fits" stays monotone: a doubling search then bisection finds it."""
    step = step or 2 * sp * 1024
    if host_budget_gib is None:
        fits = lambda n: estimate_memory(cfg, n * step, sp=sp, **kwargs)["total"] <= budget_gib  # noqa: E731
    else:
        def fits(n: int) -> bool:
            return plan_offload(cfg, n * step, budget_gib, host_budget_gib, host_fixed_gib, ranks_per_host, sp=sp,
                                **kwargs) is not None
    return largest_fitting(fits) * step


def largest_fitting(fits: Callable[[int], bool]) -> int:
    """The largest ``n >= 1`` with ``fits(n)``, for a ``fits`` that holds up to some ``n`` and fails beyond it
    (memory grows with the length); 0 when ``fits(1)`` fails. A doubling search, then bisection."""
    if not fits(1):
        return 0
    hi = 2
    while fits(hi):
        hi *= 2
    lo = hi // 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def attention_buffer_bytes(tokens: int, hq: int, hkv: int, head_dim: int, dtype_bytes: int,
                           backward: str = "auto") -> float:
    """Scratch bytes of one burst attention call on ``tokens`` local tokens (the ring's receive buffers and
    fp32 accumulators, see :func:`estimate_memory`'s ``attn_buffers``): the larger of forward and backward."""
    n, d, b = tokens, head_dim, dtype_bytes
    fwd = 4 * n * hkv * d * b + (4 * n * hq * d if b < 4 else 0)
    pattern = choose_backward(hq, hkv, d, b) if backward == "auto" else backward
    if pattern == "burst":
        bwd = 2 * n * hq * (2 * d * b + 8) + 16 * n * hq * d
    else:
        bwd = 4 * n * hkv * d * b + 32 * n * hkv * d
    bwd += 4 * n * (hq + 2 * hkv) * d
    return float(max(fwd, bwd))


def estimate_model_memory(cfg: Any, seq_len: int, **kwargs: Any) -> dict[str, float]:
    """:func:`estimate_memory` with the memory options taken from ``cfg`` (a ``ModelConfig``):
    ``lm_head_chunk_tokens``, ``mlp_tiles``, ``keep_attention_layers``, ``keep_attention_tokens``,
    ``offload_checkpoints``; other arguments as :func:`estimate_memory`'s (keywords)."""
    opts = {name: getattr(cfg, name) for name in ("lm_head_chunk_tokens", "mlp_tiles", "keep_attention_layers",
                                                  "keep_attention_tokens", "offload_checkpoints")
            if hasattr(cfg, name)}
    return estimate_memory(cfg, seq_len, **{**opts, **kwargs})
