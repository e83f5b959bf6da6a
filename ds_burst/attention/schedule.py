"""The one function that turns the caller's ``schedule`` (and the group it passed) into the schedule a call runs."""

from __future__ import annotations

import torch

from ds_burst.core.cost_model import choose_schedule
from ds_burst.core.mask import window_is_finite
from ds_burst.dist.comm import GroupInfo, NodeGroups
from ds_burst.ring import ulysses_ring as uly


def resolve_schedule(schedule: str | None, group: object, q: object, k: object, causal: bool, window: object,
                     info: GroupInfo) -> str:
    """The schedule of one call.

    ``None`` takes the topology's schedule (the flat ring for a plain process group). ``"auto"`` asks the cost
    model when the group spans several nodes, and keeps the flat ring inside a node and for sliding windows
    (the flat ring stops early there). A double ring or Ulysses-ring on a topology without node subgroups
    (one node) is the flat ring. Anything else is returned as given; validation reports unknown names.
    """
    node_groups: NodeGroups | None = getattr(group, "node_groups", None)
    sched = schedule if schedule is not None else getattr(group, "schedule", "ring")
    if sched == "auto":
        sched = _auto(q, k, causal, window, info, node_groups)
    if sched in ("double_ring", "ulysses_ring") and node_groups is None and hasattr(group, "schedule"):
        sched = "ring"  # a topology inside one node / not made for it: no node subgroups
    return sched


def _auto(q: object, k: object, causal: bool, window: object, info: GroupInfo, node_groups: NodeGroups | None) -> str:
    if node_groups is None or not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        return "ring"  # bad input is reported by validation, the same on every rank
    if q.dim() != 4 or k.dim() != 4 or not isinstance(window, (tuple, list)) or len(window) != 2:
        return "ring"
    if window_is_finite(causal, tuple(window)):  # type: ignore[arg-type]
        return "ring"
    sched = choose_schedule(q.shape[1] * info.world, node_groups.nodes, node_groups.per_node, q.shape[2],
                            k.shape[2], q.shape[3], q.element_size(), bool(causal))
    if sched == "ulysses_ring" and uly.check_heads(q.shape[2], k.shape[2], node_groups.per_node):
        return "double_ring"
    return sched
