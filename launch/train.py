"""Train the built-in Llama-style model with BurstAttention sequence parallelism under DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py --config configs/cpu_tiny.json [--override train.steps=50 ...]

One JSON file holds the DeepSpeed config (ZeRO, optimizer, scheduler, batch sizes, top-level
"sequence_parallel_size"), the "burst_attention" section (ds_burst.attention.config.BurstConfig) and a "train"
section (model, data, steps, sequence length, precision, logging, checkpoints); docs/TRAINING.md
documents every key. The "train" section is removed before the config reaches DeepSpeed; its dataclasses, the
command line and the config file handling live in launch/train_config.py (re-exported here).

``main`` runs the phases in order: runtime (distributed init, device), topology and DeepSpeed config, model and
engine, data, resume, logging, the training loop, the held-out evaluation and the summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from train_config import TrainConfig, WandbConfig, apply_overrides, load_config, parse_args, wandb_mode

if TYPE_CHECKING:
    import torch

    from ds_burst.attention.config import BurstConfig
    from ds_burst.dist.topology import Topology
    from ds_burst.training.model import ModelConfig

__all__ = ["TrainConfig", "WandbConfig", "apply_overrides", "load_config", "main", "parse_args", "wandb_mode"]

# ---------------------------------------------------------------------------------------------
# Helpers


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
    """Dense bf16 peak TFLOP/s of one device for MFU: H100/H200 989, A100/A800 312, else None (and on the CPU)."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        return 989.0
    if "A100" in name or "A800" in name:
        return 312.0
    return None


def format_flops(tflops: float) -> str:
    """A FLOP rate given in TFLOP/s, three significant digits in the largest unit that keeps it >= 1 (a CPU run's
    rate would print as 0.00 TFLOP/s): ``"294 TFLOP/s"``, ``"41.7 GFLOP/s"``, ``"12.3 MFLOP/s"``."""
    if not math.isfinite(tflops):
        return f"{tflops} TFLOP/s"
    for unit, scale in (("TFLOP/s", 1.0), ("GFLOP/s", 1e-3), ("MFLOP/s", 1e-6), ("kFLOP/s", 1e-9)):
        if abs(tflops) >= scale:
            return f"{tflops / scale:.3g} {unit}"
    return f"{tflops * 1e12:.3g} FLOP/s"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def doc_kwargs(b: dict[str, Any]) -> dict[str, Any]:
    """The model's ``cu_seqlens`` keyword for packed batches (nothing otherwise)."""
    return {"cu_seqlens": b["cu_seqlens"]} if "cu_seqlens" in b else {}


# ---------------------------------------------------------------------------------------------
# Runtime, topology, DeepSpeed config


@dataclass
class Runtime:
    """This process in the distributed job: its rank, the world size, its device, and the parsed BurstConfig."""

    burst: BurstConfig
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, msg: str) -> None:
        """Print ``[train] msg`` on rank 0."""
        if self.is_main:
            print(f"[train] {msg}", flush=True)

    def barrier(self) -> None:
        """Wait for all ranks."""
        import torch.distributed as dist

        dist.barrier()


def set_wandb_env(ds_config: dict[str, Any], tc: TrainConfig) -> tuple[str, str]:
    """Choose the wandb mode (``(mode, reason)``, see ``wandb_mode``); when our run or DeepSpeed's monitor uses
    wandb, set WANDB_MODE (unless already set) and WANDB_SILENT before anything imports wandb."""
    mode, why = wandb_mode(tc.wandb)
    if tc.wandb.enabled or ds_config.get("wandb", {}).get("enabled"):
        if not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")
    return mode, why


def init_runtime(ds_config: dict[str, Any], local_rank: int) -> Runtime:
    """Import DeepSpeed, take the "burst_attention" section out of ``ds_config`` (in place), initialise
    torch.distributed and pick the device: ``cuda:<local_rank>`` or the CPU with its cores shared by the local
    ranks."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import deepspeed
    import torch
    import torch.distributed as dist

    from ds_burst.attention.config import BurstConfig

    burst = BurstConfig.from_ds_config(ds_config)
    ds_config.pop("burst_attention", None)  # DeepSpeed would ignore it; keep its printout short
    deepspeed.init_distributed(dist_backend=None)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Runtime(burst, rank, world, device)


def init_topology(rt: Runtime) -> Topology:
    """The data x sequence parallel process groups; patch DeepSpeed's DistributedAttention when configured."""
    import ds_burst

    topo = ds_burst.init_sequence_parallel(rt.burst.sequence_parallel_size, rt.burst.gpus_per_node,
                                           rt.burst.schedule, rt.burst.ulysses_degree)
    if rt.burst.patch_deepspeed:
        ds_burst.patch_deepspeed()
    return topo


def resolve_ds_config(ds_config: dict[str, Any], tc: TrainConfig, data_parallel_size: int,
                      device: torch.device) -> tuple[bool, int, int]:
    """Fill in ``ds_config`` in place (bf16 from train.precision, scheduler ``total_num_steps: "auto"``,
    train_batch_size, steps_per_print); return ``(use_bf16, micro batch size, gradient accumulation steps)``."""
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    ds_config["bf16"] = {**ds_config.get("bf16", {}), "enabled": use_bf16}
    sched = ds_config.get("scheduler")
    if sched and "total_num_steps" in sched.get("params", {}) and sched["params"]["total_num_steps"] == "auto":
        sched["params"]["total_num_steps"] = tc.steps
    mbs = int(ds_config.get("train_micro_batch_size_per_gpu", 1))
    gas = int(ds_config.get("gradient_accumulation_steps", 1))
    ds_config.setdefault("train_batch_size", mbs * gas * data_parallel_size)
    ds_config.setdefault("steps_per_print", 10**9)
    return use_bf16, mbs, gas


def print_config(ds_config: dict[str, Any], tc: TrainConfig, local_rank: int) -> dict[str, Any]:
    """``--print-config``: resolve the config as a run would and print it as JSON on rank 0 (``RANK``, default 0),
    without torch.distributed, DeepSpeed or a device context, so it takes a second by hand and under the launcher.

    The world size is the launcher's ``WORLD_SIZE``; run by hand (no ``WORLD_SIZE``) it is the config's
    ``sequence_parallel_size`` (one data-parallel replica), which a note on stderr says. The device decides bf16
    (``train.precision: auto``) as in a run: CUDA when available. Returns the printed object."""
    import torch

    from ds_burst.attention.config import BurstConfig

    burst = BurstConfig.from_ds_config(ds_config)  # the same checks as a run
    ds_config.pop("burst_attention", None)
    sp = burst.sequence_parallel_size
    launched = os.environ.get("WORLD_SIZE")
    world = int(launched) if launched else sp
    if world % sp:
        raise ValueError(f"sequence_parallel_size={sp} does not divide the world size {world} (WORLD_SIZE)")
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    resolve_ds_config(ds_config, tc, world // sp, device)
    resolved = {"deepspeed": ds_config, "burst_attention": burst.to_dict(), "train": asdict(tc)}
    if int(os.environ.get("RANK", "0")) == 0:
        source = "WORLD_SIZE" if launched else "not launched: one data-parallel replica assumed"
        print(f"[train] resolved config for world size {world} = dp {world // sp} x sp {sp} ({source}), device "
              f"{device.type}", file=sys.stderr, flush=True)
        print(json.dumps(resolved, indent=2), flush=True)
    return resolved


# ---------------------------------------------------------------------------------------------
# Model, engine, data


@dataclass
class Job:
    """Everything the training, evaluation and summary phases share."""

    rt: Runtime
    tc: TrainConfig
    ds_config: dict[str, Any]  # as given to DeepSpeed
    topo: Topology
    mcfg: ModelConfig
    engine: Any  # deepspeed.DeepSpeedEngine
    attention: str  # "burst", "ulysses" or "local"
    layout: str  # sequence layout of the SP shards
    use_bf16: bool
    zero_stage: int
    mbs: int  # micro batch size per GPU
    gas: int  # gradient accumulation steps
    sp_grads_averaged: bool
    source: Any = None  # RetrievalTask, PackedRetrieval or TokenFile
    peak_tflops: float | None = None  # per device, for MFU
    ckpt_dir: str = field(init=False)
    tokens_per_step: int = field(init=False)
    flops_per_token: float = field(init=False)

    def __post_init__(self) -> None:
        self.ckpt_dir = os.path.join(self.tc.output_dir, "checkpoints")
        self.tokens_per_step = self.tc.seq_len * self.mbs * self.gas * self.topo.data_parallel_size
        self.flops_per_token = self.mcfg.train_flops_per_token(self.tc.seq_len)

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def is_main(self) -> bool:
        return self.rt.is_main

    def say(self, msg: str) -> None:
        """Print ``[train] msg`` on rank 0."""
        self.rt.say(msg)

    def batch(self, step: int, micro: int, offset: int = 0) -> dict[str, Any]:
        """This rank's shard of micro batch ``micro`` of optimizer step ``step`` (sample indices + ``offset``)."""
        from ds_burst.training.data import make_batch, sample_indices

        idx = sample_indices(step, micro, self.gas, self.topo.dp_rank, self.topo.data_parallel_size, self.mbs)
        return make_batch(self.source, [i + offset for i in idx], self.topo.sp_rank,
                          self.topo.sequence_parallel_size, self.layout, self.device)


def build_engine(rt: Runtime, ds_config: dict[str, Any], tc: TrainConfig, topo: Topology, use_bf16: bool,
                 mbs: int, gas: int) -> Job:
    """Print the schedule report, seed, build BurstLlama (under ZeRO-3 Init when configured) and its DeepSpeed
    engine; the returned Job has no data source yet."""
    import deepspeed
    import torch

    import ds_burst
    from ds_burst.core.cost_model import schedule_report
    from ds_burst.training.losses import sp_grads_averaged
    from ds_burst.training.model import BurstLlama, ModelConfig

    burst = rt.burst
    mcfg = ModelConfig.from_dict(tc.model)
    report = schedule_report(topo.schedule, tc.seq_len, topo.sequence_parallel_size, topo.gpus_per_node,
                             mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim, 2 if rt.device.type == "cuda" else 4)
    if rt.device.type != "cuda":  # the predicted times are for GPU figures (H200 defaults): not this run's
        report = report.splitlines()[-1] + " (cost-model times are GPU predictions: not printed for a CPU run)"
    rt.say(report)
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
    return Job(rt=rt, tc=tc, ds_config=ds_config, topo=topo, mcfg=mcfg, engine=engine, attention=attention,
               layout=burst.layout if attention == "burst" else "contiguous",  # Ulysses takes contiguous shards
               use_bf16=use_bf16, zero_stage=stage, mbs=mbs, gas=gas,
               sp_grads_averaged=sp_grads_averaged(ds_config, model=engine.module),
               peak_tflops=tc.peak_tflops if tc.peak_tflops is not None else default_peak_tflops(rt.device))


def make_data_source(tc: TrainConfig, vocab_size: int) -> Any:
    """The sample source of train.data: RetrievalTask, PackedRetrieval (``packed: true``) or TokenFile."""
    from ds_burst.training.data import PackedRetrieval, RetrievalTask, TokenFile

    data_cfg = dict(tc.data)
    kind = data_cfg.pop("type", "retrieval")
    packed = bool(data_cfg.pop("packed", False))
    if kind == "retrieval" and packed:  # documents of varied lengths in one sequence (cu_seqlens)
        return PackedRetrieval(tc.seq_len, vocab_size, **data_cfg)
    if kind == "retrieval":
        return RetrievalTask(tc.seq_len, vocab_size, **data_cfg)
    if kind == "tokens":
        return TokenFile(data_cfg.pop("path"), tc.seq_len, **data_cfg)
    raise ValueError(f"train.data.type: expected 'retrieval' or 'tokens', got {kind!r}")


# ---------------------------------------------------------------------------------------------
# Resume, logging


def resume(job: Job) -> int:
    """Load the checkpoint train.resume asks for; return the step to start from (0 without one)."""
    tc = job.tc
    load_dir = tc.resume if isinstance(tc.resume, str) else job.ckpt_dir
    if tc.resume and (tc.resume_tag or os.path.exists(os.path.join(load_dir, "latest"))):
        path, client = job.engine.load_checkpoint(load_dir, tag=tc.resume_tag)
        if path is None:
            raise FileNotFoundError(f"could not load checkpoint {tc.resume_tag or 'latest'} from {load_dir}")
        start = int(client["step"])
        job.say(f"resumed from {path} at step {start}")
        return start
    if tc.resume:
        if isinstance(tc.resume, str):
            raise FileNotFoundError(f"train.resume={tc.resume!r}: no 'latest' file there; set train.resume_tag")
        job.say(f"resume requested but no checkpoint in {job.ckpt_dir}; starting from scratch")
    return 0


@dataclass
class Logs:
    """Where rank 0 records the run: metrics.jsonl, the wandb run and the progress bar (None where unused)."""

    metrics_path: str
    wandb_mode: str
    run: Any = None  # wandb run
    bar: Any = None  # tqdm


def open_logs(job: Job, start: int, mode: str, why: str) -> Logs:
    """Create the output directory; on rank 0 print the run line, start wandb, cut metrics.jsonl back to the
    steps up to ``start`` and open the progress bar."""
    tc = job.tc
    os.makedirs(tc.output_dir, exist_ok=True)
    logs = Logs(os.path.join(tc.output_dir, "metrics.jsonl"), mode)
    if job.is_main:
        topo, mcfg = job.topo, job.mcfg
        job.say(f"world {job.rt.world} = dp {topo.data_parallel_size} x sp {topo.sequence_parallel_size}, "
                f"device {job.device}, {'bf16' if job.use_bf16 else 'fp32'}, ZeRO stage {job.zero_stage}, "
                f"model {mcfg.num_params() / 1e6:.2f}M params, seq_len {tc.seq_len}, {job.tokens_per_step} "
                f"tokens/step, attention {job.attention}, layout {job.layout}")
        if job.mcfg.lm_head_chunk_tokens is not None:
            job.say("training accuracy not measured (chunked LM head: no logits); the held-out evaluation at the "
                    "end measures it")
        if tc.wandb.enabled:
            import wandb

            full_config = {"deepspeed": job.ds_config, "burst_attention": job.rt.burst.to_dict(),
                           "train": asdict(tc), "model_params": mcfg.num_params(), "world_size": job.rt.world,
                           "data_parallel_size": topo.data_parallel_size}
            job.say(f"wandb mode {mode} ({why})" + ("; sync later with `wandb sync <run dir>`" if mode == "offline"
                                                      else ""))
            logs.run = wandb.init(project=tc.wandb.project, name=tc.wandb.name, entity=tc.wandb.entity,
                                  dir=tc.wandb.dir or tc.output_dir, mode=mode, config=full_config,
                                  resume="allow" if tc.resume else None)
        if os.path.exists(logs.metrics_path):  # keep only the history before the (re)start step
            with open(logs.metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
            with open(logs.metrics_path, "w") as f:
                f.writelines(kept)
        if tc.progress_bar:
            from tqdm import tqdm

            logs.bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)
    return logs


# ---------------------------------------------------------------------------------------------
# Training


def train_step(job: Job, step: int) -> dict[str, Any]:
    """Run optimizer step ``step`` (0-based; ``gas`` micro batches) and return its metrics record, averaged over
    the data-parallel ranks."""
    import torch
    import torch.distributed as dist

    import ds_burst
    from ds_burst.training.losses import sequence_parallel_accuracy, sequence_parallel_loss

    engine, topo, device = job.engine, job.topo, job.device
    chunked_head = job.mcfg.lm_head_chunk_tokens is not None  # chunked LM head: no logits, no train accuracy
    t_data = time.perf_counter()
    micro_batches = [job.batch(step, micro) for micro in range(job.gas)]  # built before the timed part
    t_data = time.perf_counter() - t_data
    ds_burst.reset_comm_stats()
    t0 = time.perf_counter()
    loss_sum, correct, total, far_c, far_n = 0.0, 0, 0, 0, 0
    for b in micro_batches:
        if chunked_head:
            loss = engine(b["input_ids"], b["position_ids"], b["labels"], sp_grads_averaged=job.sp_grads_averaged,
                          **doc_kwargs(b))
        else:
            logits = engine(b["input_ids"], b["position_ids"], **doc_kwargs(b))
            loss = sequence_parallel_loss(logits, b["labels"], topo, sp_grads_averaged=job.sp_grads_averaged)
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach())
        if not chunked_head:
            c, n = sequence_parallel_accuracy(logits, b["labels"], topo)
            correct, total = correct + c, total + n
            if "far_labels" in b:
                c, n = sequence_parallel_accuracy(logits, b["far_labels"], topo)
                far_c, far_n = far_c + c, far_n + n
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    stats = torch.tensor([loss_sum / job.gas, correct, total, far_c, far_n], dtype=torch.float64)
    if topo.data_parallel_size > 1:
        dp_group = topo.get_data_parallel_group()
        stats = stats.to(device) if "nccl" in str(dist.get_backend(dp_group)) else stats
        dist.all_reduce(stats, group=dp_group)
        stats = stats.cpu()
        stats[0] /= topo.data_parallel_size
    tps = job.tokens_per_step / dt
    tflops = job.flops_per_token * tps / job.rt.world / 1e12
    return {
        "step": step + 1,
        "loss": float(stats[0]),
        "lr": float(engine.get_lr()[0]),
        # None when not measured: chunked LM head (no logits), no far answers (token files, packed documents)
        "retrieval_acc": float(stats[1] / stats[2]) if stats[2] > 0 else None,
        "retrieval_acc_far": float(stats[3] / stats[4]) if stats[4] > 0 else None,
        "tokens_per_s": tps,
        "tflops_per_gpu": tflops,
        "mfu": tflops / job.peak_tflops if job.peak_tflops else None,
        "step_time_s": dt,
        "data_time_s": t_data,
        "attn_comm_bytes": sum(ds_burst.comm_stats().values()),
        "peak_mem_gib": peak_memory_gib(device),
        "rss_mib": rss_mib(),
    }


def log_step(job: Job, logs: Logs, rec: dict[str, Any]) -> None:
    """On rank 0: append ``rec`` to metrics.jsonl, log it to wandb, advance the bar, print every log_interval."""
    if not job.is_main:
        return
    step, steps = rec["step"], job.tc.steps
    with open(logs.metrics_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if logs.run is not None:
        logs.run.log({k: v for k, v in rec.items() if v is not None and k != "step"}, step=step)
    if logs.bar is not None:
        far = {} if rec["retrieval_acc_far"] is None else {"far_acc": f"{rec['retrieval_acc_far']:.2f}"}
        logs.bar.set_postfix(loss=f"{rec['loss']:.3f}", **far, tok_s=f"{rec['tokens_per_s']:.0f}")
        logs.bar.update(1)
    if step % job.tc.log_interval == 0 or step == steps:
        mfu = f" MFU {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
        measured = (("acc", rec["retrieval_acc"]), ("far", rec["retrieval_acc_far"]))
        acc = "".join(f" {name} {v:.3f}" for name, v in measured if v is not None)  # only what this step measured
        msg = (f"step {step}/{steps} loss {rec['loss']:.4f}{acc} lr {rec['lr']:.2e} {rec['step_time_s']:.2f} s "
               f"{rec['tokens_per_s']:.0f} tok/s {format_flops(rec['tflops_per_gpu'])}/GPU{mfu} "
               f"mem {rec['peak_mem_gib']:.2f} GiB comm {rec['attn_comm_bytes'] / 2**20:.1f} MiB")
        if logs.bar is not None:
            logs.bar.write(f"[train] {msg}")
        else:
            job.say(msg)


def train_loop(job: Job, logs: Logs, start: int) -> list[dict[str, Any]]:
    """Steps ``start`` .. train.steps: one record each, logged; checkpoints every save_interval and at the end
    with save_final. Returns the records of the steps run here."""
    tc = job.tc
    history: list[dict[str, Any]] = []
    job.engine.train()
    for step in range(start, tc.steps):
        rec = train_step(job, step)
        history.append(rec)
        log_step(job, logs, rec)
        if tc.save_interval and (step + 1) % tc.save_interval == 0 or (tc.save_final and step + 1 == tc.steps):
            save_checkpoint(job.engine, job.ckpt_dir, f"step_{step + 1}", {"step": step + 1}, job.is_main)
            job.say(f"saved checkpoint {job.ckpt_dir}/step_{step + 1}")
    if logs.bar is not None:
        logs.bar.close()
    return history


# ---------------------------------------------------------------------------------------------
# Evaluation and summary


@dataclass
class EvalResult:
    """Sums over the held-out batches: loss, answers right/total, far answers right/total, and per document."""

    loss_sum: float = 0.0
    correct: int = 0
    total: int = 0
    far_correct: int = 0
    far_total: int = 0
    doc_acc: list[tuple[int, float]] = field(default_factory=list)  # (document length, accuracy) per document


def evaluate(job: Job) -> EvalResult:
    """Loss and retrieval accuracy on train.eval_batches held-out batches (samples never used in training)."""
    import torch

    from ds_burst.training.losses import per_document_accuracy, sequence_parallel_accuracy, sequence_parallel_loss

    engine, topo = job.engine, job.topo
    ev = EvalResult()
    engine.eval()
    with torch.no_grad():
        for i in range(job.tc.eval_batches):
            b = job.batch(i, 0, offset=10**9)  # samples never used in training
            logits = engine(b["input_ids"], b["position_ids"], **doc_kwargs(b))
            ev.loss_sum += float(sequence_parallel_loss(logits, b["labels"], topo))
            if "doc_ids" in b:  # packed documents: accuracy of each document
                cu = b["cu_seqlens"]
                dc, dn = per_document_accuracy(logits, b["labels"], b["doc_ids"], len(cu) - 1, topo)
                ev.doc_acc += [(e - a, c / n) for a, e, c, n in zip(cu, cu[1:], dc, dn) if n]
            c, n = sequence_parallel_accuracy(logits, b["labels"], topo)
            ev.correct, ev.total = ev.correct + c, ev.total + n
            if "far_labels" in b:
                c, n = sequence_parallel_accuracy(logits, b["far_labels"], topo)
                ev.far_correct, ev.far_total = ev.far_correct + c, ev.far_total + n
            del logits
    return ev


def timed_steps(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records that throughput is averaged over: all but the first (compilation and warm-up), if more."""
    return history[1:] if len(history) > 1 else history


def summarize(job: Job, history: list[dict[str, Any]], ev: EvalResult) -> dict[str, Any]:
    """The run's summary (summary.json); a collective: the peak memory is the max over all ranks."""
    import torch
    import torch.distributed as dist

    tc, topo, device, peak, doc_acc = job.tc, job.topo, job.device, job.peak_tflops, ev.doc_acc
    timed = timed_steps(history)
    peak_mem = torch.tensor([max((r["peak_mem_gib"] for r in history), default=0.0)], dtype=torch.float64)
    peak_mem = peak_mem.to(device)
    dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
    mean = lambda key: sum(r[key] for r in timed) / max(1, len(timed))  # noqa: E731
    return {
        "steps_run": len(history),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "mean_loss_last10": sum(r["loss"] for r in history[-10:]) / max(1, len(history[-10:])),
        "eval_loss": ev.loss_sum / tc.eval_batches if tc.eval_batches else None,
        "eval_retrieval_acc": ev.correct / ev.total if ev.total else None,
        "eval_retrieval_acc_far": ev.far_correct / ev.far_total if ev.far_total else None,
        "eval_far_answers": ev.far_total,
        "eval_documents": len(doc_acc) or None,
        "eval_doc_acc_mean": sum(a for _, a in doc_acc) / len(doc_acc) if doc_acc else None,
        "eval_doc_acc_min": min(a for _, a in doc_acc) if doc_acc else None,
        "eval_doc_acc": [[n, round(a, 4)] for n, a in doc_acc] or None,
        "chance_acc": getattr(job.source, "chance_accuracy", None),
        "chance_loss": getattr(job.source, "chance_loss", None),
        "tokens_per_s": mean("tokens_per_s") if history else None,
        "tflops_per_gpu": mean("tflops_per_gpu") if history else None,
        "mfu": mean("tflops_per_gpu") / peak if peak and history else None,
        "step_time_s": mean("step_time_s") if history else None,
        "first_step_time_s": history[0]["step_time_s"] if history else None,
        "timed_steps": len(timed),
        "peak_mem_gib": float(peak_mem[0]) if history else None,
        "attn_comm_bytes_per_step": history[-1]["attn_comm_bytes"] if history else None,
        "attention": job.attention,
        "layout": job.layout,
        "model_params": job.mcfg.num_params(),
        "flops_per_token": job.flops_per_token,
        "tokens_per_step": job.tokens_per_step,
        "world_size": job.rt.world,
        "sequence_parallel_size": topo.sequence_parallel_size,
        "seq_len": tc.seq_len,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def report(job: Job, logs: Logs, summary: dict[str, Any], history: list[dict[str, Any]], ev: EvalResult) -> None:
    """Rank 0 only: write summary.json, print the summary, accuracy and throughput lines, finish wandb."""
    tc, doc_acc = job.tc, ev.doc_acc
    with open(os.path.join(tc.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    job.say("summary: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    if summary["eval_retrieval_acc_far"] is not None:
        job.say(f"retrieval accuracy on held-out answers whose fact is on another SP rank: "
                f"{summary['eval_retrieval_acc_far']:.3f} over {ev.far_total} answers "
                f"(chance {summary['chance_acc']:.3f}); all answers: {summary['eval_retrieval_acc']:.3f}")
    if doc_acc:
        job.say("packed documents: accuracy per held-out document (length: accuracy) "
                + ", ".join(f"{n}: {a:.2f}" for n, a in doc_acc[:16]) + (" ..." if len(doc_acc) > 16 else "")
                + f"; mean over {len(doc_acc)} documents {summary['eval_doc_acc_mean']:.3f}, "
                f"worst {summary['eval_doc_acc_min']:.3f} (chance {summary['chance_acc']:.3f})")
    if summary["tokens_per_s"] is not None:
        mfu_txt = f", MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else ""
        job.say(f"throughput over steps {len(history) - len(timed_steps(history)) + 1}-{len(history)}: "
                f"{summary['tokens_per_s']:.0f} tokens/s, "
                f"{format_flops(summary['tflops_per_gpu'])} per GPU{mfu_txt}, {summary['step_time_s']:.3f} s/step; "
                f"peak memory {summary['peak_mem_gib']:.2f} GiB (max over ranks); "
                f"summary in {os.path.join(tc.output_dir, 'summary.json')}")
    if logs.run is not None:
        logs.run.summary.update({k: v for k, v in summary.items() if v is not None})
        logs.run.finish()
        if logs.wandb_mode == "offline":
            job.say(f"wandb offline run written under {os.path.join(tc.wandb.dir or tc.output_dir, 'wandb')}")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one training job; return its summary on every rank (``{}`` with --print-config)."""
    args = parse_args(argv)
    ds_config, tc = load_config(args.config, args.override)
    if args.print_config:  # no torch.distributed, no DeepSpeed engine: fast by hand and under the launcher
        print_config(ds_config, tc, args.local_rank)
        return {}
    mode, why = set_wandb_env(ds_config, tc)
    rt = init_runtime(ds_config, args.local_rank)
    topo = init_topology(rt)
    use_bf16, mbs, gas = resolve_ds_config(ds_config, tc, topo.data_parallel_size, rt.device)

    job = build_engine(rt, ds_config, tc, topo, use_bf16, mbs, gas)
    job.source = make_data_source(tc, job.mcfg.vocab_size)
    start = resume(job)
    logs = open_logs(job, start, mode, why)

    history = train_loop(job, logs, start)
    ev = evaluate(job)
    summary = summarize(job, history, ev)
    if rt.is_main:
        report(job, logs, summary, history, ev)
    rt.barrier()
    return summary


def shutdown() -> None:
    """Tear the process groups down, then leave without the interpreter's teardown. A rank whose work was done
    (every file written and closed, the wandb run finished, all ranks past the last barrier) still aborted at exit
    now and then on CPU with gloo ("terminate called without an active exception", return code -6; twice in
    clean-clone CI runs of 2026-12-07, after the groups had been destroyed): the job then fails although it
    trained. Only a run that returned normally gets here; an exception exits as Python does."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    shutdown()
