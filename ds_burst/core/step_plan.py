"""Step plan: which (query block, key block) tiles a ring step computes, and which ring steps run at all.

Pure index arithmetic over :class:`~ds_burst.core.layout.Segment` lists, no torch. For a pair
(query owner ``i``, key owner ``j``) every query segment of ``i`` meets every key segment of ``j``;
:func:`pair_ops` classifies each meeting by global positions, drops empty ones, and merges fully visible
ones into larger unmasked calls. :func:`ring_passes` finds the fewest ring steps (forward and reverse)
that reach every non-empty pair, so sliding windows stop the ring early.

Packed documents (``docs``, the global boundaries, :mod:`ds_burst.core.documents`): segments are cut into
pieces inside one document and only pieces of the same document meet, so tiles and ring hops follow the
documents; every tile then lies inside one document and the kernels need no document information.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_burst.core.documents import Docs, by_document
from ds_burst.core.layout import Segment
from ds_burst.core.mask import BlockKind, classify_block


@dataclass(frozen=True)
class TileOp:
    """One local kernel call: queries ``[q0, q1)`` of the local shard against keys ``[k0, k1)``.

    ``masked`` False means every pair is visible (call the kernel with no mask). When ``masked`` is True,
    ``q_offset``/``k_offset`` are the global positions of the first query/key.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    q_offset: int
    k_offset: int
    masked: bool


def _dense(segs: list[Segment]) -> bool:
    """Whether the segments follow each other in the local shard (one local range)."""
    return all(a.local_start + a.length == b.local_start for a, b in zip(segs, segs[1:]))


def pair_ops(
    q_segs: list[Segment], k_segs: list[Segment], causal: bool, window: tuple[int, int], *, docs: Docs | None = None
) -> list[TileOp]:
    """Kernel calls needed for query segments ``q_segs`` against key segments ``k_segs``.

    ``docs``: global document boundaries; tiles are then cut at them and pair only the same document.
    """
    if docs is not None and len(docs) > 2:
        q_docs, k_docs = by_document(q_segs, docs), by_document(k_segs, docs)
        ops: list[TileOp] = []
        for d, q_pieces in q_docs.items():
            if d in k_docs:
                ops.extend(pair_ops(q_pieces, k_docs[d], causal, window))
        return ops
    kinds = [
        [classify_block(qs.global_start, qs.length, ks.global_start, ks.length, causal, window) for ks in k_segs]
        for qs in q_segs
    ]
    q_all = (q_segs[0].local_start, q_segs[-1].local_start + q_segs[-1].length)
    k_all = (k_segs[0].local_start, k_segs[-1].local_start + k_segs[-1].length)
    q_dense, k_dense = _dense(q_segs), _dense(k_segs)
    if q_dense and k_dense and all(kd is BlockKind.FULL for row in kinds for kd in row):
        return [TileOp(*q_all, *k_all, 0, 0, False)]
    ops = []
    done = [[kd is BlockKind.EMPTY for kd in row] for row in kinds]
    # Columns that every query segment sees fully: one unmasked call over the whole local query.
    for c, ks in enumerate(k_segs):
        if q_dense and all(row[c] is BlockKind.FULL for row in kinds):
            ops.append(TileOp(*q_all, ks.local_start, ks.local_start + ks.length, 0, 0, False))
            for row in done:
                row[c] = True
    # Rows that see every key segment fully (and untouched so far): one call over the whole local key.
    for r, qs in enumerate(q_segs):
        if k_dense and all(kd is BlockKind.FULL for kd in kinds[r]) and not any(done[r]):
            ops.append(TileOp(qs.local_start, qs.local_start + qs.length, *k_all, 0, 0, False))
            done[r] = [True] * len(k_segs)
    for r, qs in enumerate(q_segs):
        for c, ks in enumerate(k_segs):
            if done[r][c]:
                continue
            masked = kinds[r][c] is BlockKind.PARTIAL
            ops.append(
                TileOp(
                    qs.local_start,
                    qs.local_start + qs.length,
                    ks.local_start,
                    ks.local_start + ks.length,
                    qs.global_start if masked else 0,
                    ks.global_start if masked else 0,
                    masked,
                )
            )
    return ops


def pair_needed(q_segs: list[Segment], k_segs: list[Segment], causal: bool, window: tuple[int, int], *,
                docs: Docs | None = None) -> bool:
    """Whether any query of ``q_segs`` sees any key of ``k_segs`` (of the same document, given ``docs``)."""
    if docs is not None and len(docs) > 2:
        q_docs, k_docs = by_document(q_segs, docs), by_document(k_segs, docs)
        return any(d in k_docs and pair_needed(qp, k_docs[d], causal, window) for d, qp in q_docs.items())
    return any(
        classify_block(qs.global_start, qs.length, ks.global_start, ks.length, causal, window) is not BlockKind.EMPTY
        for qs in q_segs
        for ks in k_segs
    )


@dataclass(frozen=True)
class RingPass:
    """A ring pass: blocks move ``direction`` (+1: to rank r+1) for ``steps`` hops.

    At hop ``t`` (1-based) rank ``r`` holds the block owned by ``r - direction * t``.
    """

    direction: int
    steps: int


def ring_passes(seg_table: list[list[Segment]], causal: bool, window: tuple[int, int], *,
                docs: Docs | None = None) -> list[RingPass]:
    """Fewest forward/reverse hops so that every query owner meets every key owner it needs.

    ``seg_table[r]`` are rank ``r``'s segments. Offsets ``t = (i - j) mod P`` between query owner ``i`` and
    key owner ``j`` are covered by a forward pass of ``a >= t`` hops or a reverse pass of ``b >= P - t``
    hops. Passes run one after the other, so the split with the fewest hops in total wins, then the one
    with a single pass (a plain one-way ring), then the shorter longest pass. With ``docs`` only pairs that
    share a document count: documents inside one rank need no hop at all.
    """
    world = len(seg_table)
    need = set()
    for i in range(world):
        for j in range(world):
            if i != j and pair_needed(seg_table[i], seg_table[j], causal, window, docs=docs):
                need.add((i - j) % world)
    if not need:
        return []
    best: tuple[int, int, int, int, int] | None = None
    for a in range(world):
        b = max((world - t for t in need if t > a), default=0)
        key = (a + b, int(a > 0) + int(b > 0), max(a, b), b, a)
        if best is None or key < best:
            best = key
    *_, b, a = best  # type: ignore[misc]
    passes = []
    if a:
        passes.append(RingPass(+1, a))
    if b:
        passes.append(RingPass(-1, b))
    return passes


def mirror(passes: list[RingPass]) -> list[RingPass]:
    """Passes for moving the *query* side so that it meets the same (query, key) owner pairs."""
    return [RingPass(-p.direction, p.steps) for p in passes]
