"""Measure the cost model's figures on this machine and write them to a calibration JSON.

    torchrun --nproc_per_node N -m ds_burst.plan calibrate --out calib.json [--gpus-per-node L]
    python -m ds_burst.plan --seq 131072 --nodes 1 --gpus-per-node N --calibration calib.json

What it measures (every rank at once; each figure is the median over iterations of the slowest rank):

* the local kernel (``--kernel``, default the one ``kernel="auto"`` runs) on the two tiles of a zigzag causal
  ring with ``--tile-tokens`` local tokens ``s``: the diagonal step (``s`` queries against their own ``s``
  keys, causal mask) and a later step (``s`` queries against ``s/2`` earlier keys, nothing masked); forward
  ``fwd_step`` and backward ``bwd_step`` alone, TFLOP/s with the project's counts (forward ``4*B*H*Sq*Sk*D``,
  halved on the diagonal; backward 2.5x) -> ``fwd_tflops``, ``bwd_tflops``, ``fwd_tflops_full``,
  ``bwd_tflops_full``;
* the ring step inside a node (every rank sends ``--p2p-mib`` MiB to the next rank of its node while
  receiving from the previous one, all nodes at once) -> ``intra_gbps``; the same with a 4 KiB message ->
  ``intra_latency_s``; bandwidth = bytes / (large-message time - small-message time);
* with several nodes (ranks ``[n*L, (n+1)*L)`` form node ``n``; ``--gpus-per-node`` below the world size
  simulates nodes): the same step between ranks of equal local index on consecutive nodes (all rails at once)
  -> ``inter_gbps``, ``inter_latency_s``;
* all-to-all of ``--p2p-mib`` MiB per rank inside each node -> ``a2a_intra_gbps`` and over all ranks when
  there are several nodes -> ``a2a_inter_gbps`` (bus bandwidth: bytes * (n-1)/n / time).

``--tiles`` (one process) measures the kernel term's table instead, written as a tile-rates file
(:mod:`ds_burst.core.tile_rates`) for ``--head-dims``: for each length ``s`` of ``--sizes`` the ``diag`` and ``step``
tiles above with every kernel of ``--kernels`` (CUDA ``triton sdpa``, CPU ``torch``), ds-burst's whole one-rank call
(``whole``, kernels ``--whole-kernels``: CUDA ``auto triton``, CPU ``torch``) and torch SDPA's causal call
(``peer``: cuDNN on CUDA), forward and backward (fwd+bwd minus fwd for the whole calls), each call timed back to
back with the others of its sample (as the engine issues them: a short tile's launch overlaps the previous one's
work). Above ``--full-heads-tokens`` tokens the whole calls' heads shrink in proportion (``max(1, H * full / s)``),
as a Ulysses rank's do; the ring tiles keep every head up to ``--ring-heads-tokens``. That keeps each measurement
short::

    python -m ds_burst.plan calibrate --tiles --out docs/results/tiles_h100.json

Figures a run cannot measure (one rank per node: no intra-node link; one node: no inter-node link) are left
out of the file, and ``--calibration`` keeps the defaults for them (listed in ``meta.not_measured``).
On CUDA the ranks use NCCL, bf16 and Triton's fixed tile configurations (``DS_BURST_TRITON_AUTOTUNE=0``
unless set; autotuning every configuration takes minutes); on CPU gloo, float32 and tiny default shapes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ds_burst.core import settings
from ds_burst.core.cost_model import HARDWARE_FIELDS
from ds_burst.dist.comm import GroupInfo, P2PBatch
from ds_burst.kernels.contract import TileKernel

FORMAT = "ds-burst-calibration/1"
SMALL_MSG_BYTES = 4096
CUDA_DEFAULTS = {"tile_tokens": 16384, "heads": 32, "head_dim": 128, "dtype": "bfloat16", "p2p_mib": 256.0,
                 "iters": 5}
CPU_DEFAULTS = {"tile_tokens": 256, "heads": 4, "head_dim": 32, "dtype": "float32", "p2p_mib": 4.0, "iters": 3}
TILE_DEFAULTS = {"cuda": {"sizes": [2**i for i in range(10, 18)], "kernels": ["triton", "sdpa"],
                          "whole_kernels": ["auto", "triton"], "head_dims": [128, 64]},
                 "cpu": {"sizes": [64, 128, 256], "kernels": ["torch"], "whole_kernels": ["torch"], "head_dims": [32]}}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 1,
           before: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` calls (``before`` runs untimed)."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        if before:
            before()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _throughput_times(fn: Callable[[], object], device: torch.device, iters: int,
                      batch_s: float = 0.02) -> list[float]:
    """Seconds per call of ``fn`` run back to back, as the engine issues its tiles: each of ``iters`` samples times
    enough calls between two synchronisations to fill about ``batch_s`` seconds, so a short tile's launch latency
    overlaps the previous call's work instead of being counted once per call."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    reps = max(1, min(1000, int(batch_s / max(time.perf_counter() - t0, 1e-6))))
    out = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t0) / reps)
    return out


def _slowest(values: list[float], device: torch.device) -> float:
    """Per-position maximum over the ranks, then the median (one value per iteration in ``values``)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        values = t.tolist()
    return statistics.median(values)


def _tile_seconds(mod: TileKernel, device: torch.device, dtype: torch.dtype, sq: int, sk: int, q_offset: int,
                  heads: int, kv_heads: int, head_dim: int, iters: int,
                  throughput: bool = False) -> tuple[list[float], list[float]]:
    """Per-iteration seconds of ``fwd_step`` and ``bwd_step`` on one tile (causal mask by global position);
    ``throughput``: per call of calls run back to back (:func:`_throughput_times`)."""
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=gen)
    q, dout = rnd(1, sq, heads, head_dim), rnd(1, sq, heads, head_dim)
    k, v = rnd(1, sk, kv_heads, head_dim), rnd(1, sk, kv_heads, head_dim)
    out = torch.zeros(1, sq, heads, head_dim, device=device, dtype=torch.float32)
    lse = torch.full((1, heads, sq), -math.inf, device=device, dtype=torch.float32)
    mask = dict(scale=head_dim**-0.5, q_offset=q_offset, k_offset=0, causal=True)

    def reset() -> None:
        out.zero_()
        lse.fill_(-math.inf)

    if throughput:  # back to back, the state accumulating (the engine's ring steps); else one call per sample
        fwd = _throughput_times(lambda: mod.fwd_step(q, k, v, out, lse, **mask), device, iters)
    else:
        fwd = _times(lambda: mod.fwd_step(q, k, v, out, lse, **mask), device, iters, before=reset)
    reset()
    mod.fwd_step(q, k, v, out, lse, **mask)
    out_in = out.to(dtype)
    delta = mod.bwd_preprocess(out_in, dout)
    grads = [torch.zeros(x.shape, device=device, dtype=torch.float32) for x in (q, k, v)]
    run_bwd = lambda: mod.bwd_step(q, k, v, dout, lse, delta, *grads, **mask, out=out_in)  # noqa: E731
    bwd = _throughput_times(run_bwd, device, iters) if throughput else _times(run_bwd, device, iters)
    return fwd, bwd


def measure_kernel(kernel: str, device: torch.device, dtype: torch.dtype, tokens: int, heads: int, kv_heads: int,
                   head_dim: int, iters: int) -> dict:
    """Forward/backward seconds and TFLOP/s of the local kernel on the diagonal (causal) and a later
    (unmasked) zigzag ring tile; the slowest rank's median when torch.distributed is initialised."""
    from ds_burst.kernels import registry

    name = registry.resolve(kernel, device, dtype)
    mod = registry.get(name).impl
    if tokens < 2 or tokens % 2:
        raise ValueError(f"--tile-tokens must be an even number >= 2, got {tokens}")
    res: dict = {"kernel": name}
    # diagonal: s queries against their own s keys (causal); later step: s queries after s/2 keys (all visible)
    for tile, sq, sk, q_off in (("causal", tokens, tokens, 0), ("full", tokens, tokens // 2, tokens)):
        fwd, bwd = _tile_seconds(mod, device, dtype, sq, sk, q_off, heads, kv_heads, head_dim, iters)
        fwd_s, bwd_s = _slowest(fwd, device), _slowest(bwd, device)
        flops = 4.0 * heads * sq * sk * head_dim * (0.5 if tile == "causal" else 1.0)
        res[tile] = {"q_tokens": sq, "k_tokens": sk, "q_offset": q_off, "fwd_ms": fwd_s * 1e3, "bwd_ms": bwd_s * 1e3,
                     "fwd_tflops": flops / fwd_s / 1e12, "bwd_tflops": 2.5 * flops / bwd_s / 1e12}
    return res


def _whole_seconds(fn: Callable[[], torch.Tensor], dout: torch.Tensor, leaves: list[torch.Tensor],
                   device: torch.device, iters: int) -> tuple[float, float]:
    """Median ``(forward, backward)`` seconds of a whole attention call: forward alone under no_grad, backward as
    forward+backward minus forward."""
    def fb() -> None:
        fn().backward(dout)
        for t in leaves:
            t.grad = None

    with torch.no_grad():
        fwd = statistics.median(_throughput_times(fn, device, iters))
    fwdbwd = statistics.median(_throughput_times(fb, device, iters))
    return fwd, max(fwdbwd - fwd, 1e-9)


def measure_tiles(device: torch.device, dtype: torch.dtype, sizes: list[int], heads: int, kv_heads: int,
                  head_dim: int, iters: int, kernels: list[str], whole_kernels: list[str],
                  full_heads_tokens: int, ring_heads_tokens: int | None = None) -> tuple[dict, list[dict]]:
    """The ``curves`` of one tile-rates table and the raw rows (ms, heads, FLOPs) behind them."""
    from ds_burst.kernels import registry

    curves: dict[str, dict[str, list[dict]]] = {}
    rows: list[dict] = []
    ring_heads_tokens = ring_heads_tokens or full_heads_tokens

    def add(kind: str, kern: str, tokens: int, h: int, flops: float, fwd_s: float, bwd_s: float) -> None:
        point = {"tokens": tokens, "fwd_tflops": flops / fwd_s / 1e12, "bwd_tflops": 2.5 * flops / bwd_s / 1e12}
        curves.setdefault(kind, {}).setdefault(kern, []).append(point)
        rows.append({"kind": kind, "kernel": kern, "tokens": tokens, "heads": h, "fwd_ms": fwd_s * 1e3,
                     "bwd_ms": bwd_s * 1e3, "flops": flops} | point)

    def shrink(s: int, full: int) -> tuple[int, int]:  # heads above ``full`` tokens: in proportion, GQA kept
        h = max(1, heads * full // s) if s > full else heads
        h -= h % max(1, heads // kv_heads) if h >= heads // kv_heads else 0
        return h, max(1, h * kv_heads // heads)

    for s in sizes:
        hr, hkr = shrink(s, ring_heads_tokens)  # a ring rank keeps every head
        for kern in kernels:
            mod = registry.get(kern).impl
            for kind, sq, sk, q_off in (("diag", s, s, 0), ("step", s, s // 2, s)):
                fwd, bwd = _tile_seconds(mod, device, dtype, sq, sk, q_off, hr, hkr, head_dim, iters, True)
                flops = 4.0 * hr * sq * sk * head_dim * (0.5 if kind == "diag" else 1.0)
                add(kind, kern, s, hr, flops, statistics.median(fwd), statistics.median(bwd))
        h, hk = shrink(s, full_heads_tokens)  # a Ulysses rank holds H/P heads of the whole sequence
        for kind, kern, fwd_s, bwd_s in _whole_calls(device, dtype, s, h, hk, head_dim, iters, whole_kernels):
            add(kind, kern, s, h, 4.0 * h * s * s * head_dim * 0.5, fwd_s, bwd_s)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return curves, rows


def _whole_calls(device: torch.device, dtype: torch.dtype, s: int, h: int, hk: int, head_dim: int, iters: int,
                 whole_kernels: list[str]) -> list[tuple[str, str, float, float]]:
    """``(kind, kernel, fwd s, bwd s)`` of ds-burst's whole one-rank causal call with each of ``whole_kernels`` and of
    torch SDPA's (cuDNN on CUDA) on ``s`` tokens, ``h`` query and ``hk`` KV heads."""
    import contextlib

    import torch.nn.functional as F

    from ds_burst.attention.api import burst_attn_func

    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, s, n, head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()
               for n in (h, hk, hk))
    dout = torch.randn_like(q)
    got = []
    for kern in whole_kernels:
        fn = functools.partial(burst_attn_func, q, k, v, causal=True, kernel=kern)
        fn().backward(dout)  # plan, kernel choice, compilation
        got.append(("whole", kern, *_whole_seconds(fn, dout, [q, k, v], device, iters)))
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dt = dout.transpose(1, 2).contiguous()
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx, peer = functools.partial(sdpa_kernel, [SDPBackend.CUDNN_ATTENTION]), "cudnn"
    else:
        ctx, peer = contextlib.nullcontext, "sdpa-cpu"

    def run_peer() -> torch.Tensor:
        with ctx():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=hk != h)

    run_peer().backward(dt)
    got.append(("peer", peer, *_whole_seconds(run_peer, dt, [qt, kt, vt], device, iters)))
    return got


def calibrate_tiles(args: argparse.Namespace, device: torch.device) -> dict:
    """The tile-rates document of ``--tiles`` (one table per head dim)."""
    from ds_burst.core.tile_rates import TILE_RATES_FORMAT, from_dict

    t_start = time.perf_counter()
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("--tiles measures one GPU: run it as one process (python -m ds_burst.plan calibrate)")
    dtype = DTYPES[args.dtype]
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise ValueError(f"--heads {args.heads} must be divisible by --kv-heads {kv_heads}")
    if any(s < 2 or s % 2 for s in args.sizes):
        raise ValueError(f"--sizes must be even numbers >= 2, got {args.sizes}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tables = []
    for d in args.head_dims:
        curves, rows = measure_tiles(device, dtype, sorted(args.sizes), args.heads, kv_heads, d, args.iters,
                                     args.kernels, args.whole_kernels, args.full_heads_tokens,
                                     args.ring_heads_tokens)
        table = {"head_dim": d, "dtype": args.dtype, "curves": curves, "measurements": rows}
        from_dict({"format": TILE_RATES_FORMAT, "gpu": gpu} | table, "measured table")  # well formed
        tables.append(table)
    meta = _run_meta(t_start, device=gpu, heads=args.heads, kv_heads=kv_heads,
                     full_heads_tokens=args.full_heads_tokens, ring_heads_tokens=args.ring_heads_tokens,
                     iters=args.iters, timing="back to back, about 20 ms of calls per sample")
    return {"format": TILE_RATES_FORMAT, "gpu": gpu, "meta": meta, "tables": tables}


def _ring_step(info: GroupInfo, nbytes: int, device: torch.device, iters: int) -> float:
    """Slowest-rank median seconds of one ring step (send ``nbytes`` to the next rank, receive from the
    previous) in ``info``'s group, every group of the world at once."""
    n = max(1, nbytes // 4)
    send = torch.ones(n, dtype=torch.float32, device=device)
    recv = torch.empty_like(send)
    nxt, prv = (info.rank + 1) % info.world, (info.rank - 1) % info.world

    def step() -> None:
        batch = P2PBatch(info, "calibrate")
        batch.recv(recv, prv)
        batch.send(send, nxt)
        batch.commit().wait()

    return _slowest(_times(step, device, iters, warmup=2, before=dist.barrier), device)


def _all_to_all(info: GroupInfo, nbytes: int, device: torch.device, iters: int) -> float:
    n = max(info.world, nbytes // 4 // info.world * info.world)
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    fn = lambda: dist.all_to_all_single(y, x, group=info.group)
    return _slowest(_times(fn, device, iters, warmup=2, before=dist.barrier), device)


def _link(info: GroupInfo, nbytes: int, device: torch.device, iters: int) -> dict:
    small = _ring_step(info, SMALL_MSG_BYTES, device, iters)
    large = _ring_step(info, nbytes, device, iters)
    wire = large - small if large > small else large
    return {"small_ms": small * 1e3, "large_ms": large * 1e3, "large_bytes": nbytes,
            "gbps": nbytes / wire / 1e9, "latency_s": small}


def _groups(world: int, per_node: int) -> tuple[GroupInfo | None, GroupInfo | None]:
    """This rank's node group and rail group (``None`` where a group has a single rank); every rank creates
    every group in the same order."""
    rank, nodes = dist.get_rank(), world // per_node
    intra = inter = None
    if per_node > 1:
        if nodes == 1:
            intra = GroupInfo(dist.group.WORLD, rank, world)
        for n in range(nodes if nodes > 1 else 0):
            g = dist.new_group(list(range(n * per_node, (n + 1) * per_node)))
            if rank // per_node == n:
                intra = GroupInfo(g, rank % per_node, per_node)
    if nodes > 1:
        for j in range(per_node):
            g = dist.new_group([j + n * per_node for n in range(nodes)])
            if rank % per_node == j:
                inter = GroupInfo(g, rank // per_node, nodes)
    return intra, inter


def calibrate(args: argparse.Namespace, device: torch.device) -> dict:
    """Run every measurement; returns the calibration document (same on every rank)."""
    t_start = time.perf_counter()
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_node = args.gpus_per_node or world
    if per_node < 1 or world % per_node:
        raise ValueError(f"--gpus-per-node {per_node} must divide the number of ranks {world}")
    nodes = world // per_node
    dtype = DTYPES[args.dtype]
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise ValueError(f"--heads {args.heads} must be divisible by --kv-heads {kv_heads}")
    kern = measure_kernel(args.kernel, device, dtype, args.tile_tokens, args.heads, kv_heads, args.head_dim,
                          args.iters)
    hw: dict[str, float] = {"fwd_tflops": kern["causal"]["fwd_tflops"], "bwd_tflops": kern["causal"]["bwd_tflops"],
                            "fwd_tflops_full": kern["full"]["fwd_tflops"],
                            "bwd_tflops_full": kern["full"]["bwd_tflops"]}
    meas: dict = {"kernel": kern}
    nbytes = int(args.p2p_mib * 2**20)
    if world > 1:
        intra, inter = _groups(world, per_node)
        if intra is not None:
            link = _link(intra, nbytes, device, args.iters)
            a2a = _all_to_all(intra, nbytes, device, args.iters)
            meas["intra"] = link | {"a2a_ms": a2a * 1e3}
            hw |= {"intra_gbps": link["gbps"], "intra_latency_s": link["latency_s"],
                   "a2a_intra_gbps": nbytes * (per_node - 1) / per_node / a2a / 1e9}
        if inter is not None:
            link = _link(inter, nbytes, device, args.iters)
            a2a = _all_to_all(GroupInfo(dist.group.WORLD, dist.get_rank(), world), nbytes, device, args.iters)
            meas["inter"] = link | {"a2a_world_ms": a2a * 1e3}
            hw |= {"inter_gbps": link["gbps"], "inter_latency_s": link["latency_s"],
                   "a2a_inter_gbps": nbytes * (world - 1) / world / a2a / 1e9}
    meta = _run_meta(
        t_start, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        backend=dist.get_backend() if dist.is_initialized() else None, world=world, nodes=nodes,
        gpus_per_node=per_node, kernel=kern["kernel"], dtype=args.dtype, tile_tokens=args.tile_tokens,
        heads=args.heads, kv_heads=kv_heads, head_dim=args.head_dim, p2p_bytes=nbytes, iters=args.iters,
        not_measured=[f for f in HARDWARE_FIELDS if f not in hw and not f.startswith("peer_")])
    return {"format": FORMAT, "meta": meta, "hardware": hw, "measurements": meas}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ds_burst.plan calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="calibration JSON to write (rank 0)")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="ranks per node (default LOCAL_WORLD_SIZE, else all ranks); below the world size on one "
                    "machine it simulates nodes")
    ap.add_argument("--kernel", default="auto", help="local kernel: auto, torch, triton, sdpa")
    ap.add_argument("--tile-tokens", type=int, default=None,
                    help=f"local tokens s of the measured tiles (CUDA {CUDA_DEFAULTS['tile_tokens']}, "
                    f"CPU {CPU_DEFAULTS['tile_tokens']})")
    ap.add_argument("--heads", type=int, default=None, help="query heads (CUDA 32, CPU 4)")
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    ap.add_argument("--head-dim", type=int, default=None, help="CUDA 128, CPU 32")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="CUDA bfloat16, CPU float32")
    ap.add_argument("--p2p-mib", type=float, default=None, help="message MiB per rank (CUDA 256, CPU 4)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per figure (CUDA 5, CPU 3)")
    ap.add_argument("--cpu", action="store_true", help="measure on CPU with gloo even when CUDA is available")
    tiles = ap.add_argument_group("--tiles: the kernel term's table against tile length (one process)")
    tiles.add_argument("--tiles", action="store_true", help="measure the tile-rates table instead of the figures")
    tiles.add_argument("--sizes", type=int, nargs="+", default=None,
                       help="tile lengths s (CUDA 1K..128K in powers of 2, CPU 64 128 256)")
    tiles.add_argument("--kernels", nargs="+", default=None, help="tile kernels (CUDA triton sdpa, CPU torch)")
    tiles.add_argument("--whole-kernels", nargs="+", default=None,
                       help="kernel= of the whole one-rank call (CUDA auto triton, CPU torch)")
    tiles.add_argument("--head-dims", type=int, nargs="+", default=None, help="one table each (CUDA 128 64, CPU 32)")
    tiles.add_argument("--full-heads-tokens", type=int, default=32768,
                       help="above this length the whole calls' heads shrink in proportion (default 32768)")
    tiles.add_argument("--ring-heads-tokens", type=int, default=65536,
                       help="above this length the ring tiles' heads shrink in proportion (default 65536)")
    return ap


def _run_meta(t_start: float, **fields: object) -> dict:
    """The ``meta`` of a calibration document: date, command, torch (and triton) versions, the autotune setting,
    ``fields`` and the wall time since ``t_start``."""
    meta: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "command": " ".join([os.path.basename(sys.argv[0])] + [shlex.quote(a) for a in sys.argv[1:]]),
                  "torch": torch.__version__, **fields,
                  "triton_autotune": settings.raw(settings.TRITON_AUTOTUNE) or None,
                  "wall_s": time.perf_counter() - t_start}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return meta


def _write(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    """``python -m ds_burst.plan calibrate``: measure and write the calibration JSON."""
    args = _parser().parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.cpu
    defaults = (CUDA_DEFAULTS if use_cuda else CPU_DEFAULTS) | TILE_DEFAULTS["cuda" if use_cuda else "cpu"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.iters < 1 or args.p2p_mib <= 0:
        raise SystemExit("calibrate: --iters must be >= 1 and --p2p-mib > 0")
    if use_cuda:
        os.environ.setdefault(settings.TRITON_AUTOTUNE, "0")  # sets, for the kernels imported after this
    if args.gpus_per_node is None and settings.local_world_size():
        args.gpus_per_node = settings.local_world_size()
    owned = False
    if not dist.is_initialized() and settings.launcher_world_size() > 1:
        if use_cuda:
            torch.cuda.set_device(settings.local_rank())
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owned = True
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    try:
        try:
            doc = calibrate_tiles(args, device) if args.tiles else calibrate(args, device)
        except ValueError as exc:
            raise SystemExit(f"calibrate: {exc}") from None
        rank = dist.get_rank() if dist.is_initialized() else 0
        if args.tiles:
            _write(args.out, doc)
            print(f"tile rates written to {args.out} ({doc['meta']['wall_s']:.1f} s, {doc['gpu']})")
            for table in doc["tables"]:
                for kind, by_kernel in table["curves"].items():
                    for kern, pts in by_kernel.items():
                        print(f"  D={table['head_dim']} {kind:5s} {kern:8s} " + " ".join(
                            f"{p['tokens']}:{p['fwd_tflops']:.0f}/{p['bwd_tflops']:.0f}" for p in pts))
        elif rank == 0:
            _write(args.out, doc)
            hw = doc["hardware"]
            print(f"calibration written to {args.out} ({doc['meta']['wall_s']:.1f} s, kernel "
                  f"{doc['meta']['kernel']}, {doc['meta']['nodes']} node(s) x {doc['meta']['gpus_per_node']})")
            for key, value in hw.items():
                print(f"  {key:18s} {value:.4g}")
            if doc["meta"]["not_measured"]:
                print(f"  not measured (defaults kept): {', '.join(doc['meta']['not_measured'])}")
    finally:
        if owned:
            dist.barrier()
            dist.destroy_process_group()
