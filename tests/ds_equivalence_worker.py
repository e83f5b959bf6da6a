"""Launched by tests/test_deepspeed_train.py with ``deepspeed --num_gpus N``: trains the built-in model a few
steps under ZeRO-3 (activation checkpointing off, torch, deepspeed) and saves, on rank 0, the loss and the full
gradient of every parameter at every step. SP=1 runs use plain full-sequence attention ("local").
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
from ds_burst.config import BurstConfig
from ds_burst.data import TokenFile, make_batch, sample_indices
from ds_burst.model import BurstLlama, ModelConfig, sequence_parallel_loss, sp_grads_averaged

warnings.filterwarnings("ignore", category=FutureWarning)

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def run(topo, data: TokenFile, mbs: int, steps: int, ckpt: str, layout: str, zero: dict) -> dict:
    """``ckpt``: "off", "torch" or "deepspeed" activation checkpointing."""
    torch.manual_seed(0)
    attention = "burst" if topo.sequence_parallel_size > 1 else "local"
    model = BurstLlama(MODEL, group=topo, attention=attention, burst=BurstConfig(layout=layout),
                       activation_checkpointing=ckpt != "off", checkpoint_impl="torch" if ckpt == "off" else ckpt)
    config = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": 1,
        "train_batch_size": mbs * topo.data_parallel_size,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if ckpt == "deepspeed":
        deepspeed.checkpointing.configure(topo, deepspeed_config=config)
    engine, *_ = ds_burst.deepspeed_initialize(model, config, topo)
    losses, grads = [], []
    for step in range(steps):
        idx = sample_indices(step, 0, 1, topo.dp_rank, topo.data_parallel_size, mbs)
        b = make_batch(data, idx, topo.sp_rank, topo.sequence_parallel_size, layout)
        logits = engine(b["input_ids"], b["position_ids"])
        loss = sequence_parallel_loss(logits, b["labels"], topo, sp_grads_averaged=sp_grads_averaged(config))
        engine.backward(loss)
        g = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
        engine.step()
        lt = torch.tensor([float(loss.detach())], dtype=torch.float64)
        dist.all_reduce(lt, group=topo.get_data_parallel_group())
        losses.append(float(lt) / topo.data_parallel_size)
        grads.append(g)
    engine.destroy() if hasattr(engine, "destroy") else None
    return {"losses": losses, "grads": grads}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sp", type=int, required=True)
    p.add_argument("--mbs", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--data", required=True)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--out", required=True)
    p.add_argument("--zero", default='{"stage": 3}', help="zero_optimization section (JSON)")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    topo = ds_burst.init_sequence_parallel(args.sp)
    data = TokenFile(args.data, args.seq_len)
    zero = json.loads(args.zero)
    result = {f"ckpt={c}": run(topo, data, args.mbs, args.steps, c, args.layout, zero)
              for c in ("off", "torch", "deepspeed")}
    result["world"] = dist.get_world_size()
    if dist.get_rank() == 0:
        torch.save(result, args.out + ".tmp")
        os.replace(args.out + ".tmp", args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
