"""Ulysses over heads, and the Ulysses x ring hybrid (Burst-USP).

Inside each Ulysses group of ``U`` ranks an all-to-all over heads turns ``[B, s, H, D]`` shards into
``[B, U*s, H/U, D]``: every rank then holds all of its group's tokens for ``H/U`` heads. Across the ``N = P/U``
groups the usual ring (forward, Burst or ring backward) runs on those group-level blocks over the inter-group
communicator (one rank per group with the same local index). Outputs and gradients go back with the reverse
all-to-all. Three cases of one mechanism:

* ``schedule="ulysses"``: ``U = P``, the whole sequence-parallel group; the "ring" is one rank, so each rank runs
  the one-rank plan (global positions, whole-block kernels) over the whole sequence on its ``H/P`` heads;
* ``schedule="ulysses_ring"`` on a topology made with ``gpus_per_node=L``: ``U = L``, a group is a node;
* ``init_sequence_parallel(P, ulysses_degree=U)``: ``U`` consecutive ranks per group, inside a node or not.

The group-level token order is chosen so that the group holds the same layout at group granularity:
contiguous shards concatenate in rank order; zigzag shards put the ``U`` first halves in rank order and the
``U`` second halves in reverse rank order, which is exactly the zigzag layout over ``N`` groups with
``U*s`` tokens each (for ``N = 1`` both are the natural token order). The step plan of the flat ring therefore
applies unchanged at group level, windows and packed documents included.

Fewer KV heads than ``U`` are replicated up to ``U`` (``U % Hkv == 0``); their gradients are summed back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_burst.dist.comm import GroupInfo, all_to_all


@dataclass(frozen=True)
class UlyssesSpec:
    """The all-to-all over heads of the Ulysses schedules."""

    intra: GroupInfo  # the Ulysses group's ranks (U: the node, or the whole sequence-parallel group)
    layout: str  # compute layout of the shards ("contiguous" or "zigzag")
    kv_repeat: int  # KV heads are repeated this many times before the all-to-all (1: none)


def check_heads(hq: int, hkv: int, degree: int, schedule: str = "ulysses_ring") -> str | None:
    """Why ``schedule`` cannot split these heads over its all-to-all of ``degree`` ranks (``None`` when it can)."""
    what = {"ulysses": f"the sequence-parallel size {degree}",
            "ulysses_ring": f"the Ulysses degree {degree} (the GPUs per node, or init_sequence_parallel's "
                            "ulysses_degree)"}
    size = what.get(schedule, f"the Ulysses degree {degree}")
    if hq % degree:
        return f"schedule {schedule!r} needs Hq divisible by {size}: Hq={hq}"
    if hkv % degree and degree % hkv:
        return (f"schedule {schedule!r} needs Hkv divisible by {size} or dividing it (KV heads are then "
                f"replicated): Hkv={hkv}")
    return None


def kv_repeat(hkv: int, per_node: int) -> int:
    """How often each KV head is repeated so that every rank of the node gets at least one."""
    return per_node // hkv if hkv < per_node else 1


def to_node(x: torch.Tensor, spec: UlyssesSpec, phase: str) -> torch.Tensor:
    """``[B, s, H, D]`` shard -> ``[B, L*s, H/L, D]`` node-level block (all-to-all over heads)."""
    b, s, h, d = x.shape
    n = spec.intra.world
    if n == 1:
        return x.contiguous()
    send = x.reshape(b, s, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()  # [L(dest), B, s, H/L, D]
    recv = all_to_all(spec.intra, send, phase)  # [L(source), B, s, H/L, D]
    if spec.layout == "zigzag":
        half = s // 2
        first = recv[:, :, :half]
        second = recv[:, :, half:].flip(0)
        recv = torch.cat([first, second], dim=2).reshape(n, b, 2, half, h // n, d)
        recv = recv.permute(1, 2, 0, 3, 4, 5)  # [B, 2, L, half, H/L, D]
    else:
        recv = recv.permute(1, 0, 2, 3, 4)  # [B, L, s, H/L, D]
    return recv.reshape(b, n * s, h // n, d).contiguous()


def from_node(y: torch.Tensor, spec: UlyssesSpec, phase: str) -> torch.Tensor:
    """Inverse of :func:`to_node`: ``[B, L*s, H/L, D]`` -> ``[B, s, H, D]``."""
    b, ns, hl, d = y.shape
    n = spec.intra.world
    if n == 1:
        return y.contiguous()
    s = ns // n
    if spec.layout == "zigzag":
        half = s // 2
        parts = y.reshape(b, 2, n, half, hl, d)
        first, second = parts[:, 0], parts[:, 1].flip(1)  # [B, L, half, H/L, D], second in rank order
        send = torch.cat([first, second], dim=2).permute(1, 0, 2, 3, 4).contiguous()  # [L(dest), B, s, H/L, D]
    else:
        send = y.reshape(b, n, s, hl, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = all_to_all(spec.intra, send, phase)  # [L(head group), B, s, H/L, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, n * hl, d)


def lse_to_shard(lse: torch.Tensor, spec: UlyssesSpec, phase: str) -> torch.Tensor:
    """Node-level ``[B, H/L, L*s]`` log-sum-exp -> shard ``[B, H, s]``."""
    return from_node(lse.transpose(1, 2).unsqueeze(-1), spec, phase).squeeze(-1).transpose(1, 2).contiguous()


def lse_to_node(lse: torch.Tensor, spec: UlyssesSpec, phase: str) -> torch.Tensor:
    """Inverse of :func:`lse_to_shard`: shard ``[B, H, s]`` -> node-level ``[B, H/L, L*s]``."""
    return to_node(lse.transpose(1, 2).unsqueeze(-1), spec, phase).squeeze(-1).transpose(1, 2).contiguous()


def repeat_kv(x: torch.Tensor, times: int) -> torch.Tensor:
    """Repeat each KV head ``times`` times (head ``j`` becomes ``j*times .. j*times+times-1``)."""
    return x if times == 1 else x.repeat_interleave(times, dim=2)


def sum_repeated(g: torch.Tensor, times: int) -> torch.Tensor:
    """Gradient of :func:`repeat_kv`: sum the copies of each head."""
    if times == 1:
        return g
    b, s, h, d = g.shape
    return g.reshape(b, s, h // times, times, d).sum(3)
