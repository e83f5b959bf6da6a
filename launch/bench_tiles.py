"""Time the local tiles on the block shapes a ring step hands them, on one GPU.

    python launch/bench_tiles.py --out results/tiles.json [--seqs 16384 32768 65536] [--heads 16]

For each local size S (B=1, bf16, D=128, Hq=Hkv=heads) and each tile kind a ring step produces:

* ``square-causal``: the diagonal step (q and k at the same global offset, causal);
* ``past-full``: a step whose keys all precede the queries (offsets S apart, causal, every pair visible);
* ``zigzag-halves``: the zigzag layout's late query half against an early key half (S/2 x S/2, offsets);
* ``window``: a sliding window of 4096 keys to the left, at offsets (causal);

times ``triton_attn.fwd_step`` and ``bwd_step`` (backward TFLOP/s: 2.5x the forward's FLOPs) with the Gluon
Hopper kernels (``hopper``: ``kernels/hopper_attn.py`` and ``hopper_attn_bwd.py``) and with the portable ``tl``
kernels (``tl``: ``triton_attn.Tiles(hopper=False)``; ``tl-det``: its ``deterministic=True`` backward), and, on
the square tiles, torch SDPA's cuDNN and flash forward. TFLOP/s count visible (query, key) pairs only. Prints a
table, writes JSON (and a bar plot beside it, with matplotlib).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import cuda_time_ms, device_meta, print_table, pyplot, write_json  # noqa: E402


def _pairs(sq: int, sk: int, q_off: int, k_off: int, causal: bool, window: tuple[int, int]) -> int:
    """Visible (query, key) pairs of a tile (exact count from the mask, by rows)."""
    from ds_burst.core.mask import window_bounds

    lo, hi = window_bounds(causal, window)
    i = torch.arange(sq, dtype=torch.float64) + q_off - k_off  # key index of the diagonal, per row
    first = torch.zeros(sq, dtype=torch.float64) if lo == math.inf else (i - lo).clamp(min=0)
    last = torch.full((sq,), sk - 1.0, dtype=torch.float64) if hi == math.inf else (i + hi).clamp(max=sk - 1)
    return int((last - first + 1).clamp(min=0).sum().item())


def _tiles(s: int) -> list[dict]:
    h = s // 2
    return [
        dict(kind="square-causal", sq=s, sk=s, q_off=0, k_off=0, causal=True, window=(-1, -1)),
        dict(kind="past-full", sq=s, sk=s, q_off=s, k_off=0, causal=True, window=(-1, -1)),
        dict(kind="zigzag-halves", sq=h, sk=h, q_off=3 * s + h, k_off=s, causal=True, window=(-1, -1)),
        dict(kind="window", sq=s, sk=s, q_off=s, k_off=s, causal=True, window=(4096, 0)),
    ]


def _time_tile(t: dict, s: int, hh: int, d: int, iters: int, gpu: str) -> list[dict]:
    """Rows for one tile kind: the Hopper kernels, the ``tl`` kernels and (square tiles, forward) cuDNN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ds_burst.kernels import triton_attn as ta

    q = torch.randn(1, t["sq"], hh, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, t["sk"], hh, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.zeros(1, t["sq"], hh, d, device="cuda")
    lse = torch.full((1, hh, t["sq"]), -math.inf, device="cuda")
    flops = 4.0 * hh * d * _pairs(t["sq"], t["sk"], t["q_off"], t["k_off"], t["causal"], t["window"])
    kw = dict(scale=d ** -0.5, q_offset=t["q_off"], k_offset=t["k_off"], causal=t["causal"], window=t["window"])

    def tiles(use: bool):
        fwd = ta.Tiles(hopper=use).fwd_step
        return lambda: fwd(q, k, v, out, lse, **kw)

    def backward(use: bool, det: bool = False):
        bwd = ta.Tiles(hopper=use).bwd_step
        return lambda: bwd(q, k, v, dout, lse, delta, dq, dk, dv, deterministic=det, **kw)

    def sdpa(backend: SDPBackend):
        def run() -> None:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=t["causal"])
        return run

    methods = {"hopper": tiles(True), "tl": tiles(False)}
    if t["q_off"] == t["k_off"] and t["window"] == (-1, -1):
        methods["sdpa-cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        methods["sdpa-flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    shape = {"tile": t["kind"], "S": s, "sq": t["sq"], "sk": t["sk"], "H": hh, "D": d, "gpu": gpu}
    rows = []
    for name, fn in methods.items():
        row = {"method": name, **shape}
        try:
            out.zero_(), lse.fill_(-math.inf)
            ms = cuda_time_ms(fn, warmup=1, iters=iters)
            row.update(fwd_ms=ms, fwd_tflops=flops / ms / 1e9)
        except Exception as exc:  # noqa: BLE001 - record the failure in the table
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rows.append(row)
    # backward of the same tile: lse from one forward, delta from its output
    out.zero_(), lse.fill_(-math.inf)
    ta.fwd_step(q, k, v, out, lse, **kw)
    dout = torch.randn_like(q)
    delta = ta.bwd_preprocess(out.to(q.dtype), dout)
    dq, dk, dv = torch.zeros_like(out), torch.zeros(k.shape, device="cuda"), torch.zeros(v.shape, device="cuda")
    bwd = {"hopper": backward(True), "tl": backward(False), "tl-det": backward(False, det=True)}
    for name, fn in bwd.items():
        row = next((r for r in rows if r["method"] == name), None)
        if row is None:
            row = {"method": name, **shape}
            rows.append(row)
        try:
            ms = cuda_time_ms(fn, warmup=1, iters=iters)
            row.update(bwd_ms=ms, bwd_tflops=2.5 * flops / ms / 1e9)
        except Exception as exc:  # noqa: BLE001 - record the failure in the table
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/tiles.json", help="JSON output path (plot saved beside it)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--tiles", nargs="+", default=None, help="subset of the tile kinds (default: all)")
    args = ap.parse_args()

    gpu = torch.cuda.get_device_name()
    rows = []
    for s in args.seqs:
        for t in _tiles(s):
            if args.tiles and t["kind"] not in args.tiles:
                continue
            rows += _time_tile(t, s, args.heads, args.head_dim, args.iters, gpu)
    for r in rows:  # ratio to the hopper kernel's square-causal tile of the same size (the plain tile)
        base = next((x for x in rows if x["method"] == r["method"] and x["S"] == r["S"]
                     and x["tile"] == "square-causal" and "fwd_tflops" in x), None)
        if base and "fwd_tflops" in r:
            r["vs_square"] = r["fwd_tflops"] / base["fwd_tflops"]
    print_table(rows, ["method", "tile", "S", "sq", "sk", "fwd_ms", "fwd_tflops", "vs_square", "bwd_ms", "bwd_tflops",
                       "error"])
    write_json(args.out, device_meta() | {"command": " ".join(sys.argv)}, rows)
    _plot(rows, os.path.splitext(args.out)[0] + ".png")


def _plot(rows: list[dict], path: str) -> None:
    """Bars of forward (top) and backward (bottom) TFLOP/s per tile kind, one column per local size."""
    plt = pyplot()
    if plt is None:
        return
    seqs = sorted({r["S"] for r in rows})
    methods = [m for m in ("hopper", "tl", "tl-det", "sdpa-cudnn", "sdpa-flash") if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(2, len(seqs), figsize=(4.8 * len(seqs), 6.4), squeeze=False)
    width = 0.8 / len(methods)
    for col, s in enumerate(seqs):
        kinds = [t["kind"] for t in _tiles(s) if any(r["tile"] == t["kind"] and r["S"] == s for r in rows)]
        for row, key in enumerate(("fwd_tflops", "bwd_tflops")):
            ax = axes[row][col]
            for j, m in enumerate(methods):
                ys = [next((r[key] for r in rows if r["method"] == m and r["S"] == s and r["tile"] == kd
                            and key in r), 0.0) for kd in kinds]
                ax.bar([i + width * j for i in range(len(kinds))], ys, width=width, label=m)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds, rotation=20, fontsize=7)
            ax.set_title(f"local S={s}: {'forward' if row == 0 else 'backward'}")
            ax.set_ylabel(f"{'fwd' if row == 0 else 'bwd'} TFLOP/s")
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
