"""Peak memory per GPU of whole training jobs: ds-burst against DeepSpeed-Ulysses, full model, ZeRO-3.

    python launch/bench_train_memory.py --config configs/h200x2_llama8b.json --gpus 2 \\
        --runs ds-burst:131072 ulysses:131072 ulysses-plain:131072 --out results/train_memory.json

Each run is its own ``deepspeed --num_gpus N launch/train.py --config C --override ...`` job (a fresh process,
so a run that runs out of memory does not disturb the next) with a wall-clock limit (``--timeout``). Methods:

* ``ds-burst``: ``train.attention=burst`` with the config's model memory options (chunked LM head, tiled MLP,
  selective checkpointing / offload if set).
* ``ulysses``: ``train.attention=ulysses`` (DeepSpeed's ``DistributedAttention``) with the same model options:
  the difference to ``ds-burst`` is the attention alone.
* ``ulysses-plain``: ``train.attention=ulysses`` without a chunked LM head and without MLP tiles: the model as
  DeepSpeed-Ulysses runs it without ds-burst's model-side options.
* ``ds-burst-plain``: burst attention without those options.

The MLP tile count follows the local length: ``ceil(S / SP / --mlp-tile-tokens)``. The figures come from each
job's ``summary.json`` (peak GiB: ``torch.cuda.max_memory_allocated``, the largest over ranks; mean step time of
the steps after the first; tokens/s). Jobs that ran out of memory are marked ``OOM``, jobs over the limit
``timeout``. ``ds_burst.training.estimate.estimate_model_memory`` adds a prediction to the ds-burst rows.
Prints a table,
writes JSON (``{"meta", "rows"}``) and, with matplotlib, a PNG next to it. ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import device_meta, parse_tokens, print_table, pyplot, write_json  # noqa: E402
from train import apply_overrides  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("ds-burst", "ulysses", "ulysses-plain", "ds-burst-plain")
OOM_MARKS = ("OutOfMemoryError", "CUDA out of memory", "out of memory")


def parse_run(spec: str) -> tuple[str, int]:
    """``METHOD:S`` (``S`` may end in K or M: 128K = 131072)."""
    method, _, seq = spec.partition(":")
    if method not in METHODS or not seq:
        raise argparse.ArgumentTypeError(f"--runs: expected METHOD:S with METHOD in {METHODS}, got {spec!r}")
    try:
        return method, parse_tokens(seq)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--runs: bad length in {spec!r}") from exc


def overrides(method: str, seq: int, sp: int, tile_tokens: int, steps: int, out_dir: str) -> list[str]:
    """``--override`` entries of one job."""
    ov = [f"train.seq_len={seq}", f"train.steps={steps}", f"train.output_dir={out_dir}", "train.eval_batches=0",
          f"train.attention={'burst' if method.startswith('ds-burst') else 'ulysses'}",
          f"train.wandb.name={method}-{seq}"]
    if method.endswith("-plain"):
        ov += ["train.model.lm_head_chunk_tokens=null", "train.model.mlp_tiles=1",
               "train.model.offload_checkpoints=false"]
    else:
        ov.append(f"train.model.mlp_tiles={max(1, math.ceil(seq / sp / tile_tokens))}")
    if method.endswith("-plain") or method.startswith("ulysses"):  # selective checkpointing is burst-only
        ov.append("train.model.keep_attention_layers=0.0")
    return ov


def estimate(config: dict, ov: list[str], sp: int) -> dict | None:
    """``estimate_model_memory`` of the job's model (ZeRO stage and optimizer offload from the config)."""
    from ds_burst.training.estimate import estimate_model_memory
    from ds_burst.training.model import ModelConfig

    full = apply_overrides(config, ov)  # the job's config, as launch/train.py resolves it
    train = full["train"]
    zero = full.get("zero_optimization", {}) or {}
    off = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    try:
        return estimate_model_memory(ModelConfig.from_dict(train["model"]), train["seq_len"], sp=sp,
                                     zero_stage=int(zero.get("stage", 0)),
                                     activation_checkpointing=bool(train.get("activation_checkpointing")),
                                     offload_optimizer=off,
                                     zero_reduce_bucket=int(zero.get("reduce_bucket_size", 500_000_000)))
    except ValueError:
        return None


def run_one(args: argparse.Namespace, config: dict, method: str, seq: int) -> dict:
    sp = int(config.get("sequence_parallel_size", args.gpus))
    out_dir = os.path.join(args.workdir, f"{method}_{seq}")
    ov = [*args.extra, *overrides(method, seq, sp, args.mlp_tile_tokens, args.steps, out_dir)]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.gpus), "--master_port",
           str(args.port), os.path.join(ROOT, "launch", "train.py"), "--config", args.config, "--override", *ov]
    row: dict = {"method": method, "S": seq, "SP": sp,
                 "command": f"deepspeed --num_gpus {args.gpus} launch/train.py --config {args.config} --override "
                            + " ".join(f"'{x}'" if "{" in x else x for x in ov)}
    est = estimate(config, ov, sp) if method.startswith("ds-burst") else None
    if est is not None:
        row["estimate_gib"] = est["total"]
    if args.dry_run:
        print(" ".join(cmd))
        return row
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    log_path = os.path.join(out_dir, "log.txt")
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout, cwd=ROOT,
                                  start_new_session=True)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
            subprocess.run(["pkill", "-9", "-f", out_dir], check=False)  # the job's ranks carry its output dir
    row["wall_s"] = round(time.time() - t0, 1)
    with open(log_path, errors="replace") as f:
        text = f.read()
    summary_path = os.path.join(out_dir, "summary.json")
    if rc == 0 and os.path.exists(summary_path):
        with open(summary_path) as f:
            s = json.load(f)
        row.update(status="ok", peak_gib=s["peak_mem_gib"], step_s=s["step_time_s"],
                   first_step_s=s["first_step_time_s"], tokens_per_s=s["tokens_per_s"],
                   tflops_per_gpu=s["tflops_per_gpu"], loss=s["final_loss"])
    else:
        row["status"] = "timeout" if rc is None else ("OOM" if any(m in text for m in OOM_MARKS) else f"rc={rc}")
        row["log_tail"] = text[-600:]
    if est is not None and row.get("peak_gib"):
        row["measured_over_estimate"] = row["peak_gib"] / est["total"]
    print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
    return row


def add_ratios(rows: list[dict]) -> None:
    """``vs_<method>``: peak GiB of the row over that method's at the same S (when both ran)."""
    peaks = {(r["method"], r["S"]): r.get("peak_gib") for r in rows}
    for r in rows:
        for m in ("ulysses", "ulysses-plain"):
            other = peaks.get((m, r["S"]))
            if r.get("peak_gib") and other and r["method"] != m:
                r[f"vs_{m}"] = r["peak_gib"] / other


def plot(rows: list[dict], path: str, capacity: float | None) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in METHODS:
        sel = sorted((r for r in rows if r["method"] == m), key=lambda r: r["S"])
        if not sel:
            continue
        ok = [r for r in sel if r.get("peak_gib")]
        line = ax.plot([r["S"] / 1024 for r in ok], [r["peak_gib"] for r in ok], "o-", label=m)[0]
        for r in sel:
            if not r.get("peak_gib") and capacity:
                ax.plot(r["S"] / 1024, capacity, "x", color=line.get_color(), ms=10)
                ax.annotate(r.get("status", ""), (r["S"] / 1024, capacity), fontsize=7, xytext=(4, -10),
                            textcoords="offset points")
    if capacity:
        ax.axhline(capacity, color="gray", ls="--", lw=0.8, label="GPU memory")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (K tokens)")
    ax.set_ylabel("peak GiB per GPU")
    ax.set_title("one training job per point (x: did not train)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/h200x2_llama8b.json")
    ap.add_argument("--gpus", type=int, default=2, help="processes (GPUs, or CPU ranks) per job")
    ap.add_argument("--runs", nargs="+", type=parse_run, required=True, metavar="METHOD:S",
                    help=f"jobs in order, METHOD one of {', '.join(METHODS)}; S e.g. 131072 or 128K")
    ap.add_argument("--steps", type=int, default=2, help="training steps per job")
    ap.add_argument("--mlp-tile-tokens", type=int, default=8192, help="local tokens per MLP tile")
    ap.add_argument("--timeout", type=float, default=600.0, help="wall-clock limit per job, seconds")
    ap.add_argument("--workdir", default="runs/train_memory", help="output directories of the jobs")
    ap.add_argument("--port", type=int, default=29561, help="rendezvous port of the jobs")
    ap.add_argument("--out", default="results/train_memory.json")
    ap.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more --override entries for every job (before the per-method ones)")
    ap.add_argument("--dry-run", action="store_true", help="print the job commands and estimates only")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    with open(args.config) as f:
        config = json.load(f)
    capacity = None
    try:
        import torch

        if torch.cuda.is_available():
            capacity = torch.cuda.get_device_properties(0).total_memory / 2**30
    except ImportError:
        pass
    meta = device_meta() | {"command": " ".join(sys.argv), "config": config, "gpu_memory_gib": capacity}
    rows: list[dict] = []
    for m, s in args.runs:
        rows.append(run_one(args, config, m, s))
        add_ratios(rows)
        if not args.dry_run:  # after every job: a cut-off session keeps what finished
            write_json(args.out, meta, rows)
    cols = ["method", "S", "status", "peak_gib", "estimate_gib", "vs_ulysses", "vs_ulysses-plain", "step_s",
            "tokens_per_s", "wall_s"]
    print_table(rows, cols)
    if not args.dry_run:
        plot(rows, os.path.splitext(args.out)[0] + ".png", capacity)
    return rows


if __name__ == "__main__":
    main()
