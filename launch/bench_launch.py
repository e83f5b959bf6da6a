"""Host time of one Hopper (Gluon) kernel launch, and where it goes, on one sm_90 GPU.

    python launch/bench_launch.py --out results/launch.json [--seq 512] [--calls 300]

For the forward (``hopper_attn.fwd_step``) and the backward (``hopper_attn_bwd.bwd_step``) of a small tile (the GPU
work is a few microseconds, so the host is what is timed): the CPU microseconds per call of, each issued back to back
without a sync after warm-up,

* ``step``: the whole ds-burst call (what the engine issues per tile);
* ``descriptors``: building its TMA descriptors (``TensorDescriptor`` objects) alone;
* ``jit_prebuilt``: the JIT launch (``kernel[grid](...)``) with descriptors built beforehand;
* ``direct_prebuilt``: the compiled kernel's own ``run`` with the same arguments (no binder, no cache lookup);
* ``torch_add``: a one-element ``torch.add`` (the floor of any launch from Python);

and a cProfile of ``step`` (the top functions by own time). Prints a table and writes JSON. GPU only: on any other
machine it says so and exits 0.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_common import device_meta, print_table, write_json


def host_us(fn: Callable[[], object], calls: int) -> float:
    """CPU microseconds per call of ``fn`` issued ``calls`` times back to back (after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


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


def direct(jit_fn: Any, compiled: Any, grid: tuple[int, ...], params: list[Any]) -> Callable[[], None]:
    """A launch of ``compiled`` through its own ``run`` with ``params`` (every kernel parameter in order)."""
    from triton import knobs
    from triton.runtime.driver import driver

    g = (*grid, 1, 1)[:3]

    def launch() -> None:
        dev = driver.active.get_current_device()
        stream = driver.active.get_current_stream(dev)
        meta = compiled.launch_metadata(grid, stream, *params)
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, meta,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *params)

    return launch


def bench(seq: int, heads: int, d: int, calls: int) -> tuple[list[dict], dict[str, str]]:
    import triton

    from ds_burst.kernels import hopper_attn as hf
    from ds_burst.kernels import hopper_attn_bwd as hb
    from ds_burst.kernels import tile_math
    from ds_burst.kernels.hopper_common import LOG2E, desc

    dev, dt = torch.device("cuda"), torch.bfloat16
    q, k, v, do = (torch.randn(1, seq, heads, d, device=dev, dtype=dt) for _ in range(4))
    out = torch.empty(1, seq, heads, d, device=dev, dtype=torch.float32)
    lse = torch.empty(1, heads, seq, device=dev, dtype=torch.float32)
    scale = d**-0.5
    rows, profiles = [], {}

    # forward
    def fwd() -> None:
        hf.fwd_step(q, k, v, out, lse, scale=scale, causal=True, fresh=True)

    bm, bn, stages = hf._CONFIGS[d]
    grid = (triton.cdiv(seq, bm), heads)
    descs = (desc(q, bm // 2), desc(k, bn), desc(v, bn))
    has_lo, has_hi, win_l, win_r = tile_math.mask_args(True, (-1, -1))
    params = [*descs, out, lse, lse, *out.stride(), *lse.stride(), *lse.stride(), heads, seq, seq, 1, 0, win_l, win_r,
              scale * LOG2E, scale, has_lo, has_hi, d, bm, bn, stages, True, False, 4]

    def fwd_jit() -> Any:
        return hf._fwd_kernel[grid](*params[:-9], HAS_LO=has_lo, HAS_HI=has_hi, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
                                    STAGES=stages, FRESH=True, HAS_MAX=False, num_warps=4, maxnreg=168)

    fwd()
    compiled = fwd_jit()
    row = {"kernel": "hopper fwd_step", "seq": seq, "heads": heads, "d": d,
           "step_us": host_us(fwd, calls),
           "descriptors_us": host_us(lambda: (desc(q, bm // 2), desc(k, bn), desc(v, bn)), calls),
           "jit_prebuilt_us": host_us(fwd_jit, calls)}
    try:
        row["direct_prebuilt_us"] = host_us(direct(hf._fwd_kernel, compiled, grid, params), calls)
        # the direct launch must compute what the JIT launch computes
        ref = out.clone()
        out.zero_()
        direct(hf._fwd_kernel, compiled, grid, params)()
        torch.cuda.synchronize()
        row["direct_matches"] = bool(torch.equal(out, ref))
    except Exception as exc:  # noqa: BLE001 - a diagnostic: report, go on
        row["direct_error"] = f"{type(exc).__name__}: {exc}"[:300]
    rows.append(row)
    profiles["fwd_step"] = profile_top(fwd, calls)

    # backward
    delta = torch.randn(1, heads, seq, device=dev, dtype=torch.float32)
    dq = torch.zeros(1, seq, heads, d, device=dev, dtype=torch.float32)
    dk, dv = torch.zeros_like(dq), torch.zeros_like(dq)

    def bwd() -> None:
        hb.bwd_step(q, k, v, do, lse, delta, dq, dk, dv, scale=scale, causal=True)

    bwd()
    rows.append({"kernel": "hopper bwd_step", "seq": seq, "heads": heads, "d": d, "step_us": host_us(bwd, calls),
                 "descriptors_us": host_us(lambda: (desc(q, bm), desc(k, bn // 2), desc(k, bn, d // 2),
                                                    desc(v, bn // 2), desc(do, bm), hb._row_desc(lse, bm),
                                                    hb._row_desc(delta, bm), desc(dq, bm, d // 2)), calls)})
    profiles["bwd_step"] = profile_top(bwd, calls)

    one = torch.ones(1, device=dev)
    rows.append({"kernel": "torch.add (1 element)", "seq": 1, "heads": 1, "d": 1,
                 "step_us": host_us(lambda: torch.add(one, one), calls)})
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
    print_table(rows, ["kernel", "seq", "step_us", "descriptors_us", "jit_prebuilt_us", "direct_prebuilt_us",
                       "direct_matches", "direct_error"])
    for name, text in profiles.items():
        print(f"--- cProfile of {args.calls} {name} calls\n{text}")
    write_json(args.out, {**device_meta(), "calls": args.calls, "profiles": profiles}, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
