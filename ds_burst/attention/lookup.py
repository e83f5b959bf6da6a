"""Finding a call's plan: its documents, its cache key, the per-call header round, and on a miss the schedule and
plan (shared by the eager path, :mod:`ds_burst.attention.api`, and the compiled one,
:mod:`ds_burst.attention.compiled`).

Every call of a group of several ranks swaps a fixed-size header with every other rank (with the two ring
neighbours for ``check_inputs=False``) over the group's CPU channel (:func:`ds_burst.attention.validate.agree`):
the same messages whatever a rank's plan cache holds, so ranks that disagree fail together at once instead of
waiting on each other, and a plan is built (with whatever collectives that takes) on every rank or on none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ds_burst.attention.call_plan import PLANS, CallPlan, make_plan
from ds_burst.attention.host import cached, host_copy, memo
from ds_burst.attention.positions import boundaries_from_positions, gather_positions
from ds_burst.attention.schedule import resolve_schedule, ulysses_groups
from ds_burst.attention.validate import (
    UNKNOWN_DOCS,
    AttnArgs,
    agree,
    finite_counts,
    local_error,
    raise_local,
    read_boundaries,
    summary,
)
from ds_burst.dist.comm import GroupInfo, default_group, header_channel, initialized, resolve_group


def call_key(q: object, k: object, v: object, causal: object, softmax_scale: object, window_size: object,
             group: object, layout: object, backward: object, kernel: object, return_lse: object,
             deterministic: object, schedule: object, check_finite: object, softcap: object = None,
             sinks: object = None, *, docs: object = None, max_logit: bool = False) -> tuple | None:
    """The plan-cache key of a call, or ``None`` when the call cannot be cached (not three tensors, or an
    option that is not hashable: such calls are validated and fail there)."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None
    try:
        w = tuple(window_size)  # type: ignore[arg-type]
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, causal,
               softmax_scale, w, group, group is None and initialized(), layout,
               backward, kernel, return_lse, deterministic, schedule, check_finite, softcap, sinks is not None, docs,
               max_logit)
        hash(key)
    except TypeError:
        return None
    return key


def _args(q: object, k: object, causal: bool, softmax_scale: float | None, window_size: tuple[int, int],
          group: object, layout: str, backward: str, kernel: str, return_lse: bool, deterministic: bool,
          schedule: str | None, check_finite: bool, softcap: float | None, sinks: object, info: GroupInfo,
          docs: tuple[int, ...] | None, docs_error: tuple[str, str] | None, max_logit: bool = False) -> AttnArgs:
    node_groups = getattr(group, "node_groups", None)
    sched_error = None
    try:
        sched = resolve_schedule(schedule, group, q, k, causal, window_size, info)
    except (OSError, ValueError) as exc:  # "auto" on this rank could not read its tile table (DS_BURST_TILE_RATES):
        # reported through the header, so every rank raises it instead of waiting for this one
        sched, sched_error = "ring", (type(exc).__name__, f"schedule='auto' could not choose: {exc}")
    uly_groups = ulysses_groups(group, sched, info)
    return AttnArgs(bool(causal), softmax_scale, tuple(window_size), layout, backward, kernel,  # type: ignore[arg-type]
                    bool(return_lse), sched, node_groups is not None,
                    node_groups.per_node if node_groups is not None else 0, bool(check_finite), softcap=softcap,
                    has_sinks=sinks is not None, cu_seqlens=docs, cu_error=docs_error,
                    deterministic=bool(deterministic), max_logit=bool(max_logit),
                    ulysses_degree=uly_groups.per_node if uly_groups is not None else 0, schedule_error=sched_error)


def _docs_tag(layout: str, info: GroupInfo) -> tuple:
    """What the documents of a ``position_ids`` tensor depend on besides its values: the layout and the group."""
    return ("docs", layout, info.world, id(info.group))


def _documents(cu_seqlens: object, position_ids: object, q: object, info: GroupInfo, layout: str
               ) -> tuple[tuple[int, ...] | None, tuple[str, str] | None, int]:
    """``(boundaries, error, state)``: the call's documents from ``cu_seqlens`` or ``position_ids``; ``state`` is 0
    without positions, 1 when this rank knows the documents of its ``position_ids``, ``UNKNOWN_DOCS`` when they
    must be gathered from every rank first."""
    batch, total = (q.shape[0], q.shape[1] * info.world) if isinstance(q, torch.Tensor) and q.dim() == 4 else (1, 0)
    if position_ids is None:
        docs, err = read_boundaries(cu_seqlens, batch, total)
        return docs, err, 0
    if cu_seqlens is not None:
        return None, ("ValueError", "pass the documents as cu_seqlens or as position_ids, not both"), 0
    s_local = total // max(info.world, 1)
    ok = (isinstance(position_ids, torch.Tensor) and not position_ids.is_floating_point()
          and position_ids.dim() in (1, 2) and position_ids.shape[-1] == s_local
          and position_ids.numel() in (s_local, s_local * batch))
    if not ok:
        what = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        return None, ("ValueError", f"position_ids must be an integer tensor [B, S_local] or [S_local] of this rank's "
                                    f"positions, got {what}"), 0
    known, docs = cached(position_ids, _docs_tag(layout, info))
    return (docs, None, 1) if known else (None, None, UNKNOWN_DOCS)


def _gather_documents(position_ids: torch.Tensor, info: GroupInfo, layout: str) -> None:
    """Gather every rank's positions (this rank's once per tensor) and remember the full sequence's documents for
    this ``position_ids`` tensor (every rank of the group calls this together)."""
    full = gather_positions(host_copy(position_ids), header_channel(info), layout)
    docs = boundaries_from_positions(full, "attention position_ids")
    memo(position_ids, _docs_tag(layout, info), lambda: docs)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_capture(info: GroupInfo, cu_seqlens: object, position_ids: object) -> None:
    """Refuse what a CUDA graph would replay wrongly: a replay runs the captured kernels without this host code, so
    documents read from tensor values (they change between replays) and the per-call header round of several ranks
    would be frozen at capture."""
    if not _capturing():
        return
    if isinstance(position_ids, torch.Tensor) or any(
            isinstance(c, torch.Tensor) for c in (cu_seqlens if isinstance(cu_seqlens, tuple) else (cu_seqlens,))):
        raise ValueError("ds-burst attention inside a CUDA graph (torch.compile mode='reduce-overhead', "
                         "torch.cuda.graphs): documents from tensors (cu_seqlens / position_ids) would be frozen at "
                         "capture; pass cu_seqlens as a list of ints (a new list re-captures) or run without graphs")
    if info.world > 1:
        raise ValueError("ds-burst attention inside a CUDA graph runs on one rank only for now (the ring's per-call "
                         "header and P2P are not replayed); run the sequence-parallel model without CUDA graphs")


def _builder(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttnArgs, info: GroupInfo, deterministic: bool,
             node_groups: object, mine: tuple[int, ...], uly_groups: object = None) -> Callable[[], CallPlan]:
    return lambda: make_plan(q, k, args, info, deterministic, node_groups, mine, v,  # type: ignore[arg-type]
                             uly_groups)  # type: ignore[arg-type]


def lookup_plan(q: object, k: object, v: object, causal: bool, softmax_scale: float | None,
                window_size: tuple[int, int], group: object, layout: str, backward: str, kernel: str,
                return_lse: bool, deterministic: bool, mode: str, schedule: str | None,
                check_finite: bool, softcap: float | None = None, sinks: object = None, *,
                cu_seqlens: object = None, position_ids: object = None, max_logit: bool = False) -> CallPlan:
    """The call's plan: cached per key and built (on every rank together) on a key's first call, or on every call
    with ``mode="always"``.

    ``group=None`` is the current topology's sequence-parallel group (:func:`ds_burst.dist.comm.default_group`).
    Local checks run when a plan is built (every call with ``mode="always"``); the header round
    (:func:`~ds_burst.attention.validate.agree`) runs on every call of a group of several ranks, with every rank,
    or with the two ring neighbours only for ``mode="local"`` (``check_inputs=False``, unless ``check_finite``).
    Documents come from ``cu_seqlens`` (read on the host once per tensor object) or from ``position_ids`` that
    restart at 0 (gathered over the group once per tensor object). ``max_logit``: the call also returns the
    per-head maximum logit (part of the key and of the header)."""
    group = default_group() if group is None else group
    info = resolve_group(group)
    _check_capture(info, cu_seqlens, position_ids)
    chan = header_channel(info)
    neighbours_only = mode == "local" and not check_finite  # check_finite: NaN on any rank raises on every rank
    for _ in range(2):  # a second round only after gathering position_ids
        docs, docs_error, docs_state = _documents(cu_seqlens, position_ids, q, info, layout)
        key = None
        if mode != "always" and docs_error is None and docs_state != UNKNOWN_DOCS:
            key = call_key(q, k, v, causal, softmax_scale, window_size, group, layout, backward, kernel, return_lse,
                           deterministic, schedule, check_finite, softcap, sinks, docs=docs, max_logit=max_logit)
        plan = PLANS.get(key) if key is not None else None
        args = None
        if plan is None:
            args = _args(q, k, causal, softmax_scale, window_size, group, layout, backward, kernel, return_lse,
                         deterministic, schedule, check_finite, softcap, sinks, info, docs, docs_error, max_logit)
            err = local_error(q, k, v, args, info, sinks)
            mine = summary(q, k, args, v) if err is None else ()  # type: ignore[arg-type]
        else:
            err, mine = None, plan.summary
        finite = finite_counts(q, k, v, sinks) if check_finite and err is None else ()  # type: ignore[arg-type]
        if chan is not None:
            found = agree(chan, err, plan is not None, docs_state, mine, finite, neighbours_only)
            all_cached, docs_unknown = found.all_cached, found.docs_unknown
        else:
            raise_local(err, finite)
            all_cached, docs_unknown = plan is not None, docs_state == UNKNOWN_DOCS
        if docs_unknown:
            if info.world > 1 and header_channel(info) is None:  # only an emulated group has no channel
                raise ValueError("documents from position_ids on an emulated group (torch's fake process group: one "
                                 "process stands in for one rank): the other ranks' positions cannot be gathered; "
                                 "pass cu_seqlens instead")
            _gather_documents(position_ids, info, layout)  # type: ignore[arg-type]
            continue
        if plan is not None and all_cached:
            return plan
        if args is None:  # cached here, not on another rank: build again, with everyone
            args = _args(q, k, causal, softmax_scale, window_size, group, layout, backward, kernel, return_lse,
                         deterministic, schedule, check_finite, softcap, sinks, info, docs, docs_error, max_logit)
        assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
        node_groups = getattr(group, "node_groups", None)
        build = _builder(q, k, v, args, info, deterministic, node_groups, tuple(mine),
                         ulysses_groups(group, args.schedule, info))
        return PLANS.put(key, build) if key is not None else build()
    raise AssertionError("unreachable: documents are known after one gather")
