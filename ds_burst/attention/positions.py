"""Packed documents given as ``position_ids`` that restart at 0 at every document (Hugging Face packing).

transformers' packing collators (``DataCollatorWithFlattening``, TRL's padding-free batches) pass positions that
restart at 0 where a document starts; its flash-attention backends turn them into per-document attention. A
rank holds only its shard, so the documents of the full sequence come from every rank's positions: they are
gathered once per ``position_ids`` tensor over the group's CPU channel (:func:`gather_positions`) and turned into
boundaries by :func:`boundaries_from_positions` (the same data on every rank, so the same boundaries or the same
error everywhere).
"""

from __future__ import annotations

import torch

from ds_burst.core.layout import global_index
from ds_burst.dist.comm import GroupInfo, all_gather_tensor

PACKED_ERROR = "ds-burst: packed batch refused ({where}): {why}"


def boundaries_from_positions(position_ids: torch.Tensor, where: str = "position_ids") -> tuple[int, ...] | None:
    """Document boundaries ``(0, e1, ..., S)`` of a full-sequence ``position_ids`` (``[S]`` or ``[B, S]``, on the
    CPU), or ``None`` when the positions never restart at 0 after the first token (one document per row).

    A document starts wherever the positions restart at 0. Raises ``ValueError`` ("packed batch refused") when a
    row's positions jump without restarting at 0 (a boundary cannot be told apart from a gap) or when the rows
    hold different documents (one set of boundaries applies to every row of the batch).
    """
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[-1] < 2:
        return None
    jump = (pos[:, 1:] != pos[:, :-1] + 1) & (pos[:, 1:] != 0)
    if bool(jump.any()):
        row, t = (int(x) for x in torch.nonzero(jump)[0])
        raise ValueError(PACKED_ERROR.format(
            where=where, why=f"row {row}: position_ids jump from {int(pos[row, t])} to {int(pos[row, t + 1])} at "
                             f"token {t + 1} without restarting at 0; ds-burst reads a document start only where "
                             "the positions restart at 0"))
    starts = pos == 0
    starts[:, 0] = True
    if bool((starts != starts[:1]).any()):
        first = [[int(t) for t in torch.nonzero(row).flatten()][:8] for row in starts]
        raise ValueError(PACKED_ERROR.format(
            where=where, why="the rows of the batch hold different documents; ds-burst applies one set of document "
                             f"boundaries to every row (pack each row alike, or use batch size 1); document starts "
                             f"per row: {first}"))
    cu = (*(int(t) for t in torch.nonzero(starts[0]).flatten()), pos.shape[-1])
    return None if len(cu) == 2 else cu


def gather_positions(local: torch.Tensor, chan: GroupInfo | None, layout: str) -> torch.Tensor:
    """The full sequence's ``[B, S]`` positions (CPU) from every rank's ``[B, S_local]`` shard ``local`` (CPU, in
    the caller's ``layout``), gathered over ``chan`` (every rank of the group calls this together)."""
    local = local.reshape(-1, local.shape[-1]).to(torch.int64)
    if chan is None or chan.world == 1:
        return local
    parts = all_gather_tensor(chan, local)
    s_local = local.shape[-1]
    full = torch.empty(local.shape[0], s_local * chan.world, dtype=torch.int64)
    for r, part in enumerate(parts):
        full[:, torch.tensor(global_index(layout, r, chan.world, s_local * chan.world))] = part
    return full
