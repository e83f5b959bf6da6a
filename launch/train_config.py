"""The training job's configuration: the "train" section, the command line and the config file.

``launch/train.py`` re-exports every name here (``from train import apply_overrides`` keeps working).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from dataclasses import dataclass, field, fields
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
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (JSON, rank 0) and exit, without starting torch.distributed; "
                   "by hand the world size is sequence_parallel_size, under the launcher WORLD_SIZE")
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
# wandb


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
