"""Train the built-in Llama-style model with BurstAttention sequence parallelism under DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py --config configs/cpu_tiny.json [--override train.steps=50 ...]

One JSON file holds the DeepSpeed config (ZeRO, optimizer, scheduler, batch sizes, top-level
"sequence_parallel_size"), the "burst_attention" section (ds_burst.attention.config.BurstConfig) and a "train"
section (model, data, steps, sequence length, precision, logging, checkpoints); docs/TRAINING.md
documents every key. The "train" section is removed before the config reaches DeepSpeed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class WandbConfig:
    """Our own wandb run on rank 0 (DeepSpeed's "wandb" monitor section also works, independently)."""

    enabled: bool = False
    project: str = "ds-burst"
    name: str | None = None
    entity: str | None = None
    dir: str | None = None  # default: <output_dir>
    mode: str = "auto"  # auto: online with credentials, offline without; or "online" / "offline" / "disabled"


@dataclass
class TrainConfig:
    """The "train" section."""

    model: dict[str, Any] = field(default_factory=dict)  # ds_burst.training.model.ModelConfig fields
    data: dict[str, Any] = field(default_factory=lambda: {"type": "retrieval"})
    seq_len: int = 2048
    steps: int = 100
    seed: int = 1234
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or "bf16" / "fp32"
    attention: str = "burst"  # "burst" (ds-burst ring), "ulysses" (DeepSpeed-Ulysses), "local" (SP=1 only)
    activation_checkpointing: bool = False
    checkpoint_impl: str = "torch"  # "torch" (non-reentrant torch.utils.checkpoint) or "deepspeed"
    zero_init: bool = True  # build the model under deepspeed.zero.Init when ZeRO stage is 3
    log_interval: int = 10
    output_dir: str = "runs/default"
    save_interval: int = 0  # steps between checkpoints (0: only at the end when save_final)
    save_final: bool = False
    resume: bool | str = False  # true: latest checkpoint in <output_dir>/checkpoints; or a checkpoint directory
    resume_tag: str | None = None  # checkpoint tag to load (default: the one named in <dir>/latest)
    eval_batches: int = 2  # held-out batches evaluated at the end (retrieval accuracy)
    peak_tflops: float | None = None  # per-device peak for MFU; None: 989 on H100/H200 (bf16 dense), else no MFU
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"train: unknown key(s) {unknown}")
        w = d.pop("wandb", {}) or {}
        unknown = sorted(set(w) - {f.name for f in fields(WandbConfig)})
        if unknown:
            raise ValueError(f"train.wandb: unknown key(s) {unknown}")
        cfg = cls(**d, wandb=WandbConfig(**w))
        if cfg.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision: expected auto, bf16 or fp32, got {cfg.precision!r}")
        if cfg.attention not in ("burst", "ulysses", "local"):
            raise ValueError(f"train.attention: expected burst, ulysses or local, got {cfg.attention!r}")
        if cfg.checkpoint_impl not in ("torch", "deepspeed"):
            raise ValueError(f"train.checkpoint_impl: expected torch or deepspeed, got {cfg.checkpoint_impl!r}")
        if cfg.wandb.mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"train.wandb.mode: expected auto, online, offline or disabled, got {cfg.wandb.mode!r}")
        for name in ("seq_len", "steps", "log_interval"):
            if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
                raise ValueError(f"train.{name}: expected a positive integer, got {getattr(cfg, name)!r}")
        return cfg


# ---------------------------------------------------------------------------------------------
# Config file handling


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train the built-in Llama-style model with ds-burst sequence parallelism under DeepSpeed. "
        "Start it with the DeepSpeed launcher, e.g. `deepspeed --num_gpus 2 launch/train.py --config "
        "configs/cpu_tiny.json`. World size = data_parallel x sequence_parallel_size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", required=True, help="JSON file: DeepSpeed config + 'burst_attention' + 'train'")
    p.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="change config entries by dotted path, value parsed as JSON if possible, e.g. "
        "train.steps=20 sequence_parallel_size=4 burst_attention.backward=ring",
    )
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the DeepSpeed launcher; do not pass by hand")
    p.add_argument("--print-config", action="store_true", help="print the resolved config on rank 0 and exit")
    return p.parse_args(argv)


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries (``value`` parsed as JSON, else kept as a string)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--override expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--override {key}: {part} is not a JSON object")
        node[parts[-1]] = value
    return cfg


def load_config(path: str, overrides: list[str]) -> tuple[dict[str, Any], TrainConfig]:
    """Read the JSON, apply overrides; return ``(ds_config without "train", TrainConfig)``."""
    with open(path) as f:
        full = json.load(f)
    full = apply_overrides(full, overrides)
    train = TrainConfig.from_dict(full.pop("train", {}))
    return full, train


# ---------------------------------------------------------------------------------------------
# Logging helpers


def wandb_mode(cfg: WandbConfig) -> tuple[str, str]:
    """``(mode, reason)``: offline when no credentials are found and WANDB_MODE is unset."""
    if cfg.mode != "auto":
        return cfg.mode, f"train.wandb.mode={cfg.mode}"
    if os.environ.get("WANDB_MODE"):  # an explicit choice wins
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    netrc = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    has_netrc = os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()
    if os.environ.get("WANDB_API_KEY") or has_netrc:
        return "online", "credentials found"
    return "offline", "no WANDB_API_KEY and no wandb login found"


def rss_mib() -> float:
    """This process's resident set size in MiB (``/proc/self/statm``; 0 where it does not exist)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def save_checkpoint(engine: Any, ckpt_dir: str, tag: str, client_state: dict[str, Any], is_main: bool) -> None:
    """Save a DeepSpeed checkpoint so that ``latest`` only ever names a complete one.

    DeepSpeed's own ``latest`` is written by rank 0 after its own files only; here every rank finishes its
    files (``save_checkpoint`` ends with a barrier of all ranks), then rank 0 replaces ``latest`` atomically
    (write, fsync, rename), and the ranks meet again. A rank killed mid-save leaves ``latest`` on the previous tag.
    """
    import torch.distributed as dist

    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    if is_main:
        tmp = os.path.join(ckpt_dir, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(ckpt_dir, "latest"))
    dist.barrier()


def peak_memory_gib(device: Any) -> float:
    """Peak memory of this process: CUDA max allocated, or the CPU max resident set size."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def default_peak_tflops(device: Any) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        return 989.0
    if "A100" in name or "A800" in name:
        return 312.0
    return None


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ds_config, tc = load_config(args.config, args.override)

    mode, why = wandb_mode(tc.wandb)
    if tc.wandb.enabled or ds_config.get("wandb", {}).get("enabled"):
        if not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import deepspeed
    import torch
    import torch.distributed as dist

    import ds_burst
    from ds_burst.attention.config import BurstConfig
    from ds_burst.core.cost_model import schedule_report
    from ds_burst.training.data import PackedRetrieval, RetrievalTask, TokenFile, make_batch, sample_indices
    from ds_burst.training.losses import (
        per_document_accuracy,
        sequence_parallel_accuracy,
        sequence_parallel_loss,
        sp_grads_averaged,
    )
    from ds_burst.training.model import BurstLlama, ModelConfig

    burst = BurstConfig.from_ds_config(ds_config)
    ds_config.pop("burst_attention", None)  # DeepSpeed would ignore it; keep its printout short
    deepspeed.init_distributed(dist_backend=None)
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    if torch.cuda.is_available():
        device = torch.device("cuda", args.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    def say(msg: str) -> None:
        if is_main:
            print(f"[train] {msg}", flush=True)

    topo = ds_burst.init_sequence_parallel(burst.sequence_parallel_size, burst.gpus_per_node, burst.schedule)
    if burst.patch_deepspeed:
        ds_burst.patch_deepspeed()
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    ds_config["bf16"] = {**ds_config.get("bf16", {}), "enabled": use_bf16}
    sched = ds_config.get("scheduler")
    if sched and "total_num_steps" in sched.get("params", {}) and sched["params"]["total_num_steps"] == "auto":
        sched["params"]["total_num_steps"] = tc.steps
    mbs = int(ds_config.get("train_micro_batch_size_per_gpu", 1))
    gas = int(ds_config.get("gradient_accumulation_steps", 1))
    ds_config.setdefault("train_batch_size", mbs * gas * topo.data_parallel_size)
    ds_config.setdefault("steps_per_print", 10**9)
    if args.print_config:
        say(json.dumps({"deepspeed": ds_config, "burst_attention": burst.to_dict(), "train": asdict(tc)}, indent=2))
        return {}

    # -- model ------------------------------------------------------------------------------
    mcfg = ModelConfig.from_dict(tc.model)
    say(schedule_report(topo.schedule, tc.seq_len, topo.sequence_parallel_size, topo.gpus_per_node, mcfg.num_heads,
                        mcfg.num_kv_heads, mcfg.head_dim, 2 if device.type == "cuda" else 4))
    torch.manual_seed(tc.seed)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    init_ctx: Any = contextlib.nullcontext()
    if stage == 3 and tc.zero_init:
        init_ctx = deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=topo,
                                       data_parallel_group=topo.get_sequence_data_parallel_group())
    if tc.checkpoint_impl == "deepspeed" and tc.activation_checkpointing:
        deepspeed.checkpointing.configure(topo, deepspeed_config=ds_config)
    attention = tc.attention if (tc.attention != "burst" or burst.enabled) else "local"
    if attention == "local" and topo.sequence_parallel_size > 1:
        raise ValueError(f"attention 'local' (train.attention=local or burst_attention.enabled=false) needs "
                         f"sequence_parallel_size=1, got {topo.sequence_parallel_size}; use train.attention=burst "
                         "or ulysses")
    if attention == "ulysses" and burst.patch_deepspeed:
        raise ValueError("train.attention=ulysses with burst_attention.patch_deepspeed=true would run ds-burst "
                         "under DeepSpeed's DistributedAttention name; set patch_deepspeed=false")
    with init_ctx:
        model = BurstLlama(mcfg, group=topo, attention=attention, burst=burst,
                           activation_checkpointing=tc.activation_checkpointing, checkpoint_impl=tc.checkpoint_impl)
    engine, _, _, _ = ds_burst.deepspeed_initialize(model, ds_config, topo)
    averaged = sp_grads_averaged(ds_config)

    # -- data -------------------------------------------------------------------------------
    data_cfg = dict(tc.data)
    kind = data_cfg.pop("type", "retrieval")
    packed = bool(data_cfg.pop("packed", False))
    if kind == "retrieval" and packed:  # documents of varied lengths in one sequence (cu_seqlens)
        source: Any = PackedRetrieval(tc.seq_len, mcfg.vocab_size, **data_cfg)
    elif kind == "retrieval":
        source = RetrievalTask(tc.seq_len, mcfg.vocab_size, **data_cfg)
    elif kind == "tokens":
        source = TokenFile(data_cfg.pop("path"), tc.seq_len, **data_cfg)
    else:
        raise ValueError(f"train.data.type: expected 'retrieval' or 'tokens', got {kind!r}")
    layout = burst.layout if attention == "burst" else "contiguous"  # Ulysses takes contiguous shards

    def docs(b: dict[str, Any]) -> dict[str, Any]:
        """The model's ``cu_seqlens`` keyword for packed batches (nothing otherwise)."""
        return {"cu_seqlens": b["cu_seqlens"]} if "cu_seqlens" in b else {}

    def batch(step: int, micro: int, offset: int = 0) -> dict[str, Any]:
        idx = sample_indices(step, micro, gas, topo.dp_rank, topo.data_parallel_size, mbs)
        return make_batch(source, [i + offset for i in idx], topo.sp_rank, topo.sequence_parallel_size, layout,
                          device)

    # -- resume -----------------------------------------------------------------------------
    ckpt_dir = os.path.join(tc.output_dir, "checkpoints")
    start = 0
    load_dir = tc.resume if isinstance(tc.resume, str) else ckpt_dir
    if tc.resume and (tc.resume_tag or os.path.exists(os.path.join(load_dir, "latest"))):
        path, client = engine.load_checkpoint(load_dir, tag=tc.resume_tag)
        if path is None:
            raise FileNotFoundError(f"could not load checkpoint {tc.resume_tag or 'latest'} from {load_dir}")
        start = int(client["step"])
        say(f"resumed from {path} at step {start}")
    elif tc.resume:
        if isinstance(tc.resume, str):
            raise FileNotFoundError(f"train.resume={tc.resume!r}: no 'latest' file there; set train.resume_tag")
        say(f"resume requested but no checkpoint in {ckpt_dir}; starting from scratch")

    # -- logging ----------------------------------------------------------------------------
    os.makedirs(tc.output_dir, exist_ok=True)
    run = None
    tokens_per_step = tc.seq_len * mbs * gas * topo.data_parallel_size
    flops_per_token = mcfg.train_flops_per_token(tc.seq_len)
    peak = tc.peak_tflops if tc.peak_tflops is not None else default_peak_tflops(device)
    full_config = {"deepspeed": ds_config, "burst_attention": burst.to_dict(), "train": asdict(tc),
                   "model_params": mcfg.num_params(), "world_size": world,
                   "data_parallel_size": topo.data_parallel_size}
    if is_main:
        say(f"world {world} = dp {topo.data_parallel_size} x sp {topo.sequence_parallel_size}, device {device}, "
            f"{'bf16' if use_bf16 else 'fp32'}, ZeRO stage {stage}, model {mcfg.num_params() / 1e6:.2f}M params, "
            f"seq_len {tc.seq_len}, {tokens_per_step} tokens/step, attention {attention}, layout {layout}")
        if tc.wandb.enabled:
            import wandb

            say(f"wandb mode {mode} ({why})" + ("; sync later with `wandb sync <run dir>`" if mode == "offline"
                                                  else ""))
            run = wandb.init(project=tc.wandb.project, name=tc.wandb.name, entity=tc.wandb.entity,
                             dir=tc.wandb.dir or tc.output_dir, mode=mode, config=full_config,
                             resume="allow" if tc.resume else None)
    metrics_path = os.path.join(tc.output_dir, "metrics.jsonl")
    if is_main and os.path.exists(metrics_path):  # keep only the history before the (re)start step
        with open(metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
        with open(metrics_path, "w") as f:
            f.writelines(kept)

    bar = None
    if is_main and tc.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

    # -- loop -------------------------------------------------------------------------------
    dp_group = topo.get_data_parallel_group()
    history: list[dict[str, Any]] = []
    engine.train()
    for step in range(start, tc.steps):
        t_data = time.perf_counter()
        micro_batches = [batch(step, micro) for micro in range(gas)]  # built before the timed part
        t_data = time.perf_counter() - t_data
        ds_burst.reset_comm_stats()
        t0 = time.perf_counter()
        loss_sum, correct, total, far_c, far_n = 0.0, 0, 0, 0, 0
        for b in micro_batches:
            if mcfg.lm_head_chunk_tokens is not None:  # chunked LM head: no logits, no train accuracy
                loss = engine(b["input_ids"], b["position_ids"], b["labels"], sp_grads_averaged=averaged, **docs(b))
            else:
                logits = engine(b["input_ids"], b["position_ids"], **docs(b))
                loss = sequence_parallel_loss(logits, b["labels"], topo, sp_grads_averaged=averaged)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
            if mcfg.lm_head_chunk_tokens is None:
                c, n = sequence_parallel_accuracy(logits, b["labels"], topo)
                correct, total = correct + c, total + n
                if "far_labels" in b:
                    c, n = sequence_parallel_accuracy(logits, b["far_labels"], topo)
                    far_c, far_n = far_c + c, far_n + n
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        stats = torch.tensor([loss_sum / gas, correct, total, far_c, far_n], dtype=torch.float64)
        if topo.data_parallel_size > 1:
            stats = stats.to(device) if "nccl" in str(dist.get_backend(dp_group)) else stats
            dist.all_reduce(stats, group=dp_group)
            stats = stats.cpu()
            stats[0] /= topo.data_parallel_size
        comm = sum(ds_burst.comm_stats().values())
        tps = tokens_per_step / dt
        tflops = flops_per_token * tps / world / 1e12
        rec = {
            "step": step + 1,
            "loss": float(stats[0]),
            "lr": float(engine.get_lr()[0]),
            "retrieval_acc": float(stats[1] / stats[2]) if stats[2] > 0 else float("nan"),
            "retrieval_acc_far": float(stats[3] / stats[4]) if stats[4] > 0 else float("nan"),
            "tokens_per_s": tps,
            "tflops_per_gpu": tflops,
            "mfu": tflops / peak if peak else None,
            "step_time_s": dt,
            "data_time_s": t_data,
            "attn_comm_bytes": comm,
            "peak_mem_gib": peak_memory_gib(device),
            "rss_mib": rss_mib(),
        }
        history.append(rec)
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if run is not None:
                run.log({k: v for k, v in rec.items() if v is not None and k != "step"}, step=step + 1)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", far_acc=f"{rec['retrieval_acc_far']:.2f}",
                                tok_s=f"{tps:.0f}")
                bar.update(1)
            if (step + 1) % tc.log_interval == 0 or step + 1 == tc.steps:
                mfu = f" MFU {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
                msg = (f"step {step + 1}/{tc.steps} loss {rec['loss']:.4f} acc {rec['retrieval_acc']:.3f} "
                       f"far {rec['retrieval_acc_far']:.3f} lr {rec['lr']:.2e} {dt:.2f} s {tps:.0f} tok/s "
                       f"{tflops:.3f} TFLOP/s/GPU{mfu} mem {rec['peak_mem_gib']:.2f} GiB comm {comm / 2**20:.1f} MiB")
                if bar is not None:
                    bar.write(f"[train] {msg}")
                else:
                    say(msg)
        if tc.save_interval and (step + 1) % tc.save_interval == 0 or (tc.save_final and step + 1 == tc.steps):
            save_checkpoint(engine, ckpt_dir, f"step_{step + 1}", {"step": step + 1}, is_main)
            say(f"saved checkpoint {ckpt_dir}/step_{step + 1}")
    if bar is not None:
        bar.close()

    # -- final eval and summary -------------------------------------------------------------
    engine.eval()
    ev_loss, ev_c, ev_n, ev_fc, ev_fn = 0.0, 0, 0, 0, 0
    doc_acc: list[tuple[int, float]] = []  # (document length, accuracy) of every evaluated document
    with torch.no_grad():
        for i in range(tc.eval_batches):
            b = batch(i, 0, offset=10**9)  # samples never used in training
            logits = engine(b["input_ids"], b["position_ids"], **docs(b))
            ev_loss += float(sequence_parallel_loss(logits, b["labels"], topo))
            if "doc_ids" in b:  # packed documents: accuracy of each document
                cu = b["cu_seqlens"]
                dc, dn = per_document_accuracy(logits, b["labels"], b["doc_ids"], len(cu) - 1, topo)
                doc_acc += [(e - a, c / n) for a, e, c, n in zip(cu, cu[1:], dc, dn) if n]
            c, n = sequence_parallel_accuracy(logits, b["labels"], topo)
            ev_c, ev_n = ev_c + c, ev_n + n
            if "far_labels" in b:
                c, n = sequence_parallel_accuracy(logits, b["far_labels"], topo)
                ev_fc, ev_fn = ev_fc + c, ev_fn + n
            del logits
    timed = history[1:] if len(history) > 1 else history  # the first step includes compilation and warm-up
    peak_mem = torch.tensor([max((r["peak_mem_gib"] for r in history), default=0.0)], dtype=torch.float64)
    peak_mem = peak_mem.to(device)
    dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
    mean = lambda key: sum(r[key] for r in timed) / max(1, len(timed))  # noqa: E731
    summary = {
        "steps_run": len(history),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "mean_loss_last10": sum(r["loss"] for r in history[-10:]) / max(1, len(history[-10:])),
        "eval_loss": ev_loss / tc.eval_batches if tc.eval_batches else None,
        "eval_retrieval_acc": ev_c / ev_n if ev_n else None,
        "eval_retrieval_acc_far": ev_fc / ev_fn if ev_fn else None,
        "eval_far_answers": ev_fn,
        "eval_documents": len(doc_acc) or None,
        "eval_doc_acc_mean": sum(a for _, a in doc_acc) / len(doc_acc) if doc_acc else None,
        "eval_doc_acc_min": min(a for _, a in doc_acc) if doc_acc else None,
        "eval_doc_acc": [[n, round(a, 4)] for n, a in doc_acc] or None,
        "chance_acc": getattr(source, "chance_accuracy", None),
        "chance_loss": getattr(source, "chance_loss", None),
        "tokens_per_s": mean("tokens_per_s") if history else None,
        "tflops_per_gpu": mean("tflops_per_gpu") if history else None,
        "mfu": mean("tflops_per_gpu") / peak if peak and history else None,
        "step_time_s": mean("step_time_s") if history else None,
        "first_step_time_s": history[0]["step_time_s"] if history else None,
        "timed_steps": len(timed),
        "peak_mem_gib": float(peak_mem[0]) if history else None,
        "attn_comm_bytes_per_step": history[-1]["attn_comm_bytes"] if history else None,
        "attention": attention,
        "layout": layout,
        "model_params": mcfg.num_params(),
        "flops_per_token": flops_per_token,
        "tokens_per_step": tokens_per_step,
        "world_size": world,
        "sequence_parallel_size": topo.sequence_parallel_size,
        "seq_len": tc.seq_len,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if is_main:
        with open(os.path.join(tc.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        say("summary: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
        if summary["eval_retrieval_acc_far"] is not None:
            say(f"retrieval accuracy on held-out answers whose fact is on another SP rank: "
                f"{summary['eval_retrieval_acc_far']:.3f} over {ev_fn} answers (chance {summary['chance_acc']:.3f}); "
                f"all answers: {summary['eval_retrieval_acc']:.3f}")
        if doc_acc:
            say("packed documents: accuracy per held-out document (length: accuracy) "
                + ", ".join(f"{n}: {a:.2f}" for n, a in doc_acc[:16]) + (" ..." if len(doc_acc) > 16 else "")
                + f"; mean over {len(doc_acc)} documents {summary['eval_doc_acc_mean']:.3f}, "
                f"worst {summary['eval_doc_acc_min']:.3f} (chance {summary['chance_acc']:.3f})")
        if summary["tokens_per_s"] is not None:
            mfu_txt = f", MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else ""
            say(f"throughput over steps {len(history) - len(timed) + 1}-{len(history)}: "
                f"{summary['tokens_per_s']:.0f} tokens/s, "
                f"{summary['tflops_per_gpu']:.2f} TFLOP/s per GPU{mfu_txt}, {summary['step_time_s']:.3f} s/step; "
                f"peak memory {summary['peak_mem_gib']:.2f} GiB (max over ranks); "
                f"summary in {os.path.join(tc.output_dir, 'summary.json')}")
        if run is not None:
            run.summary.update({k: v for k, v in summary.items() if v is not None})
            run.finish()
            if mode == "offline":
                say(f"wandb offline run written under {os.path.join(tc.wandb.dir or tc.output_dir, 'wandb')}")
    dist.barrier()
    return summary


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


if __name__ == "__main__":
    main()
