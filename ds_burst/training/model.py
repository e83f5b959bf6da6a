"""A small Llama-style decoder whose attention runs on sequence shards with BurstAttention.

RMSNorm, rotary embeddings at **global** positions (``position_ids`` of the tokens this rank holds), SwiGLU
MLP, grouped-query attention, optional sliding window, optional activation checkpointing per layer.
``attention="burst"`` calls :func:`ds_burst.burst_attn_func` on the local shard over the sequence-parallel
group; ``attention="ulysses"`` runs DeepSpeed-Ulysses (``deepspeed.sequence.layer.DistributedAttention``: an
all-to-all over heads, full-sequence SDPA, cuDNN first on GPUs) on contiguous shards, the peer to compare with;
``attention="local"`` runs plain full-sequence attention (SDPA) and is the SP=1 reference.

The loss helper :func:`sequence_parallel_loss` returns the mean over all tokens of the full sequence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_burst.attention.api import burst_attn_func
from ds_burst.attention.config import BurstConfig
from ds_burst.attention.selective import KEEP_TOKENS, ActivationOffload, AttentionKeep, region
from ds_burst.dist.comm import resolve_group
from ds_burst.dist.topology import get_topology
from ds_burst.training.losses import sequence_parallel_loss, sequence_parallel_loss_from_sum
from ds_burst.training.memory import chunked_lm_head_loss, tiled_mlp


@dataclass
class ModelConfig:
    """Shape of :class:`BurstLlama`. ``intermediate_size=None`` picks ``~8/3 * hidden`` rounded up to 64."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int | None = None
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    sliding_window: int | None = None
    tie_embeddings: bool = False
    init_std: float = 0.02
    # memory options (ds_burst.training.memory); they change memory use, not results
    lm_head_chunk_tokens: int | None = None  # chunked LM head + loss over this many positions at a time
    mlp_tiles: int = 1  # > 1: run each MLP over this many sequence tiles, recomputed in backward
    # under activation checkpointing (ds_burst.attention.selective); same results, less recompute or less device memory
    keep_attention_layers: float = 0.0  # fraction of layers whose attention output + lse are kept for the re-run
    keep_attention_tokens: str = "all"  # "all" (re-run skips the ring forward) or "half" (later half kept)
    # layer inputs kept by checkpointing (and kept attention) go to host memory: true (every layer), false (none) or
    # a fraction of the layers, the first ones (see offloads_input)
    offload_checkpoints: bool | float = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{name}: expected a positive integer, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model head_dim={self.head_dim} must be even (rotary embeddings)")
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model.sliding_window must be a positive int or null, got {self.sliding_window!r}")
        c = self.lm_head_chunk_tokens
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"model.lm_head_chunk_tokens: expected a positive integer or null, got {c!r}")
        t = self.mlp_tiles
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"model.mlp_tiles: expected a positive integer (1: off), got {t!r}")
        f = self.keep_attention_layers
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"model.keep_attention_layers: expected a fraction in [0, 1], got {f!r}")
        if self.keep_attention_tokens not in KEEP_TOKENS:
            raise ValueError(f"model.keep_attention_tokens: expected one of {list(KEEP_TOKENS)}, "
                             f"got {self.keep_attention_tokens!r}")
        offloaded_layer_count(self.offload_checkpoints, self.num_layers, "model.offload_checkpoints")

    def keeps_attention(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` keeps its attention output under activation checkpointing
        (``keep_attention_layers`` of the layers, spread evenly: layer ``i`` when ``floor((i+1) f) > floor(i f)``)."""
        f = float(self.keep_attention_layers)
        return math.floor((layer + 1) * f + 1e-9) > math.floor(layer * f + 1e-9)

    def offloaded_layers(self) -> int:
        """How many decoder layers offload their checkpointed input (:func:`offloaded_layer_count`)."""
        return offloaded_layer_count(self.offload_checkpoints, self.num_layers, "model.offload_checkpoints")

    def offloads_input(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) moves its checkpointed input (and its kept attention) to host
        memory under activation checkpointing: the first ``k`` layers do, ``k`` = :meth:`offloaded_layers`
        (``L`` for true, 0 for false, ``floor(f * L)`` for a fraction ``f``). The first layers, because backward
        re-runs them last: their inputs have the longest time to come back, while the last layers, re-run first,
        keep theirs on the device."""
        return layer < self.offloaded_layers()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict, rejecting unknown keys."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"model: unknown key(s) {unknown}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_params(self) -> int:
        """Parameter count."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        assert self.intermediate_size is not None
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs (forward + backward, no recomputation) per token at sequence length ``seq_len``:
        ``6 * params`` plus causal attention ``6 * L * seq * Hq * D`` (halved again by a window)."""
        ctx = seq_len if self.sliding_window is None else min(seq_len, 2 * self.sliding_window)
        return 6.0 * self.num_params() + 6.0 * self.num_layers * ctx * self.num_heads * self.head_dim


def offloaded_layer_count(offload: Any, num_layers: int, name: str = "offload_checkpoints") -> int:
    """The number ``k`` of decoder layers (of ``num_layers``) whose checkpointed inputs go to host memory for the
    ``offload_checkpoints`` value ``offload``: ``True`` every layer, ``False`` none, a float ``f`` in ``[0, 1]`` the
    round-down ``k = floor(f * num_layers)`` (``k / num_layers`` gives back ``k``). Which ones: the first ``k``
    (:meth:`ModelConfig.offloads_input`). Integers are refused (``0``/``1`` would read as a count or a flag):
    ``ValueError`` naming ``name``, as for any other value."""
    if isinstance(offload, bool):
        return num_layers if offload else 0
    if not isinstance(offload, float) or not 0.0 <= offload <= 1.0:
        raise ValueError(f"{name}: expected true, false or a fraction of the layers in [0.0, 1.0] (a float), "
                         f"got {offload!r}")
    return min(num_layers, math.floor(offload * num_layers + 1e-9))


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (computed in fp32)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[
        torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[B, s, 1, head_dim]`` for (global) ``position_ids [B, s]``."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    ang = position_ids.float()[..., None] * inv
    ang = torch.cat([ang, ang], dim=-1)[:, :, None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x [B, s, H, D]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """GQA self-attention; ``attention="burst"`` shards the sequence over the SP group."""

    def __init__(self, cfg: ModelConfig, attention: str, group: Any, attn_kwargs: dict[str, Any]) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.attention = attention
        self.group = group
        self.attn_kwargs = dict(attn_kwargs)
        w = cfg.sliding_window
        self.window = (-1, -1) if w is None else (w - 1, 0)
        if "window_size" in self.attn_kwargs:
            self.window = tuple(self.attn_kwargs.pop("window_size"))
        self.cu_seqlens: list[int] | None = None  # packed documents of the current batch (set by BurstLlama)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.cfg.head_dim
        q = apply_rotary(self.q_proj(x).view(b, s, -1, d), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, s, -1, d), cos, sin)
        v = self.v_proj(x).view(b, s, -1, d)
        if self.attention == "burst":
            group = self.group if self.group is not None else get_topology()
            o = burst_attn_func(q, k, v, causal=True, window_size=self.window, group=group,
                                cu_seqlens=self.cu_seqlens, **self.attn_kwargs)
        elif self.cu_seqlens is not None and self.attention == "local":
            cu = self.cu_seqlens
            o = torch.cat([local_attention(q[:, a:b], k[:, a:b], v[:, a:b], self.window)
                           for a, b in zip(cu, cu[1:])], 1)
        elif self.cu_seqlens is not None:
            raise ValueError("packed documents (cu_seqlens) need attention='burst' or 'local'")
        elif self.attention == "ulysses":
            o = ulysses_attention(q, k, v, self.group if self.group is not None else get_topology(), self.window)
        else:
            o = local_attention(q, k, v, self.window)
        assert isinstance(o, torch.Tensor)
        return self.o_proj(o.reshape(b, s, -1))


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Full-sequence causal attention (SDPA) of ``[B, S, H, D]`` tensors; GQA by repeating K/V.

    On CUDA the SDPA backends are tried cuDNN first, then FlashAttention, memory-efficient, math.
    """
    g = q.shape[2] // k.shape[2]
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    if g > 1:
        k_, v_ = k_.repeat_interleave(g, dim=1), v_.repeat_interleave(g, dim=1)
    with _sdpa_priority(q.device):
        if window[0] < 0:
            o = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
        else:
            n = q.shape[1]
            i = torch.arange(n, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - window[0])
            o = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)
    return o.transpose(1, 2)


def _sdpa_priority(device: torch.device) -> Any:
    """SDPA backend order for :func:`local_attention`: cuDNN first on CUDA; the default elsewhere."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


_ULYSSES: dict[tuple[int, tuple[int, int]], Any] = {}


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any,
                      window: tuple[int, int]) -> torch.Tensor:
    """DeepSpeed-Ulysses attention of contiguous shards ``[B, s_local, H, D]`` over the SP group.

    DeepSpeed's ``DistributedAttention`` moves heads to ranks with an all-to-all, runs
    :func:`local_attention` on the whole sequence and moves back; it needs ``Hq`` and ``Hkv`` divisible by P.
    """
    info = resolve_group(group)
    if q.shape[2] % info.world or k.shape[2] % info.world:
        raise ValueError(f"attention='ulysses' needs query heads ({q.shape[2]}) and key/value heads ({k.shape[2]}) "
                         f"divisible by the sequence-parallel size {info.world}; use attention='burst'")
    if info.world == 1:
        return local_attention(q, k, v, window)
    key = (id(info.group), window)
    if key not in _ULYSSES:
        import deepspeed
        import deepspeed.comm as ds_comm
        from deepspeed.sequence.layer import DistributedAttention

        if not ds_comm.is_initialized():  # DeepSpeed's all-to-all runs on its comm layer over the same world
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)

        def local(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return local_attention(qq, kk, vv, window)

        _ULYSSES[key] = DistributedAttention(local, info.group, scatter_idx=2, gather_idx=1)
    return _ULYSSES[key](q, k, v, batch_dim_idx=0)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.intermediate_size is not None
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, cfg: ModelConfig, attention: str, group: Any, attn_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg, attention, group, attn_kwargs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)
        self.mlp_tiles = cfg.mlp_tiles

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        h = self.post_norm(x)
        return x + (tiled_mlp(self.mlp, h, self.mlp_tiles) if self.mlp_tiles > 1 else self.mlp(h))


class BurstLlama(nn.Module):
    """Llama-style causal LM over sequence shards.

    Args:
        cfg: model shape.
        group: sequence-parallel group or :class:`~ds_burst.dist.topology.Topology`; ``None`` uses the topology
            of the last ``init_sequence_parallel`` call (or a single process).
        attention: ``"burst"`` (sequence-parallel BurstAttention), ``"ulysses"`` (DeepSpeed-Ulysses over the
            same group, contiguous shards; heads divisible by P) or ``"local"`` (full-sequence SDPA; the whole
            sequence must be on this rank).
        burst: :class:`~ds_burst.attention.config.BurstConfig` (its layout, backward, kernel, ... options), or ``None``.
        activation_checkpointing: recompute each decoder layer in backward. With it, ``cfg.keep_attention_layers``
            / ``keep_attention_tokens`` keep attention outputs for the re-run (selective checkpointing, burst
            attention only) and ``cfg.offload_checkpoints`` moves the kept layer inputs to host memory, of every
            layer or of the first ones (:meth:`ModelConfig.offloads_input`; :mod:`ds_burst.attention.selective`).
        checkpoint_impl: ``"torch"`` (``torch.utils.checkpoint``, non-reentrant) or ``"deepspeed"``
            (``deepspeed.checkpointing.checkpoint``).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        group: Any = None,
        attention: str = "burst",
        burst: BurstConfig | None = None,
        activation_checkpointing: bool = False,
        checkpoint_impl: str = "torch",
    ) -> None:
        super().__init__()
        if attention not in ("burst", "ulysses", "local"):
            raise ValueError(f"attention must be 'burst', 'ulysses' or 'local', got {attention!r}")
        if checkpoint_impl not in ("torch", "deepspeed"):
            raise ValueError(f"checkpoint_impl must be 'torch' or 'deepspeed', got {checkpoint_impl!r}")
        self.cfg = cfg
        self.group = group
        self.attention = attention
        self.layout = burst.layout if burst is not None else "zigzag"
        attn_kwargs = burst.attn_kwargs() if burst is not None else {"layout": self.layout}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attention, group, attn_kwargs) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.keep_attention_layers and attention != "burst":
            raise ValueError(f"model.keep_attention_layers needs attention='burst' (got attention={attention!r})")
        self.activation_checkpointing = activation_checkpointing
        self.checkpoint_impl = checkpoint_impl
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        ignore_index: int = -100,
        sp_grads_averaged: bool = False,
        *,
        cu_seqlens: list[int] | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, s_local, vocab]`` for this rank's tokens ``input_ids [B, s_local]`` at global
        ``position_ids`` (``[B, s_local]`` or ``[s_local]``).

        With ``labels`` (shifted, sharded like ``input_ids``) it returns instead the loss of
        :func:`sequence_parallel_loss` over the model's SP group; with ``cfg.lm_head_chunk_tokens`` set that
        loss comes from :func:`ds_burst.training.memory.chunked_lm_head_loss` and the ``[B, s_local, vocab]`` logits
        are never materialised (same value and gradients).

        ``cu_seqlens``: packed documents, the global boundaries of the full sequence (list of ints, the same on
        every rank); attention stays inside each document. It is kept on the attention layers until the next
        forward, so that checkpointed layers recompute with it in backward.
        """
        docs = None if cu_seqlens is None else [int(x) for x in cu_seqlens]
        for layer in self.layers:
            layer.attn.cu_seqlens = docs
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(input_ids.shape[0], -1)
        x = self.embed(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        ckpt = self.activation_checkpointing and self.training
        # every layer of the chain gets a slot (offloaded or not), so the first layer kept on the device starts
        # fetching the last offloaded one back when it re-runs
        offload = ActivationOffload() if ckpt and self.cfg.offloaded_layers() and torch.is_grad_enabled() else None
        for i, layer in enumerate(self.layers):
            if not ckpt:
                x = layer(x, cos, sin)
                continue
            to_host = offload is not None and self.cfg.offloads_input(i)
            keep = None
            if self.attention == "burst" and self.cfg.keeps_attention(i):
                keep = AttentionKeep(self.cfg.keep_attention_tokens, to_host)
            fn = layer if keep is None and offload is None else region(layer, keep, offload, i)
            x_in, x = x, self._checkpoint(fn, x, cos, sin)
            if offload is not None:
                if to_host:
                    offload.add(x_in, keep)
                else:
                    offload.skip()
        h = self.norm(x)
        if labels is None:
            return self.lm_head(h)
        if self.cfg.lm_head_chunk_tokens is None:
            return sequence_parallel_loss(self.lm_head(h), labels, self.group, ignore_index, sp_grads_averaged)
        ce, count = chunked_lm_head_loss(h, self.lm_head, labels, self.cfg.lm_head_chunk_tokens, ignore_index)
        return sequence_parallel_loss_from_sum(ce, count, self.group, sp_grads_averaged)

    def _checkpoint(self, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_impl == "deepspeed":
            import deepspeed

            return deepspeed.checkpointing.checkpoint(layer, x, cos, sin)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(layer, x, cos, sin, use_reentrant=False)
