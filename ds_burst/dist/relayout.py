"""Move sequence shards between layouts (contiguous <-> zigzag) with one P2P exchange of half-chunks.

Costs ``O(S * H * D)`` bytes against the ``O(S^2 * H * D)`` FLOPs of attention; used to load-balance
causal attention on contiguous shards and to bring windowed attention onto contiguous shards.
Also the sharding/gathering helpers of the public API.
"""

from __future__ import annotations

import torch

from ds_burst.core.layout import check_layout, chunk_owner, needs_divisor
from ds_burst.dist.comm import GroupInfo, all_gather_tensor, all_reduce_sum, exchange, resolve_group


def relayout(x: torch.Tensor, dim: int, src: str, dst: str, info: GroupInfo, phase: str = "relayout") -> torch.Tensor:
    """Return this rank's shard under layout ``dst`` given its shard ``x`` under layout ``src``."""
    if src == dst or info.world == 1:
        return x
    s_local = x.shape[dim]
    if s_local % 2:
        raise ValueError(f"relayout between {src} and {dst} needs an even local length; got {s_local}")
    h = s_local // 2
    world, rank = info.world, info.rank
    halves = x.split(h, dim=dim)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out_halves = out.split(h, dim=dim)
    sends, recvs = [], []
    for chunk in range(2 * world):
        s_rank, s_slot = chunk_owner(src, chunk, world)
        d_rank, d_slot = chunk_owner(dst, chunk, world)
        if s_rank == rank and d_rank == rank:
            out_halves[d_slot].copy_(halves[s_slot])
        elif s_rank == rank:
            sends.append((halves[s_slot].contiguous(), d_rank))
        elif d_rank == rank:
            recvs.append((chunk, d_slot, s_rank))
    bufs = [(torch.empty_like(halves[slot], memory_format=torch.contiguous_format), slot) for _, slot, _ in recvs]
    exchange(info, phase, sends, [(b, r) for (b, _), (_, _, r) in zip(bufs, recvs)])
    for b, slot in bufs:
        out_halves[slot].copy_(b)
    return out


def shard_sequence(x: torch.Tensor, dim: int = 1, group: object = None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of a full-sequence tensor ``x`` (sequence along ``dim``) under ``layout``."""
    check_layout(layout)
    info = resolve_group(group)
    seq = x.shape[dim]
    div = needs_divisor(layout, info.world)
    if seq % div:
        raise ValueError(f"sequence length {seq} is not divisible by {div} ({layout} layout over {info.world} ranks)")
    return _shard_info(x, dim, info, layout)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, info: GroupInfo, layout: str) -> torch.Tensor:  # type: ignore[override]
        ctx.dim, ctx.info, ctx.layout = dim, info, layout
        parts = all_gather_tensor(info, x)
        if layout == "contiguous" or info.world == 1:
            return torch.cat(parts, dim=dim)
        world = info.world
        halves = [p.chunk(2, dim=dim) for p in parts]
        ordered = [halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))]
        return torch.cat(ordered, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # Adjoint of all-gather: sum the gradient over ranks, keep this rank's shard.
        total = all_reduce_sum(ctx.info, grad.contiguous())
        return _shard_info(total, ctx.dim, ctx.info, ctx.layout), None, None, None


def _shard_info(x: torch.Tensor, dim: int, info: GroupInfo, layout: str) -> torch.Tensor:
    if layout == "contiguous" or info.world == 1:
        return x.chunk(info.world, dim=dim)[info.rank].contiguous()
    chunks = x.chunk(2 * info.world, dim=dim)
    return torch.cat([chunks[info.rank], chunks[2 * info.world - 1 - info.rank]], dim=dim).contiguous()


def gather_sequence(x: torch.Tensor, dim: int = 1, group: object = None, layout: str = "zigzag") -> torch.Tensor:
    """The full-sequence tensor on every rank, from each rank's shard ``x`` under ``layout``.

    Differentiable: the gradient of the gathered tensor is summed over ranks and sharded back.
    """
    check_layout(layout)
    info = resolve_group(group)
    return _GatherSequence.apply(x, dim, info, layout)


def move_chunks(x: torch.Tensor, dim: int, src: tuple[tuple[int, ...], ...], dst: tuple[tuple[int, ...], ...],
                info: GroupInfo, phase: str = "relayout") -> torch.Tensor:
    """This rank's shard under chunk assignment ``dst`` given its shard ``x`` under ``src``.

    An assignment lists, per rank, the chunks (of ``m * P`` equal chunks of the sequence) it holds in local
    order (:mod:`ds_burst.core.documents`); one exchange of chunks, ``O(S * H * D)`` bytes.
    """
    if src == dst or info.world == 1:
        return x
    rank = info.rank
    m = len(src[rank])
    n = x.shape[dim] // m
    where_src = {c: (r, slot) for r, chunks in enumerate(src) for slot, c in enumerate(chunks)}
    parts = x.split(n, dim=dim)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out_parts = out.split(n, dim=dim)
    sends, recvs = [], []
    for d_rank, chunks in enumerate(dst):
        for d_slot, c in enumerate(chunks):
            s_rank, s_slot = where_src[c]
            if s_rank == rank and d_rank == rank:
                out_parts[d_slot].copy_(parts[s_slot])
            elif s_rank == rank:
                sends.append((parts[s_slot].contiguous(), d_rank))
            elif d_rank == rank:
                buf = torch.empty_like(parts[0], memory_format=torch.contiguous_format)
                recvs.append((buf, s_rank, d_slot))
    exchange(info, phase, sends, [(b, r) for b, r, _ in recvs])
    for b, _, slot in recvs:
        out_parts[slot].copy_(b)
    return out
