"""The step's per-head maximum attention logits over the sequence-parallel group (Muon's QK-clip).

``burst_attn_func(..., return_max_logit=True)`` returns each rank's ``[Hq]`` maximum over its own queries;
:func:`reduce_max_logits` turns one step's values of every layer into the maximum over the whole sequence with one
all-reduce. The Hugging Face backend and the DeepSpeed drop-in record per-module values (``record_max_logit``) in a
:class:`MaxLogitRecord`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ds_burst.dist.comm import all_reduce_max, resolve_group


def reduce_max_logits(values: Sequence[torch.Tensor], group: object = None) -> list[torch.Tensor]:
    """The maximum over the ranks of ``group`` of each tensor in ``values`` (e.g. every layer's ``max_logit [Hq]``
    of one step), in one all-reduce (MAX) of their concatenation: call it once per step, on every rank, with the
    same shapes. ``group`` as in ``burst_attn_func`` (``None``: the current topology's sequence-parallel group, or
    the world). Returns new tensors shaped and typed like the inputs (a CUDA tensor goes over NCCL, a CPU one over
    gloo: pass them on the group's device)."""
    values = list(values)
    if not values:
        return []
    info = resolve_group(group)
    dtype, device = values[0].dtype, values[0].device
    for x in values:
        if x.dtype != dtype or x.device != device:
            raise ValueError(f"reduce_max_logits: every tensor must have the same dtype and device; got {dtype} on "
                             f"{device} and {x.dtype} on {x.device}")
    flat = torch.cat([x.detach().reshape(-1) for x in values])
    all_reduce_max(info, flat)
    return [part.reshape(x.shape) for part, x in zip(flat.split([x.numel() for x in values]), values)]


class MaxLogitRecord:
    """The largest ``max_logit`` each attention module saw since the last :meth:`pop` (running maximum over calls:
    micro-batches of a step and a checkpointed forward's re-run leave it exact), by module, in the order the
    modules were first called (the same on every rank)."""

    def __init__(self) -> None:
        self.values: dict[object, torch.Tensor] = {}

    def add(self, key: object, value: torch.Tensor) -> None:
        """Fold one call's ``max_logit`` into ``key``'s running maximum."""
        value = value.detach()
        old = self.values.get(key)
        self.values[key] = value.clone() if old is None else torch.maximum(old, value)

    def pop(self, group: object = None, reduce: bool = True) -> dict[object, torch.Tensor]:
        """The recorded values by key and a fresh start; ``reduce``: the maximum over ``group``'s ranks
        (:func:`reduce_max_logits`: every rank calls it together, after the same forward passes)."""
        keys, got = list(self.values), list(self.values.values())
        self.values = {}
        if reduce:
            got = reduce_max_logits(got, group)
        return dict(zip(keys, got))


RECORD = MaxLogitRecord()
"""What the integrations record with ``record_max_logit=True``."""


def pop_max_logits(group: object = None, reduce: bool = True) -> dict[object, torch.Tensor]:
    """The per-head maximum logit ``[Hq]`` (fp32) of every attention module that ran with ``record_max_logit=True``
    (``ds_burst.hf.register``/``setup``, the ALST drop-in, ``DistributedAttention``) since the last call, by module
    (the Hugging Face attention module, e.g. ``LlamaAttention`` with its ``q_proj``/``k_proj``, or the
    ``DistributedAttention``), over the whole sequence: one all-reduce (MAX) over ``group`` (``None``: the current
    topology's sequence-parallel group) for all of them. Call it once per optimizer step on every rank (e.g. before
    a QK-clip); ``reduce=False``: this rank's values only."""
    return RECORD.pop(group, reduce)
