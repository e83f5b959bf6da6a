"""Sequence layouts: which global tokens each rank of a sequence-parallel group holds.

* ``contiguous``: rank ``r`` holds tokens ``[r*s, (r+1)*s)`` (what DeepSpeed-Ulysses loaders produce).
* ``zigzag``: the sequence is cut into ``2P`` chunks of ``s/2``; rank ``r`` holds chunk ``r`` then chunk
  ``2P-1-r``, which balances causal attention across ranks.

A layout is described per rank as a list of :class:`Segment` (global start, local start, length).
Everything here is pure index arithmetic; moving data lives in :mod:`ds_burst.dist.comm`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_burst.core.options import LAYOUTS

__all__ = ["LAYOUTS", "Segment"]


@dataclass(frozen=True)
class Segment:
    """A run of tokens that is contiguous both globally and in the local shard."""

    global_start: int
    local_start: int
    length: int


def check_layout(layout: str) -> None:
    """Raise ``ValueError`` for an unknown layout name."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")


def segments(layout: str, rank: int, world: int, s_local: int) -> list[Segment]:
    """Global positions of the ``s_local`` tokens rank ``rank`` holds under ``layout``."""
    check_layout(layout)
    if layout == "contiguous" or world == 1:
        return [Segment(rank * s_local, 0, s_local)]
    if s_local % 2:
        raise ValueError(f"zigzag layout needs an even local length (S divisible by 2P); got S_local={s_local}")
    h = s_local // 2
    return [Segment(rank * h, 0, h), Segment((2 * world - 1 - rank) * h, h, h)]


def chunk_owner(layout: str, chunk: int, world: int) -> tuple[int, int]:
    """Return ``(rank, slot)`` holding half-chunk ``chunk`` (of ``2P``) under ``layout``; slot is 0 or 1."""
    check_layout(layout)
    if layout == "contiguous":
        return chunk // 2, chunk % 2
    return (chunk, 0) if chunk < world else (2 * world - 1 - chunk, 1)


def global_index(layout: str, rank: int, world: int, seq_len: int) -> list[int]:
    """Global token positions (in local order) that ``rank`` holds in a sequence of ``seq_len``."""
    s_local = seq_len // world
    return [seg.global_start + i for seg in segments(layout, rank, world, s_local) for i in range(seg.length)]


def needs_divisor(layout: str, world: int) -> int:
    """The number the global sequence length must be divisible by."""
    return 2 * world if (layout == "zigzag" and world > 1) else world
