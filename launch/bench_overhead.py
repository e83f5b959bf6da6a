"""What one ``burst_attn_func`` call costs beyond its tiles, on one GPU (P=1, no ring), against raw SDPA.

    python launch/bench_overhead.py --out results/overhead.json [--seqs 2048 8192 32768] [--kernels auto sdpa triton]

For each S: forward+backward time of torch SDPA with the cuDNN backend (``enable_gqa``, the peer; measured first
and again last), of aten's cuDNN attention op called directly (what ds-burst's one-rank path calls) and of
``burst_attn_func`` with each kernel, in the same run; the ratio peer/ds-burst (> 1: ds-burst faster); and the host
time of one forward call (CPU seconds to issue it, averaged over calls issued back to back without a sync, after
warm-up: what the CPU spends per call while the GPU runs). Prints a table and writes JSON (method, shape, GPU,
ms, TFLOP/s, peak memory, ratio to the peer).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from bench_common import attn_flops, cuda_time_ms, device_meta, host_us, print_table, write_json

COLUMNS = ["method", "S", "ms", "tflops", "vs_sdpa_cudnn", "host_us_fwd", "host_us_fwd_nograd", "peak_gib", "error"]


def bench_shape(s: int, hq: int, hkv: int, d: int, kernels: list[str], iters: int) -> list[dict]:
    """Rows of one sequence length: the peer first, then ds-burst with each kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import ds_burst

    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(s)
    q = torch.randn(1, s, hq, d, device=dev, dtype=dt, generator=g).requires_grad_()
    k = torch.randn(1, s, hkv, d, device=dev, dtype=dt, generator=g).requires_grad_()
    v = torch.randn(1, s, hkv, d, device=dev, dtype=dt, generator=g).requires_grad_()
    do = torch.randn(1, s, hq, d, device=dev, dtype=dt, generator=g)
    flops = attn_flops(1, hq, s, d, True) * 3.5  # fwd + bwd (2.5x)

    def peer_fwd() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True).transpose(1, 2)

    def aten_cudnn() -> torch.Tensor:  # diagnostic: the fused op ds-burst's one-rank path calls, called directly
        o = torch.ops.aten._scaled_dot_product_cudnn_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                              None, True, 0.0, True, False, scale=d**-0.5)[0]
        return o.transpose(1, 2)

    def burst(name: str):
        return lambda: ds_burst.burst_attn_func(q, k, v, causal=True, kernel=name)

    methods = [("sdpa-cudnn", peer_fwd), ("aten-cudnn", aten_cudnn)] + [(f"ds-burst-{n}", burst(n)) for n in kernels]
    methods.append(("sdpa-cudnn-again", peer_fwd))  # the peer once more: drift of the GPU within the run
    rows, peer_ms = [], None
    for method, fwd in methods:
        row = {"method": method, "S": s, "Hq": hq, "Hkv": hkv, "D": d, "gpu": torch.cuda.get_device_name()}
        try:
            torch.cuda.reset_peak_memory_stats()
            ms = cuda_time_ms(lambda fwd=fwd: fwd().backward(do), warmup=3, iters=iters)
            row.update(ms=ms, tflops=flops / ms / 1e9, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            with torch.no_grad():
                row["host_us_fwd_nograd"] = host_us(fwd)
            row["host_us_fwd"] = host_us(fwd)
            if method == "sdpa-cudnn":
                peer_ms = ms
            row["vs_sdpa_cudnn"] = peer_ms / ms if peer_ms else None
        except Exception as exc:  # noqa: BLE001 - record and go on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        q.grad = k.grad = v.grad = None
        rows.append(row)
        print_table([row], COLUMNS)
    return rows


def profile_calls(s: int, hq: int, hkv: int, d: int, calls: int) -> None:
    """cProfile of ``calls`` fwd+bwd calls of ``burst_attn_func`` (kernel auto) at one shape: where the host goes."""
    import cProfile
    import pstats

    import ds_burst

    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(1, s, hq, d, device=dev, dtype=dt).requires_grad_()
    k, v = (torch.randn(1, s, hkv, d, device=dev, dtype=dt).requires_grad_() for _ in range(2))
    do = torch.randn(1, s, hq, d, device=dev, dtype=dt)
    step = lambda: ds_burst.burst_attn_func(q, k, v, causal=True).backward(do)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    torch.cuda.synchronize()
    print(f"# cProfile: {calls} fwd+bwd calls of burst_attn_func at S={s} (kernel auto)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kernels", nargs="+", default=["auto", "sdpa", "triton"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="results/overhead.json")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print a cProfile of N ds-burst-auto fwd+bwd calls at the first S (host time)")
    args = ap.parse_args(argv)
    rows = []
    for s in args.seqs:
        rows += bench_shape(s, args.heads, args.kv_heads, args.head_dim, args.kernels, args.iters)
    if args.profile:
        profile_calls(args.seqs[0], args.heads, args.kv_heads, args.head_dim, args.profile)
    print()
    print_table(rows, COLUMNS)
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    write_json(args.out, {**device_meta(), "command": "python launch/bench_overhead.py " + cmd,
                          "causal": True, "dtype": "bf16", "B": 1}, rows)


if __name__ == "__main__":
    main()
