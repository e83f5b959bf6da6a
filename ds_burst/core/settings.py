"""Every environment variable ds-burst reads, read here and nowhere else (documented in docs/API.md).

| variable | default | meaning |
| --- | --- | --- |
| ``DS_BURST_COMM_TIMEOUT`` | 300 on gloo, none on NCCL | bound of a P2P/validation wait, s |
| ``DS_BURST_KERNEL_CACHE`` | ``~/.cache/ds_burst/kernel_choice.json`` | ``auto`` picks file; ``0``: memory |
| ``DS_BURST_TRITON_AUTOTUNE`` | ``1`` | autotune the Triton tiles (``0``: fixed configs) |
| ``DS_BURST_HOPPER_KERNELS`` | ``1`` | Gluon Hopper tiles on sm_90 where they apply (``0``: ``tl`` only) |
| ``DS_BURST_HOPPER_BWD`` | ``1`` | the Gluon Hopper backward too (``0``: Hopper forward, ``tl`` backward) |
| ``DS_BURST_FAST_LAUNCH`` | ``1`` | launch the Hopper kernels through their compiled launcher (``0``: the JIT) |
| ``DS_BURST_SDPA_BACKENDS`` | ``cudnn,flash`` | order of torch's fused ops tried by ``kernel="sdpa"`` |
| ``DS_BURST_SDPA_BWD_ROWS`` | ``16384`` | query rows per backward chunk of the sdpa tiles |
| ``DS_BURST_SDPA_SELFCHECK`` | ``1`` | check each fused op once against the reference before use |
| ``DS_BURST_BUFFER_POOL`` | ``0`` | reuse the ring's scratch buffers across calls |
| ``DS_BURST_TILE_RATES`` | the table shipped for the GPU | tile-rates JSON ``schedule="auto"`` uses (read once) |
| ``TRITON_INTERPRET`` | unset | Triton's interpreter (CPU tensors; tests) |
| ``LOCAL_WORLD_SIZE``, ``WORLD_SIZE`` | launcher's | ranks per node; ranks of the job |

Values that only matter at import (kernel tables) are read once; the others each time they are needed, so tests
can change them.
"""

from __future__ import annotations

import os

COMM_TIMEOUT = "DS_BURST_COMM_TIMEOUT"
KERNEL_CACHE = "DS_BURST_KERNEL_CACHE"
TRITON_AUTOTUNE = "DS_BURST_TRITON_AUTOTUNE"
HOPPER_KERNELS = "DS_BURST_HOPPER_KERNELS"
HOPPER_BWD = "DS_BURST_HOPPER_BWD"
FAST_LAUNCH = "DS_BURST_FAST_LAUNCH"
SDPA_BACKENDS = "DS_BURST_SDPA_BACKENDS"
SDPA_BWD_ROWS = "DS_BURST_SDPA_BWD_ROWS"
SDPA_SELFCHECK = "DS_BURST_SDPA_SELFCHECK"
BUFFER_POOL = "DS_BURST_BUFFER_POOL"
TILE_RATES = "DS_BURST_TILE_RATES"


def raw(name: str, default: str = "") -> str:
    """The variable's text, stripped (``default`` when unset)."""
    return os.environ.get(name, default).strip()


def flag(name: str, default: bool) -> bool:
    """A boolean variable: ``0``, ``false``, ``off``, ``no`` and the empty string are false."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "off", "no", "")


def integer(name: str, default: int) -> int:
    value = raw(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def triton_interpret() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return raw("TRITON_INTERPRET", "0") not in ("", "0")


def local_world_size() -> int | None:
    value = raw("LOCAL_WORLD_SIZE")
    return int(value) if value.isdigit() else None


def local_rank() -> int:
    """``LOCAL_RANK`` set by the launcher (0 when unset)."""
    value = raw("LOCAL_RANK")
    return int(value) if value.isdigit() else 0


def launcher_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun/deepspeed (1 when unset)."""
    value = raw("WORLD_SIZE")
    return int(value) if value.isdigit() else 1
