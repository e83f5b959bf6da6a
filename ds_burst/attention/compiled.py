"""``burst_attn_func`` under ``torch.compile``: the call as one custom op with its autograd registered.

Dynamo sees ``ds_burst::attention`` (and ``ds_burst::attention_backward``) as opaque ops with primitive
arguments; the group travels as a token (:func:`group_token`, a constant at trace time). Inside, the op runs the
same plan cache, validation and ring as the eager path. Outputs of a custom op may not alias its inputs, so the
backward re-derives the compute-layout tensors from q, k, v and the output (a relayout exchange when the
caller's layout differs from the compute layout; nothing at one rank or in the compute layout; under the Ulysses
schedules the all-to-all of q, k, v, the output and the lse, one more than the eager backward's). Selective
checkpointing is not supported under compile (a clear error). ``softcap`` is a
float argument (``None`` for none) and ``sinks`` an optional tensor input that gets a gradient; the op always
returns a third tensor, ``max_logit`` (``[Hq]`` with ``want_max``, else empty). Packed documents
travel into the op as they were given: ``cu_seqlens`` as integer lists or tensors (``cu_seqlens_q``/``_k``) and
``position_ids`` as a tensor, read inside the op exactly as in eager mode, so tracing needs no graph break.
"""

from __future__ import annotations

import torch

from ds_burst.attention.call_plan import CallPlan
from ds_burst.attention.function import Saved, backward_impl, forward_impl, move_layout, returns
from ds_burst.attention.lookup import lookup_plan
from ds_burst.attention.selective import active_keep
from ds_burst.ring import ulysses_ring as uly

_GROUPS: dict[str, object] = {}


@torch._dynamo.assume_constant_result
def group_token(group: object) -> str:
    """A string naming ``group`` for the custom op (registered so the op can find the object again)."""
    try:  # dynamo hands a process group in as a fake script object wrapping the real one
        group = object.__getattribute__(group, "real_obj")
    except AttributeError:
        pass
    token = "" if group is None else f"g{id(group)}"
    _GROUPS[token] = group
    return token


def _group(token: str) -> object:
    return None if token == "" else _GROUPS[token]


Docs = tuple[list[int] | None, list[int] | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _split_docs(cu_seqlens: object, position_ids: torch.Tensor | None) -> Docs:
    """``cu_seqlens`` / ``position_ids`` as the op's arguments: ``(q list, k list, q tensor, k tensor, positions)``.
    Anything else (a bad type) goes in as a list for the op's validation to report."""
    pair = (isinstance(cu_seqlens, tuple) and len(cu_seqlens) == 2
            and all(isinstance(x, (list, tuple, torch.Tensor)) for x in cu_seqlens))
    cq, ck = cu_seqlens if pair else (cu_seqlens, None)  # type: ignore[misc]
    out: list = [None, None, None, None, position_ids]
    for i, c in enumerate((cq, ck)):
        if isinstance(c, torch.Tensor):
            out[2 + i] = c
        elif c is not None:
            out[i] = list(c)  # type: ignore[call-overload]
    return tuple(out)  # type: ignore[return-value]


def _join_docs(cq: list[int] | None, ck: list[int] | None, tq: torch.Tensor | None, tk: torch.Tensor | None
               ) -> object:
    q = cq if cq is not None else tq
    k = ck if ck is not None else tk
    return q if k is None else (q, k)


def _plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None, wl: int, wr: int,
          token: str, layout: str, backward: str, kernel: str, deterministic: bool, check_inputs: str,
          schedule: str, check_finite: bool, softcap: float | None, want_max: bool, sinks: torch.Tensor | None,
          cq: list[int] | None, ck: list[int] | None, tq: torch.Tensor | None, tk: torch.Tensor | None,
          positions: torch.Tensor | None) -> CallPlan:
    return lookup_plan(q, k, v, causal, scale, (wl, wr), _group(token), layout, backward, kernel, True,
                       deterministic, check_inputs, None if schedule == "" else schedule, check_finite, softcap, sinks,
                       cu_seqlens=_join_docs(cq, ck, tq, tk), position_ids=positions, max_logit=want_max)


@torch.library.custom_op("ds_burst::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None, wl: int,
                 wr: int, token: str, layout: str, backward: str, kernel: str, deterministic: bool,
                 check_inputs: str, schedule: str, check_finite: bool, softcap: float | None, want_max: bool,
                 sinks: torch.Tensor | None, cq: list[int] | None, ck: list[int] | None, tq: torch.Tensor | None,
                 tk: torch.Tensor | None, positions: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if active_keep() is not None:
        raise ValueError("selective checkpointing (ds_burst.attention.selective) is not supported under torch.compile")
    plan = _plan(q, k, v, causal, scale, wl, wr, token, layout, backward, kernel, deterministic, check_inputs,
                 schedule, check_finite, softcap, want_max, sinks, cq, ck, tq, tk, positions)
    out, lse, _, max_logit = forward_impl(q, k, v, plan, sinks)
    if max_logit is None:
        max_logit = lse.new_empty((0,))
    return out.contiguous(), lse.contiguous(), max_logit  # fresh tensors: forward_impl never returns an input


@attention_op.register_fake
def _(q, k, v, causal, scale, wl, wr, token, layout, backward, kernel, deterministic, check_inputs, schedule,
      check_finite, softcap, want_max, sinks, cq, ck, tq, tk, positions):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_shape = (*q.shape[:3], v.shape[3])
    return (q.new_empty(out_shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype),
            q.new_empty((q.shape[2] if want_max else 0,), dtype=lse_dtype))


@torch.library.custom_op("ds_burst::attention_backward", mutates_args=())
def attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          dout: torch.Tensor, causal: bool, scale: float | None, wl: int, wr: int, token: str,
                          layout: str, backward: str, kernel: str, deterministic: bool, check_inputs: str,
                          schedule: str, check_finite: bool, softcap: float | None, want_max: bool,
                          sinks: torch.Tensor | None, cq: list[int] | None, ck: list[int] | None,
                          tq: torch.Tensor | None, tk: torch.Tensor | None, positions: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(q, k, v, causal, scale, wl, wr, token, layout, backward, kernel, deterministic, check_inputs,
                 schedule, check_finite, softcap, want_max, sinks, cq, ck, tq, tk, positions)
    grads = backward_impl(plan, _saved(plan, q, k, v, out, lse), dout, sinks)
    # the op's outputs are fixed: d sinks is zeros (never read) without sinks
    dsinks = grads[3] if sinks is not None else q.new_zeros(())
    return grads[0].contiguous(), grads[1].contiguous(), grads[2].contiguous(), dsinks.contiguous()


def _saved(plan: CallPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
           ) -> Saved:
    """What the eager forward saves for the backward, rebuilt from the op's inputs and outputs: the compute layout
    (a relayout exchange where it differs from the caller's) and, under a Ulysses schedule, the group-level blocks
    of q, k, v (KV heads replicated as in the forward), the output and the lse (all-to-alls: the output and the lse
    go back exactly as they came, a permutation)."""
    if plan.user_layout == plan.compute_layout:
        qc, kc, vc, oc, lc = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous()
    else:
        qc, kc, vc, oc = (move_layout(x.contiguous(), 1, plan, True) for x in (q, k, v, out))
        lc = move_layout(lse.contiguous(), 2, plan, True)
    spec = plan.ulysses
    if spec is None:
        return qc, kc, vc, oc, lc
    kc, vc = (uly.repeat_kv(x, spec.kv_repeat) for x in (kc, vc))
    qc, kc, vc, oc = (uly.to_node(x, spec, "bwd_a2a") for x in (qc, kc, vc, oc))
    return qc, kc, vc, oc, uly.lse_to_node(lc, spec, "bwd_a2a")


@attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, *args):
    sinks = args[-6]
    dsinks = q.new_zeros(()) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


_N_OPTS = 14  # the op's arguments between v and sinks (causal ... want_max)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, *rest = inputs
    opts, sinks, (cq, ck, tq, tk, positions) = rest[:_N_OPTS], rest[_N_OPTS], rest[_N_OPTS + 1:]
    out, lse, max_logit = output
    tensors = [q, k, v, out, lse]
    slots = {}  # the optional tensor inputs the backward needs, by position among the saved tensors
    for name, t in (("sinks", sinks), ("tq", tq), ("tk", tk), ("positions", positions)):
        if t is not None:
            slots[name] = len(tensors)
            tensors.append(t)
    ctx.save_for_backward(*tensors)
    ctx.opts, ctx.lists, ctx.slots = opts, (cq, ck), slots
    ctx.mark_non_differentiable(lse, max_logit)


def _backward(ctx, dout, _dlse, _dmax):  # noqa: ANN001, ANN202
    saved = ctx.saved_tensors
    q, k, v, out, lse = saved[:5]
    sinks, tq, tk, positions = (saved[ctx.slots[n]] if n in ctx.slots else None
                                for n in ("sinks", "tq", "tk", "positions"))
    dq, dk, dv, dsinks = attention_backward_op(q, k, v, out, lse, dout.contiguous(), *ctx.opts, sinks,
                                               *ctx.lists, tq, tk, positions)
    return (dq, dk, dv) + (None,) * _N_OPTS + (dsinks if sinks is not None else None,) + (None,) * 5


attention_op.register_autograd(_backward, setup_context=_setup_context)


def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float | None,
         window_size: tuple[int, int], group: object, layout: str, backward: str, kernel: str, return_lse: bool,
         deterministic: bool, check_inputs: bool | str, schedule: str | None, check_finite: bool,
         softcap: float | None = None, sinks: torch.Tensor | None = None, cu_seqlens: object = None,
         position_ids: torch.Tensor | None = None, return_max_logit: bool = False
         ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``burst_attn_func`` while dynamo traces: the custom op."""
    mode = "once" if check_inputs is True else ("local" if check_inputs is False else str(check_inputs))
    scale = None if softmax_scale is None else float(softmax_scale)
    out, lse, max_logit = attention_op(q, k, v, bool(causal), scale, int(window_size[0]), int(window_size[1]),
                                       group_token(group), layout, backward, kernel, bool(deterministic), mode,
                                       "" if schedule is None else schedule, bool(check_finite),
                                       None if softcap is None else float(softcap), bool(return_max_logit), sinks,
                                       *_split_docs(cu_seqlens, position_ids))
    return returns(out, lse, max_logit if return_max_logit else None, return_lse)
