"""Peak memory per GPU of ds-burst's memory options, against ``ds_burst.training.memory``'s estimate.

    torchrun --nproc_per_node 2 launch/bench_memory.py --seq 131072 --layers 2 --out results/memory.json
    torchrun --nproc_per_node 2 launch/bench_memory.py --cpu --out /tmp/memory_cpu.json   # tiny CPU run (gloo)

All ranks form one sequence-parallel group (P = world size), B = 1, causal, zigzag shards, bf16 on GPUs.

(a) **Attention alone**, forward + backward of q, k, v ``[1, S/P, H, D]``: ds-burst (``burst_attn_func``, the
    buffer pool on and off) against DeepSpeed-Ulysses (``DistributedAttention`` with SDPA, cuDNN first, GQA
    without repeating K/V; needs ``Hq`` and ``Hkv`` divisible by P). The
    figure is the peak allocated above what the inputs and the output gradient already take; ds-burst's
    prediction is the pool's working set (``ds_burst.training.estimate.attention_buffer_bytes``) plus the kept output,
    lse and delta and the three input gradients.
(b) **One training step** (forward + backward, no optimizer) of ``BurstLlama`` with a Llama-3-8B-shaped config
    (``--layers`` cuts the depth), plain PyTorch (no DeepSpeed; parameters and gradients replicated), under
    each variant of ``--variants``: ``no_ckpt``, ``ckpt`` (activation checkpointing), ``keep_all`` /
    ``keep_half`` (selective checkpointing: attention outputs kept for the re-run), ``offload`` (checkpointed
    activations in host memory), ``keep_half_offload``, ``no_pool`` (checkpointing with the buffer pool off).
    The LM head is chunked (``--lm-head-chunk``). The prediction is ``estimate_memory``'s total without the
    optimizer (ZeRO stage 0, dp 1); the ratio measured / predicted is printed.

Every variant's loss is also compared with the first variant's (same weights and data): ``loss_rel_diff``.
On CPU (``--cpu``) nothing is measured (no allocator statistics): the run checks that every path works on
gloo ranks and prints the predictions. Writes JSON (``{"meta", "rows"}``) and, with matplotlib, a PNG next to it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import device_meta, print_table, pyplot, write_json  # noqa: E402

GIB = float(1 << 30)
VARIANTS = {  # name: (activation checkpointing, ModelConfig changes, buffer pool on)
    "no_ckpt": (False, {}, True),
    "ckpt": (True, {}, True),
    "keep_all": (True, {"keep_attention_layers": 1.0}, True),
    "keep_half": (True, {"keep_attention_layers": 1.0, "keep_attention_tokens": "half"}, True),
    "offload": (True, {"offload_checkpoints": True}, True),
    "keep_half_offload": (True, {"keep_attention_layers": 1.0, "keep_attention_tokens": "half",
                                 "offload_checkpoints": True}, True),
    "no_pool": (True, {}, False),
}
CPU_DEFAULTS = dict(seq=256, heads=4, kv_heads=2, head_dim=16, layers=2, intermediate=96, vocab=64, lm_head_chunk=64)


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


class Meter:
    """Peak allocated bytes above a baseline on CUDA; ``None`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def stop(self) -> tuple[float | None, float | None]:
        """``(peak GiB, peak above the baseline GiB)``, the slowest rank's (max over ranks)."""
        if not self.cuda:
            return None, None
        torch.cuda.synchronize()
        t = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - self.base],
                         dtype=torch.float64, device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t[0].item() / GIB, t[1].item() / GIB


def _attention_methods(kernel: str, with_ulysses: bool) -> dict:
    import torch.nn.functional as F

    import ds_burst
    from ds_burst.training.model import _sdpa_priority

    methods = {"ds-burst": lambda q, k, v: ds_burst.burst_attn_func(q, k, v, causal=True, kernel=kernel)}
    if with_ulysses:
        try:
            import deepspeed
            import deepspeed.comm as ds_comm
            from deepspeed.sequence.layer import DistributedAttention
        except ImportError:
            return methods
        if not ds_comm.is_initialized():  # DistributedAttention's all-to-all runs on DeepSpeed's comm layer
            deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)

        def local(q, k, v, *args, **kwargs):  # SDPA, cuDNN first on CUDA, GQA without repeating K/V
            with _sdpa_priority(q.device):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True, enable_gqa=k.shape[2] != q.shape[2]
                                                      ).transpose(1, 2)

        attn = DistributedAttention(local, dist.group.WORLD, scatter_idx=2, gather_idx=1)
        methods["ulysses-sdpa"] = lambda q, k, v: attn(q, k, v, batch_dim_idx=0)
    return methods


def bench_attention(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """(a): peak memory of attention forward + backward per method."""
    from ds_burst.ring.pool import release_buffers, set_buffer_pool
    from ds_burst.training.estimate import attention_buffer_bytes

    world = dist.get_world_size()
    n, h, hkv, d = args.seq // world, args.heads, args.kv_heads, args.head_dim
    b = torch.empty((), dtype=dtype).element_size()
    ulysses_ok = h % world == 0 and hkv % world == 0
    methods = _attention_methods(args.kernel, ulysses_ok and not args.no_peers)
    rows = []
    meter = Meter(device)
    g = torch.Generator(device=device).manual_seed(dist.get_rank())
    q = torch.randn(1, n, h, d, device=device, dtype=dtype, generator=g).requires_grad_()
    k, v = (torch.randn(1, n, hkv, d, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(2))
    do = torch.randn_like(q)
    todo = [(name, fn, True) for name, fn in methods.items()]
    todo.insert(1, ("ds-burst-no-pool", methods["ds-burst"], False))
    for name, fn, pooled in todo:
        row = {"part": "attention", "method": name, "S": args.seq, "P": world, "Hq": h, "Hkv": hkv, "D": d}
        set_buffer_pool(pooled)
        try:
            for _ in range(args.warmup):
                fn(q, k, v).backward(do)
            q.grad = k.grad = v.grad = None
            release_buffers()
            meter.start()
            t0 = time.perf_counter()
            fn(q, k, v).backward(do)
            row["peak_gib"], row["extra_gib"] = meter.stop()
            row["step_s"] = time.perf_counter() - t0
            q.grad = k.grad = v.grad = None
            if name.startswith("ds-burst"):
                pred = attention_buffer_bytes(n, h, hkv, d, b) + n * h * (d * b + 8) + n * (h + 2 * hkv) * d * b
                row["predicted_gib"] = pred / GIB
                if row["extra_gib"] is not None:
                    row["measured_over_predicted"] = row["extra_gib"] / row["predicted_gib"]
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row)
        _log(str(row))
    set_buffer_pool(None)
    release_buffers()
    return rows


def bench_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """(b): peak memory of one training step per variant, with estimate_memory's prediction."""
    from ds_burst.attention.config import BurstConfig
    from ds_burst.attention.selective import release_host_buffers
    from ds_burst.ring.pool import release_buffers, set_buffer_pool
    from ds_burst.training.data import shard_batch_local
    from ds_burst.training.estimate import estimate_model_memory
    from ds_burst.training.model import BurstLlama, ModelConfig

    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden or args.heads * args.head_dim,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      intermediate_size=args.intermediate, lm_head_chunk_tokens=args.lm_head_chunk)
    torch.manual_seed(0)
    model = BurstLlama(cfg, group=dist.group.WORLD, burst=BurstConfig(layout="zigzag", kernel=args.kernel))
    model = model.to(device=device, dtype=dtype).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=gen)
    shard = shard_batch_local(ids, torch.roll(ids, -1, 1), rank, world, "zigzag")
    batch = [shard[key].to(device) for key in ("input_ids", "position_ids", "labels")]
    b = torch.empty((), dtype=dtype).element_size()
    meter = Meter(device)
    rows, ref_loss = [], None
    base_opts = {f: getattr(cfg, f) for f in ("keep_attention_layers", "keep_attention_tokens", "offload_checkpoints")}
    for name in args.variants:
        ckpt, opts, pooled = VARIANTS[name]
        for f, val in {**base_opts, **opts}.items():
            setattr(model.cfg, f, val)
        model.activation_checkpointing = ckpt
        set_buffer_pool(pooled)
        row = {"part": "model", "method": name, "S": args.seq, "P": world, "layers": args.layers,
               "hidden": cfg.hidden_size, "Hq": args.heads, "Hkv": args.kv_heads}
        try:
            for _ in range(args.warmup):
                model(*batch).backward()
                model.zero_grad(set_to_none=True)
            release_buffers()
            meter.start()
            t0 = time.perf_counter()
            loss = model(*batch)
            loss.backward()
            row["peak_gib"], row["extra_gib"] = meter.stop()
            row["step_s"] = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            row["loss"] = float(loss.detach())
            ref_loss = row["loss"] if ref_loss is None else ref_loss
            row["loss_rel_diff"] = abs(row["loss"] - ref_loss) / max(abs(ref_loss), 1e-30)
            est = estimate_model_memory(model.cfg, args.seq, sp=world, zero_stage=0, dp=1, dtype_bytes=b,
                                        activation_checkpointing=ckpt)
            row["predicted_gib"] = est["total"] - est["optimizer"]
            row["predicted_host_gib"] = est.get("host_offload", 0.0)
            row.update({f"est_{k}": v for k, v in est.items() if k not in ("total", "optimizer", "host_offload")})
            if row["peak_gib"] is not None:
                row["measured_over_predicted"] = row["peak_gib"] / row["predicted_gib"]
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            model.zero_grad(set_to_none=True)
        rows.append(row)
        _log(str({k: v for k, v in row.items() if not k.startswith("est_")}))
    set_buffer_pool(None)
    release_buffers()
    release_host_buffers()
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Measured and predicted peak GiB per method, one panel per part."""
    plt = pyplot()
    if plt is None:
        return
    parts = [p for p in ("attention", "model") if any(r["part"] == p and r.get("peak_gib") for r in rows)]
    if not parts:
        return
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 3.8), squeeze=False)
    for ax, part in zip(axes[0], parts):
        sel = [r for r in rows if r["part"] == part and r.get("peak_gib") is not None]
        key = "extra_gib" if part == "attention" else "peak_gib"
        xs = range(len(sel))
        ax.bar([x - 0.2 for x in xs], [r[key] for r in sel], width=0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [r.get("predicted_gib") or 0 for r in sel], width=0.4, label="predicted")
        ax.set_xticks(list(xs), [r["method"] for r in sel], rotation=30, fontsize=7)
        ax.set_ylabel("GiB per GPU (attention: above inputs)")
        ax.set_title(f"{part}: S={sel[0]['S']}, P={sel[0]['P']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/memory.json")
    ap.add_argument("--cpu", action="store_true", help="gloo ranks on CPU with a tiny model (nothing measured)")
    ap.add_argument("--seq", type=int, default=None, help="total tokens per sequence (default 131072; CPU 256)")
    ap.add_argument("--heads", type=int, default=None, help="query heads (default 32)")
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 8)")
    ap.add_argument("--head-dim", type=int, default=None, help="head dim (default 128)")
    ap.add_argument("--hidden", type=int, default=None, help="model hidden size (default heads * head dim)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 2; Llama-3-8B has 32)")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP size (default 14336)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 128256)")
    ap.add_argument("--lm-head-chunk", type=int, default=None, help="LM head chunk in tokens (default 8192)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--kernel", default="auto", help="ds-burst local kernel (auto, triton, sdpa, torch)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each measured one")
    ap.add_argument("--skip-attention", action="store_true", help="skip part (a)")
    ap.add_argument("--skip-model", action="store_true", help="skip part (b)")
    ap.add_argument("--no-peers", action="store_true", help="no DeepSpeed-Ulysses in part (a)")
    args = ap.parse_args(argv)
    gpu_defaults = dict(seq=131072, heads=32, kv_heads=8, head_dim=128, layers=2, intermediate=14336, vocab=128256,
                        lm_head_chunk=8192)
    for key, val in (CPU_DEFAULTS if args.cpu else gpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Both parts on the already initialised process group; rank 0 prints the table and writes the files."""
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    world = dist.get_world_size()
    if args.seq % (2 * world):
        raise SystemExit(f"--seq {args.seq} must be divisible by 2 * world size = {2 * world} (zigzag)")
    _log(f"world={world} device={device} torch={torch.__version__} S={args.seq} layers={args.layers}")
    rows = []
    if not args.skip_attention:
        rows += bench_attention(args, device, dtype)
    if not args.skip_model:
        rows += bench_model(args, device, dtype)
    if dist.get_rank() == 0:
        cols = ["part", "method", "S", "P", "peak_gib", "extra_gib", "predicted_gib", "measured_over_predicted",
                "predicted_host_gib", "step_s", "loss_rel_diff", "error"]
        print_table(rows, cols)
        write_json(args.out, device_meta() | {"command": " ".join(sys.argv), "world": world, "cpu": args.cpu}, rows)
        plot(rows, os.path.splitext(args.out)[0] + ".png")
    dist.barrier()
    return rows


def main() -> None:
    args = parse_args()
    if args.cpu:
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    try:
        run(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
