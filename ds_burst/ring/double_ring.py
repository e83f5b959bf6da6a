"""Double ring (BurstAttention's topology-aware ring): intra-node ring steps, one inter-node hop per cycle.

The sequence-parallel group is ``N`` nodes of ``L`` consecutive ranks; rank ``(n, l)`` is node ``n``,
local index ``l``. The ``N * L`` steps form ``N`` node-cycles of ``L`` steps. In cycle ``c``, step ``u``,
rank ``(n, l)`` computes on the block owned by ``(n - d*c, l - d*u)``:

* inside a cycle the block moves on the intra-node ring (``l -> l + d``, NVLink), one hop per step, the
  next block in flight while the current one is computed;
* at the start of each cycle every rank also sends the block it starts the cycle with to the rank with the
  same local index on the next node (``n -> n + d``, one InfiniBand rail per local index), on the
  inter-node communicator, so it runs during the whole cycle; it becomes the first block of the next cycle.
  Each block crosses nodes once per cycle and all rails work in parallel.

Accumulators (dQ in the Burst backward, dK/dV in the ring backward) follow their block one step behind on
the intra-node ring; after a cycle's last step each goes straight home to its owner over the group's own
communicator (not the intra or inter one), where it is added.

Receive buffers and sent partials come from and go back to :func:`ds_burst.ring.pool.buffer_pool` as in
:func:`.ring.run_ring`: a cycle's block after the inter-node wait that ends the cycle, an intra-node block after
its step's waits, partials after the waits of the step that sent them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ds_burst.dist.comm import GroupInfo, NodeGroups, P2PBatch
from ds_burst.ring.pool import buffer_pool

Tensors = list[torch.Tensor]


def run_double_ring(
    info: GroupInfo,
    nodes: NodeGroups,
    phase: str,
    direction: int,
    payload: Tensors,
    compute_local: Callable[[], None],
    compute_remote: Callable[[Tensors, int], Tensors | None],
    acc_like: Tensors | None = None,
    on_home: Callable[[Tensors], None] | None = None,
) -> None:
    """Drive ``payload`` over the double ring; same callbacks as :func:`.ring.run_ring`."""
    n_nodes, per_node, d = nodes.nodes, nodes.per_node, direction
    node, local = divmod(info.rank, per_node)
    with_acc = acc_like is not None and on_home is not None

    def owner(c: int, u: int) -> int:
        return ((node - d * c) % n_nodes) * per_node + (local - d * u) % per_node

    def home_source(c: int) -> int:
        """Rank holding this rank's own block at step (c, L-1)."""
        return ((node + d * c) % n_nodes) * per_node + (local - d) % per_node

    pool = buffer_pool()

    def new_bufs(like: Tensors) -> Tensors:
        return [pool.empty_like(x) for x in like]

    cycle_payload = payload
    acc_out: tuple[Tensors, str, int] | None = None  # (tensors, "intra" | "home", destination rank)
    for c in range(n_nodes):
        inter = None
        if c + 1 < n_nodes:
            inter = P2PBatch(nodes.inter, phase, step=(c + 1) * per_node)
            next_cycle = new_bufs(payload)
            for buf in next_cycle:
                inter.recv(buf, (node - d) % n_nodes)
            for x in cycle_payload:
                inter.send(x, (node + d) % n_nodes)
            inter.commit()
        cur = cycle_payload
        for u in range(per_node):
            intra = P2PBatch(nodes.intra, phase, step=c * per_node + u + 1)
            home_batch = P2PBatch(info, phase, step=c * per_node + u + 1)
            nxt = None
            if u + 1 < per_node:
                nxt = new_bufs(payload)
                for buf in nxt:
                    intra.recv(buf, (local - d) % per_node)
                for x in cur:
                    intra.send(x, (local + d) % per_node)
            acc_in = home = None
            sent_acc: Tensors = []
            if with_acc:
                if acc_out is not None:
                    tensors, kind, dest = acc_out
                    sent_acc = tensors
                    for x in tensors:
                        (intra if kind == "intra" else home_batch).send(x, dest)
                if u >= 1 and not (c == 0 and u == 1):  # the holder of (c, u-1) computed a partial
                    acc_in = new_bufs(acc_like)  # type: ignore[arg-type]
                    for buf in acc_in:
                        intra.recv(buf, (local - d) % per_node)
                if u == 0 and c >= 1 and not (c == 1 and per_node == 1):  # (c-1, L-1) was a remote step
                    home = new_bufs(acc_like)  # type: ignore[arg-type]
                    for buf in home:
                        home_batch.recv(buf, home_source(c - 1))
            intra.commit()
            home_batch.commit()
            part = None
            if c == 0 and u == 0:
                compute_local()
            else:
                part = compute_remote(cur, owner(c, u))
            intra.wait()
            home_batch.wait()
            pool.give(*sent_acc, *(cur if u > 0 else []))  # at u == 0 cur is the cycle's block (inter send)
            if with_acc:
                acc_out = None
                if part is not None:
                    if acc_in is not None:
                        for x, y in zip(part, acc_in):
                            x.add_(y)
                    if u + 1 < per_node:
                        acc_out = (part, "intra", (local + d) % per_node)
                    else:
                        acc_out = (part, "home", owner(c, u))
                if home is not None:
                    on_home(home)  # type: ignore[misc]
                pool.give(*(acc_in or []), *(home or []))
            cur = nxt  # type: ignore[assignment]
        if inter is not None:
            inter.wait()
            if c > 0:
                pool.give(*cycle_payload)
            cycle_payload = next_cycle
        elif c > 0:
            pool.give(*cycle_payload)
    if with_acc and acc_out is not None:  # the last step's accumulators go home
        home_batch = P2PBatch(info, phase, step=n_nodes * per_node)
        home = new_bufs(acc_like)  # type: ignore[arg-type]
        for buf in home:
            home_batch.recv(buf, home_source(n_nodes - 1))
        for x in acc_out[0]:
            home_batch.send(x, acc_out[2])
        home_batch.commit().wait()
        on_home(home)  # type: ignore[misc]
        pool.give(*home, *acc_out[0])
