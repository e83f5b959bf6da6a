"""What the kernel tests (and the other numeric tests) share: the device and interpreter set-up, test cases
(:class:`Case`), the relative error (:func:`rel`), lse checks, seeded inputs, the tolerances of whole calls
(:data:`TOL`; a kernel's per-tile tolerances are in its record, ``KernelSpec.tolerance``) and a stub fourth kernel
(:func:`stub_kernel`) for the contract tests.

Without CUDA the Triton kernels run under Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` and here before Triton is imported), so the shapes of CPU cases stay small.
"""

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
from ds_burst.kernels.contract import KernelSpec  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and not settings.triton_interpret()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

#: dtype -> (output, gradient) relative L2 tolerance against float64 of a whole attention call or model step
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 3e-3),
    torch.bfloat16: (1.5e-2, 2e-2),
}


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
    assert torch.equal(torch.isfinite(got), fin), "the non-finite entries (NaN, inf) differ"
    bad = ~fin
    if bool(bad.any()):
        assert torch.equal(got[bad].isnan(), want[bad].isnan()), "NaN where the reference has inf or back"
        inf = bad & ~want.isnan()
        assert torch.equal(got[inf], want[inf]), "infinities of another sign"
    got, want = got[fin], want[fin]
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def max_rel(got: Sequence[float], want: Sequence[float], n: int | None = None) -> float:
    """Largest elementwise relative error of two sequences of numbers (e.g. losses per step), of length ``n``."""
    assert len(got) == len(want) and (n is None or len(got) == n), (got, want)
    return max(abs(x - y) / abs(y) for x, y in zip(got, want))


def check_lse(lse: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Assert ``lse`` matches the reference: ``-inf`` in the same rows (bitwise), relative error below ``tol``."""
    err = rel(lse, ref)
    assert err < tol, err
    return err


def stub_kernel(name: str = "stub", calls: collections.Counter | None = None) -> KernelSpec:
    """A fourth kernel for the contract tests: the PyTorch reference's tiles behind wrappers of its own (counting
    their calls in ``calls``), declared by a record of its own (float64 and float32 on the CPU, every variant).
    Register it with ``ds_burst.kernels.registry.register``, then call ``burst_attn_func(kernel=name)``."""
    from ds_burst.kernels import reference

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

