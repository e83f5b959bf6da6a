"""Sequence-level selective checkpointing and host offload of checkpointed activations.

**Selective checkpointing** (BurstEngine's scheme). Under activation checkpointing a layer runs twice: the
forward, and its re-forward in backward. The re-forward recomputes the ring attention forward, the
``O(S^2)`` part, only to rebuild the output and lse that the attention backward needs. An
:class:`AttentionKeep` attached to one checkpointed region keeps them from the first run and hands them to
the re-run, so the re-run recomputes only the projections, norms and MLP:

* ``tokens="all"``: the output and lse of every local token are kept; the re-run skips the ring forward (no
  attention FLOPs, no K/V traffic). Costs ``B*s*Hq*(D*e + 4)`` bytes per kept layer until its backward.
* ``tokens="half"``: only the later half of each rank's compute-layout tokens is kept (with zigzag causal
  shards, the late chunk, which attends to about three quarters of the keys); the re-run computes the early
  half's rows only, about a quarter of the causal attention FLOPs (the K/V ring still runs). Half the memory.

The region's function is wrapped by :func:`region` (the model does it); the wrapper marks its first run as
*recording* and later runs as *replaying*, and :class:`ds_burst.attention.BurstAttnFunction` consults
:func:`active_keep`. The keep object lives in the checkpoint's closure, so it is freed with the autograd
graph; a replayed entry is dropped from the keep (the attention's own saved tensors take over), and a third
run (``retain_graph`` backward twice) simply recomputes. Works with ``torch.utils.checkpoint``
(non-reentrant) and ``deepspeed.checkpointing.checkpoint``, whose forward runs under ``no_grad``.

**Offload** (:class:`ActivationOffload`). The layer inputs kept by checkpointing (and the kept attention
outputs) are copied to host memory after the layer's forward (pinned, on a side stream, on CUDA) and their
device storage is freed; in backward each layer's re-run waits for its input to come back and starts
bringing back the previous layer's, so that copy overlaps the current layer's recompute and backward. On CPU
the copies are synchronous (useful only to test the mechanism).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

KEEP_TOKENS = ("all", "half")

_STATS = {"recorded": 0, "kept_bytes": 0, "replayed": 0, "replayed_rows": 0, "offloaded_bytes": 0,
          "restored_bytes": 0}


def selective_stats() -> dict[str, int]:
    """Counters since :func:`reset_selective_stats`: attention calls ``recorded`` (and the ``kept_bytes`` of
    their outputs and lse), ``replayed`` (re-runs that
    used kept results), ``replayed_rows`` (query rows whose attention the re-runs did not recompute), bytes
    ``offloaded`` to and ``restored`` from host memory."""
    return dict(_STATS)


def reset_selective_stats() -> None:
    """Zero :func:`selective_stats`."""
    for k in _STATS:
        _STATS[k] = 0


# ---------------------------------------------------------------------------------------------
# Host copies (side stream + pinned buffers on CUDA)

_SIDE: dict[int, Any] = {}
_PINNED: dict[int, list[torch.Tensor]] = {}
_PIN_LOCK = threading.Lock()


def _side_stream(device: torch.device) -> Any:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE:
        _SIDE[idx] = torch.cuda.Stream(device=idx)
    return _SIDE[idx]


def _pinned(nbytes: int) -> torch.Tensor:
    with _PIN_LOCK:
        free = _PINNED.get(nbytes)
        if free:
            return free.pop()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _unpin(buf: torch.Tensor) -> None:
    with _PIN_LOCK:
        _PINNED.setdefault(buf.numel(), []).append(buf)


def release_host_buffers() -> None:
    """Free the pinned host buffers kept for reuse by the offload (call when training ends)."""
    with _PIN_LOCK:
        _PINNED.clear()


class HostCopy:
    """A device tensor's copy in host memory, brought back on demand.

    ``free_source=True`` frees the source's device storage once copied (its storage is resized to 0; the
    tensor object stays valid for autograd) and :meth:`wait` restores it *in place*, so every alias of the
    storage (checkpoint-held inputs, detached views) sees the data again. The source must then own its storage
    exclusively (contiguous, offset 0, storage exactly its size).
    """

    def __init__(self, t: torch.Tensor, free_source: bool = False) -> None:
        self.src = t if free_source else None
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.nbytes = t.numel() * t.element_size()
        self._dev: torch.Tensor | None = None
        self._event: Any = None
        cuda = t.device.type == "cuda"
        if cuda:
            side = _side_stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))
            self._host = _pinned(self.nbytes)
            with torch.cuda.stream(side):
                self._host.copy_(t.detach().reshape(-1).view(torch.uint8), non_blocking=True)
            t.record_stream(side)  # the allocator keeps the block until the copy is done
        else:
            self._host = t.detach().reshape(-1).view(torch.uint8).clone()
        if free_source:
            t.untyped_storage().resize_(0)
        _STATS["offloaded_bytes"] += self.nbytes

    def prefetch(self) -> None:
        """Start the copy back (side stream on CUDA); idempotent."""
        if self._host is None or self._dev is not None:
            return
        if self.src is not None:
            st = self.src.untyped_storage()
            st.resize_(self.nbytes)  # allocated on the current stream, written below on the side stream
            dev = torch.empty(0, dtype=torch.uint8, device=self.device).set_(st, 0, (self.nbytes,), (1,))
        else:
            dev = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        if self.device.type == "cuda":
            side = _side_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                dev.copy_(self._host, non_blocking=True)
                self._event = side.record_event()
            _unpin(self._host)  # later copies into it are queued on the same side stream
        else:
            dev.copy_(self._host)
        self._host = None
        self._dev = dev
        _STATS["restored_bytes"] += self.nbytes

    def wait(self) -> torch.Tensor:
        """The data on the device again (the restored source with ``free_source``, else a new tensor)."""
        self.prefetch()
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
            self._event = None
        if self.src is not None:
            return self.src
        assert self._dev is not None
        return self._dev.view(self.dtype).view(self.shape)


def owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is contiguous at offset 0 of a storage of exactly its size (safe to free in place)."""
    return (t.is_contiguous() and t.storage_offset() == 0 and t.numel() > 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


# ---------------------------------------------------------------------------------------------
# Kept attention results


class _Kept:
    def __init__(self, start: int, qshape: tuple[int, ...], out: torch.Tensor, lse: torch.Tensor,
                 offload: bool, mx: torch.Tensor | None = None) -> None:
        self.start, self.qshape = start, qshape
        self.out: torch.Tensor | HostCopy = HostCopy(out) if offload else out
        self.lse: torch.Tensor | HostCopy = HostCopy(lse) if offload else lse
        self.mx = mx  # the rows' maximum logits (return_max_logit), as small as lse: kept on the device

    def prefetch(self) -> None:
        for t in (self.out, self.lse):
            if isinstance(t, HostCopy):
                t.prefetch()

    def fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.out.wait() if isinstance(self.out, HostCopy) else self.out
        lse = self.lse.wait() if isinstance(self.lse, HostCopy) else self.lse
        return out, lse


class AttentionKeep:
    """Attention outputs kept from the first run of one checkpointed region for its re-run in backward.

    Args:
        tokens: ``"all"`` (keep every local token's output and lse; the re-run skips the ring forward) or
            ``"half"`` (keep the later half of the compute-layout tokens; the re-run computes the early half).
        offload: keep them in host memory (copied back before the re-run).
    """

    def __init__(self, tokens: str = "all", offload: bool = False) -> None:
        if tokens not in KEEP_TOKENS:
            raise ValueError(f"tokens: expected one of {KEEP_TOKENS}, got {tokens!r}")
        self.tokens, self.offload = tokens, bool(offload)
        self.entries: list[_Kept | None] = []
        self.runs = 0
        self._cursor = 0

    @property
    def recording(self) -> bool:
        return self.runs == 1

    def keep_start(self, rows: int) -> int:
        """First kept row of a local compute-layout sequence of ``rows`` tokens."""
        return 0 if self.tokens == "all" else rows // 2

    def record(self, qshape: tuple[int, ...], out: torch.Tensor, lse: torch.Tensor,
               mx: torch.Tensor | None = None) -> None:
        """Keep ``out [B, s, H, D]``, ``lse [B, H, s]`` and the rows' maximum logits ``mx [B, H, s]`` when the
        call returns them (from :meth:`keep_start` on) of the first run."""
        start = self.keep_start(out.shape[1])
        if start:
            out, lse = out[:, start:].clone(), lse[:, :, start:].clone()
            mx = None if mx is None else mx[:, :, start:].clone()
        self.entries.append(_Kept(start, tuple(qshape), out.detach(), lse.detach(), self.offload, mx))
        _STATS["recorded"] += 1
        _STATS["kept_bytes"] += out.numel() * out.element_size() + lse.numel() * lse.element_size()

    def replay(self, qshape: tuple[int, ...]) -> _Kept | None:
        """The next kept entry for a re-run (consumed), or ``None`` to compute normally."""
        if self.recording or self._cursor >= len(self.entries):
            return None
        entry = self.entries[self._cursor]
        self.entries[self._cursor] = None
        self._cursor += 1
        if entry is None:
            return None
        if entry.qshape != tuple(qshape):
            raise RuntimeError(f"selective checkpointing: the re-run's attention call {self._cursor} has queries "
                               f"{tuple(qshape)} but the first run had {entry.qshape}; the region must make the "
                               "same attention calls on both runs")
        _STATS["replayed"] += 1
        _STATS["replayed_rows"] += qshape[0] * (qshape[1] - entry.start)
        return entry

    def prefetch(self) -> None:
        """Start copying offloaded entries back (CUDA side stream)."""
        for e in self.entries:
            if e is not None:
                e.prefetch()

    @contextmanager
    def _run(self) -> Iterator[None]:
        self.runs += 1
        self._cursor = 0
        stack = _active_stack()
        stack.append(self)
        try:
            yield
        finally:
            stack.pop()


_LOCAL = threading.local()


def _active_stack() -> list[AttentionKeep]:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def active_keep() -> AttentionKeep | None:
    """The :class:`AttentionKeep` of the region running on this thread, if any."""
    stack = _active_stack()
    return stack[-1] if stack else None


# ---------------------------------------------------------------------------------------------
# Offload of checkpointed layer inputs


class ActivationOffload:
    """Host offload of the inputs of a chain of checkpointed regions, for one forward pass.

    Every region of the chain takes one slot, in forward order: :meth:`add` (after region ``i``'s forward) copies
    its input to host and frees the device storage; :meth:`skip` gives a region that keeps its input on the
    device an empty slot. The region's re-run (see :func:`region`) calls :meth:`before_rerun`, which waits for
    input ``i`` (and the region's kept attention) to be back and starts bringing back region ``i - 1``'s, if that
    one was offloaded. So with the first ``k`` regions offloaded and the rest skipped, the re-run of region ``k``
    (of those that kept their input on the device, the one backward re-runs last) starts fetching region
    ``k - 1``'s input.
    """

    def __init__(self) -> None:
        self.inputs: list[HostCopy | None] = []
        self.keeps: list[AttentionKeep | None] = []
        self._offloaded: list[bool] = []

    def add(self, x: torch.Tensor, keep: AttentionKeep | None = None) -> int:
        """Offload ``x`` (skipped when it does not own its storage); returns the region's index."""
        self.inputs.append(HostCopy(x, free_source=True) if owns_storage(x) else None)
        self.keeps.append(keep)
        self._offloaded.append(self.inputs[-1] is not None)
        return len(self.inputs) - 1

    def skip(self) -> int:
        """A region whose input (and kept attention) stays on the device: an empty slot, so that the indices of
        the later regions stay their positions in the chain; returns the region's index."""
        self.inputs.append(None)
        self.keeps.append(None)
        self._offloaded.append(False)
        return len(self.inputs) - 1

    def offloaded(self) -> list[int]:
        """Indices of the regions whose input went to host memory (also once they have come back)."""
        return [i for i, o in enumerate(self._offloaded) if o]

    def _prefetch(self, i: int) -> None:
        h = self.inputs[i]
        if h is not None:
            h.prefetch()
        k = self.keeps[i]
        if k is not None:
            k.prefetch()

    def before_rerun(self, i: int) -> None:
        """Region ``i`` is about to re-run: its input must be on the device; start fetching region ``i-1``."""
        if not 0 <= i < len(self.inputs):
            return
        self._prefetch(i)
        h = self.inputs[i]
        if h is not None:
            h.wait()
        # The input is back in its own storage, which the region's checkpoint holds until the region's backward
        # is done, and the region holds its kept attention: the chain lets go of both, or every restored input
        # would stay on the device until the step ends (all L of them by the end of backward).
        self.inputs[i] = None
        self.keeps[i] = None
        if i > 0:
            self._prefetch(i - 1)


def region(fn: Callable[..., Any], keep: AttentionKeep | None = None, offload: ActivationOffload | None = None,
           index: int | None = None) -> Callable[..., Any]:
    """Wrap a checkpointed region's function (called once in forward and again in backward).

    Burst attention calls inside it record into (first run) or replay from (later runs) ``keep``; before a
    re-run the region's offloaded input (slot ``index`` of ``offload``, added after the first run) is brought
    back and the previous region's is prefetched.
    """
    runs = [0]

    def run(*args: Any, **kwargs: Any) -> Any:
        if runs[0] >= 1 and offload is not None and index is not None:
            offload.before_rerun(index)
        runs[0] += 1
        if keep is None:
            return fn(*args, **kwargs)
        with keep._run():
            return fn(*args, **kwargs)

    return run
