"""Packed documents on one GPU: the local attention of a packed sequence, ds-burst against its peers.

    python launch/bench_documents.py --out results/bench_documents.json           # one H200
    python launch/bench_documents.py --dry-run --out /tmp/docs.json               # tiny shapes on CPU

Shapes: 32K tokens in 8 documents of 1K-8K, 128K tokens in 11 documents of 2K-32K; B=1, Hq=32, Hkv=8, D=128,
bf16, causal inside every document. Methods (forward + backward of one call):

* ``ds-burst triton`` / ``ds-burst sdpa`` / ``ds-burst auto``: ``burst_attn_func(..., cu_seqlens=cu)`` at P=1
  with that kernel (the step plan cuts the tiles at the document boundaries);
* ``flex document mask``: ``torch.nn.attention.flex_attention`` (compiled) with a ``create_block_mask`` document
  mask (causal and same document);
* ``cudnn per document``: cuDNN SDPA (``is_causal``) called once per document.

TFLOP/s count useful work only: forward ``4 * Hq * D * sum_d L_d (L_d + 1) / 2`` per row, backward 2.5x the
forward. Every method runs in its own ``try``; a failure (out of memory, missing backend) is recorded in its row.
The JSON (``--out``) holds per row: method, shape, GPU, ms, TFLOP/s, peak memory, the largest difference from the
per-document cuDNN output, and the ratio of its TFLOP/s to the best peer of the same shape.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import device_meta, print_table, write_json  # noqa: E402

SHAPES = {
    "32k": [8192, 1024, 6144, 2048, 4096, 3072, 5120, 3072],
    "128k": [32768, 2048, 16384, 8192, 24576, 4096, 12288, 2048, 20480, 6144, 2048],
}
DRY_SHAPES = {"dry": [64, 8, 1, 120, 40, 23]}
PEERS = ("flex document mask", "cudnn per document")


def boundaries(lengths: list[int]) -> list[int]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def useful_flops(lengths: list[int], batch: int, hq: int, d: int) -> float:
    """Forward + backward FLOPs of causal attention inside each document (backward 2.5x the forward)."""
    fwd = 4.0 * batch * hq * d * sum(n * (n + 1) / 2 for n in lengths)
    return 3.5 * fwd


def time_ms(fn: Callable[[], object], cuda: bool, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


# --- methods: each returns a function (q, k, v) -> out in [B, S, H, D] ----------------------------------------
def burst_method(kernel: str, cu: list[int]) -> Callable:
    import ds_burst

    cu_cpu = torch.tensor(cu, dtype=torch.int64)  # on the host: no device sync per call

    def run(q, k, v):
        return ds_burst.burst_attn_func(q, k, v, causal=True, kernel=kernel, cu_seqlens=cu_cpu)

    return run


def flex_method(cu: list[int], seq: int, device: torch.device, compile_flex: bool) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.zeros(seq, dtype=torch.int32, device=device)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        doc[a:b] = i

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    try:  # compiled mask construction: no dense S x S mask (the eager one runs out of memory at 128K)
        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq, KV_LEN=seq, device=str(device),
                                       _compile=device.type == "cuda")
    except TypeError:
        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq, KV_LEN=seq, device=str(device))
    flex = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention

    def run(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=True)
        return out.transpose(1, 2)

    return run


def cudnn_loop_method(cu: list[int], cuda: bool) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION] if cuda else [SDPBackend.MATH]

    gqa = {"native": True}

    def attend(qq, kk, vv):
        if gqa["native"]:
            try:
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            except RuntimeError:  # this backend has no GQA: repeat K/V heads from now on
                gqa["native"] = False
        rep = qq.shape[1] // kk.shape[1]
        kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)

    def run(q, k, v):
        outs = []
        with sdpa_kernel(backends):
            for a, b in zip(cu, cu[1:]):
                outs.append(attend(*(x[:, a:b].transpose(1, 2) for x in (q, k, v))))
        return torch.cat([o.transpose(1, 2) for o in outs], 1)

    return run


def bench_shape(name: str, lengths: list[int], args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> list[dict]:
    cuda = device.type == "cuda"
    seq, cu = sum(lengths), boundaries(lengths)
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda h: torch.randn(args.batch, seq, h, args.head_dim, generator=g).to(device, dtype)  # noqa: E731
    q, k, v, do = mk(args.hq), mk(args.hkv), mk(args.hkv), mk(args.hq)
    flops = useful_flops(lengths, args.batch, args.hq, args.head_dim)
    methods: list[tuple[str, Callable[[], Callable]]] = [
        ("cudnn per document", lambda: cudnn_loop_method(cu, cuda)),
        ("flex document mask", lambda: flex_method(cu, seq, device, not args.no_compile)),
        ("ds-burst triton", lambda: burst_method("triton", cu)),
        ("ds-burst sdpa", lambda: burst_method("sdpa", cu)),
        ("ds-burst auto", lambda: burst_method("auto", cu)),
    ]
    ref = None
    rows = []
    for method, make in methods:
        row: dict = {"method": method, "shape": name, "S": seq, "documents": len(lengths), "B": args.batch,
                     "Hq": args.hq, "Hkv": args.hkv, "D": args.head_dim, "dtype": str(dtype).replace("torch.", ""),
                     "gpu": torch.cuda.get_device_name() if cuda else "cpu"}
        try:
            fn = make()
            qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))

            def step(fn=fn, qq=qq, kk=kk, vv=vv):
                qq.grad = kk.grad = vv.grad = None
                out = fn(qq, kk, vv)
                out.backward(do)
                return out

            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            out = step().detach()
            if ref is None:
                ref = out.float()
            row["max_abs_diff_vs_cudnn_loop"] = float((out.float() - ref).abs().max())
            ms = time_ms(step, cuda, args.warmup, args.iters)
            row["ms"] = ms
            row["tflops"] = flops / ms / 1e9
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        except Exception as exc:  # noqa: BLE001 - record any failure (OOM, missing backend) and go on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
    best_peer = max((r.get("tflops") or 0.0 for r in rows if r["method"] in PEERS), default=0.0)
    for r in rows:
        r["ratio_to_best_peer"] = r["tflops"] / best_peer if r.get("tflops") and best_peer else None
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/bench_documents.json", help="JSON output path")
    p.add_argument("--shapes", default="32k,128k", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="run FlexAttention eagerly (slow; for debugging)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the CPU (fp32, Hq=4, Hkv=2, D=16, one iteration): checks the script only")
    p.add_argument("--verbose", action="store_true", help="print the traceback of failing methods")
    args = p.parse_args(argv)
    if args.dry_run:
        device, dtype, shapes = torch.device("cpu"), torch.float32, DRY_SHAPES
        args.hq, args.hkv, args.head_dim, args.warmup, args.iters, args.no_compile = 4, 2, 16, 0, 1, True
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton tiles under the interpreter
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (use --dry-run to check the script on the CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        names = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = sorted(set(names) - set(SHAPES))
        if unknown:
            raise SystemExit(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
        shapes = {n: SHAPES[n] for n in names}
    rows = []
    for name, lengths in shapes.items():
        rows += bench_shape(name, lengths, args, device, dtype)
        print_table([r for r in rows if r["shape"] == name],
                    ["method", "shape", "S", "documents", "ms", "tflops", "peak_mem_gib", "ratio_to_best_peer",
                     "max_abs_diff_vs_cudnn_loop", "error"])
    meta = device_meta() | {"what": "packed documents, local attention fwd+bwd, useful TFLOP/s",
                            "documents": dict(shapes)}
    write_json(args.out, meta, rows)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
