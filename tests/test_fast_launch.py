"""The light launch's bookkeeping (``ds_burst.kernels.fast_launch``) on CPU, against a stand-in for a compiled
kernel with triton 3.6's launcher layout: which calls go through the JIT, what reaches the C launcher, in which
order, and when a descriptor is encoded again. The GPU test (tests/test_hopper_kernels.py) checks that the light
launch is bitwise the JIT launch on the real kernels."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ds_burst.kernels import fast_launch as fl


def _wrap(launcher: Any, tensordesc_meta: list) -> Any:
    """A closure with the free variables of triton 3.6's ``wrap_handle_tensordesc`` inner function."""

    def inner(*args: Any) -> Any:
        assert tensordesc_meta  # (triton expands the descriptors here)
        return launcher(*args)

    return inner


class FakeKernel:
    """``kernel[grid](...)`` records the JIT launch and returns a compiled stand-in."""

    arg_names = ["a_desc", "b_desc", "Out", "n", "m", "x", "FLAG", "num_warps"]

    def __init__(self, scratch: int = 0) -> None:
        self.jit_calls: list[tuple] = []
        self.raw_calls: list[tuple] = []
        launcher = type("CudaLauncher", (), {})()
        launcher.global_scratch_size, launcher.profile_scratch_size = scratch, 0
        launcher.launch_cooperative_grid, launcher.launch_pdl = False, True
        launcher.launch = _wrap(lambda *a: self.raw_calls.append(a), [{"slot": 0}, {"slot": 1}])
        self.compiled = type("CompiledKernel", (), {"run": launcher, "function": 77, "packed_metadata": "pm"})()

    def __getitem__(self, grid: tuple) -> Any:
        def launch(*args: Any, **kw: Any) -> Any:
            self.jit_calls.append((grid, args, kw))
            return self.compiled

        return launch


@pytest.fixture
def light(monkeypatch: pytest.MonkeyPatch) -> list:
    """The light path on, descriptors built and encoded by stand-ins (encodings are recorded)."""
    encoded: list = []
    monkeypatch.setattr(fl, "ENABLED", True)
    monkeypatch.setattr(fl, "_stream", lambda dev: 5)
    monkeypatch.setattr(fl.Desc, "build", lambda self: ("built", self.base.data_ptr(), self.block))

    def encode(desc: tuple, meta: dict) -> list:
        encoded.append((desc, meta["slot"]))
        return [("map", desc[1], meta["slot"]), 8, 16]

    import triton.backends.nvidia.driver as drv

    monkeypatch.setattr(drv, "make_tensordesc_arg", encode, raising=False)
    return encoded


def _descs(a: torch.Tensor, b: torch.Tensor) -> list[fl.Desc]:
    return [fl.Desc(a, (1, 8), (8, 1), (1, 8), None), fl.Desc(b, (1, 16), (16, 1), (1, 16), None)]


def test_first_call_jit_then_c_launcher(light: list) -> None:
    k = FakeKernel()
    launch = fl.Launcher(k, {"maxnreg": 168})
    a, b, out = torch.zeros(8), torch.zeros(16), torch.zeros(4)
    cx = {"FLAG": True, "num_warps": 4}
    launch((3, 2), _descs(a, b), (out, 32, 7, 0.5), cx)
    assert len(k.jit_calls) == 1 and not k.raw_calls
    grid, args, kw = k.jit_calls[0]
    assert grid == (3, 2) and args[:2] == (("built", a.data_ptr(), (1, 8)), ("built", b.data_ptr(), (1, 16)))
    assert args[2:] == (out, 32, 7, 0.5) and kw == {"FLAG": True, "num_warps": 4, "maxnreg": 168}
    launch((3, 2), _descs(a, b), (out, 48, 9, 0.25), cx)  # same classes: 48 % 16 == 0, 9 neither 1 nor % 16
    assert len(k.jit_calls) == 1 and len(k.raw_calls) == 1
    raw = k.raw_calls[0]
    assert raw[19] is out and raw[:19] + raw[20:] == (
        3, 2, 1, 5, 77, False, True, None, None, "pm", None, None, None,  # grid, stream, handle, flags, metadata
        ("map", a.data_ptr(), 0), 8, 16, ("map", b.data_ptr(), 1), 8, 16,  # each descriptor: map, shape, strides
        48, 9, 0.25, True, 4)  # the arguments, then the constexprs in the kernel's order
    launch((3, 2), _descs(a, b), (out, 48, 9, 0.25), cx)
    assert len(light) == 2  # each descriptor encoded once, then reused
    assert (launch.launches, launch.jit_launches) == (3, 1)
    counts = fl.launch_counts()["FakeKernel"]  # every launcher of that name so far, this one's three included
    assert counts["launches"] >= 3 and counts["launches"] - counts["jit_launches"] >= 2


@pytest.mark.parametrize("change", ["int_one", "int_align", "int_64bit", "dtype", "constexpr", "desc_block"])
def test_what_the_jit_specializes_is_a_new_variant(light: list, change: str) -> None:
    k = FakeKernel()
    launch = fl.Launcher(k)
    a, b, out = torch.zeros(8), torch.zeros(16), torch.zeros(4)
    base = dict(args=(out, 32, 7, 0.5), cx={"FLAG": True, "num_warps": 4}, descs=_descs(a, b))
    launch((1,), base["descs"], base["args"], base["cx"])
    other = dict(base)
    if change == "int_one":
        other["args"] = (out, 32, 1, 0.5)
    elif change == "int_align":
        other["args"] = (out, 33, 7, 0.5)
    elif change == "int_64bit":
        other["args"] = (out, 32, 2**33 + 7, 0.5)
    elif change == "dtype":
        other["args"] = (out.double(), 32, 7, 0.5)
    elif change == "constexpr":
        other["cx"] = {"FLAG": False, "num_warps": 4}
    else:
        other["descs"] = [fl.Desc(a, (1, 8), (8, 1), (1, 4), None), _descs(a, b)[1]]
    launch((1,), other["descs"], other["args"], other["cx"])
    assert len(k.jit_calls) == 2 and not k.raw_calls


def test_new_buffer_is_encoded_again(light: list) -> None:
    k = FakeKernel()
    launch = fl.Launcher(k)
    out = torch.zeros(4)
    for _ in range(2):
        launch((1,), _descs(torch.zeros(8), torch.zeros(16)), (out, 32, 7, 0.5), {"FLAG": True, "num_warps": 4})
    a2, b2 = torch.zeros(8), torch.zeros(16)
    launch((1,), _descs(a2, b2), (out, 32, 7, 0.5), {"FLAG": True, "num_warps": 4})
    assert k.raw_calls[-1][13][1] == a2.data_ptr() and k.raw_calls[-1][16][1] == b2.data_ptr()


def test_jit_only_when_off_scratch_or_wrong_order(light: list, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, out = torch.zeros(8), torch.zeros(16), torch.zeros(4)
    call = ((1,), _descs(a, b), (out, 32, 7, 0.5), {"FLAG": True, "num_warps": 4})
    k = FakeKernel(scratch=256)  # a variant that needs scratch memory per launch
    launch = fl.Launcher(k)
    for _ in range(3):
        launch(*call)
    assert len(k.jit_calls) == 3 and launch.jit_launches == 3 and not k.raw_calls
    with pytest.raises(TypeError, match="constexprs"):
        fl.Launcher(FakeKernel())((1,), call[1], call[2], {"num_warps": 4, "FLAG": True})
    monkeypatch.setattr(fl, "ENABLED", False)
    k = FakeKernel()
    launch = fl.Launcher(k)
    for _ in range(3):
        launch(*call)
    assert len(k.jit_calls) == 3 and not k.raw_calls


def test_profiler_hook_takes_the_jit_path(light: list, monkeypatch: pytest.MonkeyPatch) -> None:
    k = FakeKernel()
    launch = fl.Launcher(k)
    call = ((1,), _descs(torch.zeros(8), torch.zeros(16)), (torch.zeros(4), 32, 7, 0.5), {"FLAG": True, "num_warps": 4})
    launch(*call)
    monkeypatch.setattr(fl, "_hooked", lambda: True)
    launch(*call)
    assert len(k.jit_calls) == 2 and not k.raw_calls


def test_hooked_reads_triton_hook_chain() -> None:
    """No hook added: the light path; a profiler's hook added to triton's chain: the JIT path."""
    from triton import knobs

    chain = knobs.runtime.launch_enter_hook
    assert not fl._hooked()

    def hook(*args: Any) -> None:
        pass

    chain.add(hook)
    try:
        assert fl._hooked()
    finally:
        chain.remove(hook)
    assert not fl._hooked()


def test_enabled_only_on_checked_triton_releases() -> None:
    import triton

    # written against 3.6's launcher; on only where the GPU test has passed (3.6)
    assert fl.WRITTEN_FOR == ("3.6.",) and fl.TRITON_RELEASES == ("3.6.",)
    assert not fl._release_ok() and not fl.ENABLED and triton.__version__
