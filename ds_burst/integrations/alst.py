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
:func:`ds_burst.patch_deepspeed` puts both classes in DeepSpeed's module, where Accelerate and the Trainer look
them up.

The ``mpu`` returned is a :class:`ParallelStateSP`: to DeepSpeed it is what ALST's mpu (the module
``deepspeed.runtime.sequence_parallel.parallel_state_sp``) is: the same functions, the
``initialize_sequence_parallel`` attribute DeepSpeed tests for, model-parallel names aliasing the sequence-parallel
ones and no ``get_data_parallel_group``, so a plain ``deepspeed.initialize(mpu=mpu)`` partitions ZeRO-3 parameters
over the world and reduces gradients over the sequence-data-parallel group exactly as with ALST. It is
backed by ds-burst's groups (:func:`ds_burst.init_sequence_parallel`) and ds-burst's code takes it as a group (it
has ``get_sequence_parallel_group()``).

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
flash-attention's varlen path); ``register_with_transformers`` may be called again (it reuses the groups; ALST's
asserts), and in eval mode with ``disable_in_eval=True`` the original attention gets the mask transformers built
(ALST passes ``None``; the same logits without padding).
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from ds_burst.attention.positions import boundaries_from_positions
from ds_burst.dist.comm import all_gather_objects, all_gather_tensor, resolve_group
from ds_burst.dist.topology import Topology, get_topology, init_sequence_parallel
from ds_burst.integrations.hf import HF_OPTIONS, hf_burst_attention
from ds_burst.training.data import IGNORE_INDEX, boundaries_from_cu_seq_lens
from ds_burst.training.losses import check_trainer_sp_gradients

log = logging.getLogger(__name__)

__all__ = ["BurstSPAttentionHF", "BurstSPDataLoaderAdapter", "ParallelStateSP", "documents_from_batch",
           "documents_from_position_ids", "positions_from_documents", "register_with_transformers",
           "unregister_from_transformers"]

PACKED_ERROR = "ds-burst: packed batch refused ({where}): {why}"

# flash-attention varlen keys that describe the documents of a packed batch
_DOC_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# attention functions replaced by register_with_transformers: key -> the original function
_REPLACED: dict[str, Any] = {}
# a Hub kernel attention key, ``owner/name[@revision][:function]`` (transformers registers it lazily)
_HUB_KERNEL_KEY = re.compile(r"[^/:]+/[^/:]+(@[^/:]+)?(:[^/:]+)?")


# ---------------------------------------------------------------------------------------------
# Packed sequences


def documents_from_position_ids(position_ids: torch.Tensor, where: str = "") -> list[int] | None:
    """Full-sequence document boundaries ``[0, e1, ..., S]`` of a ``[B, S]`` (or ``[S]``) ``position_ids`` tensor of
    the *full* (unsharded) sequence, or ``None`` for one document per row: documents start where the positions
    restart at 0 (:func:`ds_burst.attention.positions.boundaries_from_positions`, which raises ``ValueError``,
    "packed batch refused", for a jump that is not a restart and for rows with different documents). Reads the
    tensor on the host."""
    docs = boundaries_from_positions(position_ids.detach().cpu(), where or "position_ids")
    return None if docs is None else list(docs)


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
# The mpu


class ParallelStateSP:
    """The ``mpu`` of :meth:`BurstSPAttentionHF.register_with_transformers`: DeepSpeed ALST's ``parallel_state_sp``
    interface over ds-burst's groups.

    DeepSpeed tells ALST's mpu (the module ``deepspeed.runtime.sequence_parallel.parallel_state_sp``) apart by its
    ``initialize_sequence_parallel`` attribute and by the absence of ``get_data_parallel_group``: ZeRO-3 then
    partitions a plain model over the world, gradients are reduced over the sequence-data-parallel group, the
    data-parallel size is ``world / sequence_parallel_size`` and there is no model parallelism. This object has
    exactly the functions that module has, with the same meaning, so ``deepspeed.initialize(mpu=...)`` does with it
    what it does with ALST's: the same partitioning, reductions and scaling, hence the same numbers. As in ALST, the
    model-parallel functions alias the sequence-parallel ones.

    ds-burst takes it wherever it takes a group or topology (``get_sequence_parallel_group()``); ``schedule``,
    ``node_groups`` and ``ulysses_groups`` are the topology's, so attention runs the schedule the topology was made for.

    Args:
        topology: the :class:`ds_burst.Topology` whose groups back it (:func:`ds_burst.init_sequence_parallel`).
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def __repr__(self) -> str:
        t = self.topology
        return f"ParallelStateSP(sequence_parallel_size={t.sequence_parallel_size}, world_size={t.world_size})"

    @property
    def schedule(self) -> str:
        """The topology's ring schedule (read by ds-burst's attention when given this object as its group)."""
        return self.topology.schedule

    @property
    def node_groups(self) -> Any:
        """The topology's node subgroups (``None`` inside one node)."""
        return self.topology.node_groups

    @property
    def ulysses_groups(self) -> Any:
        """The topology's Ulysses groups (``init_sequence_parallel(..., ulysses_degree=U)``; ``None`` without)."""
        return self.topology.ulysses_groups

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        """ALST's group creation. The groups exist already: the same size is a no-op, another size raises
        ``ValueError`` (call :func:`register_with_transformers` with that size instead)."""
        have = self.topology.sequence_parallel_size
        if sequence_parallel_size != have:
            raise ValueError(f"ds-burst: the sequence-parallel groups of this mpu have sequence_parallel_size={have}, "
                             f"not {sequence_parallel_size}; register_with_transformers makes groups of another size")

    def get_sequence_parallel_group(self) -> Any:
        """This rank's sequence-parallel group."""
        return self.topology.get_sequence_parallel_group()

    def get_sequence_data_parallel_group(self) -> Any:
        """The sequence-data-parallel group (all ranks): ZeRO's reductions run here."""
        return self.topology.get_sequence_data_parallel_group()

    def get_sequence_parallel_world_size(self) -> int:
        """``P``."""
        return self.topology.get_sequence_parallel_world_size()

    def get_sequence_data_parallel_world_size(self) -> int:
        """The ranks of the sequence-data-parallel group (the world)."""
        return self.topology.get_sequence_data_parallel_world_size()

    def get_sequence_parallel_rank(self) -> int:
        """This rank's index in its sequence-parallel group."""
        return self.topology.get_sequence_parallel_rank()

    def get_sequence_data_parallel_rank(self) -> int:
        """This rank's index in the sequence-data-parallel group."""
        return self.topology.get_sequence_data_parallel_rank()

    # ALST's aliases: model parallel = sequence parallel
    get_model_parallel_rank = get_sequence_parallel_rank
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_group = get_sequence_parallel_group


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
        unknown = sorted(set(burst_options) - set(HF_OPTIONS))
        if unknown:
            raise ValueError(f"unknown burst option(s) {unknown}; allowed: {sorted(HF_OPTIONS)}")
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
                :class:`BurstSPDataLoaderAdapter` adds them), else taken from the restarts of the SP group's
                ``position_ids`` (gathered once per forward); ``seq_idx`` (TRL) and ``shift_labels`` are dropped;
                the rest is applied or refused as for ``attn_implementation="burst"``
                (``ds_burst.integrations.hf.hf_burst_attention``: ``scaling``, ``sliding_window``, ``softcap``,
                ``s_aux``, ``is_causal``, ...).

        Returns:
            ``(out [B, s, Hq, Dv], None)`` (``Dv``: the value head dim).
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
        # without cu_seq_lens from the data path, hf_burst_attention takes the documents from the position_ids'
        # restarts, gathered over the SP group once per forward (burst_attn_func(position_ids=...))
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
    ) -> ParallelStateSP | None:
        """ALST's ``register_with_transformers``: make ``core_attn_implementation`` run BurstAttention.

        Creates (or reuses) the sequence-parallel groups (:func:`ds_burst.init_sequence_parallel`) and replaces
        ``ALL_ATTENTION_FUNCTIONS[core_attn_implementation]`` by a BurstAttention wrapper, so the model keeps its
        ``_attn_implementation`` (and transformers' branches on it). Returns the DeepSpeed ``mpu``, a
        :class:`ParallelStateSP` (to DeepSpeed what ALST's ``parallel_state_sp`` is, so a plain
        ``deepspeed.initialize(mpu=mpu)`` partitions and reduces as with ALST), or ``None`` when
        ``sequence_parallel_size == 1`` (nothing is done).

        Accepts what ALST accepts and refuses what it refuses, with ALST's wording (``ValueError``): a loaded model
        (or anything with ``.config``, e.g. a PEFT model) whose ``_attn_implementation`` differs from
        ``core_attn_implementation`` ("... does not match model config attn_implementation=..."), ``"eager"`` and
        ``"paged|eager"``, a key transformers does not know ("... is not a valid attn_implementation. The choices
        are ..."); a Hub kernel key (``owner/name[@revision][:function]``, e.g. ``"kernels-community/flash-attn2"``)
        is first registered by transformers' ``lazy_import_flash_attention``.

        Args:
            model_name_or_path: the model (or anything with ``.config``), or a hub name / local path.
            core_attn_implementation: the model's attention key, e.g. ``"sdpa"``, ``"flash_attention_2"`` or a Hub
                kernel.
            sequence_parallel_size: SP size ``P`` (1: disabled).
            micro_batch_size: micro batch size per rank (kept for compatibility; any batch size works).
            seq_length: the fixed global sequence length: used (and must be divisible by ``P``) when
                ``seq_length_is_variable=False``, unused otherwise (as in ALST).
            seq_length_is_variable: whether the sequence length may change between batches.
            disable_in_eval: in eval mode run the original attention (no SP).
            max_length: deprecated alias of ``seq_length`` (a warning; ``seq_length`` wins when both are given).
            **burst_options: passed to every :func:`ds_burst.burst_attn_func` call.
        """
        if sequence_parallel_size == 1:
            return None
        if max_length is not None:
            log.warning("register_with_transformers: the max_length argument is deprecated, use seq_length")
            if seq_length is None:
                seq_length = max_length
        if not seq_length_is_variable and seq_length is None:
            raise ValueError("Either `seq_length_is_variable` needs to be `True` or `seq_length` needs to be set to an "
                             "integer value of the fixed sequence length (ds-burst register_with_transformers)")
        from transformers import AutoConfig
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = core_attn_implementation
        loaded = hasattr(model_name_or_path, "config")
        config = model_name_or_path.config if loaded else AutoConfig.from_pretrained(model_name_or_path)
        if loaded:  # only a loaded model's config holds the implementation it resolved; a bare config says "eager"
            current = getattr(config, "_attn_implementation", None)
            if current is not None and current != impl:
                raise ValueError(f"core_attn_implementation='{impl}' does not match model config "
                                 f"attn_implementation='{current}'. Set both to the same value so the "
                                 "sequence-parallel attention can intercept the active attention path.")
        if impl in ("eager", "paged|eager"):
            raise ValueError(f"{impl} attn_implementation isn't currently supported by sequence parallelism "
                             "(ds-burst, as DeepSpeed ALST): eager attention needs a 4D attention_mask, which a "
                             "sequence shard cannot use. Use any flash attention variant, 'flex_attention', 'sdpa', "
                             "or a hub-hosted kernel (e.g. 'kernels-community/flash-attn2').")
        original = _REPLACED.get(impl)
        if original is None:
            if isinstance(impl, str) and _HUB_KERNEL_KEY.fullmatch(impl):
                # transformers registers Hub kernels lazily: do it before looking the key up, as ALST does
                try:
                    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention
                except ImportError as exc:
                    raise ImportError("Hub kernel attention requires a transformers version exposing "
                                      "`transformers.modeling_flash_attention_utils.lazy_import_flash_attention`."
                                      ) from exc
                lazy_import_flash_attention(impl)
            if impl not in ALL_ATTENTION_FUNCTIONS:
                raise ValueError(f"{impl} is not a valid attn_implementation. The choices are "
                                 f"{ALL_ATTENTION_FUNCTIONS.valid_keys()}")
            original = ALL_ATTENTION_FUNCTIONS[impl]
        if not seq_length_is_variable and seq_length % sequence_parallel_size != 0:  # type: ignore[operator]
            raise ValueError(f"seq_length={seq_length} is not divisible by sequence_parallel_size="
                             f"{sequence_parallel_size}")

        # the HF Trainer's loss with the running DeepSpeed config: refuse combinations whose SP gradients are not
        # the SP=1 gradients (ds_burst.training.losses.sp_grads_averaged has the table)
        check_trainer_sp_gradients(sequence_parallel_size,
                                   model_name_or_path if isinstance(model_name_or_path, torch.nn.Module) else None)
        topo = get_topology()
        if topo is None or topo.get_sequence_parallel_world_size() != sequence_parallel_size:
            topo = init_sequence_parallel(sequence_parallel_size)
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
        battn.core_attn_implementation = impl

        def burst_sp_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
            # in training the mask transformers built is for the local shard only: drop it (ALST does the same)
            mask = attention_mask if (not module.training and disable_in_eval) else None
            return battn(module, query, key, value, mask, *args, **kwargs)

        burst_sp_attention.burst_attention = battn  # type: ignore[attr-defined]
        _REPLACED[impl] = original
        ALL_ATTENTION_FUNCTIONS[impl] = burst_sp_attention
        # ZeRO-3 needs nothing here: with this mpu DeepSpeed partitions a plain model over the world, as for ALST
        return ParallelStateSP(topo)


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
) -> ParallelStateSP | None:
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

