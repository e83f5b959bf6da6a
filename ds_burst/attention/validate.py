"""Input validation that raises the same clear error on every rank of the group, never a hang.

Each rank checks its own arguments (once per call key: :func:`local_error`), then, on every call, the ranks swap
a fixed-size header over the group's CPU channel (:func:`agree`; gloo, no device sync, no NCCL op): an error
flag, whether the rank has the call's plan cached, and a short integer summary of the call (shapes, dtype,
options, documents). If any rank failed a local check, every rank raises that rank's error; if the summaries
disagree, every rank raises a ``ValueError`` naming each field that differs with every rank's current value.
Because every rank sends the same messages whatever its plan cache holds, a rank whose input changed while the
others reuse their cached plan fails on every rank at once, and the process group stays usable.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ds_burst.attention.host import host_values
from ds_burst.core.documents import check_boundaries, fingerprint
from ds_burst.core.options import BACKWARDS, LAYOUTS, SCHEDULES, ULYSSES_SCHEDULES
from ds_burst.dist.comm import GroupInfo, exchange_header
from ds_burst.kernels import registry
from ds_burst.ring.ulysses_ring import check_heads

__all__ = ["BACKWARDS", "SCHEDULES", "AttnArgs", "Agreement", "agree", "check_mode", "finite_counts", "local_error",
           "raise_local", "read_boundaries", "summary"]
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "meta")


@dataclass(frozen=True)
class AttnArgs:
    """The arguments of one ``burst_attn_func`` call that every rank must agree on."""

    causal: bool
    softmax_scale: float | None
    window_size: tuple[int, int]
    layout: str
    backward: str
    kernel: str
    return_lse: bool
    schedule: str = "ring"
    has_node_groups: bool = False
    per_node: int = 0  # ranks per node of the topology's node groups (0: none)
    check_finite: bool = False  # q, k, v must not hold NaN/Inf
    softcap: float | None = None  # logit softcapping (Gemma 2)
    has_sinks: bool = False  # a per-head sink logit in the softmax denominator (GPT-OSS)
    cu_seqlens: tuple[int, ...] | None = None  # global document boundaries as read (checked in validation)
    cu_error: tuple[str, str] | None = None  # (exception class, message) when cu_seqlens could not be read
    deterministic: bool = False
    max_logit: bool = False  # also return the per-head maximum logit (return_max_logit)
    ulysses_degree: int = 0  # ranks of the all-to-all over heads of a Ulysses schedule (0: none / no groups)
    schedule_error: tuple[str, str] | None = None  # (exception class, message) when "auto" could not decide here


_PER_ROW = ("ds-burst applies one set of document boundaries to every row of the batch: pass the boundaries of one "
            "row [0, e1, ..., S], or flash-attn's offsets into the flattened batch [0, ..., B*S] with the same "
            "documents in every row")


def _int_list(name: str, value: object) -> tuple[list[int] | None, tuple[str, str] | None]:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return None, ("TypeError", f"{name} must be an integer tensor, got dtype {value.dtype}")
        if value.dim() != 1:
            return None, ("ValueError", f"{name} must be 1-D, got shape {tuple(value.shape)}; {_PER_ROW}")
        return [int(x) for x in host_values(value)], None
    if isinstance(value, (list, tuple)):
        for x in value:
            if isinstance(x, (list, tuple, torch.Tensor)):
                return None, ("TypeError", f"{name} must be a flat list of ints, got a nested {type(x).__name__}; "
                                           f"{_PER_ROW}")
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                return None, ("TypeError", f"{name} entries must be ints, got {type(x).__name__} {x!r}")
        return [int(x) for x in value], None
    return None, ("TypeError", f"{name} must be None, a 1-D integer tensor or a list of ints, got "
                               f"{type(value).__name__}")


def _is_pair(value: object) -> bool:
    return (isinstance(value, tuple) and len(value) == 2
            and all(isinstance(x, (list, tuple, torch.Tensor)) for x in value))


def read_boundaries(cu_seqlens: object, batch: int, total: int
                    ) -> tuple[tuple[int, ...] | None, tuple[str, str] | None]:
    """``(boundaries, None)`` or ``(None, (exception class, message))`` for a ``cu_seqlens`` argument of a call
    with ``batch`` rows of ``total`` tokens (the full sequence).

    Accepts ``None``; the boundaries of one row ``[0, e1, ..., S]``; flash-attn's offsets into the flattened
    batch ``[0, ..., B*S]`` when every row holds the same documents; as a 1-D integer tensor (read on the host
    once per tensor object and version: a CUDA tensor passed to every layer costs one copy) or a list of ints;
    or a pair ``(cu_seqlens_q, cu_seqlens_k)``, which must be equal (self-attention). Empty documents (a
    repeated boundary) are dropped. ``(None, None)`` for a single document.
    """
    if cu_seqlens is None:
        return None, None
    if _is_pair(cu_seqlens):
        (cq, eq), (ck, ek) = (_int_list(n, x) for n, x in zip(("cu_seqlens_q", "cu_seqlens_k"), cu_seqlens))
        if eq or ek:
            return None, eq or ek
        if cq != ck:
            return None, ("ValueError", f"cu_seqlens_q {cq[:8]} and cu_seqlens_k {ck[:8]} differ (self-attention over "
                                        "packed documents needs one set of boundaries)")
        cu = cq
    else:
        cu, err = _int_list("cu_seqlens", cu_seqlens)
        if err:
            return None, err
    assert cu is not None
    if batch > 1 and cu and cu[-1] == batch * total and total != batch * total:
        rows = [sorted({0, total, *(c - r * total for c in cu if r * total <= c <= (r + 1) * total)})
                for r in range(batch)]
        if any(r != rows[0] for r in rows[1:]):
            return None, ("ValueError", f"cu_seqlens: the rows of the batch hold different documents; {_PER_ROW}")
        cu = rows[0]
    try:
        docs = check_boundaries(cu, total)
    except ValueError as exc:
        return None, ("ValueError", str(exc))
    return (docs if len(docs) > 2 else None), None


def _sinks_error(sinks: object, q: torch.Tensor) -> str | None:
    if not isinstance(sinks, torch.Tensor):
        return f"sinks must be a torch.Tensor of shape [Hq] or None, got {type(sinks).__name__}"
    if sinks.dim() != 1 or sinks.shape[0] != q.shape[2]:
        return f"sinks must have shape [Hq] = [{q.shape[2]}], got {tuple(sinks.shape)}"
    if sinks.device != q.device:
        return f"sinks is on {sinks.device}, q on {q.device}"
    if not sinks.is_floating_point():
        return f"sinks must be a floating-point tensor, got {sinks.dtype}"
    return None


def local_error(q: object, k: object, v: object, a: AttnArgs, info: GroupInfo, sinks: object = None
                 ) -> tuple[str, str] | None:
    """This rank's first problem as ``(exception class name, message)``, or ``None``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return "TypeError", f"{name} must be a torch.Tensor, got {type(t).__name__}"
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            return "ValueError", f"{name} must have 4 dims [B, S_local, H, D], got shape {tuple(t.shape)}"
    if k.shape[:3] != v.shape[:3]:
        return "ValueError", (f"k and v must agree in batch, S_local and heads ([B, S_local, Hkv, D] and "
                              f"[B, S_local, Hkv, Dv]): {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        return "ValueError", (
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, S_local and head dim "
            "([B, S_local, Hq, D] and [B, S_local, Hkv, D])"
        )
    if v.shape[3] == 0:
        return "ValueError", f"empty input: v shape {tuple(v.shape)}"
    if q.shape[2] % k.shape[2]:
        return "ValueError", f"Hq % Hkv != 0: {q.shape[2]} query heads and {k.shape[2]} key/value heads"
    if q.shape[1] == 0 or q.shape[0] == 0 or q.shape[3] == 0 or k.shape[2] == 0:
        return "ValueError", f"empty input: q shape {tuple(q.shape)}, k shape {tuple(k.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return "ValueError", f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dtype not in _DTYPES:
        return "TypeError", f"unsupported dtype {q.dtype}: expected one of {[str(d) for d in _DTYPES]}"
    if not (q.device == k.device == v.device):
        return "ValueError", f"q, k, v devices differ: {q.device}, {k.device}, {v.device}"
    if a.layout not in LAYOUTS:
        return "ValueError", f"unknown layout {a.layout!r}: expected one of {LAYOUTS}"
    if a.backward not in BACKWARDS:
        return "ValueError", f"unknown backward {a.backward!r}: expected one of {BACKWARDS}"
    if a.kernel not in registry.names():
        return "ValueError", f"unknown kernel {a.kernel!r}: expected one of {registry.names()}"
    if a.schedule not in SCHEDULES:
        return "ValueError", f"unknown schedule {a.schedule!r}: expected one of {SCHEDULES}"
    if a.schedule == "double_ring" and info.world > 1 and not a.has_node_groups:
        return "ValueError", (
            f"schedule={a.schedule!r} needs group=<topology from ds_burst.init_sequence_parallel(..., "
            f"schedule={a.schedule!r})> whose sequence-parallel group spans whole nodes"
        )
    if a.schedule == "ulysses_ring" and info.world > 1 and not a.ulysses_degree:
        return "ValueError", (
            "schedule='ulysses_ring' needs group=<topology from ds_burst.init_sequence_parallel(..., "
            "schedule='ulysses_ring')> whose sequence-parallel group spans whole nodes, or from "
            "init_sequence_parallel(P, ulysses_degree=U); schedule='ulysses' runs the all-to-all over any group"
        )
    if a.schedule in ULYSSES_SCHEDULES and a.ulysses_degree > 1:
        problem = check_heads(q.shape[2], k.shape[2], a.ulysses_degree, a.schedule)
        if problem:
            return "ValueError", problem
    w = a.window_size
    if not (isinstance(w, (tuple, list)) and len(w) == 2 and all(isinstance(x, int) and x >= -1 for x in w)):
        return "ValueError", f"window_size must be a pair of ints >= -1 (left, right), got {w!r}"
    if a.causal and w[1] > 0:
        return "ValueError", f"window_size right={w[1]} conflicts with causal=True (use right=0 or -1)"
    if a.softmax_scale is not None and not (isinstance(a.softmax_scale, (int, float)) and a.softmax_scale > 0):
        return "ValueError", f"softmax_scale must be a positive number or None, got {a.softmax_scale!r}"
    if a.softcap is not None and not (isinstance(a.softcap, (int, float)) and not isinstance(a.softcap, bool)
                                      and 0 < a.softcap < float("inf")):
        return "ValueError", f"softcap must be a positive finite number or None, got {a.softcap!r}"
    if sinks is not None:
        problem = _sinks_error(sinks, q)
        if problem:
            return "ValueError", problem
    if a.layout == "zigzag" and info.world > 1 and q.shape[1] % 2:
        return "ValueError", (
            f"zigzag layout needs S divisible by 2P: S_local={q.shape[1]} is odd (P={info.world})"
        )
    problem = _kernel_error(q, k, a)
    if problem:
        return "ValueError", problem
    if a.cu_error is not None:
        return a.cu_error
    if a.schedule_error is not None:
        return a.schedule_error
    return None


def _kernel_error(q: torch.Tensor, k: torch.Tensor, a: AttnArgs) -> str | None:
    """Why a named kernel (not ``auto``) cannot run these inputs, as its record says (variants aside: the plan
    hands those to a kernel that has them)."""
    try:
        spec = None if a.kernel == "auto" else registry.get(a.kernel)
    except ValueError as exc:
        return str(exc)
    if spec is not None and spec.bwd_needs_out and a.backward == "burst":
        return f"kernel={a.kernel!r} needs the output in its backward: use backward='ring' or 'auto'"
    why = None if spec is None else spec.why_not(q, k)
    return None if why is None else f"kernel={a.kernel!r} cannot run these inputs: {why} (or use kernel='torch')"


def summary(q: torch.Tensor, k: torch.Tensor, a: AttnArgs, v: torch.Tensor | None = None) -> tuple[int, ...]:
    """The integers every rank compares: shapes, dtype, options, documents (in ``_FIELD_NAMES`` order)."""
    scale_bits = -1 if a.softmax_scale is None else int(round(float(a.softmax_scale) * 1e9))
    softcap_bits = -1 if a.softcap is None else int(round(float(a.softcap) * 1e9))
    fields = {
        "batch": q.shape[0],
        "S_local": q.shape[1],
        "Hq": q.shape[2],
        "Hkv": k.shape[2],
        "head dim": q.shape[3],
        "dtype": _DTYPES.index(q.dtype),
        "device type": _DEVICE_TYPES.index(q.device.type) if q.device.type in _DEVICE_TYPES else 99,
        "causal": int(a.causal),
        "window left": a.window_size[0],
        "window right": a.window_size[1],
        "softmax_scale": scale_bits,
        "layout": LAYOUTS.index(a.layout),
        "backward": BACKWARDS.index(a.backward),
        "kernel": registry.names().index(a.kernel),
        "return_lse": int(a.return_lse),
        "schedule": SCHEDULES.index(a.schedule),
        "check_finite": int(a.check_finite),
        "value head dim": (v if v is not None else k).shape[3],
        "softcap": softcap_bits,
        "sinks": int(a.has_sinks),
        "documents": fingerprint(a.cu_seqlens)[0],
        "cu_seqlens crc32": fingerprint(a.cu_seqlens)[1],
        "deterministic": int(a.deterministic),
        "return_max_logit": int(a.max_logit),
    }
    return tuple(fields.values())


_FIELD_NAMES = ("batch", "S_local", "Hq", "Hkv", "head dim", "dtype", "device type", "causal", "window left",
                "window right", "softmax_scale", "layout", "backward", "kernel", "return_lse", "schedule",
                "check_finite", "value head dim", "softcap", "sinks", "documents", "cu_seqlens crc32", "deterministic",
                "return_max_logit")
_N_FIELDS = len(_FIELD_NAMES)
_EXC = {"TypeError": TypeError, "ValueError": ValueError}


def check_mode(check_inputs: object) -> str:
    """``check_inputs`` as ``"once"`` (``True``, ``"once"``), ``"always"`` or ``"local"`` (``False``)."""
    if check_inputs is True or check_inputs == "once":
        return "once"
    if check_inputs is False:
        return "local"
    if check_inputs == "always":
        return "always"
    raise ValueError(f"check_inputs must be True, False, 'once' or 'always', got {check_inputs!r}")


def finite_counts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: object = None) -> tuple[int, ...]:
    """NaN/Inf counts of q, k, v and sinks (``check_finite=True``; one host read of four small reductions)."""
    named = [q, k, v] + ([sinks] if isinstance(sinks, torch.Tensor) else [])
    counts = torch.stack([(~torch.isfinite(t)).sum() for t in named]).tolist()
    return tuple(int(x) for x in counts) + (0,) * (4 - len(named))


_FINITE_NAMES = ("q", "k", "v", "sinks")
# the header every rank sends every other rank of the group on every call (see :func:`agree`)
_HEADER = ("error", "plan cached", "documents known", *_FIELD_NAMES, *(f"non-finite {n}" for n in _FINITE_NAMES))
_DOC_FIELDS = ("documents", "cu_seqlens crc32")
UNKNOWN_DOCS = 2  # "documents known" value of a rank whose documents come from positions not yet gathered


@dataclass(frozen=True)
class Agreement:
    """What the ranks found out about each other in one header round."""

    all_cached: bool  # every rank has the call's plan (none builds, so none issues the build's collectives)
    docs_unknown: bool  # some rank still has to gather position_ids for its documents


def header(err: tuple[str, str] | None, cached: bool, docs_state: int, summary: tuple[int, ...],
           finite: tuple[int, ...]) -> list[int]:
    """This rank's header: error flag, cache state, documents state, the call summary, non-finite counts."""
    body = list(summary) if err is None else [0] * _N_FIELDS
    return [int(err is not None), int(cached), docs_state, *body, *(finite or (0,) * len(_FINITE_NAMES))]


def agree(chan: GroupInfo, err: tuple[str, str] | None, cached: bool, docs_state: int, summary: tuple[int, ...],
          finite: tuple[int, ...] = (), neighbours_only: bool = False) -> Agreement:
    """One header round over the group's CPU channel; raise the same error on every rank when any rank's input is
    bad (its own message, read from the store), when the ranks are not making the same call (every field that
    differs, with each rank's current value), or when ``check_finite`` found NaN/Inf on a rank.

    Every rank sends the same fixed-size message whatever its plan cache holds, so a rank that changed its input
    alone fails on every rank at once and the process group stays usable (docs/RELIABILITY.md).
    ``neighbours_only`` (``check_inputs=False``): only the two ring neighbours are compared; a rank whose neighbours
    agree with it learns of a problem further away inside the ring (bounded by the communication timeout)."""
    note = None if err is None else f"{err[0]}\n{err[1]}"
    heard, read_note = exchange_header(chan, header(err, cached, docs_state, summary, finite), note, neighbours_only)
    ranks = [r for r, row in enumerate(heard) if row is not None]
    rows = [heard[r] for r in ranks]
    bad = next((r for r, row in zip(ranks, rows) if row[0]), None)
    if bad is not None:
        cls, _, msg = read_note(bad).partition("\n")
        raise _EXC.get(cls, ValueError)(f"rank {bad}: {msg}")
    unknown = any(row[2] == UNKNOWN_DOCS for row in rows)
    diffs = []
    for i, name in enumerate(_FIELD_NAMES, start=3):
        if unknown and name in _DOC_FIELDS:
            continue  # compared in the round after the positions are gathered
        seen = [row[i] for row in rows]
        if len(set(seen)) > 1:
            diffs.append(f"{name} differs across the ranks of the sequence-parallel group: "
                         f"{_decode(name, seen, ranks)}")
    if diffs:
        raise ValueError("ds-burst: the ranks are not making the same attention call: " + "; ".join(diffs))
    first = 3 + _N_FIELDS
    for r, row in zip(ranks, rows):
        for name, n in zip(_FINITE_NAMES, row[first:]):
            if n:
                raise ValueError(f"rank {r}: {name} contains {n} NaN/Inf values (check_finite=True)")
    return Agreement(all(row[1] for row in rows), unknown)


def raise_local(err: tuple[str, str] | None, finite: tuple[int, ...] = ()) -> None:
    """Without a header round (one rank, ``check_inputs=False``): raise this rank's own error."""
    if err is not None:
        raise _EXC[err[0]](err[1])
    for name, n in zip(_FINITE_NAMES, finite):
        if n:
            raise ValueError(f"{name} contains {n} NaN/Inf values (check_finite=True)")


def _decode(name: str, seen: list[int], ranks: list[int] | None = None) -> str:
    ranks = list(range(len(seen))) if ranks is None else ranks
    table = {"dtype": [str(d) for d in _DTYPES], "layout": list(LAYOUTS), "backward": list(BACKWARDS),
             "schedule": list(SCHEDULES),
             "kernel": list(registry.names()), "device type": list(_DEVICE_TYPES)}
    if name in table:
        return ", ".join(f"rank {r}: {table[name][x] if x < len(table[name]) else x}" for r, x in zip(ranks, seen))
    if name in ("softmax_scale", "softcap"):
        return ", ".join(f"rank {r}: {'None' if x < 0 else x / 1e9}" for r, x in zip(ranks, seen))
    return ", ".join(f"rank {r}: {x}" for r, x in zip(ranks, seen))
