"""Hugging Face Trainer + Accelerate sequence parallelism (DeepSpeed ALST's switch) running ds-burst.

    torchrun --nproc_per_node 2 examples/hf_trainer_sp.py                 # ds-burst (BurstAttention ring)
    torchrun --nproc_per_node 2 examples/hf_trainer_sp.py --backend alst  # DeepSpeed's own Ulysses, for comparison

The only ds-burst line is ``ds_burst.patch_deepspeed()`` before the Trainer is built: Accelerate's
``ParallelismConfig(sp_backend="deepspeed", sp_size=2)`` then gets ds-burst's ``UlyssesSPAttentionHF`` and
``UlyssesSPDataLoaderAdapter`` drop-ins. A tiny Llama built from a config (no downloads), fp32, ZeRO-3, on CPU
(gloo) or GPUs. ``--trainer trl`` uses TRL's ``SFTTrainer`` instead; ``--packing`` cuts every sample into two
documents (20 + 12 or 18 + 14 tokens, each with its own prompt) that TRL packs (``packing=True``, BFD, padding-free)
into rows of ``SEQ`` tokens: ``position_ids`` restart at 0 per document and the collator adds ``cu_seq_lens_q``;
ds-burst's adapter turns them into full-sequence document boundaries and attention stays inside each document
(documents span the SP ranks). With the HF ``Trainer``, ``--packing`` gives the same documents, two per step, to
transformers' ``DataCollatorWithFlattening`` (``position_ids`` restarting at 0; ``--flash-kwargs`` adds its
``cu_seq_lens_q``/``_k`` tensors). Run it with ``--nproc_per_node 1`` for the one-process reference (transformers'
sdpa with its block-diagonal packed mask). ``--out FILE`` writes the per-step losses and ds-burst's ring bytes as
JSON.

One process, ds-burst's Hugging Face backend itself (``attn_implementation="burst"``, registered by
``ds_burst.hf.register()``) against transformers' sdpa on the same packed batches, e.g. on one GPU::

    torchrun --nproc_per_node 1 examples/hf_trainer_sp.py --packing --attn burst --out burst.json
    torchrun --nproc_per_node 1 examples/hf_trainer_sp.py --packing --attn sdpa --out sdpa.json

``--bf16`` trains in bf16 (DeepSpeed's bf16 mode; a CUDA device). ``--attn burst`` is for one process: with SP > 1
keep the default sdpa, whose attention function the ALST drop-in replaces.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

SEQ = 32
VOCAB = 128


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["burst", "alst"], default="burst")
    ap.add_argument("--trainer", choices=["hf", "trl"], default="hf")
    ap.add_argument("--sp", type=int, default=None, help="sequence-parallel size (default: the world size)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--packing", action="store_true",
                    help="pack documents (position_ids restart per document): TRL packing=True, or the HF Trainer "
                    "with DataCollatorWithFlattening")
    ap.add_argument("--flash-kwargs", action="store_true",
                    help="HF Trainer with --packing: the collator also returns cu_seq_lens_q/_k (tensors)")
    ap.add_argument("--attn", choices=["sdpa", "burst"], default="sdpa",
                    help="the model's attn_implementation (burst: ds-burst's backend, ds_burst.hf.register())")
    ap.add_argument("--bf16", action="store_true", help="train in bf16 (DeepSpeed bf16; needs a CUDA device)")
    ap.add_argument("--out", default=None, help="write {'losses': [...], 'comm': {...}} here (rank 0)")
    ap.add_argument("--output-dir", default="/tmp/ds_burst_hf_trainer_sp")
    return ap.parse_args()


def tiny_llama(heads: int, kv_heads: int, attn: str = "sdpa") -> torch.nn.Module:
    """A tiny random Llama (2 layers, head dim 8), fp32, with ``attn_implementation=attn``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                      max_position_embeddings=4 * SEQ, attention_dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)


def tiny_tokenizer() -> object:
    """A word-level tokenizer over ``VOCAB`` made-up tokens (TRL wants a processing class; no downloads)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


def samples(n: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: 4 + 3 * i] = -100  # a prompt that is not trained on, different per sample
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "position_ids": list(range(SEQ))})
    return out


def documents(data: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """Each sample cut into two documents (20 + 12 or 18 + 14 tokens), each with its own prompt (``labels`` -100)."""
    docs = []
    for i, s in enumerate(data):
        cut = 20 if i % 2 == 0 else 18
        for lo, hi, prompt in ((0, cut, 3 + i % 4), (cut, SEQ, 2)):
            ids = s["input_ids"][lo:hi]
            docs.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return docs


def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([f[k] for f in features]) for k in features[0]}


def ds_config(bf16: bool = False) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 3}, "fp16": {"enabled": False}, "bf16": {"enabled": bf16},
            "gradient_clipping": 1.0}


def main() -> None:
    args = parse_args()
    import ds_burst

    if args.backend == "burst":
        ds_burst.patch_deepspeed()  # before the Trainer/Accelerator is created
    if args.attn == "burst":
        import ds_burst.hf

        ds_burst.hf.register()  # attn_implementation="burst" (one process: the local tensors, no ring)

    import deepspeed
    from accelerate.utils import ParallelismConfig
    from accelerate.utils.dataclasses import DeepSpeedSequenceParallelConfig
    from transformers import Trainer, TrainerCallback, TrainingArguments

    # DeepSpeed's collectives (ALST uses them; accelerate on CPU leaves deepspeed.comm uninitialised)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sp = args.sp or world
    if args.attn == "burst" and sp > 1:
        raise SystemExit("--attn burst runs ds-burst's HF backend in one process; with SP > 1 keep --attn sdpa (the "
                         "ALST drop-in replaces its attention function)")
    hf_packing = args.packing and args.trainer == "hf"
    common = dict(output_dir=args.output_dir, per_device_train_batch_size=2 if hf_packing else 1,
                  max_steps=args.steps, learning_rate=1e-2,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no",
                  report_to="none", seed=0, bf16=args.bf16, fp16=False, data_seed=0,
                  use_cpu=not torch.cuda.is_available(), train_sampling_strategy="sequential",
                  dataloader_num_workers=0, remove_unused_columns=False, deepspeed=ds_config(args.bf16))
    if sp > 1:
        common["parallelism_config"] = ParallelismConfig(
            sp_backend="deepspeed", sp_size=sp,
            sp_handler=DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa"))

    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # transformers' callback API
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    model = tiny_llama(args.heads, args.kv_heads, args.attn)
    data = samples(args.steps * max(sp, 1) * 2)
    if args.trainer == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        rows = [{"input_ids": s["input_ids"], "completion_mask": [int(x != -100) for x in s["labels"]]}
                for s in data]
        if args.packing:  # two documents per sample (each with a prompt), packed by TRL into rows of SEQ tokens
            rows = [{"input_ids": d["input_ids"], "completion_mask": [int(x != -100) for x in d["labels"]]}
                    for d in documents(data)]
        targs = SFTConfig(**common, max_length=SEQ, packing=args.packing, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=targs, train_dataset=Dataset.from_list(rows),
                             processing_class=tiny_tokenizer(), callbacks=[Record()])
    elif hf_packing:  # two documents per step, flattened into one row of SEQ tokens by transformers' collator
        from transformers import DataCollatorWithFlattening

        flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=args.flash_kwargs)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=documents(data),
                          data_collator=flatten, callbacks=[Record()])
    else:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, data_collator=collate,
                          callbacks=[Record()])
    ds_burst.reset_comm_stats()
    trainer.train()
    comm = ds_burst.comm_stats()
    rank = int(os.environ.get("RANK", "0"))
    print(f"rank {rank}: losses {losses} ds-burst ring bytes {comm}", flush=True)
    if args.out and rank == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "comm": comm, "sp": sp, "backend": args.backend,
                       "attn_implementation": model.config._attn_implementation, "bf16": args.bf16,
                       "device": str(trainer.args.device)}, f)
    if torch.distributed.is_initialized():  # shut the group down before the interpreter does (gloo's threads)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
