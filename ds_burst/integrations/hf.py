"""Hugging Face transformers integration: run Llama/Mistral/Qwen2-style models with BurstAttention.

    import ds_burst.hf as bhf
    topo = bhf.setup(sequence_parallel_size=8)                 # groups + registers attn_implementation "burst"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="burst")   # or from_pretrained(...)
    engine, *_ = ds_burst.deepspeed_initialize(model, ds_config, topo)
    batch = bhf.shard_batch({"input_ids": ids, "labels": ids}, topo)          # this rank's tokens
    logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = bhf.sequence_parallel_loss(logits, batch["shift_labels"], topo,
                                      sp_grads_averaged=ds_burst.training.losses.sp_grads_averaged(ds_config))

What the attention function gets from transformers 5.x (checked on 5.24): ``query [B, Hq, s, D]``,
``key/value [B, Hkv, s, D]`` (GQA not repeated), ``module.is_causal``, ``scaling``, ``dropout`` and, from
Mistral/Qwen2-style models, ``sliding_window=W`` (a query sees its ``W`` most recent keys, itself
included: flash-attn ``window_size=(W-1, 0)``); Llama passes none. transformers builds no mask for a
registered custom implementation (``attention_mask`` arrives as ``None``), so padding masks are not
applied: pack sequences without padding, or :func:`shard_batch` rejects a padding ``attention_mask``.
Positions (RoPE) come from the ``position_ids`` you pass, which :func:`shard_batch` makes global.

Packed documents: :func:`shard_batch` finds the documents from ``position_ids`` that restart at 0 (what
transformers' packing collators pass) or from the collator's ``cu_seq_lens_q``/``cu_seq_lens_k`` (offsets into
the flattened, unsharded batch) and returns the full-sequence boundaries as ``cu_seq_lens_q``/``cu_seq_lens_k``
(Python lists); pass them to the model (``model(..., cu_seq_lens_q=..., cu_seq_lens_k=...)``): transformers
hands them to the attention function, which gives them to ``burst_attn_func(cu_seqlens=...)``. A CUDA tensor
there costs one small device-to-host copy per layer; the lists cost nothing.

The ALST-compatible path used by Accelerate / the HF Trainer / TRL (``ParallelismConfig(sp_backend="deepspeed")``)
is :mod:`ds_burst.integrations.alst`, re-exported with this module by ``ds_burst.hf``:
``register_with_transformers``, ``BurstSPAttentionHF``, ``BurstSPDataLoaderAdapter``,
``documents_from_position_ids`` (or just call :func:`ds_burst.patch_deepspeed`).

transformers is imported lazily; the rest of ds_burst does not need it.
"""

from __future__ import annotations

from typing import Any

import torch

from ds_burst.attention.api import burst_attn_func
from ds_burst.attention.max_logit import RECORD
from ds_burst.core.layout import check_layout
from ds_burst.dist.comm import resolve_group
from ds_burst.dist.topology import Topology, get_topology, init_sequence_parallel
from ds_burst.training.data import (
    IGNORE_INDEX,
    boundaries_from_cu_seq_lens,
    boundaries_from_position_ids,
    shard_batch_local,
)
from ds_burst.training.losses import sequence_parallel_loss as _sp_loss

__all__ = ["ATTN_NAME", "burst_attention_forward", "hf_burst_attention", "register", "setup", "shard_batch",
           "sequence_parallel_loss"]

_DOCUMENT_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

ATTN_NAME = "burst"
#: the options ``register``/``setup`` and the ALST drop-in take (``record_max_logit``: see :func:`hf_burst_attention`)
HF_OPTIONS = ("backward", "kernel", "deterministic", "check_inputs", "check_finite", "record_max_logit")
_STATE: dict[str, Any] = {"topology": None, "layout": "zigzag", "options": {}}


# Keywords transformers' models pass to the attention function besides the ones applied below, that do not change
# the attention result (cache bookkeeping, output flags); every other keyword is refused with a ValueError.
# shift_labels: the HF Trainer's SP loss input, handed on with the model's keywords; seq_idx: TRL's padding-free
# document index per token (for linear-attention convolutions): the documents reach attention as cu_seq_lens or
# position_ids
_NO_EFFECT = ("use_cache", "cache_position", "output_router_logits", "output_hidden_states", "return_dict",
              "num_items_in_batch", "layer_idx", "shift_labels", "seq_idx")


def _sp_size(group: Any) -> int:
    """Ranks of the sequence-parallel group (a topology/mpu, a process group or ``None``)."""
    return resolve_group(group).world


def burst_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered as ``attn_implementation="burst"`` (transformers' AttentionInterface): see
    :func:`hf_burst_attention` for what it applies and refuses."""
    topo = _STATE["topology"] or get_topology()
    out = hf_burst_attention(module, query, key, value, attention_mask, group=topo, layout=_STATE["layout"],
                             burst_options=_STATE["options"], **kwargs)
    return out, None


def hf_burst_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    is_causal: bool | None = None,
    output_attentions: bool = False,
    *,
    group: Any = None,
    layout: str = "zigzag",
    burst_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """BurstAttention on transformers' attention-function tensors: ``query [B, Hq, s, D]``, ``key/value
    [B, Hkv, s, Dv]`` (this rank's shard) -> ``[B, s, Hq, Dv]``. Shared by ``attn_implementation="burst"`` and the
    ALST drop-in (:mod:`ds_burst.integrations.alst`).

    Applied: ``scaling``, ``sliding_window``, ``softcap`` (Gemma 2 logit softcapping), ``s_aux`` (GPT-OSS attention
    sinks, ``[Hq]``), ``is_causal`` (else ``module.is_causal``), a value head dim other than the q/k one (MLA),
    packed documents: ``cu_seq_lens_q``/``cu_seq_lens_k`` when given (full-sequence boundaries, see
    :func:`shard_batch`, or offsets into the flattened batch; ``max_length_q``/``_k`` carry nothing ds-burst
    needs), else the ``position_ids``, whose restarts at 0 start documents as in transformers' flash-attention
    backends (every rank's positions are gathered once per forward: ``burst_attn_func(position_ids=...)``).
    ``position_ids`` must be given when the sequence is split (RoPE positions must be global). Refused with a
    ``ValueError``: dropout > 0, an attention mask, ``output_attentions=True``, positions that jump without
    restarting at 0, rows with different documents, and any keyword not listed here or in ``_NO_EFFECT``.
    ``burst_options["record_max_logit"]``: the call also computes the per-head maximum logit of this rank's queries
    and folds it into :func:`ds_burst.pop_max_logits` under ``module`` (Muon's QK-clip).
    """
    if dropout and dropout > 0:
        raise ValueError(f"ds-burst attention: attention dropout={dropout} > 0 is not supported (set attention_dropout"
                         "=0 in the model config)")
    if attention_mask is not None:
        raise ValueError("ds-burst attention: an explicit attention mask is not supported (causal and sliding window "
                         "masks are applied by position; do not pad)")
    if output_attentions:
        raise ValueError("ds-burst attention: output_attentions=True is not supported (no attention weights are "
                         "formed)")
    unknown = sorted(k for k, val in kwargs.items() if k not in _NO_EFFECT and k not in _DOCUMENT_KEYS
                     and val is not None)
    if unknown:
        raise ValueError(f"ds-burst attention: keyword argument(s) {unknown} are not supported by the 'burst' "
                         "attention implementation (custom masks and the like)")
    if position_ids is None and _sp_size(group) > 1:
        raise ValueError("ds-burst attention: position_ids are required when the sequence is split over ranks "
                         "(sequence-parallel size > 1); pass the global positions, e.g. shard_batch(...)"
                         "['position_ids'], or RoPE runs with local positions")
    causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
    window = (-1, -1)
    if sliding_window is not None:
        window = (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)
    opts = dict(burst_options or {})
    record = bool(opts.pop("record_max_logit", False))
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    documents: dict[str, Any] = {}
    if cu_q is not None or cu_k is not None:  # full-sequence boundaries (or flattened-batch offsets), read in the op
        documents["cu_seqlens"] = (cu_q, cu_k) if (cu_q is not None and cu_k is not None and cu_q is not cu_k) \
            else (cu_q if cu_q is not None else cu_k)
    elif position_ids is not None:  # packed documents restart their positions at 0 (gathered once per forward)
        documents["position_ids"] = position_ids
    out = burst_attn_func(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=causal,
        softmax_scale=scaling,
        window_size=window,
        group=group,
        layout=layout,
        softcap=None if softcap is None else float(softcap),
        sinks=s_aux,
        return_max_logit=record,
        **documents,
        **opts,
    )
    if record:
        out, max_logit = out
        RECORD.add(module, max_logit)
    assert isinstance(out, torch.Tensor)
    return out


def register(layout: str = "zigzag", topology: Topology | None = None, **burst_options: Any) -> None:
    """Register ``attn_implementation="burst"`` with transformers. ``layout`` must match :func:`shard_batch`;
    ``burst_options`` (:data:`HF_OPTIONS`: ``backward``, ``kernel``, ``deterministic``, ``check_inputs``,
    ``check_finite`` go to every call; ``record_max_logit=True`` records every attention module's per-head maximum
    logit for :func:`ds_burst.pop_max_logits`)."""
    from transformers import AttentionInterface

    check_layout(layout)
    unknown = sorted(set(burst_options) - set(HF_OPTIONS))
    if unknown:
        raise ValueError(f"unknown burst option(s) {unknown}; allowed: {sorted(HF_OPTIONS)}")
    _STATE.update(topology=topology, layout=layout, options=dict(burst_options))
    AttentionInterface.register(ATTN_NAME, burst_attention_forward)


def setup(sequence_parallel_size: int, gpus_per_node: int | None = None, schedule: str = "auto",
          layout: str = "zigzag", *, ulysses_degree: int | None = None, **burst_options: Any) -> Topology | None:
    """Create the sequence/data-parallel groups (:func:`ds_burst.init_sequence_parallel`, ``ulysses_degree``
    included) and register ``attn_implementation="burst"``. Call on every rank after ``deepspeed.init_distributed()``.

    ``sequence_parallel_size=1`` in a single process without torch.distributed (no process group and no launcher
    ``WORLD_SIZE`` above 1) only registers the attention and returns ``None``: there are no groups to make, and
    ``None`` is what every ds-burst function takes for "one process" (:func:`shard_batch` returns the whole
    sequence, :func:`sequence_parallel_loss` the plain mean, the attention runs on the local tensors). With a
    process group, ``sequence_parallel_size=1`` returns a :class:`Topology` (data parallelism over every rank)
    as for any other size. Returns the topology (the DeepSpeed ``mpu``) otherwise.
    """
    from ds_burst.core import settings
    from ds_burst.dist.comm import initialized as comm_initialized

    if sequence_parallel_size == 1 and not comm_initialized():
        launched = settings.launcher_world_size()
        if launched > 1:
            raise RuntimeError(f"setup(1): the launcher started WORLD_SIZE={launched} processes but no "
                               "torch.distributed process group is initialised; call deepspeed.init_distributed() "
                               "first (or run a single process)")
        register(layout, None, **burst_options)
        return None
    topo = init_sequence_parallel(sequence_parallel_size, gpus_per_node, schedule, ulysses_degree)
    register(layout, topo, **burst_options)
    return topo


def shard_batch(batch: dict[str, torch.Tensor], mpu: Any = None, layout: str | None = None) -> dict[str, torch.Tensor]:
    """This rank's part of a full-sequence batch: ``input_ids``, ``shift_labels`` and global ``position_ids``.

    ``batch`` holds ``input_ids [B, S]`` and ``shift_labels [B, S]`` (target of each token) or ``labels``
    (transformers convention, shifted here; the last position gets ``-100``). An ``attention_mask`` with
    any zero (padding) raises ``ValueError``. Given ``position_ids`` are sharded along; otherwise ``0..S-1``.
    ``mpu`` is the topology (default: the current one); ``layout`` defaults to the registered one.
    Packed documents (``position_ids`` restarting at 0, or ``cu_seq_lens_q``/``cu_seq_lens_k`` of the unsharded
    batch): the result also holds ``cu_seq_lens_q``/``cu_seq_lens_k``, the full-sequence boundaries (lists) to
    pass to the model.

    Tensors may live on any device (CUDA included); the outputs are on ``input_ids``' device and the shard indices
    are built there. The only reads back to the host are the ones whose answer the host needs: the padding check
    of an ``attention_mask`` (one bool) and the document boundaries of a packed batch (a bool mask of
    ``position_ids``, or ``cu_seq_lens_*`` given as a tensor).
    """
    from ds_burst.training.data import shard_index

    topo = mpu if mpu is not None else get_topology()
    sp_rank = topo.get_sequence_parallel_rank() if topo is not None else 0
    sp_size = topo.get_sequence_parallel_world_size() if topo is not None else 1
    layout = layout or _STATE["layout"]
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("attention_mask has padding (zeros): ds-burst attention applies no padding mask; pack "
                         "sequences to full length instead")
    if "shift_labels" in batch:
        shift = batch["shift_labels"]
    elif "labels" in batch:
        labels = batch["labels"]
        shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    else:
        raise ValueError("batch needs 'shift_labels' or 'labels'")
    out = shard_batch_local(ids, shift, sp_rank, sp_size, layout)
    result = {"input_ids": out["input_ids"], "shift_labels": out["labels"], "position_ids": out["position_ids"]}
    if "position_ids" in batch:
        given = batch["position_ids"]
        result["position_ids"] = given.index_select(-1, shard_index(layout, sp_rank, sp_size, ids.shape[-1],
                                                                    given.device))
    docs = None
    if batch.get("cu_seq_lens_q") is not None or batch.get("cu_seq_lens_k") is not None:
        cu = batch.get("cu_seq_lens_q", batch.get("cu_seq_lens_k"))
        docs = boundaries_from_cu_seq_lens(cu, ids.shape[0], ids.shape[-1])
    elif "position_ids" in batch:
        docs = boundaries_from_position_ids(batch["position_ids"])
    moved: dict[str, Any] = {k: v.to(ids.device) for k, v in result.items()}
    if docs is not None:
        moved["cu_seq_lens_q"] = moved["cu_seq_lens_k"] = docs
    return moved


def sequence_parallel_loss(logits: torch.Tensor, shift_labels: torch.Tensor, mpu: Any = None,
                           ignore_index: int = IGNORE_INDEX, sp_grads_averaged: bool = False) -> torch.Tensor:
    """Mean cross-entropy over all labelled tokens of the full sequence (see
    :func:`ds_burst.training.losses.sequence_parallel_loss`; pass
    ``sp_grads_averaged=ds_burst.training.losses.sp_grads_averaged(ds_config)`` under DeepSpeed)."""
    return _sp_loss(logits, shift_labels, mpu, ignore_index=ignore_index, sp_grads_averaged=sp_grads_averaged)

