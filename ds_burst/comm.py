"""Communication: process-group helpers, batched P2P with a send/commit/wait object, byte counters.

The schedules never call ``torch.distributed`` directly; they queue sends and receives on a
:class:`P2PBatch`, ``commit()`` them as one ``batch_isend_irecv`` (NCCL runs it on its own stream,
overlapping the compute issued next), and ``wait()`` before touching the received buffers.

Every rank of a group must issue the same sequence of batches; the schedules guarantee that by
deriving every send and receive from the same step list on all ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class GroupInfo:
    """A process group with this rank's position in it (``group is None`` means single process)."""

    group: dist.ProcessGroup | None
    rank: int
    world: int

    def global_rank(self, group_rank: int) -> int:
        """Global rank of the member at ``group_rank``."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


@dataclass(frozen=True)
class NodeGroups:
    """The sequence-parallel group seen as ``nodes`` nodes of ``per_node`` consecutive ranks.

    ``intra`` holds this rank's node (NVLink); ``inter`` the ranks with the same local index on every
    node (one InfiniBand rail). Group rank ``r`` of the SP group is node ``r // per_node``, local index
    ``r % per_node``.
    """

    nodes: int
    per_node: int
    intra: GroupInfo
    inter: GroupInfo


def resolve_group(group: object) -> GroupInfo:
    """Accept ``None`` (world, or a single process when torch.distributed is not initialised), a
    ``ProcessGroup``, or any object with ``get_sequence_parallel_group()`` (a DeepSpeed ``mpu``)."""
    if group is not None and hasattr(group, "get_sequence_parallel_group"):
        group = group.get_sequence_parallel_group()
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return GroupInfo(None, 0, 1)
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, an mpu or None; got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this rank is not a member of the given process group")
    return GroupInfo(group, rank, dist.get_world_size(group))


# ---------------------------------------------------------------------------------------------
# Byte counters


class CommCounter:
    """Bytes this rank sent, keyed by phase (``"fwd"``, ``"bwd"``, ``"relayout"``, ...)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.messages: dict[str, int] = defaultdict(int)

    def add(self, phase: str, nbytes: int) -> None:
        self.bytes[phase] += nbytes
        self.messages[phase] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.messages.clear()

    def snapshot(self) -> dict[str, int]:
        return dict(self.bytes)


COUNTER = CommCounter()


def comm_stats() -> dict[str, int]:
    """Bytes sent by this rank since the last :func:`reset_comm_stats`, per phase."""
    return COUNTER.snapshot()


def reset_comm_stats() -> None:
    """Zero the per-phase byte counters."""
    COUNTER.reset()


# ---------------------------------------------------------------------------------------------
# Batched P2P


class P2PBatch:
    """Queue sends/receives for one step, then ``commit()`` and later ``wait()``.

    Messages between one pair of ranks are matched in queue order (NCCL) and by tag (gloo); callers
    queue them in the same canonical order on both sides.
    """

    def __init__(self, info: GroupInfo, phase: str) -> None:
        self.info = info
        self.phase = phase
        self._ops: list[dist.P2POp] = []
        self._reqs: list = []
        self._tags: dict[tuple[str, int], int] = defaultdict(int)

    def _tag(self, kind: str, peer: int) -> int:
        n = self._tags[(kind, peer)]
        self._tags[(kind, peer)] += 1
        return n

    def send(self, tensor: torch.Tensor, to_rank: int) -> None:
        """Queue sending a contiguous ``tensor`` to group rank ``to_rank``."""
        assert tensor.is_contiguous()
        tag = self._tag("s", to_rank)
        self._ops.append(dist.P2POp(dist.isend, tensor, self.info.global_rank(to_rank), self.info.group, tag))
        COUNTER.add(self.phase, tensor.numel() * tensor.element_size())

    def recv(self, tensor: torch.Tensor, from_rank: int) -> None:
        """Queue receiving into a contiguous ``tensor`` from group rank ``from_rank``."""
        assert tensor.is_contiguous()
        tag = self._tag("r", from_rank)
        self._ops.append(dist.P2POp(dist.irecv, tensor, self.info.global_rank(from_rank), self.info.group, tag))

    def commit(self) -> P2PBatch:
        """Start every queued operation."""
        if self._ops:
            self._reqs = dist.batch_isend_irecv(self._ops)
            self._ops = []
        return self

    def wait(self) -> None:
        """Block (the current stream, for NCCL) until every started operation finished."""
        for req in self._reqs:
            req.wait()
        self._reqs = []


def exchange(info: GroupInfo, phase: str, sends: list[tuple[torch.Tensor, int]],
             recvs: list[tuple[torch.Tensor, int]]) -> None:
    """Run one batch of sends and receives to completion."""
    batch = P2PBatch(info, phase)
    for t, r in recvs:
        batch.recv(t, r)
    for t, r in sends:
        batch.send(t, r)
    batch.commit().wait()


# ---------------------------------------------------------------------------------------------
# Collectives used for validation and gathering


def all_to_all(info: GroupInfo, send: torch.Tensor, phase: str) -> torch.Tensor:
    """All-to-all of a contiguous ``[world, ...]`` tensor: slice ``i`` goes to rank ``i``; returns the
    ``[world, ...]`` tensor whose slice ``j`` came from rank ``j``."""
    if info.world == 1:
        return send
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=info.group)
    COUNTER.add(phase, send.numel() * send.element_size() * (info.world - 1) // info.world)
    return recv


def all_gather_ints(info: GroupInfo, values: list[int], device: torch.device) -> list[list[int]]:
    """All-gather a short list of integers (same length on every rank)."""
    if info.world == 1:
        return [list(values)]
    dev = device if _backend_device_ok(info, device) else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=dev)
    out = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(out, t, group=info.group)
    return [o.tolist() for o in out]


def all_gather_objects(info: GroupInfo, obj: object) -> list[object]:
    """All-gather picklable objects (used only on the error path)."""
    if info.world == 1:
        return [obj]
    out: list[object] = [None] * info.world
    dist.all_gather_object(out, obj, group=info.group)
    return out


def all_gather_tensor(info: GroupInfo, x: torch.Tensor) -> list[torch.Tensor]:
    """All-gather equally shaped tensors; returns one per rank."""
    if info.world == 1:
        return [x]
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(info.world)]
    dist.all_gather(out, x, group=info.group)
    return out


def all_reduce_sum(info: GroupInfo, x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the group (returns a new tensor)."""
    x = x.clone()
    if info.world > 1:
        dist.all_reduce(x, group=info.group)
    return x


def _backend_device_ok(info: GroupInfo, device: torch.device) -> bool:
    backend = dist.get_backend(info.group)
    if device.type == "cpu":
        return "gloo" in backend or "mpi" in backend
    return "nccl" in backend or device.type in backend
