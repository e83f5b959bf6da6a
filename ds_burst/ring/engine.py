"""The ring computations and the flat ring: forward (K/V travel), Burst backward (Q, dO, lse, delta
travel; dQ one step behind) and ring backward (K, V travel; dK, dV one step behind). :func:`drive` sends
them over the flat ring (:func:`run_ring`, here) or the double ring (:mod:`.double_ring`).

One engine, :func:`run_ring`, drives all three. A *payload* (list of tensors) is owned by every rank and
moves along one or more :class:`~ds_burst.core.step_plan.RingPass` (forward and/or reverse hops). While step
``c`` is computed, the payload for step ``c + 1`` is already in flight (double buffer). In the backward
passes an *accumulator* (fp32 partial gradients of the travelling owner's tensors) follows its payload one
step behind and, after the pass's last hop, goes straight back to its owner.

Every rank walks the same step list, so sends and receives match on all ranks.
No Triton and no direct ``torch.distributed`` calls here: the kernel is a record of
:mod:`ds_burst.kernels.registry` (its tile functions and what it declares), messages go through
:class:`ds_burst.dist.comm.P2PBatch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ds_burst.core.layout import Segment
from ds_burst.core.step_plan import RingPass, TileOp, mirror, pair_ops
from ds_burst.dist.comm import GroupInfo, NodeGroups, P2PBatch
from ds_burst.kernels.contract import KernelSpec
from ds_burst.ring.pool import buffer_pool

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
    _ops: dict[tuple[int, int], list[TileOp]] = field(default_factory=dict, compare=False, repr=False)

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

    Receive buffers come from :func:`ds_burst.ring.pool.buffer_pool` and go back after the wait that ends their
    last transfer and the compute that read them; partials returned by ``compute_remote`` that came from the
    pool go back once they have been sent.
    """
    rank, world = info.rank, info.world
    pool = buffer_pool()
    steps = [(p, t) for p in passes for t in range(1, p.steps + 1)]
    with_acc = acc_like is not None and on_home is not None
    cur: Tensors | None = None
    acc_out: tuple[Tensors, int] | None = None  # (tensors, destination) produced by the previous step
    for c in range(-1, len(steps) + 1):
        batch = P2PBatch(info, phase, step=c + 1)  # errors name the step whose payload is in flight
        # 1) payload for the next step, forwarded along its pass
        nxt = None
        if c + 1 < len(steps):
            p, t = steps[c + 1]
            to_send = payload if t == 1 else cur
            nxt = [pool.empty_like(x) for x in payload]
            for buf in nxt:
                batch.recv(buf, (rank - p.direction) % world)
            for x in to_send:  # type: ignore[union-attr]
                batch.send(x, (rank + p.direction) % world)
        # 2) accumulators: send the previous step's, receive what this step adds to / what comes home
        acc_in = home = None
        sent_acc = acc_out[0] if (with_acc and acc_out is not None) else []
        if with_acc:
            for x in sent_acc:
                batch.send(x, acc_out[1])  # type: ignore[index]
            if 0 <= c < len(steps) and steps[c][1] >= 2:
                p = steps[c][0]
                acc_in = [pool.empty_like(x) for x in acc_like]  # type: ignore[union-attr]
                for buf in acc_in:
                    batch.recv(buf, (rank - p.direction) % world)
            if c >= 1 and steps[c - 1][1] == steps[c - 1][0].steps:
                p = steps[c - 1][0]
                home = [pool.empty_like(x) for x in acc_like]  # type: ignore[union-attr]
                for buf in home:
                    batch.recv(buf, (rank + p.direction * p.steps) % world)
        batch.commit()
        # 3) compute
        part = None
        owner = rank
        if c == -1:
            compute_local()
        elif c < len(steps):
            p, t = steps[c]
            owner = (rank - p.direction * t) % world
            part = compute_remote(cur, owner)  # type: ignore[arg-type]
        batch.wait()
        pool.give(*sent_acc, *(cur or []))  # sent / computed on and forwarded: done with them
        if with_acc:
            acc_out = None
            if part is not None:
                if acc_in is not None:
                    for x, y in zip(part, acc_in):
                        x.add_(y)
                p, t = steps[c]
                acc_out = (part, (rank + p.direction) % world if t < p.steps else owner)
            if home is not None:
                on_home(home)  # type: ignore[misc]
            pool.give(*(acc_in or []), *(home or []))
        cur = nxt


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

    def attend(kk: torch.Tensor, vv: torch.Tensor, owner: int) -> None:
        for op in setup.ops(me, owner):
            q1 = min(op.q1, n)  # clipping the end keeps q_offset (the first query's position) valid
            if op.q0 >= q1:
                continue
            extra = {} if max_rows is None else {"max_out": max_rows[:, :, op.q0 : q1]}
            setup.kernel.impl.fwd_step(
                q[:, op.q0 : q1], kk[:, op.k0 : op.k1], vv[:, op.k0 : op.k1],
                out[:, op.q0 : q1], lse[:, :, op.q0 : q1], scale=setup.scale, **setup.mask_args(op), **extra,
            )

    def remote(payload: Tensors, owner: int) -> None:
        attend(payload[0], payload[1], owner)

    drive(setup, "fwd", False, [k, v], lambda: attend(k, v, me), remote)
    return out, lse


def _bwd_tiles(
    setup: RingSetup, ops: list[TileOp], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
    lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    out: torch.Tensor | None = None,
) -> None:
    """Backward of each tile: query-side tensors sliced by ``[q0, q1)``, key-side by ``[k0, k1)`` (``out`` only for
    kernels whose backward needs it)."""
    for op in ops:
        qs, ks = slice(op.q0, op.q1), slice(op.k0, op.k1)
        setup.kernel.impl.bwd_step(
            q[:, qs], k[:, ks], v[:, ks], dout[:, qs], lse[:, :, qs], delta[:, :, qs], dq[:, qs], dk[:, ks],
            dv[:, ks], scale=setup.scale, deterministic=setup.deterministic, out=None if out is None else out[:, qs],
            **setup.mask_args(op),
        )


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

    def grads(qq, do, ll, dd, dq_buf, q_owner: int) -> None:
        _bwd_tiles(setup, setup.ops(q_owner, me), qq, k, v, do, ll, dd, dq_buf, dk, dv)

    def remote(payload: Tensors, owner: int) -> Tensors:
        part = buffer_pool().zeros_like(dq)
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

    def grads(kk, vv, dk_buf, dv_buf, k_owner: int) -> None:
        _bwd_tiles(setup, setup.ops(me, k_owner), q, kk, vv, dout, lse, delta, dq, dk_buf, dv_buf,
                   out if pass_out else None)

    def remote(payload: Tensors, owner: int) -> Tensors:
        pool = buffer_pool()
        dk_part, dv_part = pool.zeros_like(dk), pool.zeros_like(dv)
        grads(payload[0], payload[1], dk_part, dv_part, owner)
        return [dk_part, dv_part]

    def home(accs: Tensors) -> None:
        dk.add_(accs[0])
        dv.add_(accs[1])

    drive(setup, "bwd", False, [k, v], lambda: grads(k, v, dk, dv, me), remote, [dk, dv], home)
    return dq, dk, dv
