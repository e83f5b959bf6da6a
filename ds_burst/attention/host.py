"""Values of small tensors read on the host once per tensor object and version.

Document boundaries (``cu_seqlens``) and ``position_ids`` reach every attention layer of a forward as the same
tensor object. Reading a CUDA tensor on the host waits for the device, so it is done once: :func:`memo` keeps what
was computed from a tensor while that tensor lives and is not modified in place (its version counter), and
computes it again for any other tensor. Nothing is shared between processes: callers that must stay in step with
other ranks exchange what they found (:func:`ds_burst.attention.validate.agree`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

_CAPACITY = 64
_MEMO: OrderedDict[tuple[int, Hashable], tuple[weakref.ref, int, Any]] = OrderedDict()


def memo(t: torch.Tensor, tag: Hashable, compute: Callable[[], Any]) -> Any:
    """``compute()``, or its value from an earlier call with this very tensor (same object, unmodified) and
    ``tag``."""
    key = (id(t), tag)
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        _MEMO.move_to_end(key)
        return hit[2]
    value = compute()
    _MEMO[key] = (weakref.ref(t), t._version, value)
    if len(_MEMO) > _CAPACITY:
        _MEMO.popitem(last=False)
    return value


def cached(t: torch.Tensor, tag: Hashable) -> tuple[bool, Any]:
    """``(True, value)`` when :func:`memo` holds a value for this tensor and ``tag``, else ``(False, None)``."""
    hit = _MEMO.get((id(t), tag))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return True, hit[2]
    return False, None


def host_values(t: torch.Tensor) -> tuple[int, ...]:
    """The integer entries of ``t`` (flattened), read on the host once per tensor object and version."""
    return memo(t, "values", lambda: tuple(int(x) for x in t.detach().reshape(-1).tolist()))


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, copied once per tensor object and version."""
    return memo(t, "cpu", lambda: t.detach().cpu())
