"""Launched by tests/test_deepspeed_train.py with ``deepspeed --num_gpus N``: trains the built-in model a few
steps under ZeRO-3 (activation checkpointing off, torch, deepspeed) and saves, on rank 0, the loss and the full
gradient of every parameter at every step. SP=1 runs use plain full-sequence attention ("local").

``--gpu`` runs the same on CUDA with NCCL in bf16 with a larger model and sequence (stage ``equiv`` of
``launch/gpu_session.sh``); ``--compare SP1.pt OTHER.pt`` prints (and checks) the relative differences.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

import ds_burst
from ds_burst.attention.config import BurstConfig
from ds_burst.training.data import TokenFile, make_batch, sample_indices
from ds_burst.training.losses import sequence_parallel_loss, sp_grads_averaged
from ds_burst.training.model import BurstLlama, ModelConfig

warnings.filterwarnings("ignore", category=FutureWarning)

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
GPU_MODEL = ModelConfig(vocab_size=1024, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4)
GPU_LOSS_RTOL = 2e-2  # bf16: measured differences are printed by --compare
GPU_GRAD_RTOL = 5e-2  # relative Frobenius error of each parameter's gradient


def run(topo, data: TokenFile, mbs: int, steps: int, ckpt: str, layout: str, zero: dict, gpu: bool = False) -> dict:
    """``ckpt``: "off", "torch" or "deepspeed" activation checkpointing."""
    torch.manual_seed(0)
    attention = "burst" if topo.sequence_parallel_size > 1 else "local"
    model = BurstLlama(GPU_MODEL if gpu else MODEL, group=topo, attention=attention, burst=BurstConfig(layout=layout),
                       activation_checkpointing=ckpt != "off", checkpoint_impl="torch" if ckpt == "off" else ckpt)
    config = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": 1,
        "train_batch_size": mbs * topo.data_parallel_size,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if gpu:
        config["bf16"] = {"enabled": True}
    if ckpt == "deepspeed":
        deepspeed.checkpointing.configure(topo, deepspeed_config=config)
    engine, *_ = ds_burst.deepspeed_initialize(model, config, topo)
    losses, grads = [], []
    for step in range(steps):
        idx = sample_indices(step, 0, 1, topo.dp_rank, topo.data_parallel_size, mbs)
        b = make_batch(data, idx, topo.sp_rank, topo.sequence_parallel_size, layout)
        if gpu:
            b = {k: v.cuda() for k, v in b.items()}
        logits = engine(b["input_ids"], b["position_ids"])
        averaged = sp_grads_averaged(config, model=engine.module)
        loss = sequence_parallel_loss(logits, b["labels"], topo, sp_grads_averaged=averaged)
        engine.backward(loss)
        g = {n: safe_get_full_grad(p).detach().float().cpu() for n, p in engine.module.named_parameters()}
        engine.step()
        lt = torch.tensor([float(loss.detach())], dtype=torch.float64, device="cuda" if gpu else "cpu")
        dist.all_reduce(lt, group=topo.get_data_parallel_group())
        losses.append(float(lt) / topo.data_parallel_size)
        grads.append(g)
    engine.destroy() if hasattr(engine, "destroy") else None
    return {"losses": losses, "grads": grads}


def compare(ref_path: str, got_path: str) -> bool:
    """Print the relative loss and gradient differences of two ``--gpu`` results; True when within tolerance."""
    ref, got = torch.load(ref_path), torch.load(got_path)
    ok = True
    for key in (k for k in ref if k.startswith("ckpt=")):
        r, g = ref[key], got[key]
        loss_err = max(abs(a - b) / abs(a) for a, b in zip(r["losses"], g["losses"]))
        grad_err = max(float((gb[n] - ga[n]).norm() / ga[n].norm().clamp_min(1e-30))
                       for ga, gb in zip(r["grads"], g["grads"]) for n in ga)
        ok &= loss_err <= GPU_LOSS_RTOL and grad_err <= GPU_GRAD_RTOL
        print(f"{key}: losses SP=1 {[round(x, 5) for x in r['losses']]} vs {[round(x, 5) for x in g['losses']]}; "
              f"max loss rel diff {loss_err:.2e}, max grad rel err {grad_err:.2e} (world {got['world']})")
    print("EQUIVALENCE", "OK" if ok else "FAILED", f"(tolerances loss {GPU_LOSS_RTOL}, grads {GPU_GRAD_RTOL})")
    return ok


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compare", nargs=2, metavar=("SP1_PT", "OTHER_PT"), help="compare two --gpu results and exit")
    p.add_argument("--gpu", action="store_true", help="CUDA + NCCL + bf16, larger model (GPU_MODEL)")
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--data")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--out")
    p.add_argument("--zero", default='{"stage": 3}', help="zero_optimization section (JSON)")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    if args.compare:
        raise SystemExit(0 if compare(*args.compare) else 1)
    torch.set_num_threads(1)
    if args.gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if args.gpu else "gloo")
    topo = ds_burst.init_sequence_parallel(args.sp)
    data = TokenFile(args.data, args.seq_len)
    zero = json.loads(args.zero)
    result = {f"ckpt={c}": run(topo, data, args.mbs, args.steps, c, args.layout, zero, args.gpu)
              for c in ("off", "torch", "deepspeed")}
    result["world"] = dist.get_world_size()
    if dist.get_rank() == 0:
        torch.save(result, args.out + ".tmp")
        os.replace(args.out + ".tmp", args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
