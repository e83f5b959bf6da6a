"""Byte counts of the two backward communication patterns (the GQA caveat of the design doc).

Per ring hop and per token of the travelling shard:

* ``burst``: q and dO (input dtype) + lse and delta (fp32) go forward, the fp32 dQ accumulator follows:
  ``Hq * (2 * D * e + 8 + 4 * D)`` bytes.
* ``ring``: k and v (input dtype) go forward, fp32 dK and dV accumulators follow:
  ``Hkv * (2 * D * e + 8 * D)`` bytes.

For MHA the Burst pattern is cheaper; with GQA (``Hq / Hkv >= 2``) the ring pattern usually is.
"""

from __future__ import annotations


def backward_bytes_per_token(pattern: str, hq: int, hkv: int, head_dim: int, elem_size: int) -> int:
    """Bytes one rank sends per hop, per token of a shard, for backward ``pattern``."""
    if pattern == "burst":
        return hq * (2 * head_dim * elem_size + 8 + 4 * head_dim)
    if pattern == "ring":
        return hkv * (2 * head_dim * elem_size + 8 * head_dim)
    raise ValueError(f"unknown backward pattern {pattern!r}")


def choose_backward(hq: int, hkv: int, head_dim: int, elem_size: int) -> str:
    """The backward pattern that sends fewer bytes (Burst on a tie)."""
    burst = backward_bytes_per_token("burst", hq, hkv, head_dim, elem_size)
    ring = backward_bytes_per_token("ring", hq, hkv, head_dim, elem_size)
    return "burst" if burst <= ring else "ring"
