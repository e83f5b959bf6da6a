"""Drop-ins for DeepSpeed ALST's Ulysses path (``deepspeed.runtime.sequence_parallel.ulysses_sp``).

Accelerate (``ParallelismConfig(sp_backend="deepspeed", sp_size=N)``), the Hugging Face ``Trainer`` and TRL's
``SFTTrainer`` call two DeepSpeed classes when sequence parallelism is on:

* ``UlyssesSPAttentionHF.register_with_transformers(...)``: replaces the model's attention function (under the
  key the model already uses, e.g. ``"sdpa"``) and returns the ``mpu``;
* ``UlyssesSPDataLoaderAdapter(dl, sp_rank, sp_group, sp_world_size, device)``: each rank loads its own sample;
  every sample is cut into contiguous shards over the SP group, ``labels`` become pre-shifted
  ``shift_labels``, ``position_ids`` stay global.

:class:`BurstSPAttentionHF` and :class:`BurstSPDataLoaderAdapter` have the same signatures and behaviour, but
attention is BurstAttention on the local contiguous shards (``burst_attn_func(..., layout="contiguous")``,
which rebalances the causal work internally) instead of two all-to-alls around a full-sequence local
attention, so any head count works (Ulysses needs ``Hq % P == 0`` and ``Hkv % P == 0`` or ``P % Hkv == 0``).
The ``mpu`` returned is a :class:`ds_burst.Topology`. :func:`ds_burst.patch_deepspeed` puts both classes in
DeepSpeed's module, where Accelerate and the Trainer look them up.

Differences from ALST: a missing ``position_ids`` is filled with ``0..S-1`` by the adapter (ALST raises);
packed batches (``position_ids`` restarting inside a row) raise ``ValueError`` on every rank until document
support (``cu_seqlens``) reaches :func:`ds_burst.burst_attn_func` (see :func:`documents_from_position_ids`).
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from ds_burst.dist.comm import all_gather_objects, all_gather_tensor, resolve_group
from ds_burst.dist.topology import Topology, get_topology, init_sequence_parallel
from ds_burst.integrations.hf import hf_burst_attention
from ds_burst.training.data import IGNORE_INDEX

log = logging.getLogger(__name__)

__all__ = ["BurstSPAttentionHF", "BurstSPDataLoaderAdapter", "documents_from_position_ids", "refuse_packed",
           "register_with_transformers", "unregister_from_transformers"]

PACKED_ERROR = (
    "ds-burst: packed batch refused ({where}): a row holds several documents (position_ids restart inside the "
    "row) and ds-burst would let them attend to each other. Document support (cu_seqlens) is not in ds-burst yet: "
    "use packing=False / no padding-free collator (TRL), or one document per row"
)

# flash-attention varlen keys that describe the documents of a packed batch
_DOC_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# attention functions replaced by register_with_transformers: key -> the original function
_REPLACED: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------
# Packed sequences


def documents_from_position_ids(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Document boundaries of a ``[B, S]`` (or ``[S]``) ``position_ids`` tensor of the *full* sequence.

    A document starts where ``position_ids[t + 1] != position_ids[t] + 1``. Returns ``None`` when every row is one
    run of consecutive positions (the only case ds-burst attends correctly today), else per row the offsets
    ``[0, start_1, ..., S]`` (``cu_seqlens`` of that row). This is where the switch to
    ``burst_attn_func(..., cu_seqlens=...)`` goes once it exists.
    """
    pos = position_ids.reshape(1, -1) if position_ids.dim() == 1 else position_ids.reshape(position_ids.shape[0], -1)
    if pos.shape[-1] < 2:
        return None
    restart = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(restart.any()):
        return None
    seq = pos.shape[-1]
    return [[0, *(int(t) + 1 for t in torch.nonzero(row).flatten()), seq] for row in restart]


def refuse_packed(position_ids: torch.Tensor, where: str = "") -> None:
    """Raise ``ValueError`` if the full-sequence ``position_ids`` describe a packed batch (several documents)."""
    docs = documents_from_position_ids(position_ids)
    if docs is not None:
        row = next(i for i, d in enumerate(docs) if len(d) > 2)
        detail = f"row {row}, document starts {docs[row][1:-1][:8]}"
        raise ValueError(PACKED_ERROR.format(where=f"{where}: {detail}" if where else detail))


# ---------------------------------------------------------------------------------------------
# Attention


class BurstSPAttentionHF(torch.nn.Module):
    """BurstAttention with the interface of DeepSpeed ALST's ``UlyssesSPAttentionHF``.

    Args:
        attn: the model's core attention function (from ``ALL_ATTENTION_FUNCTIONS``); called only when
            ``disable_in_eval`` and the module is in eval mode (no sequence parallelism then).
        batch_size: micro batch size (kept for compatibility; any batch size works).
        attn_head_count, attn_head_size, kv_head_count: the model's heads (``attn_head_count % kv_head_count == 0``;
            unlike Ulysses no divisibility by the SP size is needed).
        num_hidden_layers: kept for compatibility.
        process_group: the SP ``ProcessGroup`` or a :class:`ds_burst.Topology`/``mpu``.
        seq_length_is_variable: if ``False``, every call must bring ``local_seq_length`` tokens.
        local_seq_length, global_seq_length: the fixed lengths (when ``seq_length_is_variable=False``).
        disable_in_eval: in eval mode call ``attn`` on the (unsharded) inputs instead.
        **burst_options: ``backward``, ``kernel``, ``deterministic``, ``check_inputs``, ``check_finite`` for
            :func:`ds_burst.burst_attn_func`.
    """

    def __init__(
        self,
        attn: Any,
        batch_size: int,
        attn_head_count: int,
        attn_head_size: int,
        kv_head_count: int,
        num_hidden_layers: int,
        process_group: Any,
        seq_length_is_variable: bool = False,
        local_seq_length: int | None = None,
        global_seq_length: int | None = None,
        disable_in_eval: bool = False,
        **burst_options: Any,
    ) -> None:
        super().__init__()
        allowed = {"backward", "kernel", "deterministic", "check_inputs", "check_finite"}
        unknown = sorted(set(burst_options) - allowed)
        if unknown:
            raise ValueError(f"unknown burst option(s) {unknown}; allowed: {sorted(allowed)}")
        if kv_head_count < 1 or attn_head_count % kv_head_count != 0:
            raise ValueError(f"attention head count {attn_head_count} is not a multiple of the KV head count "
                             f"{kv_head_count}")
        if not seq_length_is_variable and (local_seq_length is None or global_seq_length is None):
            raise ValueError("seq_length_is_variable=False needs local_seq_length and global_seq_length")
        self.attn = attn
        self.process_group = process_group
        info = resolve_group(process_group)
        self.world_size = info.world
        self.sp_rank = info.rank
        self.batch_size = batch_size
        self.attn_head_count = attn_head_count
        self.attn_head_size = attn_head_size
        self.global_kv_head_count = kv_head_count
        self.num_hidden_layers = num_hidden_layers
        self.seq_length_is_variable = seq_length_is_variable
        self.local_seq_length = local_seq_length
        self.global_seq_length = global_seq_length
        self.disable_in_eval = disable_in_eval
        self.core_attn_implementation: str | None = None  # set by register_with_transformers
        self.burst_options = dict(burst_options)
        self._checked: Any = None  # weak reference to the last position_ids found unpacked

    def check_position_ids(self, position_ids: torch.Tensor) -> None:
        """Gather this call's ``position_ids`` over the SP group and refuse packed batches on every rank.

        Done once per ``position_ids`` tensor (every layer of one forward passes the same object; every rank
        runs the same layers, so all ranks take part in the same gathers)."""
        if self._checked is not None and self._checked() is position_ids:
            return
        full = position_ids
        info = resolve_group(self.process_group)
        if info.world > 1:
            full = torch.cat(all_gather_tensor(info, position_ids), dim=-1)
        refuse_packed(full, "attention")
        self._checked = weakref.ref(position_ids)

    def forward(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """Attention over the full sequence from this rank's contiguous shard.

        Args:
            module: the attention module (``is_causal``, ``training`` are read).
            query: ``[B, Hq, s, D]``; key, value: ``[B, Hkv, s, D]`` (transformers' attention-function layout).
            attention_mask: ignored (as ALST does: a mask built for the local shard is meaningless; causality is
                by global position).
            **kwargs: ``position_ids`` (required, this rank's shard of the global positions); the rest is applied
                or refused as for ``attn_implementation="burst"`` (``ds_burst.integrations.hf.hf_burst_attention``:
                ``scaling``, ``sliding_window``, ``softcap``, ``s_aux``, ``is_causal``, ...).

        Returns:
            ``(out [B, s, Hq, D], None)``.
        """
        if not module.training and self.disable_in_eval:
            return self.attn(module, query, key, value, attention_mask, *args, **kwargs)
        if args:
            raise ValueError(f"ds-burst attention: unexpected positional arguments ({len(args)})")
        if not self.seq_length_is_variable and query.shape[2] != self.local_seq_length:
            raise ValueError(f"ds-burst attention: local sequence length {query.shape[2]} != the fixed "
                             f"local_seq_length={self.local_seq_length} (set seq_length_is_variable=True)")
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError("ds-burst attention under sequence parallelism needs position_ids in every forward (this "
                             "rank's shard of the global positions); use BurstSPDataLoaderAdapter, which adds them")
        self.check_position_ids(position_ids)
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None and cu.numel() > 2:
            raise ValueError(PACKED_ERROR.format(where=f"cu_seq_lens_q={cu.tolist()[:8]}"))
        # transformers built a mask for the key this class took over; like ALST it is not used (causality is by
        # global position); every other keyword is applied or refused by hf_burst_attention
        out = hf_burst_attention(module, query, key, value, None, group=self.process_group, layout="contiguous",
                                 burst_options=self.burst_options, **kwargs)
        return out, None

    @classmethod
    def register_with_transformers(
        cls,
        model_name_or_path: Any,
        core_attn_implementation: str,
        sequence_parallel_size: int,
        micro_batch_size: int,
        seq_length: int | None = None,
        seq_length_is_variable: bool = True,
        disable_in_eval: bool = False,
        max_length: int | None = None,
        **burst_options: Any,
    ) -> Topology | None:
        """ALST's ``register_with_transformers``: make ``core_attn_implementation`` run BurstAttention.

        Creates (or reuses) the sequence-parallel groups (:func:`ds_burst.init_sequence_parallel`) and replaces
        ``ALL_ATTENTION_FUNCTIONS[core_attn_implementation]`` by a BurstAttention wrapper, so the model keeps its
        ``_attn_implementation`` (and transformers' branches on it). Returns the :class:`ds_burst.Topology`
        (a DeepSpeed ``mpu``), or ``None`` when ``sequence_parallel_size == 1`` (nothing is done).

        Args:
            model_name_or_path: the model (or anything with ``.config``), or a hub name / local path.
            core_attn_implementation: the model's attention key, e.g. ``"sdpa"`` or ``"flash_attention_2"``.
            sequence_parallel_size: SP size ``P`` (1: disabled).
            micro_batch_size: micro batch size per rank.
            seq_length: the fixed global sequence length (needed when ``seq_length_is_variable=False``).
            seq_length_is_variable: whether the sequence length may change between batches.
            disable_in_eval: in eval mode run the original attention (no SP).
            max_length: deprecated alias of ``seq_length``.
            **burst_options: passed to every :func:`ds_burst.burst_attn_func` call.
        """
        if sequence_parallel_size == 1:
            return None
        if seq_length is None and max_length is not None:
            log.warning("register_with_transformers: max_length is deprecated, use seq_length")
            seq_length = max_length
        if not seq_length_is_variable and seq_length is None:
            raise ValueError("seq_length_is_variable=False needs seq_length (the fixed global sequence length)")
        from transformers import AutoConfig
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        loaded = hasattr(model_name_or_path, "config")
        config = model_name_or_path.config if loaded else AutoConfig.from_pretrained(model_name_or_path)
        if loaded:
            current = getattr(config, "_attn_implementation", None)
            if current is not None and current != core_attn_implementation:
                raise ValueError(f"core_attn_implementation={core_attn_implementation!r} does not match the model's "
                                 f"attn_implementation={current!r}; set both to the same value")
        if core_attn_implementation in ("eager", "paged|eager"):
            raise ValueError(f"{core_attn_implementation!r} cannot be intercepted (transformers calls its eager "
                             "attention directly); load the model with attn_implementation='sdpa'")
        original = _REPLACED.get(core_attn_implementation)
        if original is None:
            if core_attn_implementation not in ALL_ATTENTION_FUNCTIONS:
                raise ValueError(f"{core_attn_implementation!r} is not a valid attn_implementation; choices: "
                                 f"{ALL_ATTENTION_FUNCTIONS.valid_keys()}")
            original = ALL_ATTENTION_FUNCTIONS[core_attn_implementation]

        topo = get_topology()
        if topo is None or topo.get_sequence_parallel_world_size() != sequence_parallel_size:
            topo = init_sequence_parallel(sequence_parallel_size)
        if seq_length is not None and seq_length % sequence_parallel_size != 0:
            raise ValueError(f"seq_length={seq_length} is not divisible by sequence_parallel_size="
                             f"{sequence_parallel_size}")
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        battn = cls(
            attn=original,
            batch_size=micro_batch_size,
            attn_head_count=text.num_attention_heads,
            attn_head_size=head_dim,
            kv_head_count=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            num_hidden_layers=text.num_hidden_layers,
            process_group=topo,
            seq_length_is_variable=seq_length_is_variable,
            local_seq_length=None if seq_length_is_variable else seq_length // sequence_parallel_size,
            global_seq_length=None if seq_length_is_variable else seq_length,
            disable_in_eval=disable_in_eval,
            **burst_options,
        )
        battn.core_attn_implementation = core_attn_implementation

        def burst_sp_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
            # in training the mask transformers built is for the local shard only: drop it (ALST does the same)
            mask = attention_mask if (not module.training and disable_in_eval) else None
            return battn(module, query, key, value, mask, *args, **kwargs)

        if loaded and isinstance(model_name_or_path, torch.nn.Module):
            partition_for_zero3(model_name_or_path, topo)
        burst_sp_attention.burst_attention = battn  # type: ignore[attr-defined]
        _REPLACED[core_attn_implementation] = original
        ALL_ATTENTION_FUNCTIONS[core_attn_implementation] = burst_sp_attention
        return topo


def _strip_auto(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_auto(v) for k, v in obj.items() if v != "auto"}
    return obj


def _zero3_config() -> dict[str, Any] | None:
    """The DeepSpeed config of the running HF Trainer / Accelerate job if it is ZeRO-3, else ``None``."""
    config = None
    try:
        from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            config = deepspeed_config()
    except ImportError:
        pass
    if config is None:
        try:
            from accelerate.state import AcceleratorState

            plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
            config = plugin.deepspeed_config if plugin is not None else None
        except (ImportError, AttributeError):
            config = None
    if not config or int((config.get("zero_optimization") or {}).get("stage", 0)) != 3:
        return None
    return config


def partition_for_zero3(model: torch.nn.Module, topology: Topology) -> None:
    """Under ZeRO-3, partition ``model``'s not yet partitioned parameters over the sequence-data-parallel group.

    DeepSpeed 0.19.8 partitions a plain model over ``mpu.get_data_parallel_group()`` (the DP replicas only) when
    the mpu is not its own ALST module: the SP ranks' gradients would never be summed (see
    :func:`ds_burst.deepspeed_initialize`). ALST's mpu gets the world group. So before Accelerate calls
    ``deepspeed.initialize(mpu=topology)`` the model is converted here with ``deepspeed.zero.Init(module=model,
    data_parallel_group=<sequence-data-parallel group>)``; a model already built under ``zero.Init`` (the HF
    ``from_pretrained`` path with ZeRO-3) is only checked. No-op without a ZeRO-3 config.
    """
    config = _zero3_config()
    if config is None:
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    from ds_burst.integrations.zero import check_zero3_partitioning

    if any(not is_zero_param(p) for p in model.parameters()):
        minimal = {k: _strip_auto(config[k]) for k in ("zero_optimization", "fp16", "bf16") if k in config}
        minimal["train_micro_batch_size_per_gpu"] = 1
        deepspeed.zero.Init(module=model, data_parallel_group=topology.get_sequence_data_parallel_group(),
                            config_dict_or_path=minimal, mpu=topology)
    check_zero3_partitioning(model, topology)


def register_with_transformers(
    model_name_or_path: Any,
    core_attn_implementation: str,
    sequence_parallel_size: int,
    micro_batch_size: int,
    seq_length: int | None = None,
    seq_length_is_variable: bool = True,
    disable_in_eval: bool = False,
    max_length: int | None = None,
    **burst_options: Any,
) -> Topology | None:
    """:meth:`BurstSPAttentionHF.register_with_transformers` as a function
    (``ds_burst.hf.register_with_transformers``)."""
    return BurstSPAttentionHF.register_with_transformers(
        model_name_or_path, core_attn_implementation, sequence_parallel_size, micro_batch_size, seq_length=seq_length,
        seq_length_is_variable=seq_length_is_variable, disable_in_eval=disable_in_eval, max_length=max_length,
        **burst_options,
    )


def unregister_from_transformers() -> None:
    """Put back the attention functions that :func:`register_with_transformers` replaced."""
    if not _REPLACED:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for key, fn in list(_REPLACED.items()):
        ALL_ATTENTION_FUNCTIONS[key] = fn
        del _REPLACED[key]


# ---------------------------------------------------------------------------------------------
# Data


class BurstSPDataLoaderAdapter:
    """ALST's ``UlyssesSPDataLoaderAdapter``: every rank's own sample, cut into contiguous shards over the SP group.

    Each refill takes one batch from every SP rank's ``dl`` (all ranks gather all of them), then yields, one after
    the other, this rank's shard of rank 0's batch, of rank 1's batch, ... So ``len(self) == len(dl) * P``. Every
    tensor ``[B, S, ...]`` is cut along dim 1 into ``P`` contiguous chunks (``S % P == 0``); ``labels`` become
    ``shift_labels`` (``shift_labels[t] = labels[t + 1]``, last ``-100``) and are dropped (a given
    ``shift_labels`` is kept as it is); ``position_ids`` (``0..S-1`` if missing) stay global; non-tensor entries
    are copied to all ranks. Packed batches raise ``ValueError`` on every rank (:func:`refuse_packed`).
    Shards are returned on the CPU (the Trainer moves them), as ALST does.

    Args:
        dl: the data loader to wrap (batches are dicts with ``input_ids`` and ``labels``/``shift_labels``).
        sp_rank: this rank's index in its SP group.
        sp_group: the SP ``ProcessGroup`` (or a topology/``mpu``).
        sp_world_size: ``P``.
        device: where batches go for the gather (the model's device; CPU for gloo).
    """

    def __init__(self, dl: Any, sp_rank: int, sp_group: Any, sp_world_size: int, device: Any) -> None:
        self.dl = dl
        self.sp_rank = sp_rank
        self.sp_group = sp_group
        self.sp_world_size = sp_world_size
        self.device = device
        self.iter = iter(dl)
        self.micro_batches: deque[dict[str, Any]] = deque()

    def __len__(self) -> int:
        return len(self.dl) * self.sp_world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self.micro_batches:
            self.refill()
        return self.micro_batches.popleft()

    def _gather(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Every SP rank's batch, in SP rank order."""
        p = self.sp_world_size
        if p == 1:
            return [batch]
        info = resolve_group(self.sp_group)
        if info.world != p:
            raise ValueError(f"sp_world_size={p} but the SP group has {info.world} ranks")
        tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        meta = {
            "tensors": {k: (str(v.dtype), tuple(v.shape[:1]) + tuple(v.shape[2:]), int(v.shape[1]))
                        for k, v in sorted(tensors.items())},
            "objects": {k: v for k, v in batch.items() if not torch.is_tensor(v)},
        }
        metas: list[Any] = all_gather_objects(info, meta)
        keys = list(meta["tensors"])
        for r, m in enumerate(metas):
            if list(m["tensors"]) != keys or any(m["tensors"][k][:2] != meta["tensors"][k][:2] for k in keys):
                raise ValueError(f"SP rank {r}'s batch has other keys/dtypes/shapes than SP rank {self.sp_rank}'s: "
                                 f"{m['tensors']} vs {meta['tensors']}")
        out: list[dict[str, Any]] = [dict(m["objects"]) for m in metas]
        for k in keys:
            t = tensors[k].to(self.device)
            lengths = [m["tensors"][k][2] for m in metas]
            longest = max(lengths)
            if t.shape[1] < longest:
                pad = torch.zeros((t.shape[0], longest - t.shape[1], *t.shape[2:]), dtype=t.dtype, device=t.device)
                t = torch.cat([t, pad], dim=1)
            with torch.no_grad():
                parts = all_gather_tensor(info, t)
            for r in range(p):
                out[r][k] = parts[r][:, : lengths[r]]
        return out

    def refill(self) -> None:
        """Load this rank's next batch, gather all SP ranks' batches and queue this rank's shards of each."""
        try:
            batch = next(self.iter)
        except StopIteration:
            self.iter = iter(self.dl)
            raise
        batch = dict(batch)
        for k in _DOC_KEYS:  # flash-attn varlen metadata (TRL's padding-free collator): per batch, not per token
            if torch.is_tensor(batch.get(k)):
                batch[k] = batch[k].tolist()
        if "input_ids" not in batch:
            raise ValueError("BurstSPDataLoaderAdapter: batches need 'input_ids'")
        seq = batch["input_ids"].shape[1]
        for k, v in batch.items():
            if torch.is_tensor(v) and (v.dim() < 2 or v.shape[1] != seq):
                raise ValueError(f"{k}'s shape {tuple(v.shape)} must match input_ids's shape "
                                 f"{tuple(batch['input_ids'].shape)} in the first two dimensions")
        if "position_ids" not in batch:
            ids = batch["input_ids"]
            batch["position_ids"] = torch.arange(seq, device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
        if "labels" not in batch and "shift_labels" not in batch:
            raise ValueError("BurstSPDataLoaderAdapter: batches need 'labels' (or pre-shifted 'shift_labels')")
        for r, sample in enumerate(self._gather(batch)):
            cu = sample.get("cu_seq_lens_q")
            if isinstance(cu, list) and len(cu) > 2:
                raise ValueError(PACKED_ERROR.format(where=f"data loader batch of SP rank {r}: cu_seq_lens_q={cu[:8]}"))
            refuse_packed(sample["position_ids"], f"data loader batch of SP rank {r}")
            for k in _DOC_KEYS:  # one document per row: nothing for the attention to use
                sample.pop(k, None)
            length = sample["input_ids"].shape[1]
            if length % self.sp_world_size != 0:
                raise ValueError(f"batch's seqlen={length} isn't divisible by sp-size={self.sp_world_size}")
            labels = sample.pop("labels", None)
            if "shift_labels" not in sample:
                sample["shift_labels"] = torch.cat(
                    [labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
            chunk = length // self.sp_world_size
            lo, hi = chunk * self.sp_rank, chunk * (self.sp_rank + 1)
            self.micro_batches.append(
                {k: (v[:, lo:hi].contiguous().cpu() if torch.is_tensor(v) else v) for k, v in sample.items()})

