"""Launched by tests/test_deepspeed_convention.py with ``deepspeed --num_gpus 2`` (CPU ranks, gloo, SP=2): for each
ZeRO config of ``CASES`` one backward of the built-in model under DeepSpeed, the loss scaled per
``sp_grads_averaged(config, model=engine.module)`` (or, where that refuses, as if DeepSpeed summed), and every
parameter's reduced gradient compared with the SP=1 gradient of the same batch computed without DeepSpeed.
Rank 0 writes ``{case: {"averaged", "refused", "err", "ratio"}}`` as JSON: ``err`` the largest
``max |g - g_sp1| / max |g_sp1|`` over the parameters, ``ratio`` per parameter ``<g, g_sp1> / <g_sp1, g_sp1>``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad

import ds_burst
from ds_burst.attention.config import BurstConfig
from ds_burst.training.data import TokenFile, make_batch
from ds_burst.training.losses import sequence_parallel_loss, sp_grads_averaged
from ds_burst.training.model import BurstLlama, ModelConfig

warnings.filterwarnings("ignore", category=FutureWarning)

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
#: reduce_bucket_size of the mixed case: below the MLP weights (4096 elements), above every other parameter
MIXED_BUCKET = 3000
CASES = {
    "zero3_reduce_scatter": {"stage": 3},
    "zero3_allreduce": {"stage": 3, "reduce_scatter": False},
    "zero3_allreduce_noncontiguous": {"stage": 3, "reduce_scatter": False, "contiguous_gradients": False},
    "zero3_mixed": {"stage": 3, "reduce_scatter": False, "reduce_bucket_size": MIXED_BUCKET},
    "zero2": {"stage": 2},
    "zero2_allreduce": {"stage": 2, "reduce_scatter": False},
    "zero1": {"stage": 1},
    "zero0": {"stage": 0},
}
SAMPLES = [0, 1]


def reference(data: TokenFile) -> dict[str, torch.Tensor]:
    """SP=1 gradients of the full-sequence token mean, one process, no DeepSpeed."""
    torch.manual_seed(0)
    model = BurstLlama(MODEL, attention="local")
    b = make_batch(data, SAMPLES, 0, 1, "zigzag")
    logits = model(b["input_ids"], b["position_ids"])
    F.cross_entropy(logits.reshape(-1, MODEL.vocab_size), b["labels"].reshape(-1), ignore_index=-100).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def run_case(topo, data: TokenFile, zero: dict, ref: dict[str, torch.Tensor]) -> dict:
    torch.manual_seed(0)
    model = BurstLlama(MODEL, group=topo, attention="burst", burst=BurstConfig(layout="zigzag"))
    config = {"train_micro_batch_size_per_gpu": len(SAMPLES), "gradient_accumulation_steps": 1,
              "train_batch_size": len(SAMPLES), "zero_optimization": zero, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}}}
    engine, *_ = ds_burst.deepspeed_initialize(model, config, topo)
    refused = None
    try:
        averaged = sp_grads_averaged(config, model=engine.module)
    except ValueError as exc:
        refused, averaged = str(exc), False
    b = make_batch(data, SAMPLES, topo.sp_rank, topo.sequence_parallel_size, "zigzag")
    loss = sequence_parallel_loss(engine(b["input_ids"], b["position_ids"]), b["labels"], topo,
                                  sp_grads_averaged=averaged)
    engine.backward(loss)
    err, ratio = 0.0, {}
    for n, p in engine.module.named_parameters():
        g, r = safe_get_full_grad(p).detach().float(), ref[n]
        err = max(err, float((g - r).abs().max() / r.abs().max()))
        ratio[n] = float((g * r).sum() / (r * r).sum())
    engine.destroy() if hasattr(engine, "destroy") else None
    return {"averaged": averaged, "refused": refused, "err": err, "ratio": ratio}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    topo = ds_burst.init_sequence_parallel(2)
    data = TokenFile(args.data, 64)
    ref = reference(data)
    result = {name: run_case(topo, data, zero, ref) for name, zero in CASES.items()}
    if dist.get_rank() == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(args.out + ".tmp", args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
