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

Packed batches (several documents per row: ``position_ids`` restarting at 0, what transformers' packing
collators pass, or TRL's padding-free ``cu_seq_lens_q``/``cu_seq_lens_k``) train through the documents path: the
adapter reads the document boundaries of each *full* sample before sharding it and hands them to the model as
``cu_seq_lens_q``/``cu_seq_lens_k`` (Python lists of full-sequence boundaries ``[0, e1, ..., S]``, the same on
every SP rank), which transformers passes to the attention function and that to
``burst_attn_func(cu_seqlens=...)``; ``position_ids`` stay the per-document positions (RoPE). Without them the
attention function gathers ``position_ids`` over the SP group once per forward and takes the boundaries from the
full sequence (:func:`documents_from_position_ids`), never from its own shard alone. What cannot be honoured
raises ``ValueError`` on every rank: rows of one batch holding different documents (one set of boundaries
applies to every row), a jump in ``position_ids`` that is not a restart at 0, boundaries and ``position_ids``
that disagree.

Differences from ALST: a missing ``position_ids`` is filled with ``0..S-1`` (or, with ``cu_seq_lens_q``, the
per-document positions) by the adapter (ALST raises); packed batches work with any attention key (ALST needs
flash-attention's varlen path).
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
from ds_burst.integrations.zero import check_zero3_partitioning, partition_over_sequence_data_parallel
from ds_burst.training.data import IGNORE_INDEX, boundaries_from_cu_seq_lens, boundaries_from_position_ids

log = logging.getLogger(__name__)

__all__ = ["BurstSPAttentionHF", "BurstSPDataLoaderAdapter", "documents_from_batch", "documents_from_position_ids",
           "positions_from_documents", "register_with_transformers", "unregister_from_transformers"]

PACKED_ERROR = "ds-burst: packed batch refused ({where}): {why}"

# flash-attention varlen keys that describe the documents of a packed batch
_DOC_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# keywords that reach the attention function through model(**batch) but do not concern attention: TRL's
# padding-free seq_idx (document index per token, for linear-attention convolutions) and the Trainer's
# shift_labels (deepspeed_sp_compute_loss passes the adapter's batch to the model, which hands its **kwargs on)
_NO_ATTENTION_KEYS = ("seq_idx", "shift_labels")

# attention functions replaced by register_with_transformers: key -> the original function
_REPLACED: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------
# Packed sequences


def documents_from_position_ids(position_ids: torch.Tensor, where: str = "") -> list[int] | None:
    """Full-sequence document boundaries ``[0, e1, ..., S]`` of a ``[B, S]`` (or ``[S]``) ``position_ids`` tensor of
    the *full* (unsharded) sequence, or ``None`` for one document per row.

    A document starts wherever the positions restart at 0 (what transformers' packing collators and TRL pass;
    the convention of :func:`ds_burst.training.data.boundaries_from_position_ids`). Raises ``ValueError``
    ("packed batch refused") when a row's positions jump without restarting at 0 (no document boundary can be
    told apart from a gap) or when the rows of the batch hold different documents (one set of boundaries applies
    to every row of a ``burst_attn_func`` call). Reads the tensor on the host.
    """
    pos = position_ids.reshape(-1, position_ids.shape[-1]).cpu()
    if pos.shape[-1] < 2:
        return None
    jump = (pos[:, 1:] != pos[:, :-1] + 1) & (pos[:, 1:] != 0)
    if bool(jump.any()):
        row, t = (int(x) for x in torch.nonzero(jump)[0])
        raise ValueError(PACKED_ERROR.format(
            where=where or "position_ids",
            why=f"row {row}: position_ids jump from {int(pos[row, t])} to {int(pos[row, t + 1])} at token {t + 1} "
                "without restarting at 0; ds-burst reads a document start only where the positions restart at 0"))
    try:
        return boundaries_from_position_ids(pos)
    except ValueError as exc:
        starts = [[int(t) for t in torch.nonzero(row == 0).flatten()][:8] for row in pos]
        raise ValueError(PACKED_ERROR.format(
            where=where or "position_ids",
            why=f"{exc} (document starts per row: {starts})")) from None


def positions_from_documents(cu: list[int], batch: int) -> torch.Tensor:
    """Per-document positions ``[batch, S]`` (``0..len-1`` in every document) of boundaries ``[0, e1, ..., S]``."""
    pos = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
    return pos.unsqueeze(0).expand(batch, -1).contiguous()


def documents_from_batch(sample: dict[str, Any], where: str = "") -> list[int] | None:
    """Full-sequence document boundaries of one *unsharded* batch (``input_ids [B, S]``), or ``None``.

    From ``cu_seq_lens_q``/``cu_seq_lens_k`` when present (flash-attn varlen offsets into the flattened batch
    ``[B * S]``, or boundaries of one row; :func:`ds_burst.training.data.boundaries_from_cu_seq_lens`), checked
    against the restarts of the ``position_ids`` if those are given; else from the ``position_ids``
    (:func:`documents_from_position_ids`). Raises ``ValueError`` ("packed batch refused") for what one set of
    boundaries cannot express.
    """
    ids = sample["input_ids"]
    batch, seq = int(ids.shape[0]), int(ids.shape[1])
    where = where or "batch"
    cus = {k: sample[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k") if sample.get(k) is not None}
    pos = sample.get("position_ids")
    if not cus:
        return None if pos is None else documents_from_position_ids(pos, where)
    got = {}
    for k, c in cus.items():
        try:
            got[k] = boundaries_from_cu_seq_lens(c, batch, seq)
        except ValueError as exc:
            raise ValueError(PACKED_ERROR.format(where=where, why=f"{k}: {exc}")) from None
    docs = next(iter(got.values()))
    if any(d != docs for d in got.values()):
        raise ValueError(PACKED_ERROR.format(
            where=where, why=f"cu_seq_lens_q and cu_seq_lens_k differ ({got['cu_seq_lens_q'][:8]} vs "
                             f"{got['cu_seq_lens_k'][:8]}); self-attention over packed documents needs one set"))
    if len(docs) < 2 or docs[0] != 0 or docs[-1] != seq or any(b <= a for a, b in zip(docs[:-1], docs[1:])):
        raise ValueError(PACKED_ERROR.format(
            where=where, why=f"cu_seq_lens {docs[:8]} are not strictly increasing boundaries from 0 to S={seq}"))
    if pos is not None:
        from_pos = documents_from_position_ids(pos, where) or [0, seq]
        if from_pos != docs:
            raise ValueError(PACKED_ERROR.format(
                where=where, why=f"the documents of cu_seq_lens ({docs[:8]}) and of position_ids (restarts at 0: "
                                 f"{from_pos[:8]}) differ; RoPE would not get the per-document positions"))
    return None if len(docs) == 2 else docs


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
        self._checked: Any = None  # (weak reference to the last position_ids, its document boundaries)

    def documents(self, position_ids: torch.Tensor) -> list[int] | None:
        """Full-sequence document boundaries of this call's ``position_ids`` shard: the shards of the SP group are
        gathered and the boundaries taken from the full sequence (:func:`documents_from_position_ids`), so every
        rank gets the same list (or the same ``ValueError``).

        Done once per ``position_ids`` tensor (every layer of one forward passes the same object; every rank
        runs the same layers, so all ranks take part in the same gathers)."""
        if self._checked is not None and self._checked[0]() is position_ids:
            return self._checked[1]
        full = position_ids
        info = resolve_group(self.process_group)
        if info.world > 1:
            full = torch.cat(all_gather_tensor(info, position_ids), dim=-1)
        docs = documents_from_position_ids(full, "attention")
        self._checked = (weakref.ref(position_ids), docs)
        return docs

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
            **kwargs: ``position_ids`` (required, this rank's shard of the global positions); packed documents as
                ``cu_seq_lens_q``/``cu_seq_lens_k`` (full-sequence boundaries, the same on every rank:
                :class:`BurstSPDataLoaderAdapter` adds them), else taken from the SP group's gathered
                ``position_ids`` (:meth:`documents`); ``seq_idx`` (TRL) and ``shift_labels`` are dropped; the rest
                is applied or refused as for ``attn_implementation="burst"``
                (``ds_burst.integrations.hf.hf_burst_attention``: ``scaling``, ``sliding_window``, ``softcap``,
                ``s_aux``, ``is_causal``, ...).

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
        for k in _NO_ATTENTION_KEYS:
            kwargs.pop(k, None)
        if kwargs.get("cu_seq_lens_q") is None and kwargs.get("cu_seq_lens_k") is None:
            # no boundaries from the data path: the full sequence's position_ids (gathered) give them
            docs = self.documents(position_ids)
            if docs is not None:
                kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = docs
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
    minimal = {k: _strip_auto(config[k]) for k in ("zero_optimization", "fp16", "bf16") if k in config}
    minimal["train_micro_batch_size_per_gpu"] = 1
    partition_over_sequence_data_parallel(model, minimal, topology)
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
    are copied to all ranks.

    Packed batches (``position_ids`` restarting at 0 inside a row, or ``cu_seq_lens_q``/``cu_seq_lens_k`` of
    the unsharded batch, e.g. TRL's padding-free collator): the full-sequence document boundaries are read from
    the full sample before it is sharded (:func:`documents_from_batch`) and every shard carries them as
    ``cu_seq_lens_q``/``cu_seq_lens_k`` (Python lists ``[0, e1, ..., S]``, identical on every SP rank; the
    Trainer passes them to ``model(**batch)``, the model to the attention function); ``max_length_q``/``_k`` are
    dropped; ``position_ids`` stay the per-document positions (RoPE; filled from ``cu_seq_lens_q`` if missing).
    What one set of boundaries cannot express raises ``ValueError`` on every rank (the samples are checked after
    the gather, so all ranks see the same ones).
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

    @staticmethod
    def _positions(batch: dict[str, Any], rows: int, seq: int) -> torch.Tensor:
        """``position_ids`` for a batch without them: per document when ``cu_seq_lens_q``/``_k`` describe valid
        documents, else ``0..S-1`` (invalid boundaries are refused after the gather, on every rank)."""
        cu = batch.get("cu_seq_lens_q", batch.get("cu_seq_lens_k"))
        if cu is not None:
            try:
                docs = boundaries_from_cu_seq_lens(cu, rows, seq)
            except ValueError:
                docs = []
            if len(docs) >= 2 and docs[0] == 0 and docs[-1] == seq and all(b > a for a, b in zip(docs, docs[1:])):
                return positions_from_documents(docs, rows)
        return torch.arange(seq).unsqueeze(0).expand(rows, -1)

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
            batch["position_ids"] = self._positions(batch, int(ids.shape[0]), seq).to(ids.device)
        if "labels" not in batch and "shift_labels" not in batch:
            raise ValueError("BurstSPDataLoaderAdapter: batches need 'labels' (or pre-shifted 'shift_labels')")
        for r, sample in enumerate(self._gather(batch)):
            docs = documents_from_batch(sample, f"data loader batch of SP rank {r}")
            for k in _DOC_KEYS:
                sample.pop(k, None)
            if docs is not None:  # full-sequence boundaries, the same object for every shard of this sample
                sample["cu_seq_lens_q"], sample["cu_seq_lens_k"] = docs, list(docs)
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

