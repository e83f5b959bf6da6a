"""The names every option of the public op accepts, as typed literals and tuples (one place for them).

``burst_attn_func``, ``BurstConfig``, the DeepSpeed and Hugging Face integrations and the validation all
read these; nothing else spells an option's values.
"""

from __future__ import annotations

from typing import Literal, get_args

Layout = Literal["contiguous", "zigzag"]
Backward = Literal["auto", "burst", "ring"]
Kernel = Literal["auto", "torch", "triton", "sdpa"]
Schedule = Literal["auto", "ring", "double_ring", "ulysses_ring", "ulysses"]
CheckInputs = Literal["once", "always"]

LAYOUTS: tuple[str, ...] = get_args(Layout)
BACKWARDS: tuple[str, ...] = get_args(Backward)
KERNELS: tuple[str, ...] = get_args(Kernel)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
CONCRETE_SCHEDULES: tuple[str, ...] = ("ring", "double_ring", "ulysses_ring", "ulysses")
TOPOLOGY_SCHEDULES: tuple[str, ...] = ("double_ring", "ulysses_ring")  # need node (or Ulysses) subgroups
#: the all-to-all over heads: over the whole sequence-parallel group, or over groups of U ranks with a ring across
ULYSSES_SCHEDULES: tuple[str, ...] = ("ulysses", "ulysses_ring")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` when it is one of ``allowed``, else raise ``ValueError`` naming the option."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: expected one of {allowed}")
    return value  # type: ignore[return-value]
