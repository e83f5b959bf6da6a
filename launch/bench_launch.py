"""Host time of one Hopper (Gluon) kernel launch, and where it goes, on one sm_90 GPU.

    python launch/bench_launch.py --out results/launch.json [--seq 512] [--calls 300]

For the forward (``hopper_attn.fwd_step``) and the backward (``hopper_attn_bwd.bwd_step``) of a small tile (the GPU
work is a few microseconds, so the host is what is timed): the CPU microseconds per call of, each issued back to back
without a sync after warm-up,

* ``step``: the whole ds-burst call (what the engine issues per tile), through the light launch
  (``ds_burst.kernels.fast_launch``; ``light_launch`` says whether it is on);
* ``step_jit``: the same call with the light launch off (every launch through the JIT);
* ``descriptors``: building the call's TMA descriptors (``TensorDescriptor`` objects) alone;
* ``torch.add``: a one-element ``torch.add`` (the floor of any launch from Python);

whether one call with the light launch writes bitwise what one call through the JIT writes
(``light_matches_jit``), and a cProfile of ``step`` (the top functions by own time). Prints a table and writes
JSON. GPU only: on any other machine it says so and exits 0.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from collections.abc import Callable

import torch
from bench_common import device_meta, host_us, print_table, write_json


def profile_top(fn: Callable[[], object], calls: int, top: int = 25) -> str:
    """The ``top`` functions by own time over ``calls`` calls of ``fn``."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def _jit_path(fn: Callable[[], object], outs: list[torch.Tensor], calls: int) -> tuple[float, bool]:
    """Host us per call of ``fn`` with the light launch off, and whether one call then writes bitwise what one
    call with the light launch on wrote."""
    from ds_burst.kernels import fast_launch

    fn()
    torch.cuda.synchronize()
    light = [t.clone() for t in outs]
    was, fast_launch.ENABLED = fast_launch.ENABLED, False
    try:
        us = host_us(fn, calls, warmup=5)
        fn()
        torch.cuda.synchronize()
    finally:
        fast_launch.ENABLED = was
    return us, all(torch.equal(a, b) for a, b in zip(light, outs, strict=True))


def bench(seq: int, heads: int, d: int, calls: int) -> tuple[list[dict], dict[str, str]]:
    import triton

    from ds_burst.kernels import fast_launch
    from ds_burst.kernels import hopper_attn as hf
    from ds_burst.kernels import hopper_attn_bwd as hb
    from ds_burst.kernels.hopper_common import desc

    # measured on the release it was written for, whether or not it is declared on there yet (TRITON_RELEASES)
    fast_launch.ENABLED = triton.__version__.startswith(fast_launch.WRITTEN_FOR)
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(seq)
    q, k, v, do = (torch.randn(1, seq, heads, d, device=dev, dtype=dt, generator=g) for _ in range(4))
    out = torch.empty(1, seq, heads, d, device=dev, dtype=torch.float32)
    lse = torch.empty(1, heads, seq, device=dev, dtype=torch.float32)
    delta = torch.randn(1, heads, seq, device=dev, dtype=torch.float32, generator=g)
    dq = torch.zeros(1, seq, heads, d, device=dev, dtype=torch.float32)
    dk, dv = torch.zeros_like(dq), torch.zeros_like(dq)
    scale = d**-0.5
    bm, bn, _ = hf._CONFIGS[d]

    def fwd() -> None:
        hf.fwd_step(q, k, v, out, lse, scale=scale, causal=True, fresh=True)

    def bwd() -> None:
        dq.zero_(), dk.zero_(), dv.zero_()
        hb.bwd_step(q, k, v, do, lse, delta, dq, dk, dv, scale=scale, causal=True)

    def bwd_launch() -> None:
        hb.bwd_step(q, k, v, do, lse, delta, dq, dk, dv, scale=scale, causal=True)

    descs = {
        "fwd": lambda: (desc(q, bm // 2), desc(k, bn), desc(v, bn)),
        "bwd": lambda: (desc(q, bm), desc(k, bn // 2), desc(k, bn, d // 2), desc(v, bn // 2), desc(do, bm),
                        hb._row_desc(lse, bm).build(), hb._row_desc(delta, bm).build(), desc(dq, bm, d // 2)),
    }
    rows, profiles = [], {}
    for name, check, launch, outs in (("fwd", fwd, fwd, [out, lse]), ("bwd", bwd, bwd_launch, [dq, dk, dv])):
        jit_us, same = _jit_path(check, outs, calls)
        rows.append({"kernel": f"hopper {name}_step", "seq": seq, "heads": heads, "d": d,
                     "light_launch": fast_launch.ENABLED, "step_us": host_us(launch, calls, warmup=5),
                     "step_jit_us": jit_us, "light_matches_jit": same,
                     "descriptors_us": host_us(descs[name], calls, warmup=5)})
        profiles[f"{name}_step"] = profile_top(launch, calls)
    one = torch.ones(1, device=dev)
    rows.append({"kernel": "torch.add (1 element)", "seq": 1, "heads": 1, "d": 1,
                 "step_us": host_us(lambda: torch.add(one, one), calls, warmup=5)})
    return rows, profiles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", default="results/launch.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("bench_launch: needs an sm_90 GPU (Hopper kernels); nothing measured")
        return 0
    rows, profiles = bench(args.seq, args.heads, args.head_dim, args.calls)
    print_table(rows, ["kernel", "seq", "light_launch", "step_us", "step_jit_us", "light_matches_jit",
                       "descriptors_us"])
    for name, text in profiles.items():
        print(f"--- cProfile of {args.calls} {name} calls\n{text}")
    write_json(args.out, {**device_meta(), "calls": args.calls, "profiles": profiles}, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
