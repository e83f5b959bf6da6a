"""What the kernel tests (and the other numeric tests) share: device and interpreter set-up (without CUDA the
Triton kernels run under ``TRITON_INTERPRET=1``, so CPU shapes stay small), :class:`Case`, :func:`rel`, seeded
inputs and checks, :data:`TOL` for whole calls (a kernel's per-tile tolerances are in its record) and a stub fourth
kernel (:func:`stub_kernel`)."""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import types
from collections.abc import Sequence

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ds_burst.core import settings  # noqa: E402
from ds_burst.kernels import reference  # noqa: E402
from ds_burst.kernels.contract import KernelSpec  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and not settings.triton_interpret()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def gpu(test):
    """Mark ``test`` for the GPU tier (``-m gpu``) and skip it without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")(test))


#: dtype -> (output, gradient) relative L2 tolerance against float64 of a whole attention call or model step
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 3e-3),
       torch.bfloat16: (1.5e-2, 2e-2)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention block: sizes, heads, head dims (``dv``: the value head dim, default ``d``), mask and global
    offsets; ``fused``: the sdpa kernel's fused ops can run all of it; ``carried``: a state from an earlier step."""

    name: str
    sq: int
    sk: int
    hq: int
    hkv: int
    d: int
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    q_off: int = 0
    k_off: int = 0
    b: int = 1
    dv: int | None = None
    fused: bool = True
    carried: bool = False

    def __post_init__(self) -> None:
        if self.dv is None:
            object.__setattr__(self, "dv", self.d)

    def __repr__(self) -> str:
        return self.name

    def mask_kw(self, k_shift: int = 0) -> dict:
        """The kernels' mask keywords for this block (keys starting ``k_shift`` rows later)."""
        return dict(q_offset=self.q_off, k_offset=self.k_off + k_shift, causal=self.causal, window=self.window)


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def randn(shape: Sequence[int], g: torch.Generator, dtype: torch.dtype = torch.float32,
          device: torch.device | str = DEVICE, scale: float = 1.0) -> torch.Tensor:
    """Seeded normal values drawn in float64 on the CPU (the same on every device), scaled, then cast."""
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error of ``got`` against ``want`` over the finite entries of ``want``; the non-finite entries
    (lse ``-inf`` of rows without keys, NaN inputs) must match exactly, and ``got`` must be finite elsewhere."""
    got = torch.as_tensor(got).detach().double()
    want = torch.as_tensor(want).detach().double().to(got.device)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), "NaN / inf where the reference has none, or back"
    assert torch.equal(got[~fin].nan_to_num(), want[~fin].nan_to_num()), "other non-finite values"
    got, want = got[fin], want[fin]
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def ref_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, **kw) -> list:
    """``[out, dq, dk, dv]`` of float64 attention (``naive_attention`` keywords, autograd); with ``sinks=`` also
    d sinks (``None`` without sinks)."""
    qf, kf, vf = (x.detach().double().clone().requires_grad_() for x in (q, k, v))
    with_sinks = "sinks" in kw
    sf = kw.pop("sinks", None)
    sf = None if sf is None else sf.detach().double().clone().requires_grad_()
    out, _ = reference.naive_attention(qf, kf, vf, sinks=sf, **kw)
    out.backward(do.double())
    return [out.detach(), qf.grad, kf.grad, vf.grad] + ([None if sf is None else sf.grad] if with_sinks else [])


def qkv(c: Case, dtype: torch.dtype, g: torch.Generator, amp: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Strided q, k, v (q from a wider buffer, k and v from one ``[.., Hkv, D + Dv]`` tensor); ``amp`` scales q, k."""
    q = randn((c.b, c.sq, c.hq + 1, c.d), g, dtype, scale=amp)[:, :, 1:]
    kv = randn((c.b, c.sk, c.hkv, c.d + c.dv), g, dtype)
    k = kv[..., :c.d] if amp == 1 else (kv[..., :c.d].double() * amp).to(dtype)
    return q, k, kv[..., c.d:]


def state(c: Case, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random carried state as strided views: fp32 out ``[B, Sq, Hq, Dv]``, lse (``-inf`` every third row)."""
    out = randn((c.b, c.sq + 9, c.hq, c.dv), g).narrow(1, 4, c.sq)
    lse = randn((c.b, c.hq, c.sq + 5), g, scale=2.0).narrow(2, 3, c.sq)
    lse[:, :, ::3] = -float("inf")
    return out, lse


def bwd_inputs(c: Case, dtype: torch.dtype, g: torch.Generator, softcap: float | None = None, amp: float = 1.0
               ) -> tuple[torch.Tensor, ...]:
    """q, k, v, dout, a plausible global lse and delta, and random fp32 accumulators dq, dk, dv (strided)."""
    q, k, v = qkv(c, dtype, g, amp)
    dout = randn((c.b, c.sq, c.hq, c.dv), g, dtype)
    _, blk = reference.naive_attention(*(x.double() for x in (q, k, v)), scale=c.d**-0.5, softcap=softcap,
                                       **c.mask_kw())
    extra = torch.rand(blk.shape, generator=g, dtype=torch.float64).to(blk.device)
    lse = torch.where(torch.isfinite(blk), blk + torch.log1p(extra), extra * 3).float()
    delta = randn((c.b, c.hq, c.sq), g, scale=0.5)
    dq = randn((c.b, c.sq + 6, c.hq, c.d), g).narrow(1, 2, c.sq)
    dk = randn((c.b, c.sk, c.hkv, c.d), g)
    dv = randn((c.b, c.sk + 3, c.hkv, c.dv), g).narrow(1, 3, c.sk)
    return q, k, v, dout, lse, delta, dq, dk, dv


def ref_bwd(c: Case, q, k, v, dout, lse, delta, dq, dk, dv, scale: float, softcap: float | None = None):
    """The float64 reference's ``(dq, dk, dv)``: the accumulators plus this block's gradients."""
    got = [x.double() for x in (dq, dk, dv)]
    reference.bwd_step(*(x.double() for x in (q, k, v, dout, lse, delta)), *got, scale=scale, softcap=softcap,
                       **c.mask_kw())
    return got


def check_fwd(kernel, c: Case, dtype: torch.dtype, g: torch.Generator, tol: float, scale: float | None = None,
              softcap: float | None = None, amp: float = 1.0) -> tuple:
    """``kernel.fwd_step`` continuing a random carried state (:func:`state`) over the block, against the float64
    reference: out and lse within ``tol``. Returns the state before and after, ``((out0, lse0), (out, lse))``."""
    q, k, v = qkv(c, dtype, g, amp)
    out, lse = state(c, g)
    before, rout, rlse = (out.clone(), lse.clone()), out.double(), lse.double()
    kw = dict(scale=c.d**-0.5 if scale is None else scale, softcap=softcap, **c.mask_kw())
    kernel.fwd_step(q, k, v, out, lse, **kw)
    reference.fwd_step(q.double(), k.double(), v.double(), rout, rlse, **kw)
    assert rel(out, rout) < tol and rel(lse, rlse) < tol, (rel(out, rout), rel(lse, rlse))
    return before, (out, lse)


def check_bwd(kernel, c: Case, dtype: torch.dtype, g: torch.Generator, tol: float, scale: float | None = None,
              softcap: float | None = None, amp: float = 1.0, deterministic: bool = True) -> tuple:
    """``kernel.bwd_step`` adding to random accumulators against the float64 reference: the increments of dq, dk,
    dv (a dropped gradient cannot hide behind the accumulators) within ``tol``. Returns ``(errors, (dq, dk, dv))``."""
    q, k, v, dout, lse, delta, dq, dk, dv = bwd_inputs(c, dtype, g, softcap, amp)
    scale = c.d**-0.5 if scale is None else scale
    x0 = [t.double() for t in (dq, dk, dv)]
    want = ref_bwd(c, q, k, v, dout, lse, delta, dq, dk, dv, scale, softcap)
    kernel.bwd_step(q, k, v, dout, lse, delta, dq, dk, dv, scale=scale, softcap=softcap, deterministic=deterministic,
                    **c.mask_kw())
    errs = [rel(x.double() - a, b - a) for x, a, b in zip((dq, dk, dv), x0, want)]
    assert max(errs) < tol, errs
    return errs, (dq, dk, dv)


def max_rel(got: Sequence[float], want: Sequence[float], n: int | None = None) -> float:
    """Largest elementwise relative error of two sequences of numbers (e.g. losses per step), of length ``n``."""
    assert len(got) == len(want) and (n is None or len(got) == n), (got, want)
    return max(abs(x - y) / abs(y) for x, y in zip(got, want))


def stub_kernel(name: str = "stub", calls: collections.Counter | None = None) -> KernelSpec:
    """A fourth kernel: the reference's tiles behind wrappers (counting calls in ``calls``) with a record of its own
    (float64/float32 on the CPU, every variant); register it, then ``burst_attn_func(kernel=name)``."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if calls is not None:
                calls[fn.__name__] += 1
            return fn(*args, **kwargs)
        return call

    impl = types.SimpleNamespace(**{n: wrap(getattr(reference, n)) for n in ("fwd_step", "bwd_preprocess", "bwd_step")})
    return KernelSpec(name, impl, dtypes=(torch.float64, torch.float32), devices=("cpu",), softcap=True,
                      value_dim=True, tolerance={torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5)})

