"""Benchmark the local attention kernels on one GPU against torch SDPA (cuDNN and flash backends).

    python launch/bench_kernels.py --out results/kernels.json [--seqs 8192 32768 131072] [--head-dims 64 128]

For every shape (B=1, H=32, bf16) and causal/non-causal: forward and forward+backward time of
``burst_attn_func(kernel="triton")`` on one process (the same tiles the ring runs; on sm_90 they run the Gluon
Hopper kernels, forward and backward, ``ds-burst-triton-tl`` keeps the portable ``tl`` kernels), of its PyTorch tiles
(``kernel="torch"``, only for S <= 8K) and of SDPA with the cuDNN and flash backends.
TFLOP/s: forward ``4*B*H*S^2*D`` (halved when causal), backward 2.5x forward. Prints a table, writes JSON
and, with matplotlib, a plot next to the JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import attn_flops, cuda_time_ms, device_meta, print_table, pyplot, tl_kernel, write_json  # noqa: E402

SOFTCAP = 30.0
"""The softcap of the ``ds-burst-triton-softcap`` rows (Gemma 2's attention softcap)."""


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal).transpose(1, 2)

    return run


def _burst(kernel, softcap=None):
    import ds_burst

    def run(q, k, v, causal):
        return ds_burst.burst_attn_func(q, k, v, causal=causal, kernel=kernel, softcap=softcap)

    return run


def _time_method(fn, q, k, v, do, causal: bool, flops: float, iters: int) -> dict:
    """Forward and forward+backward times, TFLOP/s and peak memory of one method on one shape."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fwd = cuda_time_ms(lambda: fn(q, k, v, causal), iters=iters)

    def fb():
        fn(q, k, v, causal).backward(do)
        q.grad = k.grad = v.grad = None

    fwdbwd = cuda_time_ms(fb, iters=iters)
    return dict(fwd_ms=fwd, fwd_tflops=flops / fwd / 1e9, fwdbwd_ms=fwdbwd, fwdbwd_tflops=3.5 * flops / fwdbwd / 1e9,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/kernels.json", help="JSON output path (plot saved beside it)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=None, help="subset of the methods to time (default: all)")
    ap.add_argument("--hopper-softcap", action="store_true",
                    help="run softcap on the Hopper kernels even before hopper_common.SOFTCAP_CHECKED (to time them "
                         "in the call that runs their GPU tests)")
    args = ap.parse_args()
    if args.hopper_softcap:
        from ds_burst.kernels import hopper_common

        hopper_common.SOFTCAP_CHECKED = True
    from torch.nn.attention import SDPBackend

    methods = {
        "ds-burst-triton": _burst("triton"),
        "ds-burst-triton-tl": _burst(tl_kernel()),  # the portable tl tiles, forward and backward
        # Gemma 2's logit softcapping (30.0), against ds-burst-triton without it ("softcap_vs_plain")
        "ds-burst-triton-softcap": _burst("triton", softcap=SOFTCAP),
        "ds-burst-torch": _burst("torch"),
        "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    }
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            ap.error(f"unknown methods {unknown}; known: {sorted(methods)}")
        methods = {m: f for m, f in methods.items() if m in args.methods}
    rows = []
    gpu = torch.cuda.get_device_name()
    for d in args.head_dims:
        for s in args.seqs:
            for causal in (False, True):
                shape = (1, s, args.heads, d)
                q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
                flops = attn_flops(1, args.heads, s, d, causal)
                for name, fn in methods.items():
                    if name == "ds-burst-torch" and s > 8192:
                        continue
                    row = {"method": name, "S": s, "D": d, "H": args.heads, "causal": causal, "gpu": gpu}
                    try:
                        row.update(_time_method(fn, q, k, v, do, causal, flops, args.iters))
                    except Exception as exc:  # noqa: BLE001 - record the failure in the table
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    rows.append(row)
                    print(row, flush=True)
                del q, k, v, do
    # ratios against the peers measured in the same run
    for r in rows:
        ratios = {f"fwdbwd_vs_{peer}": _ratio(rows, r, peer) for peer in ("sdpa-cudnn", "sdpa-flash")}
        if r["method"] == "ds-burst-triton-softcap":  # its rate against the plain kernel's
            ratios["softcap_vs_plain"] = _ratio(rows, r, "ds-burst-triton")
        r.update({k: v for k, v in ratios.items() if v is not None})
    cols = ["method", "S", "D", "causal", "fwd_ms", "fwd_tflops", "fwdbwd_ms", "fwdbwd_tflops", "peak_gib",
            "fwdbwd_vs_sdpa-cudnn", "fwdbwd_vs_sdpa-flash", "softcap_vs_plain", "error"]
    print_table(rows, cols)
    meta = device_meta() | {"command": " ".join(sys.argv), "hopper_softcap": args.hopper_softcap}
    write_json(args.out, meta, rows)
    _plot(rows, os.path.splitext(args.out)[0] + ".png")


def _ratio(rows: list[dict], r: dict, peer: str) -> float | None:
    """``peer``'s forward+backward time over row ``r``'s at the same shape in the same run (``None`` where either
    did not run)."""
    p = next((x for x in rows if x["method"] == peer and (x["S"], x["D"], x["causal"]) == (r["S"], r["D"], r["causal"])
              and "fwdbwd_ms" in x), None)
    return p["fwdbwd_ms"] / r["fwdbwd_ms"] if p is not None and "fwdbwd_ms" in r else None


def _plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    combos = sorted({(r["D"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.5 * len(combos), 3.6), squeeze=False)
    for ax, (d, causal) in zip(axes[0], combos):
        for m in sorted({r["method"] for r in rows}):
            pts = sorted((r["S"], r["fwdbwd_tflops"]) for r in rows
                         if r["method"] == m and r["D"] == d and r["causal"] == causal and "fwdbwd_tflops" in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_title(f"D={d} {'causal' if causal else 'full'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("fwd+bwd TFLOP/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
