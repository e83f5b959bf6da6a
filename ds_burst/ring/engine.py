"""The ring computations and the flat ring: forward (K/V travel), Burst backward (Q, dO, lse, delta
travel; dQ one step behind) and ring backward (K, V travel; dK, dV one step behind). :func:`drive` sends
them over the flat ring (:func:`run_ring`, here) or the double ring (:mod:`.double_ring`).

One engine, :func:`run_ring`, drives all three. A *payload* (list of tensors) is owned by every rank and
moves along one or more :class:`~ds_burst.core.step_plan.RingPass` (forward and/or reverse hops). While step
``c`` is computed, the payload for step ``c + 1`` is already in flight (double buffer). In the backward
passes an *accumulator* (fp32 partial gradients of the travelling owner's tensors) follows its payload one
step behind and, after the pass's last hop, goes straight back to its owner.

Every rank walks the same step list, so sends and receives match on all ranks.

The host work of a step is small and fixed (a step of a short shard runs ~100 us on the GPU): the step list
(:func:`ring_schedule`) and each tile's kernel arguments (:meth:`RingSetup.calls`) are built once and cached, the
views of the tensors that stay put are made once per call, and a payload of several tensors travels as one
*packed* block (:class:`Packing`): at a pass's first hop the owner's tensors go one message each into the views of
the receiver's block, from the second hop on the block goes as one message, and the accumulators of several
tensors likewise. The flat ring keeps two payload blocks for the whole call and alternates them. Fewer messages
and no allocation per step; the kernels see the same tensors (shape, strides, dtype, alignment), so the results
are bitwise those of one buffer per tensor.

No Triton and no direct ``torch.distributed`` calls here: the kernel is a record of
:mod:`ds_burst.kernels.registry` (its tile functions and what it declares), messages go through
:class:`ds_burst.dist.comm.P2PBatch`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ds_burst.core.layout import Segment
from ds_burst.core.step_plan import RingPass, TileOp, mirror, pair_ops
from ds_burst.dist.comm import GroupInfo, NodeGroups, P2PBatch, wait_settings
from ds_burst.kernels.contract import KernelSpec
from ds_burst.ring.pool import BufferPool, buffer_pool

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class RingSetup:
    """Everything a ring call needs besides the tensors."""

    info: GroupInfo
    seg_table: list[list[Segment]]  # compute-layout segments of every rank
    passes: list[RingPass]  # forward-pass hops (K/V moving); the backward mirrors them for Q moving
    causal: bool
    window: tuple[int, int]
    scale: float
    kernel: KernelSpec
    deterministic: bool = False
    nodes: NodeGroups | None = None  # set: run the double ring over these nodes instead of the flat ring
    softcap: float | None = None  # logit softcapping ``softcap * tanh(s / softcap)`` (passed to the kernels when set)
    docs: tuple[int, ...] | None = None  # global document boundaries (packed documents); None: one document
    # built once per pair and kept (not fields of the constructor: ``dataclasses.replace`` starts them afresh)
    _ops: dict[tuple[int, int], list[TileOp]] = field(default_factory=dict, init=False, compare=False, repr=False)
    _calls: dict[tuple[str, int, int], list[tuple[TileOp, dict]]] = field(default_factory=dict, init=False,
                                                                         compare=False, repr=False)

    def ops(self, q_owner: int, k_owner: int) -> list[TileOp]:
        """The tiles of queries owned by ``q_owner`` against keys owned by ``k_owner`` (built once per pair)."""
        got = self._ops.get((q_owner, k_owner))
        if got is None:
            got = pair_ops(self.seg_table[q_owner], self.seg_table[k_owner], self.causal, self.window, docs=self.docs)
            self._ops[(q_owner, k_owner)] = got
        return got

    def mask_args(self, op: TileOp) -> dict:
        """Keyword arguments of a kernel call for tile ``op``: its mask, and ``softcap`` when the call has one."""
        if op.masked:
            kw = dict(q_offset=op.q_offset, k_offset=op.k_offset, causal=self.causal, window=self.window)
        else:
            kw = dict(q_offset=0, k_offset=0, causal=False, window=(-1, -1))
        if self.softcap is not None:
            kw["softcap"] = self.softcap
        return kw

    def calls(self, kind: str, q_owner: int, k_owner: int) -> list[tuple[TileOp, dict]]:
        """``(tile, keyword arguments)`` of the kernel calls of :meth:`ops` (``kind``: ``"fwd"`` for ``fwd_step``:
        ``scale`` and :meth:`mask_args`; ``"bwd"`` for ``bwd_step``: ``deterministic`` too), built once per pair
        from this setup's own fields (frozen), so the ring loop builds no argument dicts. The kernel is not part
        of them: it is read from the setup at each call. Callers must not change the dicts."""
        key = (kind, q_owner, k_owner)
        got = self._calls.get(key)
        if got is None:
            if kind not in ("fwd", "bwd"):
                raise ValueError(f"RingSetup.calls: kind must be 'fwd' or 'bwd', got {kind!r}")
            extra: dict = {"scale": self.scale}
            if kind == "bwd":
                extra["deterministic"] = self.deterministic
            got = [(op, {**extra, **self.mask_args(op)}) for op in self.ops(q_owner, k_owner)]
            self._calls[key] = got
        return got


@functools.lru_cache(maxsize=256)
def ring_schedule(rank: int, world: int, passes: tuple[RingPass, ...]) -> tuple[tuple, ...]:
    """What :func:`run_ring` does at each step ``c = -1 .. len(steps)`` of ``passes`` on ``rank`` of ``world``, one
    tuple per step (a pure function of its arguments, cached):

    ``(next_first, recv_from, send_to, acc_from, home_from, owner, acc_to)``: the next step's payload is the
    caller's own (``next_first``: its pass's first hop) or the one being computed, received from ``recv_from`` and
    forwarded to ``send_to`` (``None``: no next step); accumulators of this step are received from ``acc_from``
    (``None``: this step starts them); the accumulators of this rank's own block come home from ``home_from``
    (``None``: not at this step); ``owner``: the block computed (``None`` at ``c = -1``, the local block, and
    after the last step); ``acc_to``: where this step's accumulators go next."""
    steps = [(p, t) for p in passes for t in range(1, p.steps + 1)]
    out = []
    for c in range(-1, len(steps) + 1):
        next_first = recv_from = send_to = acc_from = home_from = owner = acc_to = None
        if c + 1 < len(steps):
            p, t = steps[c + 1]
            next_first = t == 1
            recv_from, send_to = (rank - p.direction) % world, (rank + p.direction) % world
        if 0 <= c < len(steps):
            p, t = steps[c]
            if t >= 2:
                acc_from = (rank - p.direction) % world
            owner = (rank - p.direction * t) % world
            acc_to = (rank + p.direction) % world if t < p.steps else owner
        if c >= 1 and steps[c - 1][1] == steps[c - 1][0].steps:
            p = steps[c - 1][0]
            home_from = (rank + p.direction * p.steps) % world
        out.append((next_first, recv_from, send_to, acc_from, home_from, owner, acc_to))
    return tuple(out)


#: bytes: each tensor of a packed block starts where a fresh allocation would (the CUDA caching allocator's
#: alignment), so the kernels see the same alignment as in a buffer of its own
PACK_ALIGN = 512


class Packing:
    """A payload of several tensors as one block, so that from a pass's second hop on it travels as one message
    (the first hop sends the owner's own tensors, one message each, into the views of the receiver's block: nothing
    is copied). Tensors of one dtype share a block of that dtype; mixed dtypes share a byte block. Each view has
    its tensor's shape, contiguous strides and dtype, and starts on a :data:`PACK_ALIGN`-byte boundary.
    ``nbytes``: the tensors' bytes (what a packed message counts; the padding between them is not counted)."""

    def __init__(self, payload: Tensors) -> None:
        dtypes = {x.dtype for x in payload}
        self.single = len(payload) == 1
        self.mixed = len(dtypes) > 1  # a byte block: its elements are not the tensors' elements
        self.dtype = torch.uint8 if self.mixed else payload[0].dtype
        self.device = payload[0].device
        self.parts: list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]] = []
        end = 0
        for x in payload:
            start = -(-end // PACK_ALIGN) * PACK_ALIGN
            shape = tuple(x.shape)
            strides, step = [], 1
            for n in reversed(shape):
                strides.append(step)
                step *= n
            self.parts.append((x.dtype, shape, tuple(reversed(strides)), start // x.element_size()))
            end = start + x.numel() * x.element_size()
        self.numel = -(-end // PACK_ALIGN) * PACK_ALIGN // self.dtype.itemsize
        self.nbytes = sum(x.numel() * x.element_size() for x in payload)

    def take(self, pool: BufferPool, like: torch.Tensor) -> torch.Tensor:
        """A receive block (a payload of one tensor: a buffer shaped like it, as without packing)."""
        if self.single:
            return pool.empty_like(like)
        return pool.take((self.numel,), self.dtype, self.device)

    def zeros(self, pool: BufferPool, like: Tensors) -> Tensors:
        """Zeroed tensors shaped like ``like`` in one block (:class:`Parts`; one tensor: a plain zeroed buffer)."""
        if self.single:
            return [pool.zeros_like(like[0])]
        block = pool.zeros((self.numel,), self.dtype, self.device)
        parts = Parts(self.views(block))
        parts.block = block
        return parts

    def views(self, block: torch.Tensor) -> Tensors:
        """The payload's tensors inside ``block``."""
        if self.single:
            return [block]
        typed: dict[torch.dtype, torch.Tensor] = {}
        out = []
        for dtype, shape, strides, offset in self.parts:
            t = typed.get(dtype)
            if t is None:
                t = typed[dtype] = block if dtype == block.dtype else block.view(dtype)
            out.append(torch.as_strided(t, shape, strides, t.storage_offset() + offset))
        return out


class Parts(list):
    """Partial accumulators that are views of one block (:meth:`Packing.zeros`): the flat ring sends, receives and
    adds them as that block."""

    block: torch.Tensor | None = None


def _packed(pool: BufferPool, pack: Packing, parts: Tensors) -> tuple[torch.Tensor, Tensors]:
    """``(block, views)`` of partials returned by ``compute_remote``: their own block, or (partials of a callback
    that made them one by one) a copy in a new block, so every rank sends them alike."""
    if pack.single:
        return parts[0], parts
    block = getattr(parts, "block", None)
    if block is None:
        block = pack.take(pool, parts[0])
        views = pack.views(block)
        for view, x in zip(views, parts):
            view.copy_(x)
        pool.give(*parts)  # copied (the copy is ordered before any reuse on this stream)
        return block, views
    return block, parts


def run_ring(
    info: GroupInfo,
    phase: str,
    passes: list[RingPass],
    payload: Tensors,
    compute_local: Callable[[], None],
    compute_remote: Callable[[Tensors, int], Tensors | None],
    acc_like: Tensors | None = None,
    on_home: Callable[[Tensors], None] | None = None,
) -> None:
    """Drive ``payload`` around ``passes``; see the module docstring.

    ``compute_remote(payload_of_owner, owner)`` returns the owner's partial accumulators (or ``None`` when
    nothing travels back); ``acc_like`` gives the accumulators' shapes and dtypes; ``on_home(accs)``
    receives this rank's own accumulators after each pass (and must not keep them).

    Receive buffers come from :func:`ds_burst.ring.pool.buffer_pool`: the payload's two blocks (alternated) go back
    after the last step that receives a payload, the accumulators' receive blocks (one for partials, one for those
    coming home, each reused at every step) at the end; partials returned by ``compute_remote`` go back once they
    have been sent. Partials of several tensors travel as one block: ``compute_remote`` returns them as views of
    one (:meth:`Packing.zeros`), or they are copied into one. ``on_home`` must not keep its tensors (their block
    is received into again).
    """
    pool = buffer_pool()
    give = pool.give
    waits = wait_settings(info)  # the timeout and backend kind, read once for every step's batch
    pack = Packing(payload)
    with_acc = acc_like is not None and on_home is not None
    acc_pack = Packing(acc_like) if with_acc else None  # type: ignore[arg-type]
    acc_in_block = home_block = None
    home_views: Tensors = []
    # two receive blocks, taken once and alternated: the block received at step c is computed on and forwarded at
    # step c + 1 and received into again at step c + 2, after the wait that ended its send and behind the compute
    # that read it on the same stream (the buffer pool's rule); their views are made once
    blocks: list[tuple[torch.Tensor, Tensors]] = []
    cur: Tensors | None = None  # the payload computed at this step (views of cur_block)
    cur_block: torch.Tensor | None = None
    acc_out: tuple[torch.Tensor, int] | None = None  # (block, destination) of the partials of the previous step
    for c, (next_first, recv_from, send_to, acc_from, home_from, owner, acc_to) in enumerate(
            ring_schedule(info.rank, info.world, tuple(passes)), start=-1):
        batch = P2PBatch(info, phase, step=c + 1, **waits)  # errors name the step whose payload is in flight
        # 1) payload for the next step, forwarded along its pass: at a pass's first hop the owner's own tensors
        # (one message each, into the views of the packed block), then the packed block as one message
        nxt = nxt_block = None
        if recv_from is not None:
            if len(blocks) <= (c + 1) % 2:
                block = pack.take(pool, payload[0])
                blocks.append((block, pack.views(block)))
            nxt_block, nxt = blocks[(c + 1) % 2]
            if next_first or pack.single:
                for buf in nxt:
                    batch.recv(buf, recv_from)
                for x in payload if next_first else cur:  # type: ignore[union-attr]
                    batch.send(x, send_to)
            else:
                batch.recv(nxt_block, recv_from)
                batch.send(cur_block, send_to, nbytes=pack.nbytes)  # type: ignore[arg-type]
        # 2) accumulators: send the previous step's, receive what this step adds to / what comes home (each
        # kind as one block, received into the same block at every step)
        acc_in = home = None
        if with_acc:
            if acc_out is not None:
                batch.send(acc_out[0], acc_out[1], nbytes=acc_pack.nbytes)
            if acc_from is not None:
                if acc_in_block is None:
                    acc_in_block = acc_pack.take(pool, acc_like[0])  # type: ignore[index]
                acc_in = acc_in_block
                batch.recv(acc_in, acc_from)
            if home_from is not None:
                if home_block is None:
                    home_block = acc_pack.take(pool, acc_like[0])  # type: ignore[index]
                    home_views = acc_pack.views(home_block)
                home = home_views
                batch.recv(home_block, home_from)
        batch.commit()
        # 3) compute
        part = None
        if c == -1:
            compute_local()
        elif owner is not None:
            part = compute_remote(cur, owner)  # type: ignore[arg-type]
        batch.wait()
        if with_acc:
            if acc_out is not None:
                give(acc_out[0])  # sent: done with it
            acc_out = None
            if part is not None:
                block, part = _packed(pool, acc_pack, part)  # type: ignore[arg-type]
                if acc_in is not None and not acc_pack.mixed:  # type: ignore[union-attr]
                    block.add_(acc_in)  # the partials' elements, each added as on its own (and the padding)
                elif acc_in is not None:  # several dtypes in a byte block: tensor by tensor
                    for x, y in zip(part, acc_pack.views(acc_in)):  # type: ignore[union-attr]
                        x.add_(y)
                acc_out = (block, acc_to)  # type: ignore[assignment]
            if home is not None:
                on_home(home)  # type: ignore[misc]
        if nxt is None and blocks:  # no payload arrives any more: its blocks go now, as each block went before
            give(*(block for block, _ in blocks))
            blocks.clear()
        cur, cur_block = nxt, nxt_block
    give(acc_in_block, home_block)


def drive(
    setup: RingSetup,
    phase: str,
    mirrored: bool,
    payload: Tensors,
    compute_local: Callable[[], None],
    compute_remote: Callable[[Tensors, int], Tensors | None],
    acc_like: Tensors | None = None,
    on_home: Callable[[Tensors], None] | None = None,
) -> None:
    """Move ``payload`` with the setup's schedule: the flat ring (its passes, mirrored when the query side
    travels) or the double ring (directions reversed when mirrored)."""
    if setup.nodes is not None:
        from ds_burst.ring.double_ring import run_double_ring

        direction = -1 if mirrored else +1
        run_double_ring(setup.info, setup.nodes, phase, direction, payload, compute_local, compute_remote,
                        acc_like, on_home)
        return
    passes = mirror(setup.passes) if mirrored else setup.passes
    run_ring(setup.info, phase, passes, payload, compute_local, compute_remote, acc_like, on_home)


def _empty_state(q: torch.Tensor, rows: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed output accumulator of value head dim ``d`` (pooled for 16-bit inputs, where the caller's ``.to``
    copies it) and a fresh ``-inf`` lse (it is saved for backward) for the first ``rows`` queries."""
    b, _, h, _ = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if q.dtype in (torch.float16, torch.bfloat16):
        out = buffer_pool().zeros((b, rows, h, d), cdt, q.device)
    else:
        out = torch.zeros(b, rows, h, d, dtype=cdt, device=q.device)
    lse = torch.full((b, h, rows), -math.inf, dtype=cdt, device=q.device)
    return out, lse


def _cut(x: torch.Tensor | None, lo: int, hi: int, dim: int = 1) -> torch.Tensor | None:
    """``x[:, lo:hi]`` (``dim=1``) or ``x[:, :, lo:hi]`` (``dim=2``: the ``[B, H, S]`` row statistics), or ``x``
    itself when that is all of it (the same data, shape and strides, without making a view: a tile that covers a
    whole travelling block costs no slicing); ``None`` stays ``None``."""
    if x is None or (lo == 0 and hi == x.shape[dim]):
        return x
    return x[:, lo:hi] if dim == 1 else x[:, :, lo:hi]


class _Rows:
    """Views ``[lo, hi)`` of tensors that stay put for a whole ring call (sequence dim 1, or 2 for the
    ``[B, H, S]`` row statistics), made once per range and reused by every step that reaches it (a range covering
    a whole tensor gives the tensor itself, as :func:`_cut`)."""

    def __init__(self, *tensors: tuple[torch.Tensor | None, int]) -> None:
        self._tensors = tensors
        self._got: dict[tuple[int, int], tuple] = {}

    def __call__(self, lo: int, hi: int) -> tuple:
        got = self._got.get((lo, hi))
        if got is None:
            got = self._got[(lo, hi)] = tuple(_cut(x, lo, hi, dim) for x, dim in self._tensors)
        return got


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, setup: RingSetup, rows: int | None = None,
    max_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the local queries over every rank's keys: ``(out fp32 [B,s,Hq,Dv], lse fp32 [B,Hq,s])``.

    ``rows``: only the first ``rows`` local queries (``[B, rows, ...]`` results); K and V still travel the
    whole ring (every rank walks the same steps), but tiles of the other queries are skipped. ``out`` may come
    from :func:`ds_burst.ring.pool.buffer_pool` (16-bit inputs): convert it with ``BufferPool.export``.
    ``max_rows [B, Hq, rows]`` (``-inf`` at first): raised to each query's largest visible scaled score.
    """
    n = q.shape[1] if rows is None else rows
    out, lse = _empty_state(q, n, v.shape[-1])
    me = setup.info.rank
    fwd_step = setup.kernel.impl.fwd_step
    q_rows = _Rows((q, 1), (out, 1), (lse, 2), (max_rows, 2))

    def attend(kk: torch.Tensor, vv: torch.Tensor, owner: int) -> None:
        for op, kw in setup.calls("fwd", me, owner):
            q1 = min(op.q1, n)  # clipping the end keeps q_offset (the first query's position) valid
            if op.q0 >= q1:
                continue
            qq, oo, ll, mx = q_rows(op.q0, q1)
            if mx is None:
                fwd_step(qq, _cut(kk, op.k0, op.k1), _cut(vv, op.k0, op.k1), oo, ll, **kw)
            else:
                fwd_step(qq, _cut(kk, op.k0, op.k1), _cut(vv, op.k0, op.k1), oo, ll, **kw, max_out=mx)

    def remote(payload: Tensors, owner: int) -> None:
        attend(payload[0], payload[1], owner)

    drive(setup, "fwd", False, [k, v], lambda: attend(k, v, me), remote)
    return out, lse


def _bwd_tiles(
    setup: RingSetup, calls: list[tuple[TileOp, dict]], q_side: Callable[[int, int], tuple],
    k_side: Callable[[int, int], tuple],
) -> None:
    """Backward of each tile of ``calls`` (:meth:`RingSetup.calls`): ``q_side(q0, q1)`` gives the query-side tensors
    ``(q, dout, lse, delta, dq, out)`` of the tile's rows (``out`` ``None`` unless the kernel's backward needs it),
    ``k_side(k0, k1)`` the key-side ``(k, v, dk, dv)``."""
    bwd_step = setup.kernel.impl.bwd_step
    for op, kw in calls:
        q, dout, lse, delta, dq, out = q_side(op.q0, op.q1)
        k, v, dk, dv = k_side(op.k0, op.k1)
        bwd_step(q, k, v, dout, lse, delta, dq, dk, dv, out=out, **kw)


def _travelling(*tensors: tuple[torch.Tensor | None, int]) -> Callable[[int, int], tuple]:
    """The views ``[lo, hi)`` of one step's tensors (a block that travels: new tensors at every step), cut per tile
    (no cut where a tile covers the whole block)."""

    def views(lo: int, hi: int) -> tuple:
        return tuple(_cut(x, lo, hi, dim) for x, dim in tensors)

    return views


def _grad_accumulators(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tensors:
    """Zeroed fp32 (fp64 for fp64 inputs) gradient buffers shaped like q, k, v, from the buffer pool (the caller
    converts them with ``BufferPool.export``)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pool = buffer_pool()
    return [pool.zeros(x.shape, acc, x.device) for x in (q, k, v)]


def burst_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
    delta: torch.Tensor, setup: RingSetup,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BurstAttention backward: K, V, dK, dV stay; Q, dO, lse, delta travel and dQ follows them home.

    Returns fp32 ``dq, dk, dv`` for the local shard (pooled: convert them with ``BufferPool.export``).
    """
    me = setup.info.rank
    dq, dk, dv = _grad_accumulators(q, k, v)
    pool = buffer_pool()
    k_rows = _Rows((k, 1), (v, 1), (dk, 1), (dv, 1))  # the key side stays: views made once per range

    def grads(qq, do, ll, dd, dq_buf, q_owner: int) -> None:
        q_side = _travelling((qq, 1), (do, 1), (ll, 2), (dd, 2), (dq_buf, 1), (None, 1))
        _bwd_tiles(setup, setup.calls("bwd", q_owner, me), q_side, k_rows)

    def remote(payload: Tensors, owner: int) -> Tensors:
        part = pool.zeros_like(dq)
        grads(*payload, part, owner)
        return [part]

    def home(accs: Tensors) -> None:
        dq.add_(accs[0])

    drive(setup, "bwd", True, [q, dout, lse, delta], lambda: grads(q, dout, lse, delta, dq, me), remote, [dq], home)
    return dq, dk, dv


def kv_ring_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
    delta: torch.Tensor, setup: RingSetup, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RingAttention-style backward: Q, dO stay; K, V travel and dK, dV follow them home.

    ``out`` (local output, input dtype) is passed to kernels whose record says their backward needs it. Returns
    fp32 ``dq, dk, dv`` (pooled: convert them with ``BufferPool.export``).
    """
    pass_out = out is not None and setup.kernel.bwd_needs_out
    me = setup.info.rank
    dq, dk, dv = _grad_accumulators(q, k, v)
    pool = buffer_pool()
    parts = Packing([dk, dv])  # the travelling dK, dV partials: one zeroed block per step, one message
    # the query side stays: views made once per range
    q_rows = _Rows((q, 1), (dout, 1), (lse, 2), (delta, 2), (dq, 1), (out if pass_out else None, 1))

    def grads(kk, vv, dk_buf, dv_buf, k_owner: int) -> None:
        _bwd_tiles(setup, setup.calls("bwd", me, k_owner), q_rows,
                   _travelling((kk, 1), (vv, 1), (dk_buf, 1), (dv_buf, 1)))

    def remote(payload: Tensors, owner: int) -> Tensors:
        got = parts.zeros(pool, [dk, dv])
        grads(payload[0], payload[1], got[0], got[1], owner)
        return got

    def home(accs: Tensors) -> None:
        dk.add_(accs[0])
        dv.add_(accs[1])

    drive(setup, "bwd", False, [k, v], lambda: grads(k, v, dk, dv, me), remote, [dk, dv], home)
    return dq, dk, dv
