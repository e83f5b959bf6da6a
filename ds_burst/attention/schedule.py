"""The one function that turns the caller's ``schedule`` (and the group it passed) into the schedule a call runs,
and the groups of the Ulysses schedules' all-to-all."""

from __future__ import annotations

import functools

import torch

from ds_burst.core.cost_model import choose_schedule
from ds_burst.core.mask import window_is_finite
from ds_burst.core.tile_rates import gpu_kind
from ds_burst.dist.comm import GroupInfo, NodeGroups
from ds_burst.ring import ulysses_ring as uly

_ONE = GroupInfo(None, 0, 1)  # the "ring" of schedule="ulysses": this rank alone


def resolve_schedule(schedule: str | None, group: object, q: object, k: object, causal: bool, window: object,
                     info: GroupInfo) -> str:
    """The schedule of one call.

    ``None`` takes the topology's schedule (the flat ring for a plain process group). ``"auto"`` asks the cost
    model (:func:`ds_burst.core.cost_model.choose_schedule`): across nodes among the ring, the double ring and the
    Ulysses schedules; inside one node between the flat ring and ``ulysses`` where the GPU has a measured tile table
    (the flat ring without one, e.g. on CPU); the flat ring for sliding windows (it stops early there). It never
    picks a Ulysses schedule whose heads cannot be split. A double
    ring on a topology without node subgroups (one node) is the flat ring; ``ulysses_ring`` on a topology without
    node or Ulysses groups whose sequence-parallel group lies inside one node is ``ulysses`` (Ulysses over the
    node is Ulysses over the whole group). Anything else is returned as given; validation reports unknown names
    and what a schedule cannot run. Pure: the same answer on every rank for the same call, no collective.
    """
    node_groups: NodeGroups | None = getattr(group, "node_groups", None)
    sched = schedule if schedule is not None else getattr(group, "schedule", "ring")
    if sched == "auto":
        sched = _auto(q, k, causal, window, info, node_groups, group)
    if sched == "double_ring" and node_groups is None and hasattr(group, "schedule"):
        sched = "ring"  # a topology inside one node / not made for it: no node subgroups
    if sched == "ulysses_ring" and ulysses_groups(group, sched, info) is None and _inside_one_node(group, info):
        sched = "ulysses"
    return sched


def ulysses_groups(group: object, schedule: str, info: GroupInfo) -> NodeGroups | None:
    """The all-to-all group and the ring across of a Ulysses schedule, as :class:`NodeGroups` (``None``: not a
    Ulysses schedule, or a group without the subgroups ``ulysses_ring`` needs).

    ``ulysses``: the whole sequence-parallel group ``info``, and a ring of one rank. ``ulysses_ring``: the topology's
    Ulysses groups (``init_sequence_parallel(..., ulysses_degree=U)``), else its node groups (``U`` = GPUs per
    node)."""
    if schedule == "ulysses":
        return NodeGroups(1, info.world, info, _ONE)
    if schedule == "ulysses_ring":
        return getattr(group, "ulysses_groups", None) or getattr(group, "node_groups", None)
    return None


def _inside_one_node(group: object, info: GroupInfo) -> bool:
    """Whether ``group`` is a topology (or ALST's object around one) whose sequence-parallel group fits one node."""
    topo = getattr(group, "topology", group)
    per_node = getattr(topo, "gpus_per_node", None)
    return isinstance(per_node, int) and hasattr(group, "schedule") and info.world <= per_node


@functools.cache
def _cuda_kind(index: int) -> str | None:
    return gpu_kind(torch.cuda.get_device_name(index))


def device_kind(device: torch.device) -> str | None:
    """The GPU kind whose shipped tile table ``auto`` uses for tensors on ``device`` (``None`` off CUDA or for a
    GPU without a table); read once per device."""
    if device.type != "cuda":
        return None
    return _cuda_kind(device.index if device.index is not None else torch.cuda.current_device())


def _auto(q: object, k: object, causal: bool, window: object, info: GroupInfo, node_groups: NodeGroups | None,
          group: object = None) -> str:
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() != 4 or k.dim() != 4:
        return "ring"  # bad input is reported by validation, the same on every rank
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        return "ring"
    if window_is_finite(causal, tuple(window)):  # type: ignore[arg-type]
        return "ring"
    nodes, per_node = (node_groups.nodes, node_groups.per_node) if node_groups is not None else (1, info.world)
    sched = choose_schedule(q.shape[1] * info.world, nodes, per_node, q.shape[2], k.shape[2], q.shape[3],
                            q.element_size(), bool(causal), device_kind(q.device))
    groups = ulysses_groups(group, sched, info)
    if groups is not None and uly.check_heads(q.shape[2], k.shape[2], groups.per_node, sched):
        return "double_ring" if nodes > 1 else "ring"
    return sched
