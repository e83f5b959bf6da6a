"""Input validation that raises the same clear error on every rank of the group, never a hang.

Each rank checks its own arguments, then the ranks all-gather a short integer summary (shapes, dtype,
options and an error flag). If any rank failed a local check, every rank raises that rank's error; if
the summaries disagree (different ``S_local``, dtype, options ...), every rank raises a ``ValueError``
naming the field and the values seen. The public op runs this once per call key (see
:mod:`ds_burst.attention.api`). Before the all-gather each rank publishes its summary in the process
group's store, and the all-gather's wait is bounded by the communication timeout, so a rank that meets a
new key alone (the others run the ring of their cached key) can say what differs: :func:`diagnose_drift`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ds_burst.core.documents import check_boundaries, fingerprint
from ds_burst.core.options import BACKWARDS, LAYOUTS, SCHEDULES
from ds_burst.dist.comm import (
    CommTimeoutError,
    GroupInfo,
    all_gather_ints,
    all_gather_objects,
    exchange,
    publish_ints,
    published_ints,
)
from ds_burst.kernels import registry
from ds_burst.ring.ulysses_ring import check_heads

__all__ = ["BACKWARDS", "SCHEDULES", "AttnArgs", "validate", "check_mode", "check_neighbours", "diagnose_drift"]
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


def read_boundaries(cu_seqlens: object) -> tuple[tuple[int, ...] | None, tuple[str, str] | None]:
    """``(boundaries, None)`` or ``(None, (exception class, message))`` for a ``cu_seqlens`` argument.

    Accepts ``None``, a 1-D integer tensor (a CUDA tensor costs one small device-to-host copy, a sync, per call:
    pass a CPU tensor or a list) or a sequence of Python ints. Start, end and order are checked in validation,
    which knows ``S``.
    """
    if cu_seqlens is None:
        return None, None
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
            return None, ("TypeError", f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1:
            return None, ("ValueError", f"cu_seqlens must be 1-D, got shape {tuple(cu_seqlens.shape)}")
        return tuple(int(x) for x in cu_seqlens.tolist()), None
    if isinstance(cu_seqlens, (list, tuple)):
        for x in cu_seqlens:
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                return None, ("TypeError", f"cu_seqlens entries must be ints, got {type(x).__name__} {x!r}")
        return tuple(int(x) for x in cu_seqlens), None
    return None, ("TypeError", f"cu_seqlens must be None, a 1-D integer tensor or a list of ints, got "
                               f"{type(cu_seqlens).__name__}")


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


def _local_error(q: object, k: object, v: object, a: AttnArgs, info: GroupInfo, sinks: object = None
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
    if a.schedule in ("double_ring", "ulysses_ring") and info.world > 1 and not a.has_node_groups:
        return "ValueError", (
            f"schedule={a.schedule!r} needs group=<topology from ds_burst.init_sequence_parallel(..., "
            f"schedule={a.schedule!r})> whose sequence-parallel group spans whole nodes"
        )
    if a.schedule == "ulysses_ring" and a.per_node:
        problem = check_heads(q.shape[2], k.shape[2], a.per_node)
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
    if a.check_finite:
        named = (("q", q), ("k", k), ("v", v)) + ((("sinks", sinks),) if sinks is not None else ())
        for name, t in named:
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return "ValueError", f"{name} contains {bad} NaN/Inf values (check_finite=True)"
    if a.cu_error is not None:
        return a.cu_error
    if a.cu_seqlens is not None:
        try:
            check_boundaries(a.cu_seqlens, q.shape[1] * info.world)
        except ValueError as exc:
            return "ValueError", str(exc)
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


def _summary(q: torch.Tensor, k: torch.Tensor, a: AttnArgs, v: torch.Tensor | None = None) -> dict[str, int]:
    scale_bits = -1 if a.softmax_scale is None else int(round(float(a.softmax_scale) * 1e9))
    softcap_bits = -1 if a.softcap is None else int(round(float(a.softcap) * 1e9))
    return {
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
    }


_FIELD_NAMES = ("batch", "S_local", "Hq", "Hkv", "head dim", "dtype", "device type", "causal", "window left",
                "window right", "softmax_scale", "layout", "backward", "kernel", "return_lse", "schedule",
                "check_finite", "value head dim", "softcap", "sinks", "documents", "cu_seqlens crc32")
_N_FIELDS = len(_FIELD_NAMES)  # the all-gathered row is the error flag plus these
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


_TAG = "validate"


def validate(q: object, k: object, v: object, a: AttnArgs, info: GroupInfo, collective: bool = True,
             sinks: object = None) -> tuple[int, ...]:
    """Raise the same ``ValueError``/``TypeError`` on every rank when any rank's input is bad; return this
    rank's summary (the values the ranks compared)."""
    err = _local_error(q, k, v, a, info, sinks)
    if info.world == 1 or not collective:
        if err:
            raise _EXC[err[0]](err[1])
        return tuple(_summary(q, k, a, v).values())  # type: ignore[arg-type]
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    if err is None:
        summary = _summary(q, k, a, v)  # type: ignore[arg-type]
        values = [0, *summary.values()]
    else:
        summary = {}
        values = [1] + [0] * _N_FIELDS
    publish_ints(info, _TAG, values)
    try:
        rows = all_gather_ints(info, values, device, bounded=True)
    except CommTimeoutError as exc:
        diagnose_drift(info, tuple(values[1:]), exc)
        raise
    if any(row[0] for row in rows):
        errs = all_gather_objects(info, err)
        r, (cls, msg) = next((r, e) for r, e in enumerate(errs) if e is not None)  # type: ignore[misc]
        raise _EXC[cls](f"rank {r}: {msg}")
    names = list(summary)
    for i, name in enumerate(names, start=1):
        seen = [row[i] for row in rows]
        if len(set(seen)) > 1:
            raise ValueError(f"{name} differs across the ranks of the sequence-parallel group: {_decode(name, seen)}")
    return tuple(values[1:])


def check_neighbours(info: GroupInfo, mine: tuple[int, ...] | None, device: torch.device) -> None:
    """``check_inputs=False``: exchange this call's summary with both ring neighbours (fixed-size P2P messages,
    no collective) and raise ``ValueError`` naming what differs on both sides of a link whose ranks disagree.
    ``mine=None``: this rank failed its own checks (it re-raises its error after telling its neighbours).

    Without it a shard-length mismatch reaches the ring's K/V messages, where gloo silently accepts a shorter
    message on one side while the other aborts. A rank whose neighbours agree with it but whose ring has a
    failed rank elsewhere fails inside the ring (a closed connection or the communication timeout).
    """
    if info.world == 1:
        return
    rank, world = info.rank, info.world
    prev, nxt = (rank - 1) % world, (rank + 1) % world
    row = [1] + [0] * _N_FIELDS if mine is None else [0, *mine]
    me = torch.tensor(row, dtype=torch.int64, device=device)
    got = [torch.empty_like(me), torch.empty_like(me)]
    exchange(info, "validate", [(me, nxt), (me, prev)], [(got[0], prev), (got[1], nxt)])
    if mine is None:
        return
    names = list(_FIELD_NAMES)
    diffs = []
    for peer, theirs in ((prev, got[0].tolist()), (nxt, got[1].tolist())):
        if theirs[0]:
            diffs.append(f"rank {peer} failed its own input checks")
            continue
        for i, (a, b) in enumerate(zip(mine, theirs[1:])):
            if a != b:
                diffs.append(f"{names[i]}: {_decode(names[i], [a, b], [rank, peer])}")
    if diffs:
        raise ValueError(f"ds-burst rank {rank}: the ranks of the sequence-parallel group are not running the same "
                         f"attention call ({'; '.join(dict.fromkeys(diffs))}; check_inputs=False compares ring "
                         "neighbours only)")


def diagnose_drift(info: GroupInfo, mine: tuple[int, ...], exc: BaseException) -> None:
    """After a communication timeout: raise ``ValueError`` naming what differs when another rank's latest
    validated call (published in the store) is not this rank's ``mine``; return when nothing is known to differ.
    """
    if info.world == 1 or not mine:
        return
    rows = published_ints(info, _TAG)
    names = list(_FIELD_NAMES)
    diffs = []
    for r, row in enumerate(rows):
        if row is None or r == info.rank:
            continue
        if row[0]:
            diffs.append(f"rank {r} failed its own input checks")
            continue
        for i, name in enumerate(names):
            if i < len(row) - 1 and row[i + 1] != mine[i]:
                diffs.append(f"{name}: {_decode(name, [mine[i], row[i + 1]], [info.rank, r])}")
    if diffs:
        raise ValueError(
            f"ds-burst rank {info.rank}: the ranks of the sequence-parallel group are not running the same "
            f"attention call ({'; '.join(dict.fromkeys(diffs))}); one rank changed its input after the others "
            f"had validated theirs, so they waited on each other until the communication timeout"
        ) from exc


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
