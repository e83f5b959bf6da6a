"""Distributed attention benchmark: ds-burst against DeepSpeed-Ulysses and torch context_parallel.

    torchrun --nproc_per_node 2 launch/bench_ring.py --out results/ring.json --seqs 131072 262144 --kv-heads 32 8

Every method runs in the same launch on the same GPUs, bf16, B=1, causal, Hq=32, D=128:

* ``ds-burst-<kernel>[-<schedule>]``: ``burst_attn_func`` on zigzag shards (backward "auto"), flat ring or
  the ``--schedules`` given, over ``--gpus-per-node`` ranks per (simulated) node;
* ``ulysses-cudnn`` / ``ulysses-flash``: DeepSpeed's ``DistributedAttention`` with SDPA as local attention;
* ``torch-cp``: ``torch.distributed.tensor.experimental.context_parallel`` (ring, SDPA flash), MHA only.

Times are the median over iterations of the slowest rank (barrier before each). TFLOP/s per GPU counts
causal attention FLOPs ``2*B*H*S^2*D`` forward and 3.5x that for forward+backward, divided by P.
``--check`` first compares ds-burst's gathered output and gradients in bf16 with a float64 reference.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import attn_flops, device_meta, dist_time_ms, print_table, pyplot, write_json  # noqa: E402


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def check(world: int, kernel: str, s: int = 8192, h: int = 8, hkv: int = 8, d: int = 128) -> dict:
    """bf16 ds-burst vs float64 reference; also single-GPU SDPA bf16 vs the same reference."""
    import ds_burst
    from ds_burst.kernels.reference import naive_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda hh: torch.randn(1, s, hh, d, device="cuda", generator=g, dtype=torch.float64)
    q, k, v, do = mk(h), mk(hkv), mk(hkv), mk(h)
    res = {}
    for causal in (True, False):
        qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
        ref, _ = naive_attention(qf, kf, vf, causal=causal)
        ref.backward(do)
        refs = [ref.detach(), qf.grad, kf.grad, vf.grad]
        ql, kl, vl = (ds_burst.shard_sequence(x.bfloat16(), 1).requires_grad_() for x in (q, k, v))
        out = ds_burst.burst_attn_func(ql, kl, vl, causal=causal, kernel=kernel)
        out.backward(ds_burst.shard_sequence(do.bfloat16(), 1))
        got = [ds_burst.gather_sequence(t.detach(), 1) for t in (out, ql.grad, kl.grad, vl.grad)]
        qs, ks, vs = (x.bfloat16().requires_grad_() for x in (q, k, v))
        o1 = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                            is_causal=causal, enable_gqa=True).transpose(1, 2)
        o1.backward(do.bfloat16())
        single = [o1.detach(), qs.grad, ks.grad, vs.grad]
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
        for name, a, b, r in zip(["out", "dq", "dk", "dv"], got, single, refs):
            res[f"{'causal' if causal else 'full'}_{name}"] = (rel(a, r), rel(b, r))
    return res


PEERS = ("ulysses-cudnn", "ulysses-flash", "torch-cp")


def make_methods(world: int, kernels: list[str], schedules: list[str], gpus_per_node: int | None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import ds_burst

    methods = {}
    for sched in schedules:
        # every rank creates every topology's groups in the same order
        topo = ds_burst.init_sequence_parallel(world, gpus_per_node=gpus_per_node, schedule=sched)
        for kern in kernels:
            name = f"ds-burst-{kern}" + ("" if sched == "ring" else f"-{sched}")
            methods[name] = lambda q, k, v, kern=kern, topo=topo: ds_burst.burst_attn_func(
                q, k, v, causal=True, layout="zigzag", kernel=kern, group=topo)

    def ulysses(backend):
        from deepspeed.sequence.layer import DistributedAttention

        def local(q, k, v, *args, **kwargs):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True, enable_gqa=k.shape[2] != q.shape[2]
                                                      ).transpose(1, 2)

        attn = DistributedAttention(local, dist.group.WORLD, scatter_idx=2, gather_idx=1)
        return lambda q, k, v: attn(q, k, v, batch_dim_idx=0)

    methods["ulysses-cudnn"] = ulysses(SDPBackend.CUDNN_ATTENTION)
    methods["ulysses-flash"] = ulysses(SDPBackend.FLASH_ATTENTION)
    return methods


def torch_cp(world: int, s: int, h: int, d: int, iters: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel

    set_rotate_method("allgather")
    mesh = init_device_mesh("cuda", (world,))
    q, k, v, do = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    torch.cuda.reset_peak_memory_stats()
    with context_parallel(mesh, buffers=[q, k, v, do], buffer_seq_dims=[2, 2, 2, 2]):
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            with torch.no_grad():
                fwd = dist_time_ms(lambda: F.scaled_dot_product_attention(ql, kl, vl, is_causal=True), iters=iters)
            fb = dist_time_ms(lambda: F.scaled_dot_product_attention(ql, kl, vl, is_causal=True).backward(do),
                              iters=iters)
    return {"fwd_ms": fwd, "fwdbwd_ms": fb, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def _time_method(fn, q, k, v, do, iters: int) -> dict:
    """Forward and forward+backward times (slowest rank) and peak memory of one method."""
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fwd = dist_time_ms(lambda: fn(q, k, v), iters=iters)

    def fb():
        fn(q, k, v).backward(do)
        q.grad = k.grad = v.grad = None

    fwdbwd = dist_time_ms(fb, iters=iters)
    return {"fwd_ms": fwd, "fwdbwd_ms": fwdbwd, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def plot(rows: list[dict], path: str) -> None:
    """Forward+backward time against S, one panel per KV-head count, one line per method."""
    plt = pyplot()
    if plt is None:
        return
    kv = sorted({r["Hkv"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(kv), figsize=(5 * len(kv), 3.8), squeeze=False)
    for ax, hkv in zip(axes[0], kv):
        for m in methods:
            pts = sorted((r["S"], r["fwdbwd_ms"]) for r in rows if r["method"] == m and r["Hkv"] == hkv
                         and "fwdbwd_ms" in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, color=colors[m])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"P={rows[0]['P']}, Hq={rows[0]['Hq']}, Hkv={hkv}, causal bf16")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("fwd+bwd ms (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/ring.json")
    ap.add_argument("--seqs", type=int, nargs="+", default=[131072, 262144])
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kernels", nargs="+", default=["triton"], help="ds-burst local kernels to run")
    ap.add_argument("--schedules", nargs="+", default=["ring"],
                    help="ds-burst schedules: ring, double_ring, ulysses_ring, ulysses, auto")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="ranks per (simulated) node for the topology-aware schedules, e.g. 2 on 4 GPUs = 2x2")
    ap.add_argument("--torch-kernel-max-seq", type=int, default=32768, help="largest S for kernel=torch")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="bf16 correctness check against float64 first")
    ap.add_argument("--no-peers", action="store_true", help="only ds-burst")
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS),
                    help="peers to run next to ds-burst (torch-cp runs only when Hkv == Hq)")
    args = ap.parse_args()

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    world = dist.get_world_size()
    gpu = torch.cuda.get_device_name()
    _log(f"world={world} gpu={gpu} torch={torch.__version__} nccl={torch.cuda.nccl.version()}")
    if args.check:
        for kern in args.kernels:
            res = check(world, kern)
            for key, (ours, single) in res.items():
                _log(f"CHECK kernel={kern} {key}: ds-burst bf16 rel err {ours:.2e}, single-GPU SDPA bf16 {single:.2e}")
    methods = make_methods(world, args.kernels, args.schedules, args.gpus_per_node)
    peers = [] if args.no_peers else args.peers
    methods = {k: v for k, v in methods.items() if k.startswith("ds-burst") or k in peers}
    rows = []
    h, d = args.heads, args.head_dim
    for s in args.seqs:
        flops = attn_flops(1, h, s, d, True)
        for hkv in args.kv_heads:
            q = torch.randn(1, s // world, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(1, s // world, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            do = torch.randn_like(q)
            todo = list(methods.items())
            if hkv == h and "torch-cp" in peers:
                todo.append(("torch-cp", None))
            for name, fn in todo:
                if name == "ds-burst-torch" and s > args.torch_kernel_max_seq:
                    continue
                row = {"method": name, "S": s, "P": world, "Hq": h, "Hkv": hkv, "D": d, "gpu": gpu}
                try:
                    torch.cuda.empty_cache()
                    row.update(torch_cp(world, s, h, d, args.iters) if fn is None
                               else _time_method(fn, q, k, v, do, args.iters))
                    row["fwd_tflops_per_gpu"] = flops / row["fwd_ms"] / 1e9 / world
                    row["fwdbwd_tflops_per_gpu"] = 3.5 * flops / row["fwdbwd_ms"] / 1e9 / world
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                    torch.cuda.empty_cache()
                rows.append(row)
                _log(str(row))
            del q, k, v, do
    for r in rows:
        for peer in ("ulysses-cudnn", "ulysses-flash", "torch-cp"):
            p = next((x for x in rows if x["method"] == peer and x["S"] == r["S"] and x["Hkv"] == r["Hkv"]
                      and "fwdbwd_ms" in x), None)
            if p and "fwdbwd_ms" in r:
                r[f"speedup_vs_{peer}"] = p["fwdbwd_ms"] / r["fwdbwd_ms"]
    if dist.get_rank() == 0:
        cols = ["method", "S", "P", "Hkv", "fwd_ms", "fwdbwd_ms", "fwd_tflops_per_gpu", "fwdbwd_tflops_per_gpu",
                "peak_gib", "speedup_vs_ulysses-cudnn", "speedup_vs_torch-cp", "error"]
        print_table(rows, cols)
        write_json(args.out, device_meta() | {"command": " ".join(sys.argv), "world": world}, rows)
        plot(rows, os.path.splitext(args.out)[0] + ".png")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
