"""What the per-row maximum logit (``max_out``, for Muon's QK-clip) costs the forward of one tile, on one GPU.

    python launch/bench_max_logit.py --out results/max_logit.json [--seqs 4096 16384] [--iters 5]

For each local size S (B=1, H=32, D=128, bf16), causal and full, and each method, times with and without
``max_out``:

* ``fwd_step``: one tile continuing a carried fp32 state ``(out, lse)`` over all S keys;
* ``attend``: the whole block from no state (the one-rank call); where a kernel's ``attend`` returns ``None`` (no
  such entry, or it declines ``max_out``) the general path the caller then runs is timed: a fresh fp32 state,
  ``fwd_step``, the output cast to bf16 (``path`` says which ran).

Methods: ``hopper`` (``triton_attn.Tiles()``: the Gluon forward on sm_90), ``tl`` (``Tiles(hopper=False)``: the
portable ``tl`` kernels), ``sdpa`` (torch's fused ops; with ``max_out`` its Triton fallback) and ``torch`` (the
PyTorch reference tiles), and ``call``: the whole one-rank ``burst_attn_func(kernel="auto")`` forward and forward +
backward with and without ``return_max_logit=True`` (auto binds cuDNN without it, runs the Triton tiles with it:
what a user pays). CUDA events, warmup, the median of ``--iters`` (the lower of two such medians, taken
alternately with and without). Prints a table (ms without, ms with, cost %) and writes JSON with the GPU name,
TFLOP/s (forward ``4*B*H*S^2*D``, halved when causal), peak memory and the ratio with / without.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import attn_flops, cuda_time_ms, device_meta, print_table, write_json  # noqa: E402

METHODS = ("hopper", "tl", "sdpa", "torch", "call")


def _call_ops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
              ) -> dict[str, Callable[[torch.Tensor | None], object]]:
    """``burst_attn_func(kernel="auto")`` at one rank, forward and forward + backward; ``max_out`` only says whether
    to ask for the maximum logit."""
    import ds_burst

    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def run(max_out: torch.Tensor | None, grads: bool) -> object:
        with torch.set_grad_enabled(grads):
            got = ds_burst.burst_attn_func(qg, kg, vg, causal=causal, return_max_logit=max_out is not None)
            out = got[0] if isinstance(got, tuple) else got
            if grads:
                out.backward(do)
        return out

    return {"call_fwd": lambda m: run(m, False), "call_fwd_bwd": lambda m: run(m, True)}


def _impl(method: str) -> object:
    """The tile functions of ``method`` (an object with ``fwd_step`` and, where it has one, ``attend``)."""
    if method in ("hopper", "tl"):
        from ds_burst.kernels import triton_attn as ta

        return ta.Tiles(hopper=method == "hopper")
    if method == "sdpa":
        from ds_burst.kernels import sdpa_attn

        return sdpa_attn
    from ds_burst.kernels import reference

    return reference


def _path(method: str, impl: object, q: torch.Tensor, k: torch.Tensor) -> str:
    return impl.path(q, k) if method in ("hopper", "tl") else method  # type: ignore[attr-defined]


def _ops(impl: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kw: dict,
         paths: dict[str, str]) -> dict[str, Callable[[torch.Tensor | None], object]]:
    """``fwd_step`` on a carried state and ``attend`` (or the general path where it returns ``None``), each a
    function of ``max_out``; ``paths`` records what ``attend`` ran."""
    b, s, h, d = q.shape
    out = torch.randn(b, s, h, d, device=q.device) * 0.1
    lse = torch.randn(b, h, s, device=q.device) + 5.0  # a state from earlier keys

    def fwd(max_out: torch.Tensor | None) -> None:
        impl.fwd_step(q, k, v, out, lse, max_out=max_out, **kw)  # type: ignore[attr-defined]

    def attend(max_out: torch.Tensor | None) -> object:
        whole = getattr(impl, "attend", None)
        got = None if whole is None else whole(q, k, v, max_out=max_out, **kw)
        if got is not None:
            paths["with" if max_out is not None else "without"] = "attend"
            return got
        paths["with" if max_out is not None else "without"] = "general"
        o32 = torch.zeros(b, s, h, d, device=q.device)
        l32 = torch.full((b, h, s), -math.inf, device=q.device)
        impl.fwd_step(q, k, v, o32, l32, max_out=max_out, **kw)  # type: ignore[attr-defined]
        return o32.to(q.dtype), l32

    return {"fwd_step": fwd, "attend": attend}


def _measure(fn: Callable[[torch.Tensor | None], object], max_out: torch.Tensor, warmup: int,
             iters: int) -> dict[str, float]:
    """Median ms without and with ``max_out`` (the lower of two medians each, taken alternately) and the peak
    memory of each."""
    best: dict[str, float] = {}
    peak: dict[str, float] = {}
    for _ in range(2):
        for tag, m in (("without", None), ("with", max_out)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = cuda_time_ms(lambda m=m: fn(m), warmup=warmup, iters=iters)
            best[tag] = min(best.get(tag, math.inf), ms)
            peak[tag] = max(peak.get(tag, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    return {"ms_without": best["without"], "ms_with": best["with"], "peak_gib_without": peak["without"],
            "peak_gib_with": peak["with"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/max_logit.json", help="JSON output path")
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_max_logit: needs a CUDA GPU (nothing timed)", file=sys.stderr)
        return 0

    gpu = torch.cuda.get_device_name()
    hh, d = args.heads, args.head_dim
    rows = []
    for s in args.seqs:
        for causal in (True, False):
            g = torch.Generator(device="cuda").manual_seed(s + causal)
            q, k, v = (torch.randn(1, s, hh, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
            max_out = torch.full((1, hh, s), -math.inf, device="cuda")
            flops = attn_flops(1, hh, s, d, causal)
            kw = dict(scale=d**-0.5, causal=causal)
            for method in args.methods:
                impl = None if method == "call" else _impl(method)
                paths: dict[str, str] = {}
                ops = _call_ops(q, k, v, causal) if impl is None else _ops(impl, q, k, v, kw, paths)
                for op, fn in ops.items():
                    path = "auto" if impl is None else _path(method, impl, q, k)
                    row: dict = {"method": method, "op": op, "S": s, "H": hh, "D": d, "causal": causal,
                                 "dtype": "bf16", "gpu": gpu, "path": path}
                    try:
                        row.update(_measure(fn, max_out, args.warmup, args.iters))
                        f = flops * (3.5 if op == "call_fwd_bwd" else 1.0)  # backward: 2.5x the forward
                        row["tflops_without"] = f / row["ms_without"] / 1e9
                        row["tflops_with"] = f / row["ms_with"] / 1e9
                        row["ratio"] = row["ms_with"] / row["ms_without"]
                        row["cost_pct"] = 100.0 * (row["ratio"] - 1.0)
                        if op == "attend":
                            row["path"] += f" ({paths.get('without')} / {paths.get('with')})"
                    except Exception as exc:  # noqa: BLE001 - record the failure in the table
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    rows.append(row)
                    print(row, flush=True)
                torch.cuda.empty_cache()
            del q, k, v, max_out
    print_table(rows, ["method", "op", "S", "causal", "path", "ms_without", "ms_with", "cost_pct", "tflops_with",
                       "peak_gib_with", "error"])
    write_json(args.out, device_meta() | {"command": " ".join(sys.argv)}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
