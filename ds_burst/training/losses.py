"""Loss and accuracy over the whole (sharded) sequence: every rank holds a shard of the logits and labels;
the token-weighted mean over all labelled tokens of the SP group is what SP=1 reports. A rank without labelled
tokens contributes zero (never NaN)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ds_burst.dist.comm import GroupInfo, all_reduce_sum, is_cpu_backend, resolve_group
from ds_burst.dist.topology import get_topology


def _sp_info(group: Any) -> GroupInfo:
    """The SP group: ``group`` if given, else the current topology, else a single process (never WORLD)."""
    if group is None:
        group = get_topology()
    if group is None:
        return GroupInfo(None, 0, 1)
    return resolve_group(group)


def sequence_parallel_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: Any = None,
    ignore_index: int = -100,
    sp_grads_averaged: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy over all labelled tokens of the full sequence, from this rank's shard.

    ``labels`` are already shifted (``labels[t]`` is the target of ``logits[t]``), sharded like ``logits``.
    The returned value is the same on every rank of the SP group (the full-sequence mean, as SP=1 would
    report). Its gradient on this rank is that of ``local_sum / global_count``; summed over the SP ranks
    those give exactly the gradient of the full-sequence mean. Whether the engine then *sums* or
    *averages* the gradients over the SP ranks depends on the DeepSpeed code path (see
    :func:`sp_grads_averaged`); pass ``sp_grads_averaged=True`` when it averages (the gradient is then
    scaled by ``P``, so the average is the true gradient).
    """
    flat = labels.reshape(-1)
    logits = logits if logits.dtype == torch.float64 else logits.float()  # fp32 softmax; fp64 stays fp64
    ce = F.cross_entropy(logits.reshape(flat.numel(), -1), flat, ignore_index=ignore_index, reduction="sum")
    count = (flat != ignore_index).sum().to(torch.float64)
    return sequence_parallel_loss_from_sum(ce, count, group, sp_grads_averaged)


def sequence_parallel_loss_from_sum(
    ce_sum: torch.Tensor, count: torch.Tensor, group: Any = None, sp_grads_averaged: bool = False
) -> torch.Tensor:
    """:func:`sequence_parallel_loss` from this rank's summed token loss ``ce_sum`` and labelled-token
    ``count`` (e.g. from :func:`ds_burst.training.memory.chunked_lm_head_loss`): same value and gradients."""
    info = _sp_info(group)
    ce = ce_sum
    total = all_reduce_sum(info, count) if info.world > 1 else count
    local = ce / total.clamp(min=1).to(ce.dtype)
    value = all_reduce_sum(info, local.detach()) if info.world > 1 else local.detach()
    scaled = local * info.world if sp_grads_averaged else local
    return scaled + (value - scaled).detach()


def sp_grads_averaged(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed (0.19.8) *averages* gradients over the sequence-parallel ranks for this config.

    With a sequence-parallel ``mpu`` DeepSpeed reduces gradients over all ``dp * sp`` ranks. ZeRO-3 with
    ``reduce_scatter`` (the default) pre-divides by ``dp * sp`` (``reduce_scatter_coalesced``): an
    average over the SP ranks. Every other path (no ZeRO, ZeRO-1/2, ZeRO-3 with ``"reduce_scatter":
    false``) divides by ``dp`` only: a sum over the SP ranks. ``tests/test_deepspeed_train.py`` checks
    both against SP=1 gradients.
    """
    zero = ds_config.get("zero_optimization", {}) or {}
    return int(zero.get("stage", 0)) == 3 and bool(zero.get("reduce_scatter", True))


@torch.no_grad()
def sequence_parallel_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, group: Any = None, ignore_index: int = -100
) -> tuple[int, int]:
    """``(correct, total)`` argmax predictions over the labelled tokens of the full sequence."""
    info = _sp_info(group)
    mask = labels != ignore_index
    correct = ((logits.argmax(-1) == labels) & mask).sum()
    t = torch.stack([correct, mask.sum()]).to(torch.int64)
    if info.world > 1:
        t = all_reduce_sum(info, t.cpu() if _gloo(info) else t)
    return int(t[0]), int(t[1])


def per_document_accuracy(logits: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor, num_docs: int,
                          group: Any = None, ignore_index: int = -100) -> tuple[list[int], list[int]]:
    """``(correct, total)`` per document (packed documents: ``doc_ids`` sharded like ``labels``) over the full
    sequence of every row."""
    info = _sp_info(group)
    mask = labels != ignore_index
    hit = (logits.argmax(-1) == labels) & mask
    t = torch.zeros(2, num_docs, dtype=torch.int64, device=labels.device)
    t[0].index_add_(0, doc_ids[mask], torch.ones_like(doc_ids[mask]).masked_fill_(~hit[mask], 0))
    t[1].index_add_(0, doc_ids[mask], torch.ones_like(doc_ids[mask]))
    if info.world > 1:
        t = all_reduce_sum(info, t.cpu() if _gloo(info) else t)
    return t[0].tolist(), t[1].tolist()


def _gloo(info: GroupInfo) -> bool:
    return is_cpu_backend(info)
