"""Block-level mask classification by global token positions (pure Python, no torch).

Every local kernel computes attention between a block of queries at global positions
``[q_start, q_start + q_len)`` and a block of keys at ``[k_start, k_start + k_len)``.
A key at position ``kp`` is visible from a query at ``qp`` iff

* ``causal`` is off or ``kp <= qp``, and
* ``left < 0`` or ``kp >= qp - left``, and
* ``right < 0`` or ``kp <= qp + right``

(``window = (left, right)`` as in flash-attn; ``-1`` means unbounded on that side).
``classify_block`` tells whether a block pair needs no work, no mask, or an element mask.
"""

from __future__ import annotations

from enum import Enum

INF = float("inf")


class BlockKind(str, Enum):
    """What a (query block, key block) pair needs."""

    EMPTY = "empty"  # no visible pair: skip
    FULL = "full"  # every pair visible: no mask
    PARTIAL = "partial"  # element mask needed


def window_bounds(causal: bool, window: tuple[int, int]) -> tuple[float, float]:
    """Return ``(L, R)``: a key at ``kp`` is visible from ``qp`` iff ``qp - L <= kp <= qp + R``."""
    left, right = window
    lo = INF if left < 0 else float(left)
    hi = INF if right < 0 else float(right)
    if causal:
        hi = min(hi, 0.0)
    return lo, hi


def window_is_finite(causal: bool, window: tuple[int, int]) -> bool:
    """Whether a query sees a bounded range of keys (a sliding window), so distant blocks are skipped."""
    return window[0] >= 0 or (not causal and window[1] >= 0)


def classify_block(
    q_start: int, q_len: int, k_start: int, k_len: int, causal: bool, window: tuple[int, int] = (-1, -1)
) -> BlockKind:
    """Classify the attention block between two contiguous ranges of global positions."""
    if q_len <= 0 or k_len <= 0:
        return BlockKind.EMPTY
    lo, hi = window_bounds(causal, window)
    q_last, k_last = q_start + q_len - 1, k_start + k_len - 1
    # Some query qp in [q_start, q_last] sees some key iff k_start - hi <= qp <= k_last + lo.
    if max(q_start, k_start - hi) > min(q_last, k_last + lo):
        return BlockKind.EMPTY
    # Every pair visible iff the last query's window starts at or before k_start
    # and the first query's window ends at or after k_last.
    if q_last - lo <= k_start and q_start + hi >= k_last:
        return BlockKind.FULL
    return BlockKind.PARTIAL
