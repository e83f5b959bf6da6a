"""A reusable pool of scratch buffers for the ring schedules (receive buffers, fp32 accumulators, travelling
dQ/dK/dV partials), shared by every attention call of the process.

Buffers are raw byte blocks keyed by device and stream; :meth:`BufferPool.take` hands out the smallest free
block that fits (at most about twice the request) viewed with the requested shape and dtype, or allocates a
new one on first use. :meth:`BufferPool.give` returns a block once nothing will touch it any more: after the
:meth:`ds_burst.dist.comm.P2PBatch.wait` that covers its last send or receive, and after the compute that read it.
After the first call of each shape (warm-up) the ring allocates nothing on its hot path.

Safety rules the schedules follow:

* a block is given back only after the wait of every transfer that used it; on CUDA that wait makes the
  current stream wait for NCCL, and NCCL's next transfer waits for the current stream, so reusing the block
  on the same stream is ordered. Blocks are keyed by the current stream: a call on another stream never
  receives a block that is in use on this one.
* nothing from the pool is ever returned to the caller or saved for backward: outputs and gradients are
  fresh tensors (:meth:`BufferPool.export` copies a pooled accumulator when the dtype conversion would not).
* the pool allocates only inside attention calls, through the ordinary caching allocator on the current
  stream, so ZeRO-3's parameter gathers (on their own stream) are not disturbed; its memory is simply held
  between calls, which is the point.

Call :func:`release_buffers` when training ends (or before a phase that needs the memory back) to drop the
free blocks. The pool is **off by default** (plain ``torch.empty`` per call through the caching allocator,
the same results bit for bit): on 2 H200 its held blocks raised a checkpointed training step's peak memory
(21.2 -> 23.9 GiB at 128K, docs/BENCHMARKS.md). ``DS_BURST_BUFFER_POOL=1`` in the environment, or
:func:`set_buffer_pool(True) <set_buffer_pool>`, turns it on.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ds_burst.core import settings

POOL_ENV = settings.BUFFER_POOL
_ALIGN = 512


def _stream_key(device: torch.device) -> tuple[str, int, int]:
    if device.type == "cuda":
        return ("cuda", device.index if device.index is not None else torch.cuda.current_device(),
                torch.cuda.current_stream(device).stream_id)
    return (device.type, device.index if device.index is not None else -1, 0)


class BufferPool:
    """Free lists of byte blocks per (device, stream); see the module docstring.

    ``stats()`` counts blocks ``allocated`` (new memory) and ``reused`` (handed out again), and the bytes held.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._used: dict[int, tuple[tuple, torch.Tensor]] = {}
        self.allocated = 0
        self.reused = 0

    # -- handing out -------------------------------------------------------------------------------

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """An uninitialised tensor of ``shape``/``dtype`` on ``device``, backed by a pooled block."""
        device = torch.device(device)
        numel = 1
        for n in shape:
            numel *= int(n)
        nbytes = numel * dtype.itemsize
        if nbytes == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        key = _stream_key(device)
        with self._lock:
            free = self._free.setdefault(key, [])
            best = None
            want = -(-nbytes // _ALIGN) * _ALIGN
            for i, blk in enumerate(free):  # the block made for this size, else the smallest that fits
                size = blk.numel()
                if size == want:
                    best = i
                    break
                if nbytes <= size <= 2 * nbytes + _ALIGN and (best is None or size < free[best].numel()):
                    best = i
            if best is not None:
                blk = free.pop(best)
                self.reused += 1
            else:
                blk = torch.empty(want, dtype=torch.uint8, device=device)
                self.allocated += 1
            self._used[blk.data_ptr()] = (key, blk)
        return blk[:nbytes].view(dtype).view(tuple(shape))

    def zeros(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """:meth:`take`, zero-filled."""
        return self.take(shape, dtype, device).zero_()

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.take(x.shape, x.dtype, x.device)

    def zeros_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.zeros(x.shape, x.dtype, x.device)

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a block handed out by this pool and not given back yet."""
        with self._lock:
            return t.numel() > 0 and t.untyped_storage().data_ptr() in self._used

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Return blocks to the pool (tensors that did not come from it, and ``None``, are ignored).

        Only call this once no pending transfer or computation uses the tensor (see the module docstring).
        """
        with self._lock:
            for t in tensors:
                if t is None or t.numel() == 0:
                    continue
                entry = self._used.pop(t.untyped_storage().data_ptr(), None)
                if entry is not None:
                    self._free.setdefault(entry[0], []).append(entry[1])

    def export(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t.to(dtype)`` as a tensor the caller may keep: a pooled ``t`` is copied and given back."""
        if not self.owns(t):
            return t.to(dtype)
        out = t.to(dtype, copy=True)
        self.give(t)
        return out

    # -- bookkeeping -------------------------------------------------------------------------------

    def release(self) -> int:
        """Drop every free block (blocks still handed out stay valid); returns the bytes released."""
        with self._lock:
            n = sum(b.numel() for blocks in self._free.values() for b in blocks)
            self._free.clear()
        return n

    def blocks(self) -> list[tuple[int, int, bool]]:
        """``(data_ptr, nbytes, in_use)`` of every block held."""
        with self._lock:
            free = [(b.data_ptr(), b.numel(), False) for blocks in self._free.values() for b in blocks]
            return sorted(free + [(b.data_ptr(), b.numel(), True) for _, b in self._used.values()])

    def stats(self) -> dict[str, int]:
        """``allocated``/``reused`` counts since the start, blocks and bytes held (free and in use)."""
        with self._lock:
            free = [b for blocks in self._free.values() for b in blocks]
            return {"allocated": self.allocated, "reused": self.reused, "free_blocks": len(free),
                    "used_blocks": len(self._used), "free_bytes": sum(b.numel() for b in free),
                    "used_bytes": sum(b.numel() for _, b in self._used.values())}


class _NoPool(BufferPool):
    """The pool switched off: plain allocations, nothing is tracked."""

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype, device=device)

    def zeros(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)  # one op, not empty + zero_

    def owns(self, t: torch.Tensor) -> bool:
        return False

    def give(self, *tensors: torch.Tensor | None) -> None:
        return None


_POOL = BufferPool()
_NO_POOL = _NoPool()
_enabled: bool | None = None


def set_buffer_pool(enabled: bool | None) -> None:
    """Turn the ring buffer pool on or off for later calls (``None``: back to ``DS_BURST_BUFFER_POOL``,
    default off). Turning it off releases its free blocks."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_buffer_pool: expected True, False or None, got {enabled!r}")
    _enabled = enabled
    if enabled is False:
        _POOL.release()


def buffer_pool_enabled() -> bool:
    """Whether attention calls take their scratch buffers from the pool."""
    if _enabled is not None:
        return _enabled
    return settings.flag(POOL_ENV, False)


def buffer_pool() -> BufferPool:
    """The process-wide pool, or a pass-through allocator when the pool is off."""
    return _POOL if buffer_pool_enabled() else _NO_POOL


def release_buffers() -> int:
    """Free the pool's idle blocks (call when training ends); returns the bytes released. The pool refills on
    the next attention call."""
    return _POOL.release()


def buffer_pool_stats() -> dict[str, int]:
    """:meth:`BufferPool.stats` of the process-wide pool."""
    return _POOL.stats()
