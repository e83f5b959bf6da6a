"""Communication: process-group helpers, batched P2P with a send/commit/wait object, byte counters.

The schedules never call ``torch.distributed`` directly; they queue sends and receives on a
:class:`P2PBatch`, ``commit()`` them as one ``batch_isend_irecv`` (NCCL runs it on its own stream,
overlapping the compute issued next), and ``wait()`` before touching the received buffers.

Every rank of a group must issue the same sequence of batches; the schedules guarantee that by
deriving every send and receive from the same step list on all ranks.

Waiting is bounded: on CPU process groups (gloo) ``wait()`` gives up after the ds-burst communication
timeout (``DS_BURST_COMM_TIMEOUT`` seconds, default 300, or :func:`set_comm_timeout`) and raises a
``RuntimeError`` naming the phase, the peer ranks and (when the caller passes it) the ring step, so a
rank that fails or hangs mid-ring does not leave its peers blocked for the process group's timeout. On
NCCL the timeout is off unless set explicitly (a bounded wait blocks the CPU until the transfer is done;
NCCL's own watchdog covers the rest). A failed peer that *exits* is reported by gloo at once as a closed
connection; that error is re-raised with the same context. After either error the process group is
unusable: let the process exit.
"""

from __future__ import annotations

import datetime
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ds_burst.core import settings

# ---------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class GroupInfo:
    """A process group with this rank's position in it (``group is None`` means single process)."""

    group: dist.ProcessGroup | None
    rank: int
    world: int

    def global_rank(self, group_rank: int) -> int:
        """Global rank of the member at ``group_rank`` (asked of torch once per member: a group's members do not
        change while it lives)."""
        if self.group is None:
            return group_rank
        known = self.__dict__.get("_global_ranks")
        if known is None:  # not a field: equality, hashing and repr stay those of (group, rank, world)
            known = {}
            object.__setattr__(self, "_global_ranks", known)
        got = known.get(group_rank)
        if got is None:
            got = known[group_rank] = dist.get_global_rank(self.group, group_rank)
        return got


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


def initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def group_size(group: object) -> int:
    """Members of a process group."""
    return dist.get_world_size(group)  # type: ignore[arg-type]


def is_cpu_backend(info: GroupInfo) -> bool:
    """Whether ``info``'s group runs on a CPU backend (gloo/mpi), whose collectives take CPU tensors."""
    return info.group is None or _is_cpu_backend(info)


_DEFAULT: list[object] = []  # the current topology, set by ds_burst.init_sequence_parallel


def set_default_group(group: object | None) -> None:
    """Make ``group`` (a topology / ``mpu``) what ``group=None`` means from now on (``None``: the world)."""
    _DEFAULT[:] = [] if group is None else [group]


def default_group() -> object | None:
    """What ``group=None`` stands for: the current topology (:func:`ds_burst.init_sequence_parallel`) while its
    process groups live, else ``None`` (the world, or one process without torch.distributed)."""
    if not _DEFAULT or not (dist.is_available() and dist.is_initialized()):
        return None
    return _DEFAULT[0]


def resolve_group(group: object) -> GroupInfo:
    """Accept ``None`` (the current topology's sequence-parallel group when one exists, else the world, or a
    single process when torch.distributed is not initialised), a ``ProcessGroup``, or any object with
    ``get_sequence_parallel_group()`` (a DeepSpeed ``mpu``)."""
    if group is None:
        group = default_group()
    if group is not None and hasattr(group, "get_sequence_parallel_group"):
        group = group.get_sequence_parallel_group()
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            launched = settings.launcher_world_size()
            if launched > 1:
                raise RuntimeError(
                    f"ds-burst: the launcher started WORLD_SIZE={launched} processes but no torch.distributed "
                    "process group is initialised, so this call would run as one process over the local shard "
                    "only; call deepspeed.init_distributed() or torch.distributed.init_process_group() first")
            return GroupInfo(None, 0, 1)
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, an mpu or None; got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this rank is not a member of the given process group")
    return GroupInfo(group, rank, dist.get_world_size(group))


# ---------------------------------------------------------------------------------------------
# Emulated groups: one process standing in for one rank of a P-rank group

#: the backend name of torch's fake process group (``torch.testing._internal.distributed.fake_pg``)
EMULATED_BACKEND = "fake"
_EMULATED: dict[object, bool] = {}


def emulated(info: GroupInfo) -> bool:
    """Whether ``info``'s group is *emulated*: torch's fake process group (backend ``"fake"``), on which one process
    runs one rank of a ``P``-rank group alone (``launch/bench_emulate.py``). Every P2P operation and collective
    there returns at once without moving data, so received buffers hold whatever they held and only time and host
    cost mean anything. ds-burst then takes three shortcuts, and only there: no per-call header round
    (:func:`header_channel` gives no channel), and :func:`all_gather_ints`, :func:`all_gather_objects` and
    :func:`exchange_header` return this rank's own values for every rank (the kernel choice's agreement, the NaN
    check, ``init_sequence_parallel``'s settings check), so no decision rests on what the fake backend happens to
    write into an output. Packed documents from ``position_ids`` are refused there (the other ranks' positions
    cannot be gathered: pass ``cu_seqlens``). Decided once per group from the backend's name; a real group (gloo,
    NCCL, MPI, ...) is never emulated."""
    if info.group is None or info.world == 1:
        return False
    got = _EMULATED.get(info.group)
    if got is None:
        try:
            got = str(dist.get_backend(info.group)) == EMULATED_BACKEND
        except (RuntimeError, ValueError):
            got = False
        _EMULATED[info.group] = got
    return got


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


COMM_TIMEOUT_ENV = settings.COMM_TIMEOUT
DEFAULT_CPU_COMM_TIMEOUT = 300.0
_UNSET = object()
_timeout_override: object = _UNSET


def set_comm_timeout(seconds: float | None | object = _UNSET) -> None:
    """Set the ds-burst communication timeout for P2P waits, in seconds, for every backend.

    ``None`` (or ``0``) waits without a bound (the process group's own timeout still applies); calling it
    without an argument restores the default: ``DS_BURST_COMM_TIMEOUT`` if set, else 300 s on CPU process
    groups (gloo) and no bound on NCCL.
    """
    global _timeout_override
    if seconds is not _UNSET and seconds is not None:
        seconds = _check_timeout(seconds, "set_comm_timeout")
    _timeout_override = seconds


def _check_timeout(value: object, where: str) -> float | None:
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number of seconds (0 or 'none' for no bound), got {value!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: expected a finite number of seconds >= 0, got {value!r}")
    return t if t > 0 else None


def comm_timeout(info: GroupInfo | None = None) -> float | None:
    """The timeout (seconds, ``None`` = unbounded) that :meth:`P2PBatch.wait` uses on ``info``'s group."""
    if _timeout_override is not _UNSET:
        return _timeout_override  # type: ignore[return-value]
    raw = settings.raw(COMM_TIMEOUT_ENV)
    if raw:
        if raw.lower() in ("none", "off", "inf"):
            return None
        return _check_timeout(raw, COMM_TIMEOUT_ENV)
    if info is None or info.group is None or _is_cpu_backend(info):
        return DEFAULT_CPU_COMM_TIMEOUT
    return None


def _is_cpu_backend(info: GroupInfo) -> bool:
    try:
        backend = str(dist.get_backend(info.group))
    except (RuntimeError, ValueError):
        return False
    return "nccl" not in backend


class CommTimeoutError(RuntimeError):
    """A P2P wait exceeded the ds-burst communication timeout (the peer failed, hangs or is far behind)."""


class P2PBatch:
    """Queue sends/receives for one step, then ``commit()`` and later ``wait()``.

    Messages between one pair of ranks are matched in queue order (NCCL) and by tag (gloo); callers
    queue them in the same canonical order on both sides. ``step`` (optional) is only used in error
    messages. ``timeout`` (seconds, ``None``: unbounded) and ``cpu`` (the group runs on a CPU backend) are what
    :meth:`wait` would otherwise ask :func:`comm_timeout` and :func:`is_cpu_backend` for on every wait: a schedule
    that makes many batches in one call reads them once (:func:`wait_settings`) and passes them on.
    """

    def __init__(self, info: GroupInfo, phase: str, step: int | None = None, *,
                 timeout: float | None | object = _UNSET, cpu: bool | None = None) -> None:
        self.info = info
        self.phase = phase
        self.step = step
        self._timeout = timeout
        self._cpu = cpu
        self._ops: list[dist.P2POp] = []
        self._desc: list[tuple[str, torch.Tensor, int]] = []  # (kind, tensor, peer): worded only for an error
        self._reqs: list = []
        self._req_desc: list = []
        self._tags: dict[tuple[str, int], int] = {}

    def _tag(self, kind: str, peer: int) -> int:
        key = (kind, peer)
        n = self._tags.get(key, 0)
        self._tags[key] = n + 1
        return n

    @staticmethod
    def _what(tensor: torch.Tensor) -> str:
        return f"{str(tensor.dtype).replace('torch.', '')}{list(tensor.shape)}"

    @classmethod
    def _words(cls, desc: tuple[str, torch.Tensor, int] | list) -> str:
        """The text of one queued operation, or of a list of them joined (a coalesced request)."""
        if isinstance(desc, list):
            return "; ".join(cls._words(d) for d in desc)
        kind, tensor, peer = desc
        if kind == "send":
            return f"send of {cls._what(tensor)} to rank {peer}"
        return f"receive of {cls._what(tensor)} from rank {peer}"

    def send(self, tensor: torch.Tensor, to_rank: int, nbytes: int | None = None) -> None:
        """Queue sending a contiguous ``tensor`` to group rank ``to_rank``; ``nbytes``: what the byte counters count
        for it (default: the tensor's bytes; a packed block counts its tensors', not the padding between them)."""
        assert tensor.is_contiguous()
        tag = self._tag("s", to_rank)
        self._ops.append(dist.P2POp(dist.isend, tensor, self.info.global_rank(to_rank), self.info.group, tag))
        self._desc.append(("send", tensor, to_rank))
        COUNTER.add(self.phase, tensor.numel() * tensor.element_size() if nbytes is None else nbytes)

    def recv(self, tensor: torch.Tensor, from_rank: int) -> None:
        """Queue receiving into a contiguous ``tensor`` from group rank ``from_rank``."""
        assert tensor.is_contiguous()
        tag = self._tag("r", from_rank)
        self._ops.append(dist.P2POp(dist.irecv, tensor, self.info.global_rank(from_rank), self.info.group, tag))
        self._desc.append(("recv", tensor, from_rank))

    def commit(self) -> P2PBatch:
        """Start every queued operation."""
        if self._ops:
            try:
                self._reqs = list(dist.batch_isend_irecv(self._ops))
            except RuntimeError as exc:  # gloo: a peer that already closed its connection
                msg = str(exc).splitlines()[0] if str(exc) else repr(exc)
                raise RuntimeError(f"{self._where()}: starting {self._words(self._desc)} failed: {msg}") from exc
            # one request per operation (gloo); a coalesced backend (NCCL) may return one for the batch
            self._req_desc = (self._desc if len(self._reqs) == len(self._desc)
                              else [self._desc] * len(self._reqs))
            self._ops, self._desc = [], []
        return self

    def _where(self) -> str:
        step = f", step {self.step}" if self.step is not None else ""
        return f"ds-burst rank {self.info.rank} (phase {self.phase!r}{step}, group of {self.info.world})"

    def wait(self) -> None:
        """Block (the current stream, for NCCL) until every started operation finished.

        Raises :class:`CommTimeoutError` when the operations do not finish within :func:`comm_timeout`
        and ``RuntimeError`` (naming the phase, step and peer) when the backend reports a failed peer.
        """
        reqs, descs = self._reqs, self._req_desc
        self._reqs, self._req_desc = [], []
        if not reqs:
            return
        timeout = comm_timeout(self.info) if self._timeout is _UNSET else self._timeout
        deadline = None if timeout is None else time.monotonic() + timeout  # type: ignore[operator]
        cpu = is_cpu_backend(self.info) if self._cpu is None else self._cpu
        for req, desc in zip(reqs, descs):
            try:
                _wait_until(req, cpu, deadline)
            except (RuntimeError, TimeoutError) as exc:
                msg = str(exc)
                if timeout is not None and _is_timeout(exc):
                    raise CommTimeoutError(
                        f"{self._where()}: {self._words(desc)} did not complete within the ds-burst communication "
                        f"timeout of {timeout:g}s; that peer failed, hangs or is far behind (set {COMM_TIMEOUT_ENV} "
                        f"to change the bound)"
                    ) from exc
                raise RuntimeError(f"{self._where()}: {self._words(desc)} failed: "
                                   f"{msg.splitlines()[0] if msg else exc!r}") from exc


def wait_settings(info: GroupInfo) -> dict:
    """``timeout`` and ``cpu`` of :class:`P2PBatch` for ``info``'s group as they stand now (read once per ring call:
    the environment and :func:`set_comm_timeout` are read here, not on every wait)."""
    return {"timeout": comm_timeout(info), "cpu": is_cpu_backend(info)}


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


def all_gather_ints(info: GroupInfo, values: list[int], device: torch.device,
                    bounded: bool = False) -> list[list[int]]:
    """All-gather a short list of integers (same length on every rank); on an emulated group (:func:`emulated`)
    this rank's values for every rank, without a collective.

    ``bounded``: wait at most :func:`comm_timeout` (raises :class:`CommTimeoutError`), as P2P waits do.
    """
    if info.world == 1:
        return [list(values)]
    if emulated(info):  # every rank of an emulated group is this one
        return [list(values) for _ in range(info.world)]
    dev = device if _backend_device_ok(info, device) else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=dev)
    out = [torch.empty_like(t) for _ in range(info.world)]
    timeout = comm_timeout(info) if bounded else None
    if timeout is None:
        dist.all_gather(out, t, group=info.group)
    else:
        work = dist.all_gather(out, t, group=info.group, async_op=True)
        _bounded_wait(work, info, timeout, f"ds-burst rank {info.rank}: the validation all-gather")
    return [o.tolist() for o in out]


def _wait_until(work: Any, cpu: bool, deadline: float | None) -> None:
    """Wait for one started operation until ``deadline`` (``time.monotonic()``; ``None``: unbounded). Raises the
    backend's error, or ``TimeoutError`` / gloo's timed-out ``RuntimeError`` past the deadline. CPU backends wait
    with gloo's own timeout; NCCL work is polled, so the CPU is not blocked on the stream."""
    if deadline is None:
        work.wait()
    elif cpu:
        work.wait(timeout=datetime.timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
    else:
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError("not completed")
            time.sleep(1e-4)
        work.wait()


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or "timed out" in str(exc).lower()


def _bounded_wait(work: Any, info: GroupInfo, timeout: float, what: str) -> None:
    try:
        _wait_until(work, is_cpu_backend(info), time.monotonic() + timeout)
    except (RuntimeError, TimeoutError) as exc:
        if _is_timeout(exc):
            raise CommTimeoutError(
                f"{what} (group of {info.world}) did not complete within the ds-burst communication timeout of "
                f"{timeout:g}s ({COMM_TIMEOUT_ENV})"
            ) from exc
        raise


# ---------------------------------------------------------------------------------------------
# Per-call headers on a CPU channel


_CHANNELS: dict[object, GroupInfo | None] = {}
_HEADER_SEQ: dict[object, int] = defaultdict(int)


def header_channel(info: GroupInfo) -> GroupInfo | None:
    """The CPU channel of ``info``'s group, on which every attention call swaps its header (host memory only:
    no device sync, no op on the group's own NCCL stream): the group itself when its backend takes CPU tensors
    (gloo), else a gloo group of the same ranks, made on first use (every member of the group reaches its first
    call together). ``None`` for one rank and for an emulated group (:func:`emulated`: no peers to hear from, so
    no header round)."""
    if info.world == 1 or info.group is None:
        return None
    if info.group in _CHANNELS:
        return _CHANNELS[info.group]
    backend = str(dist.get_backend(info.group))
    if emulated(info):
        chan = None  # no peers: the header round is skipped (one rank stands in for the group)
    elif "gloo" in backend or "mpi" in backend:
        chan = info
    else:
        ranks = [info.global_rank(r) for r in range(info.world)]
        twin = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
        chan = GroupInfo(twin, info.rank, info.world)
    _CHANNELS[info.group] = chan
    return chan


def exchange_header(chan: GroupInfo, values: list[int], note: str | None = None, neighbours_only: bool = False
                    ) -> tuple[list[list[int] | None], Callable[[int], str]]:
    """Send ``values`` (the same length on every rank) to every other rank of ``chan`` (or only to the two ring
    neighbours) and receive theirs, in one batch of CPU messages; waits are bounded by the communication timeout.
    ``note``: a text the others can read through the returned function (``read(rank)``; the error path only: it
    goes through the store).

    Returns the values of every rank heard from (``None`` for the others), in group-rank order. On an emulated group
    (:func:`emulated`; :func:`header_channel` gives none, so the attention call does not get here) ``values`` for every
    rank, without a message."""
    if emulated(chan):
        return [list(values) for _ in range(chan.world)], lambda rank: note or ""
    seq = _HEADER_SEQ[chan.group]
    _HEADER_SEQ[chan.group] = seq + 1
    store = _store()
    if note is not None and store is not None:
        store.set(_store_key(chan, f"note/{seq}", chan.rank), note)
    mine = torch.tensor(values, dtype=torch.int64)
    peers = sorted({(chan.rank - 1) % chan.world, (chan.rank + 1) % chan.world} - {chan.rank}) if neighbours_only \
        else [r for r in range(chan.world) if r != chan.rank]
    rows: list[torch.Tensor | None] = [mine if r == chan.rank else None for r in range(chan.world)]
    works = []  # plain isend/irecv: on gloo they start at once (batch_isend_irecv measured slower here)
    for r in peers:
        rows[r] = torch.empty_like(mine)
        works.append((dist.irecv(rows[r], chan.global_rank(r), group=chan.group), f"receive from rank {r}"))
    for r in peers:
        works.append((dist.isend(mine, chan.global_rank(r), group=chan.group), f"send to rank {r}"))
    timeout = comm_timeout(chan)
    deadline = None if timeout is None else time.monotonic() + timeout
    for work, what in works:
        try:
            _wait_until(work, True, deadline)
        except (RuntimeError, TimeoutError) as exc:
            where = f"ds-burst rank {chan.rank} (the per-call header, group of {chan.world}): {what}"
            if timeout is not None and _is_timeout(exc):
                raise CommTimeoutError(f"{where} did not complete within the ds-burst communication timeout of "
                                       f"{timeout:g}s ({COMM_TIMEOUT_ENV}); that rank is not making this call") \
                    from exc
            raise RuntimeError(f"{where} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc

    def read(rank: int) -> str:
        if store is None:
            return "ValueError\nthis rank's input failed its checks (no store to read its message from)"
        return store.get(_store_key(chan, f"note/{seq}", rank)).decode()

    return [None if row is None else row.tolist() for row in rows], read


# ---------------------------------------------------------------------------------------------
# The process group's store: error messages of a header round (read only on the error path)


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (e.g. a backend without one): no diagnosis
        return None


def _store_key(info: GroupInfo, tag: str, group_rank: int) -> str:
    ranks = "-".join(str(info.global_rank(r)) for r in range(info.world))
    return f"ds_burst/{tag}/{ranks}/{group_rank}"


def all_gather_objects(info: GroupInfo, obj: object) -> list[object]:
    """All-gather picklable objects (the error path, ALST's batch metadata); on an emulated group (:func:`emulated`)
    ``obj`` for every rank, without a collective."""
    if info.world == 1 or emulated(info):
        return [obj] * info.world
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


def all_reduce_max(info: GroupInfo, x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``x`` over the group, in place (returns ``x``)."""
    if info.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=info.group)
    return x


def _backend_device_ok(info: GroupInfo, device: torch.device) -> bool:
    backend = dist.get_backend(info.group)
    if device.type == "cpu":
        return "gloo" in backend or "mpi" in backend
    return "nccl" in backend or device.type in backend
