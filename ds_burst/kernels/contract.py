"""The tile contract, declared once: the step functions every local kernel implements (:class:`TileKernel`), its
optional one-rank entry points (:class:`WholeBlock`, :class:`Binder`) and the record each kernel module publishes
as ``KERNEL`` (:class:`KernelSpec`), which the registry returns and every caller reads. Tensors, masks and the
carried state are those of :mod:`ds_burst.kernels.reference` (read its docstring). Every kernel takes every
keyword (:func:`conformance` checks); what it cannot honour its record declares, and no plan hands it such a call.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch

from ds_burst.core.step_plan import TileOp

Tensor = torch.Tensor
Runner = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class TileKernel(Protocol):
    """The step functions of a local kernel (a module, or an object with these methods)."""

    def fwd_step(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, scale: float, q_offset: int = 0,
                 k_offset: int = 0, causal: bool = False, window: tuple[int, int] = (-1, -1),
                 softcap: float | None = None, block_k: int | None = None, max_out: Tensor | None = None) -> None:
        """Continue the online softmax of ``(out, lse)`` over the keys ``k, v`` (both updated in place).
        ``softcap``: scores ``softcap * tanh(s / softcap)``; ``block_k``: key tile of kernels that take one
        (``None``: the kernel's choice); ``max_out``: ``[B, Hq, Sq]`` fp32 (fp64 for fp64 inputs), raised in place
        to the maximum over this block's visible keys of each query's scaled score ``scale * q.k`` (before
        softcapping; ``-inf`` where no key is visible)."""

    def bwd_preprocess(self, out: Tensor, dout: Tensor) -> Tensor:
        """``delta = rowsum(dout * out)``, ``[B, H, S]`` fp32 (fp64 for fp64 inputs)."""

    def bwd_step(self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, dq: Tensor,
                 dk: Tensor, dv: Tensor, *, scale: float, q_offset: int = 0, k_offset: int = 0, causal: bool = False,
                 window: tuple[int, int] = (-1, -1), softcap: float | None = None, deterministic: bool = False,
                 out: Tensor | None = None, block_k: int | None = None) -> None:
        """Add the block's gradients to ``dq, dk, dv`` given the global ``lse`` and ``delta`` of the queries.
        ``deterministic``: bitwise reproducible; ``out``: the queries' final output, required by kernels whose
        record sets ``bwd_needs_out`` and ignored by the others."""


class WholeBlock(Protocol):
    """One-rank entry points (``KernelSpec.whole``): a call whose only tile is the whole local block, in one call
    each way, inside ds-burst's autograd function. ``None``: not covered, the ring of one runs instead."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False,
               window: tuple[int, int] = (-1, -1), q_offset: int = 0, k_offset: int = 0,
               softcap: float | None = None, max_out: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """``(out [B, Sq, Hq, Dv]`` in the input dtype, ``lse [B, Hq, Sq]``) or ``None``; ``max_out`` as in
        :meth:`TileKernel.fwd_step` (written only when the call runs)."""

    def attend_bwd(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, *, scale: float,
                   causal: bool = False, window: tuple[int, int] = (-1, -1), q_offset: int = 0, k_offset: int = 0,
                   deterministic: bool = False, softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(dq, dk, dv)`` in the input dtype, or ``None``."""


class Binder(Protocol):
    """One-rank entry points (``KernelSpec.binds``): fused ops chosen once per plan and run under torch's own
    autograd (no autograd function of ds-burst's), per tile of a call whose tiles are diagonal blocks."""

    def whole_backend(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                      window: tuple[int, int] = (-1, -1), q_offset: int = 0, k_offset: int = 0) -> object | None:
        """What :meth:`bind_whole` would bind for these inputs, or ``None`` (the check alone)."""

    def bind_whole(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False,
                   window: tuple[int, int] = (-1, -1), q_offset: int = 0, k_offset: int = 0) -> Runner | None:
        """A function ``(q, k, v) -> (out, lse)`` for tensors shaped like these, or ``None``."""


class OneRank(enum.Enum):
    """How a call with one rank (no ring) runs on a kernel: :meth:`KernelSpec.one_rank`."""

    RING = "ring"  # the ring engine over the rank's own tiles
    WHOLE = "whole"  # attend / attend_bwd on the only tile, the whole block (the ring where they return None)
    BIND = "bind"  # fused ops bound once per diagonal tile, under torch's autograd (WHOLE or RING when that is off)


def _mismatch(want: Callable, got: Callable) -> str | None:
    """Why ``got`` cannot be called as the protocol method ``want`` is (``None``: it can): the tensors by position in
    the same order, every keyword (with the same default), nothing else required."""
    params = list(inspect.signature(want).parameters.values())[1:]
    sig = inspect.signature(got)
    pos = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    try:  # each positional value is its name, so where it lands tells the order
        bound = sig.bind(*pos, **{p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY})
    except TypeError as exc:  # a keyword it does not take, an argument outside the contract
        return str(exc)
    wrong = [n for n in pos if n in sig.parameters and bound.arguments.get(n) != n]
    if wrong:
        return f"positional tensors out of order: {wrong}"
    for p in params:
        g = sig.parameters.get(p.name)
        if p.default is not p.empty and g is not None and g.default != p.default:
            return f"{p.name!r} defaults to {g.default!r}, not {p.default!r}"
    return None


def conformance(impl: object, *protocols: type) -> list[str]:
    """Problems of ``impl`` against the methods of ``protocols`` (default :class:`TileKernel`): missing methods,
    positional tensors out of order, missing keywords, other defaults, extra required arguments. ``[]``: conforms."""
    problems = []
    for proto in protocols or (TileKernel,):
        for name, fn in vars(proto).items():
            if name.startswith("_") or not callable(fn):
                continue
            got = getattr(impl, name, None)
            if not callable(got):
                problems.append(f"{proto.__name__}.{name}: missing")
                continue
            why = _mismatch(fn, got)
            if why:
                problems.append(f"{proto.__name__}.{name}: {why}")
    return problems


def whole_tile(tiles: Sequence[TileOp], rows: int) -> TileOp | None:
    """The only tile when it is the whole ``rows x rows`` block, else ``None``."""
    if len(tiles) == 1 and (tiles[0].q0, tiles[0].q1, tiles[0].k0, tiles[0].k1) == (0, rows, 0, rows):
        return tiles[0]
    return None


def diagonal_tiles(tiles: Sequence[TileOp], rows: int) -> list[TileOp] | None:
    """``tiles`` by query start when they are diagonal blocks (queries and keys the same rows) partitioning
    ``[0, rows)`` (the whole block, or one tile per packed document), else ``None``."""
    got = sorted(tiles, key=lambda t: t.q0)
    if not got or got[0].q0 != 0 or got[-1].q1 != rows or any(t.q0 != t.k0 or t.q1 != t.k1 for t in got) \
            or any(x.q1 != y.q0 for x, y in zip(got, got[1:])):
        return None
    return got


@dataclass(frozen=True, eq=False)
class KernelSpec:
    """One local kernel: its step functions and what it declares. Each kernel module publishes one as ``KERNEL``;
    :func:`ds_burst.kernels.registry.register` adds others (``burst_attn_func(kernel=<name>)``)."""

    name: str  # the value of ``kernel=`` that selects it
    impl: TileKernel  # the step functions (and the one-rank entry points that ``whole`` / ``binds`` announce)
    dtypes: tuple[torch.dtype, ...]  # input dtypes it runs
    devices: tuple[str, ...]  # device types it runs on
    softcap: bool = False  # honours logit softcapping
    value_dim: bool = False  # honours a value head dim Dv != D
    deterministic: bool = True  # bwd_step(deterministic=True) is bitwise reproducible
    documents: bool = False  # a tile may hold several packed documents (none does: the step plan splits tiles)
    bwd_needs_out: bool = False  # bwd_step needs out=, so the plan runs it with the K/V-ring backward only
    whole: bool = False  # impl is also a WholeBlock (attend / attend_bwd)
    binds: bool = False  # impl is also a Binder (whole_backend / bind_whole)
    tolerance: Mapping[torch.dtype, tuple[float, float]] = field(default_factory=dict)
    """Test tolerances per dtype, ``(forward, gradient)``: relative L2 error of one tile against float64."""
    check: Callable[[Tensor, Tensor, Tensor], str | None] | None = None
    """The kernel's own rules beyond the fields (head dims, ...): ``(q, k, v) -> reason or None``."""
    path: Callable[[Tensor, Tensor], str] | None = None
    """Which of its code paths runs ``(q, k)`` (part of the ``auto`` choice's cache key); ``None``: one path."""

    def __post_init__(self) -> None:
        protocols = [TileKernel] + [WholeBlock] * self.whole + [Binder] * self.binds
        problems = conformance(self.impl, *protocols)
        if problems:
            raise TypeError(f"kernel {self.name!r} does not match the tile contract: " + "; ".join(problems))

    def why_not(self, q: Tensor, k: Tensor, v: Tensor | None = None, *, softcap: float | None = None,
                deterministic: bool = False, documents: bool = False) -> str | None:
        """``None`` when this kernel runs such a call exactly, else the reason it does not (``v=None``: a ``v``
        shaped like ``k``, no ``Dv != D``). Generalises the kernels' own applicability checks."""
        v = k if v is None else v
        if q.dtype not in self.dtypes:
            return f"dtype {q.dtype} (kernel {self.name!r} takes {', '.join(map(str, self.dtypes))})"
        if q.device.type not in self.devices:
            return f"device {q.device.type} (kernel {self.name!r} runs on {', '.join(self.devices)})"
        if softcap is not None and not self.softcap:
            return f"logit softcapping (kernel {self.name!r} has none)"
        if not self.value_dim and v.shape[-1] != q.shape[-1]:
            return f"value head dim {v.shape[-1]} != head dim {q.shape[-1]} (kernel {self.name!r} needs them equal)"
        if deterministic and not self.deterministic:
            return f"a deterministic backward (kernel {self.name!r} has none)"
        if documents and not self.documents:
            return f"several documents in a tile (kernel {self.name!r} takes one)"
        return None if self.check is None else self.check(q, k, v)

    def one_rank(self, tiles: Sequence[TileOp], rows: int, *, deterministic: bool, softcap: float | None,
                 sinks: bool, max_logit: bool = False) -> OneRank:
        """How a one-rank call with these tiles over ``rows`` queries runs: bound fused ops where the kernel binds,
        the tiles are diagonal and nothing needs ds-burst's autograd function (sinks to fold, softcap, a
        deterministic backward, the maximum logit, which fused ops do not expose); else ``attend`` on the whole
        block where the kernel has it; else the ring of one."""
        if (self.binds and not deterministic and softcap is None and not sinks and not max_logit
                and diagonal_tiles(tiles, rows) is not None):
            return OneRank.BIND
        if self.whole and whole_tile(tiles, rows) is not None:
            return OneRank.WHOLE
        return OneRank.RING

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **kw: object) -> tuple[Tensor, Tensor] | None:
        """:meth:`WholeBlock.attend`, or ``None`` for a kernel without it."""
        return cast(WholeBlock, self.impl).attend(q, k, v, **kw) if self.whole else None  # type: ignore[arg-type]

    def attend_bwd(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, **kw: object
                   ) -> tuple[Tensor, Tensor, Tensor] | None:
        """:meth:`WholeBlock.attend_bwd`, or ``None`` for a kernel without it."""
        impl = cast(WholeBlock, self.impl)
        return impl.attend_bwd(q, k, v, out, dout, lse, **kw) if self.whole else None  # type: ignore[arg-type]

    def bind(self, q: Tensor, k: Tensor, v: Tensor, **kw: object) -> Runner | None:
        """:meth:`Binder.bind_whole`, or ``None`` for a kernel without it."""
        return cast(Binder, self.impl).bind_whole(q, k, v, **kw) if self.binds else None  # type: ignore[arg-type]

    def can_bind(self, q: Tensor, k: Tensor, v: Tensor, *, deterministic: bool, softcap: float | None, sinks: bool,
                 max_logit: bool = False, **mask: object) -> bool:
        """Whether a one-rank call of this whole block would run bound fused ops (the check alone)."""
        if not self.binds or deterministic or softcap is not None or sinks or max_logit:
            return False
        return cast(Binder, self.impl).whole_backend(q, k, v, **mask) is not None  # type: ignore[arg-type]
