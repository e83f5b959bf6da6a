"""Packed documents: boundaries, per-document pieces of segments, causal work and the balanced compute layout.

Pure index arithmetic, no torch. A packed sequence of ``S`` tokens holds documents given by their global
boundaries ``docs = (0, e1, ..., S)`` (flash-attn's ``cu_seqlens`` for one packed row); a query sees a key only
when both lie in the same document (and the causal/window rule holds by global positions, which inside one
document is the same rule as by positions within the document).

The step plan (:mod:`ds_burst.core.step_plan`) cuts every segment at the document boundaries into *pieces*
that each lie inside one document, and pairs only pieces of the same document: tiles without a same-document
pair disappear, and ring hops that no document needs are not run.

Balance (see docs/API.md, "Packed documents"): the sequence is cut into ``m * P`` equal chunks (``m`` chunks per
rank, ``m`` in 1, 2, 4); the causal work of a chunk is the number of visible (query, key) pairs of its queries,
computed from the real document lengths; chunks are dealt to ranks so that the busiest rank has as little work
as possible (exact pairing for ``m = 2``, largest-first into the least loaded rank with room otherwise).
Among the caller's layout, contiguous, zigzag and the dealt layouts whose busiest rank is within 5% of the
least loaded busiest rank, the plan keeps the one with the fewest ring hops, then one that needs no token
moves, then the least work.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Callable, Sequence

from ds_burst.core.layout import Segment
from ds_burst.core.mask import window_bounds

Docs = tuple[int, ...]
Assignment = tuple[tuple[int, ...], ...]  # per rank: the chunk indices it holds, in local order
BALANCE_SLACK = 1.05  # a layout needing no moves is kept when its busiest rank is within 5% of the best


def check_boundaries(values: Sequence[int], total: int) -> Docs:
    """The boundaries as a tuple of ints without empty documents, or ``ValueError`` naming what is wrong (start 0,
    end ``total``, non-decreasing). A repeated boundary (``[0, 5, 5, S]``: an empty document, which flash-attn's
    varlen convention allows and some collators emit) holds no token and is dropped."""
    docs = tuple(int(x) for x in values)
    if len(docs) < 2:
        raise ValueError(f"cu_seqlens needs at least two boundaries [0, ..., S], got {list(docs)}")
    if docs[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {docs[0]}")
    if docs[-1] != total:
        raise ValueError(f"cu_seqlens must end at the full sequence length S={total} (S_local * P), got {docs[-1]}")
    for i in range(1, len(docs)):
        if docs[i] < docs[i - 1]:
            raise ValueError(f"cu_seqlens must be non-decreasing: cu_seqlens[{i - 1}]={docs[i - 1]} > "
                             f"cu_seqlens[{i}]={docs[i]}")
    return tuple(x for i, x in enumerate(docs) if i == 0 or x != docs[i - 1])


def fingerprint(docs: Docs | None) -> tuple[int, int]:
    """``(number of documents, crc32 of the boundaries)``; ``(0, 0)`` for one document (or none given)."""
    if docs is None or len(docs) <= 2:
        return 0, 0
    raw = b"".join(int(x).to_bytes(8, "little", signed=True) for x in docs)
    return len(docs) - 1, zlib.crc32(raw)


def doc_of(docs: Docs, pos: int) -> int:
    """Index of the document holding global position ``pos``."""
    return bisect.bisect_right(docs, pos) - 1


def pieces(seg: Segment, docs: Docs) -> list[tuple[int, Segment]]:
    """``seg`` cut at the document boundaries: ``(document index, piece)`` in order."""
    out = []
    start, end = seg.global_start, seg.global_start + seg.length
    d = doc_of(docs, start)
    while start < end:
        stop = min(end, docs[d + 1])
        out.append((d, Segment(start, seg.local_start + start - seg.global_start, stop - start)))
        start, d = stop, d + 1
    return out


def by_document(segs: list[Segment], docs: Docs) -> dict[int, list[Segment]]:
    """Pieces of ``segs`` grouped by document (pieces in local order)."""
    got: dict[int, list[Segment]] = {}
    for seg in segs:
        for d, piece in pieces(seg, docs):
            got.setdefault(d, []).append(piece)
    return got


def _series(x0: int, x1: int, slope: int, offset: float) -> float:
    """Sum over ``p`` in ``[x0, x1)`` of ``slope * p + offset``."""
    n = x1 - x0
    if n <= 0:
        return 0.0
    return slope * (x0 + x1 - 1) * n / 2 + offset * n


def query_work(start: int, end: int, docs: Docs | None, causal: bool, window: tuple[int, int], total: int) -> float:
    """Visible (query, key) pairs of the queries at global positions ``[start, end)``."""
    docs = docs if docs is not None else (0, total)
    lo, hi = window_bounds(causal, window)
    work = 0.0
    d = doc_of(docs, start)
    while start < end:
        a, b = docs[d], docs[d + 1]
        stop = min(end, b)
        # visible keys of p: min(b-1, p+hi) - max(a, p-lo) + 1, piecewise linear; it changes form at b-hi and a+lo+1
        cuts = sorted({start, stop, *(int(c) for c in (b - hi, a + lo + 1) if start < c < stop)})
        for x0, x1 in zip(cuts, cuts[1:]):
            right_const = hi == float("inf") or x0 > b - 1 - hi  # min(...) is b-1 on this piece
            left_const = lo == float("inf") or x0 <= a + lo  # max(...) is a on this piece
            slope = (0 if right_const else 1) - (0 if left_const else 1)
            offset = ((b - 1) if right_const else hi) - (a if left_const else -lo) + 1
            work += _series(x0, x1, slope, offset)
        start, d = stop, d + 1
    return work


def chunk_segments(chunks: tuple[int, ...], chunk_len: int) -> list[Segment]:
    """Segments of a rank holding ``chunks`` (in local order), merging globally adjacent neighbours."""
    segs: list[Segment] = []
    for slot, c in enumerate(chunks):
        g, loc = c * chunk_len, slot * chunk_len
        if segs and segs[-1].global_start + segs[-1].length == g:
            last = segs[-1]
            segs[-1] = Segment(last.global_start, last.local_start, last.length + chunk_len)
        else:
            segs.append(Segment(g, loc, chunk_len))
    return segs


def layout_assignment(layout: str, world: int, m: int) -> Assignment:
    """The chunks (of ``m * world``) each rank holds under a named layout (zigzag needs ``m`` even)."""
    if layout == "contiguous" or world == 1:
        return tuple(tuple(range(r * m, (r + 1) * m)) for r in range(world))
    h = m // 2
    return tuple(tuple(range(r * h, (r + 1) * h)) + tuple(range((2 * world - 1 - r) * h, (2 * world - r) * h))
                 for r in range(world))


def deal_chunks(work: list[float], world: int) -> Assignment:
    """Deal ``len(work)`` chunks to ``world`` ranks (equal counts) so that the busiest rank has little work."""
    m = len(work) // world
    order = sorted(range(len(work)), key=lambda c: (-work[c], c))
    if m == 2:  # pair the heaviest with the lightest: optimal for two per rank
        ranks = [(order[i], order[-1 - i]) for i in range(world)]
    else:
        load = [0.0] * world
        ranks_l: list[list[int]] = [[] for _ in range(world)]
        for c in order:
            r = min((r for r in range(world) if len(ranks_l[r]) < m), key=lambda r: (load[r], r))
            ranks_l[r].append(c)
            load[r] += work[c]
        ranks = [tuple(x) for x in ranks_l]
    return tuple(tuple(sorted(x)) for x in ranks)


def rank_work(assign: Assignment, chunk_len: int, docs: Docs | None, causal: bool, window: tuple[int, int],
              total: int) -> list[float]:
    """Visible pairs of each rank's queries under ``assign``."""
    return [sum(query_work(c * chunk_len, (c + 1) * chunk_len, docs, causal, window, total) for c in chunks)
            for chunks in assign]


def balanced_layout(user_layout: str, docs: Docs | None, causal: bool, window: tuple[int, int], world: int,
                    s_local: int, hops: Callable[[Assignment, int], int] | None = None
                    ) -> tuple[int, Assignment, list[float]]:
    """``(m, assignment, work per rank)`` of the compute layout for packed documents (module docstring).

    The assignment is at granularity ``m * world`` chunks of ``s_local // m`` tokens; the caller's layout
    expressed at that granularity is ``layout_assignment(user_layout, world, m)``. ``hops(assignment, m)``
    counts the ring hops a layout needs; among the layouts whose busiest rank is within ``BALANCE_SLACK`` of
    the best, the one with the fewest hops wins, then one that needs no token moves, then the least work.
    """
    total = world * s_local
    cands: list[tuple[float, int, int, Assignment, list[float]]] = []  # (max work, moves?, m, assign, work)
    for m in (1, 2, 4):
        if s_local % m or (m == 1 and user_layout == "zigzag" and world > 1):
            continue
        chunk_len = s_local // m
        user = layout_assignment(user_layout, world, m) if (m % 2 == 0 or user_layout == "contiguous") else None
        work = [query_work(c * chunk_len, (c + 1) * chunk_len, docs, causal, window, total)
                for c in range(m * world)]
        options = [deal_chunks(work, world), layout_assignment("contiguous", world, m)]
        if m % 2 == 0:
            options.append(layout_assignment("zigzag", world, m))
        for assign in options:
            per_rank = [sum(work[c] for c in chunks) for chunks in assign]
            cands.append((max(per_rank), int(assign != user), m, assign, per_rank))
    best = min(c[0] for c in cands)
    near = [c for c in cands if c[0] <= best * BALANCE_SLACK]
    count = (lambda c: hops(c[3], c[2])) if hops is not None else (lambda c: 0)
    pick = min(near, key=lambda c: (count(c), c[1], c[0], c[2]))
    return pick[2], pick[3], pick[4]
