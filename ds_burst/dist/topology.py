"""Process groups for sequence parallelism, exposed as a DeepSpeed ``mpu``.

``init_sequence_parallel(P)`` splits the world (``W = dp * P`` ranks) into

* **sequence-parallel (SP) groups** of ``P`` consecutive ranks: ``[i*P, (i+1)*P)`` (the ring runs here;
  consecutive ranks keep a group inside a node when ``P`` divides the GPUs per node);
* **data-parallel (DP) groups**, orthogonal: ranks with the same SP rank, ``{j, j+P, j+2P, ...}``;
* one **sequence-data-parallel** group of all ranks (ZeRO shards parameters and reduces gradients there);
* **model-parallel** groups of size 1 (no tensor or pipeline parallelism).

Every rank creates every group in the same order, as ``torch.distributed.new_group`` requires.

The returned :class:`Topology` is what ``deepspeed.initialize(..., mpu=topology)`` expects. With it,
DeepSpeed reduces gradients over the sequence-data-parallel group; whether that sums or averages over the SP
ranks depends on the DeepSpeed version, ZeRO stage and path (see
:func:`ds_burst.training.losses.sp_grads_averaged`). The batch size DeepSpeed checks is ``micro * accumulation *
dp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ds_burst.core import settings
from ds_burst.core.options import SCHEDULES
from ds_burst.dist.comm import GroupInfo, NodeGroups, all_gather_objects, set_default_group

LATER_SCHEDULES: tuple[str, ...] = ()

_CURRENT: Topology | None = None


def check_schedule(schedule: str, sequence_parallel_size: int = 1, gpus_per_node: int = 1) -> str:
    """Return the concrete schedule for ``schedule``, or raise ``ValueError``.

    ``auto`` keeps the choice open when the SP group spans several whole nodes (each attention call then
    takes the cost model's pick for its shapes, :func:`ds_burst.plan.choose_schedule`) and is the flat ring
    inside one node. ``double_ring`` inside a single node is the flat ring. ``ulysses`` (the all-to-all over the
    whole group) fits any group; ``ulysses_ring`` inside one node is Ulysses over that node, the whole group.
    """
    if schedule in LATER_SCHEDULES:
        raise ValueError(
            f"schedule {schedule!r} is not available yet in this version of ds-burst; use 'ring', 'double_ring' "
            "or 'auto'"
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: expected one of {SCHEDULES}")
    p, gpn = sequence_parallel_size, gpus_per_node
    spans_nodes = p > gpn
    aligned = p % gpn == 0
    if schedule in ("double_ring", "ulysses_ring") and spans_nodes and not aligned:
        raise ValueError(
            f"schedule {schedule!r} needs whole nodes in a sequence-parallel group: sequence_parallel_size={p} "
            f"is not a multiple of gpus_per_node={gpn}"
        )
    if schedule in ("ulysses_ring", "ulysses"):
        return schedule
    if schedule in ("auto", "double_ring") and spans_nodes and aligned:
        return schedule
    return "ring"


def detect_gpus_per_node(world_size: int) -> int:
    """GPUs (ranks) per node: ``LOCAL_WORLD_SIZE`` if set (torchrun, the DeepSpeed launcher), else the
    visible CUDA device count, else the world size (single node)."""
    env = settings.local_world_size()
    if env:
        return env
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return min(torch.cuda.device_count(), world_size)
    except Exception:  # noqa: BLE001 - detection only
        pass
    return world_size


@dataclass(eq=False)  # compared and hashed by identity: a topology is a set of live process groups
class Topology:
    """Sequence/data parallel groups of this rank; implements the DeepSpeed ``mpu`` interface.

    Attributes:
        sequence_parallel_size: ``P``, ranks per SP group.
        data_parallel_size: ``dp = world // P``, SP groups (model replicas that see different data).
        world_size, rank: of the default (world) group.
        gpus_per_node: ranks per node (``LOCAL_WORLD_SIZE``); ``gpus_per_node=2`` on 4 ranks acts as 2 nodes.
        schedule: ``"ring"``, ``"double_ring"``, ``"ulysses_ring"``, ``"ulysses"`` or ``"auto"`` (several nodes:
            chosen per call by the cost model).
        node_groups: for the double ring, this rank's intra-node and inter-node subgroups of its SP group.
        ulysses_degree: ``U``, the ranks of one all-to-all over heads (``P`` for ``"ulysses"``, ``U`` of
            ``ulysses_degree=U`` or the GPUs per node for ``"ulysses_ring"``; 1: no all-to-all).
        ulysses_groups: for ``ulysses_degree=U``, this rank's Ulysses group (``U`` consecutive ranks) and the
            ring across the ``P/U`` groups; ``None``: ``ulysses_ring`` uses ``node_groups``.
    """

    sequence_parallel_size: int
    data_parallel_size: int
    world_size: int
    rank: int
    gpus_per_node: int
    schedule: str
    sp_group: dist.ProcessGroup | None = field(repr=False, default=None)
    dp_group: dist.ProcessGroup | None = field(repr=False, default=None)
    sdp_group: dist.ProcessGroup | None = field(repr=False, default=None)
    mp_group: dist.ProcessGroup | None = field(repr=False, default=None)
    node_groups: NodeGroups | None = field(repr=False, default=None)
    ulysses_degree: int = 1
    ulysses_groups: NodeGroups | None = field(repr=False, default=None)

    # -- ranks ---------------------------------------------------------------------------------
    @property
    def sp_rank(self) -> int:
        """This rank's position in its SP group."""
        return self.rank % self.sequence_parallel_size

    @property
    def dp_rank(self) -> int:
        """Index of this rank's SP group (its data-parallel replica)."""
        return self.rank // self.sequence_parallel_size

    def get_sequence_parallel_group_ranks(self) -> list[int]:
        """Global ranks of this rank's SP group."""
        p = self.sequence_parallel_size
        return list(range(self.dp_rank * p, (self.dp_rank + 1) * p))

    def get_data_parallel_group_ranks(self) -> list[int]:
        """Global ranks of this rank's DP group."""
        return list(range(self.sp_rank, self.world_size, self.sequence_parallel_size))

    # -- sequence parallel ---------------------------------------------------------------------
    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self.sp_group  # type: ignore[return-value]

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.sequence_parallel_size

    # -- sequence x data parallel (ZeRO partitioning and gradient reduction) -------------------
    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self.sdp_group  # type: ignore[return-value]

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.world_size

    # -- data parallel -------------------------------------------------------------------------
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group  # type: ignore[return-value]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    # -- model / tensor / pipeline parallel: none (each rank alone) -----------------------------
    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.mp_group  # type: ignore[return-value]

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_src_rank(self) -> int:
        return self.rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank
    get_pipe_parallel_group = get_model_parallel_group
    get_pipe_parallel_rank = get_model_parallel_rank
    get_pipe_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_rank = get_model_parallel_rank
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size


def init_sequence_parallel(
    sequence_parallel_size: int, gpus_per_node: int | None = None, schedule: str = "auto",
    ulysses_degree: int | None = None,
) -> Topology:
    """Create the SP, DP, sequence-data-parallel and model-parallel groups; return the :class:`Topology`.

    Call on every rank after ``deepspeed.init_distributed()`` (or ``torch.distributed.init_process_group``),
    before ``deepspeed.initialize(..., mpu=topology)``.

    Args:
        sequence_parallel_size: ranks per sequence-parallel group; must divide the world size.
        gpus_per_node: ranks per node; default ``LOCAL_WORLD_SIZE`` or the visible GPU count.
        schedule: ``"auto"``, ``"ring"`` (flat), ``"double_ring"`` (intra-node ring, one inter-node hop per
            node-cycle), ``"ulysses_ring"`` (all-to-all over heads inside the node, ring across nodes) or
            ``"ulysses"`` (all-to-all over heads across the whole group, DeepSpeed-Ulysses with ds-burst's
            kernels); ``double_ring`` and ``ulysses_ring`` need ``sequence_parallel_size`` to be a multiple of
            ``gpus_per_node`` when the group spans nodes.
        ulysses_degree: ``U``, the 2-D Ulysses x ring split (USP's ``ulysses_degree``; the ring degree is
            ``sequence_parallel_size / U``): all-to-all over heads inside groups of ``U`` consecutive ranks, the
            ring across the groups, wherever the nodes are (``U`` dividing the GPUs per node keeps each
            all-to-all inside a node). ``U = sequence_parallel_size`` is ``"ulysses"``, ``U = 1`` the flat ring,
            anything between ``"ulysses_ring"`` on these groups. ``schedule`` must then be ``"auto"`` (the
            default) or agree. ``None``: ``ulysses_ring`` takes ``U`` = the GPUs per node.

    Raises:
        ValueError: bad size, size not dividing the world, an unavailable schedule, or a ``ulysses_degree`` that
            does not divide ``sequence_parallel_size`` or conflicts with ``schedule``.
        RuntimeError: torch.distributed is not initialised.
    """
    global _CURRENT
    check_schedule(schedule)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "init_sequence_parallel needs torch.distributed: call deepspeed.init_distributed() first"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    p = sequence_parallel_size
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"sequence_parallel_size must be a positive int, got {sequence_parallel_size!r}")
    if world % p:
        raise ValueError(
            f"sequence_parallel_size={p} must divide the world size {world} (world = data_parallel x sequence_parallel)"
        )
    if gpus_per_node is None:
        gpus_per_node = detect_gpus_per_node(world)
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be a positive int, got {gpus_per_node!r}")
    _check_agreement(world, rank, p, gpus_per_node, schedule, ulysses_degree)  # first: ranks that differ all raise
    if ulysses_degree is not None:
        schedule = ulysses_schedule(p, ulysses_degree, schedule)
    dp = world // p
    # a Ulysses degree makes its own groups: the nodes need not be whole
    concrete = schedule if ulysses_degree is not None else check_schedule(schedule, p, gpus_per_node)
    topo = Topology(p, dp, world, rank, gpus_per_node, concrete)
    for i in range(dp):  # SP groups: consecutive ranks
        ranks = list(range(i * p, (i + 1) * p))
        g = dist.new_group(ranks)
        if rank in ranks:
            topo.sp_group = g
    for j in range(p):  # DP groups: same SP rank
        ranks = list(range(j, world, p))
        g = dist.new_group(ranks)
        if rank in ranks:
            topo.dp_group = g
    whole_nodes = p <= gpus_per_node or p % gpus_per_node == 0
    if concrete in ("auto", "double_ring", "ulysses_ring") and whole_nodes:  # node subgroups, same order everywhere
        topo.node_groups = _node_groups(rank, world, p, min(gpus_per_node, p))
    if concrete == "ulysses_ring":
        u = min(gpus_per_node, p) if ulysses_degree is None else ulysses_degree
        topo.ulysses_degree = u
        topo.ulysses_groups = (topo.node_groups if topo.node_groups is not None and u == topo.node_groups.per_node
                               else _node_groups(rank, world, p, u))
    elif concrete == "ulysses":
        topo.ulysses_degree = p
    topo.sdp_group = dist.new_group(list(range(world)))
    for r in range(world):  # model-parallel: each rank alone
        g = dist.new_group([r])
        if r == rank:
            topo.mp_group = g
    _CURRENT = topo
    set_default_group(topo)  # group=None now means this topology's SP group
    return topo


def ulysses_schedule(sequence_parallel_size: int, ulysses_degree: object, schedule: str = "auto") -> str:
    """The schedule of ``init_sequence_parallel(P, ulysses_degree=U, schedule=...)``: ``"ulysses"`` for ``U = P``,
    ``"ring"`` for ``U = 1``, else ``"ulysses_ring"``; ``ValueError`` for a ``U`` that does not divide ``P`` or a
    ``schedule`` other than ``"auto"`` that says otherwise."""
    p, u = sequence_parallel_size, ulysses_degree
    if isinstance(u, bool) or not isinstance(u, int) or u < 1 or p % u:
        raise ValueError(f"ulysses_degree must be a positive int dividing sequence_parallel_size={p} (the ring "
                         f"degree is sequence_parallel_size / ulysses_degree), got {ulysses_degree!r}")
    concrete = "ulysses" if u == p else ("ring" if u == 1 else "ulysses_ring")
    agrees = schedule in ("auto", concrete) or (schedule == "ulysses_ring" and concrete == "ulysses")
    if not agrees:
        raise ValueError(f"init_sequence_parallel: ulysses_degree={u} with sequence_parallel_size={p} is schedule "
                         f"{concrete!r}, but schedule={schedule!r} was asked for; leave schedule='auto'")
    return concrete


def _check_agreement(world: int, rank: int, p: int, gpus_per_node: int, schedule: str,
                     ulysses_degree: int | None = None) -> None:
    """Raise the same ``ValueError`` on every rank when the ranks disagree on the settings or when a declared
    node (``gpus_per_node`` consecutive ranks) spans more than one host. Several declared nodes on one host
    (simulated nodes) are allowed."""
    import socket

    mine = (p, gpus_per_node, schedule, ulysses_degree, socket.gethostname())
    rows: list[tuple[int, int, str, int | None, str]] = [mine] * world
    if world > 1:  # an emulated world (torch's fake backend) hears only this rank's settings
        rows = all_gather_objects(GroupInfo(dist.group.WORLD, rank, world), mine)  # type: ignore[assignment]
    for i, name in enumerate(("sequence_parallel_size", "gpus_per_node", "schedule", "ulysses_degree")):
        seen = [row[i] for row in rows]
        if len(set(seen)) > 1:
            raise ValueError(f"init_sequence_parallel: {name} differs across ranks: "
                             + ", ".join(f"rank {r}: {x}" for r, x in enumerate(seen)))
    if world % gpus_per_node and gpus_per_node < world:
        raise ValueError(f"init_sequence_parallel: gpus_per_node={gpus_per_node} does not divide the world size "
                         f"{world}: the ranks cannot form whole nodes")
    for start in range(0, world, gpus_per_node):
        hosts = {rows[r][4] for r in range(start, min(start + gpus_per_node, world))}
        if len(hosts) > 1:
            raise ValueError(f"init_sequence_parallel: gpus_per_node={gpus_per_node} puts ranks {start}.."
                             f"{min(start + gpus_per_node, world) - 1} in one node, but they run on hosts "
                             f"{sorted(hosts)}; pass the real GPUs per node (LOCAL_WORLD_SIZE)")


def _node_groups(rank: int, world: int, p: int, per_node: int) -> NodeGroups:
    """Intra-node and inter-node subgroups of each SP group (``p`` a multiple of ``per_node``)."""
    n_nodes = p // per_node
    intra = inter = None
    for start in range(0, world, p):
        for k in range(n_nodes):
            ranks = list(range(start + k * per_node, start + (k + 1) * per_node))
            g = dist.new_group(ranks)
            if rank in ranks:
                intra = GroupInfo(g, ranks.index(rank), per_node)
        for j in range(per_node):
            ranks = list(range(start + j, start + p, per_node))
            g = dist.new_group(ranks)
            if rank in ranks:
                inter = GroupInfo(g, ranks.index(rank), n_nodes)
    assert intra is not None and inter is not None
    return NodeGroups(n_nodes, per_node, intra, inter)


def get_topology() -> Topology | None:
    """The topology made by the last :func:`init_sequence_parallel` call in this process (or ``None``)."""
    return _CURRENT


def reset_topology() -> None:
    """Forget the current topology (the process groups themselves are not destroyed)."""
    global _CURRENT
    _CURRENT = None
    set_default_group(None)
