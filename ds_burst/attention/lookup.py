"""Finding a call's plan: its cache key, and on a miss the validation, schedule and plan (shared by the eager
path, :mod:`ds_burst.attention.api`, and the compiled one, :mod:`ds_burst.attention.compiled`)."""

from __future__ import annotations

import torch

from ds_burst.attention.call_plan import PLANS, CallPlan, make_plan
from ds_burst.attention.schedule import resolve_schedule
from ds_burst.attention.validate import AttnArgs, check_neighbours, read_boundaries, validate
from ds_burst.dist.comm import initialized, resolve_group


def call_key(q: object, k: object, v: object, causal: object, softmax_scale: object, window_size: object,
         group: object, layout: object, backward: object, kernel: object, return_lse: object,
         deterministic: object, schedule: object, check_finite: object, softcap: object = None,
         sinks: object = None, *, docs: object = None) -> tuple | None:
    """The plan-cache key of a call, or ``None`` when the call cannot be cached (not three tensors, or an
    option that is not hashable: such calls are validated and fail there)."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None
    try:
        w = tuple(window_size)  # type: ignore[arg-type]
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, causal,
               softmax_scale, w, group, group is None and initialized(), layout,
               backward, kernel, return_lse, deterministic, schedule, check_finite, softcap, sinks is not None, docs)
        hash(key)
    except TypeError:
        return None
    return key


def build_plan(q: object, k: object, v: object, causal: bool, softmax_scale: float | None,
                window_size: tuple[int, int], group: object, layout: str, backward: str, kernel: str,
                return_lse: bool, deterministic: bool, collective: bool, schedule: str | None,
                check_finite: bool, softcap: float | None = None, sinks: object = None, *,
                docs: tuple[int, ...] | None = None, docs_error: tuple[str, str] | None = None) -> CallPlan:
    info = resolve_group(group)
    node_groups = getattr(group, "node_groups", None)
    sched = resolve_schedule(schedule, group, q, k, causal, window_size, info)
    args = AttnArgs(bool(causal), softmax_scale, tuple(window_size), layout, backward, kernel,  # type: ignore[arg-type]
                    bool(return_lse), sched, node_groups is not None,
                    node_groups.per_node if node_groups is not None else 0, bool(check_finite), softcap=softcap,
                    has_sinks=sinks is not None, cu_seqlens=docs, cu_error=docs_error)
    summary = validate(q, k, v, args, info, collective=collective, sinks=sinks)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    return make_plan(q, k, args, info, deterministic, node_groups, summary, v)


def lookup_plan(q: object, k: object, v: object, causal: bool, softmax_scale: float | None,
                window_size: tuple[int, int], group: object, layout: str, backward: str, kernel: str,
                return_lse: bool, deterministic: bool, mode: str, schedule: str | None,
                check_finite: bool, softcap: float | None = None, sinks: object = None, *,
                cu_seqlens: object = None) -> CallPlan:
    """The call's plan: cached per key (validated on every rank on the key's first call), or built and validated
    on every call with ``mode="always"`` or ``check_finite``. With ``mode="local"`` (``check_inputs=False``) every
    call compares its summary with the ring neighbours' (:func:`~ds_burst.attention.validate.check_neighbours`).
    ``cu_seqlens`` (packed documents) is read on the host and its values join the key
    (:func:`ds_burst.attention.validate.read_boundaries`)."""
    docs, docs_error = read_boundaries(cu_seqlens)
    per_call = mode == "always" or bool(check_finite) or docs_error is not None
    key = None if per_call else call_key(q, k, v, causal, softmax_scale, window_size, group, layout, backward,
                                         kernel, return_lse, deterministic, schedule, check_finite, softcap, sinks,
                                         docs=docs)
    plan = PLANS.get(key) if key is not None else None
    # check_finite is a collective check per call even with check_inputs=False (the same error on every rank)
    collective = mode != "local" or bool(check_finite)
    neighbours = mode == "local" and not check_finite
    if plan is None:
        build = lambda: build_plan(q, k, v, causal, softmax_scale, window_size, group, layout, backward, kernel,
                                   return_lse, deterministic, collective, schedule, check_finite, softcap, sinks,
                                   docs=docs, docs_error=docs_error)
        try:
            plan = PLANS.put(key, build) if key is not None else build()
        except (ValueError, TypeError):
            if neighbours:  # tell the ring neighbours, which are waiting for this rank's summary
                info = resolve_group(group)
                device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
                check_neighbours(info, None, device)
            raise
    if neighbours and plan.info.world > 1:
        assert isinstance(q, torch.Tensor)
        check_neighbours(plan.info, plan.summary, q.device)
    return plan
