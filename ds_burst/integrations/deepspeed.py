"""Drop-in replacement for ``deepspeed.sequence.layer.DistributedAttention`` (DeepSpeed-Ulysses).

Same constructor and forward signature, same input and output layouts (contiguous sequence shards,
``batch_dim_idx=0``: ``[b, s/p, h, d]``, ``batch_dim_idx=1``: ``[s/p, b, h, d]``), but instead of two
all-to-alls around a full-sequence local attention it runs BurstAttention on the local shards. It
therefore works where Ulysses refuses: query heads not divisible by ``P`` and fewer KV heads than ``P``.

``local_attention`` is never called; ds-burst computes attention itself. Its options are read from it
(attributes ``causal``/``is_causal``/``attn_mask_type``, ``softmax_scale``/``scale``/``scaling``,
``window_size``/``sliding_window``, ``dropout_p``/``attention_dropout``/``dropout``), overridden by the
``burst_options`` given to the constructor, overridden by the same keywords given to ``forward``.
An explicit attention-mask tensor, or attention dropout > 0 in training, raises ``ValueError``.

``patch_deepspeed()`` makes ``deepspeed.sequence.layer.DistributedAttention`` resolve to this class (for
code that looks it up after the patch, e.g. Megatron-DeepSpeed models built after the call), and ALST's
``UlyssesSPAttentionHF``/``UlyssesSPDataLoaderAdapter`` (Accelerate, HF Trainer, TRL) resolve to
:mod:`ds_burst.integrations.alst`'s drop-ins. DeepSpeed's classes taken before the patch keep working as
DeepSpeed's, side by side with ds-burst's.
"""

from __future__ import annotations

import builtins
import logging
import types
from typing import Any

import torch

from ds_burst.attention.api import burst_attn_func
from ds_burst.attention.max_logit import RECORD
from ds_burst.core.layout import check_layout, global_index
from ds_burst.dist.comm import resolve_group
from ds_burst.integrations import alst

log = logging.getLogger(__name__)

BURST_OPTIONS = ("causal", "softmax_scale", "window_size", "layout", "backward", "kernel", "deterministic",
                 "check_inputs", "check_finite", "softcap", "record_max_logit")
_CAUSAL_KEYS = ("causal", "is_causal")
_SCALE_KEYS = ("softmax_scale", "scale", "scaling")
_WINDOW_KEYS = ("window_size", "sliding_window")
_MASK_KEYS = ("attn_mask", "attention_mask", "mask")
_DROPOUT_KEYS = ("dropout_p", "attention_dropout", "dropout")
_SOFTCAP_KEYS = ("softcap",)
_SINK_KEYS = ("sinks", "s_aux")
_CALL_KEYS = _CAUSAL_KEYS + _SCALE_KEYS + _WINDOW_KEYS + _MASK_KEYS + _DROPOUT_KEYS + _SOFTCAP_KEYS + _SINK_KEYS


def _window_from(name: str, value: Any, causal: bool) -> tuple[int, int]:
    """``window_size`` is a flash-attn ``(left, right)`` pair; ``sliding_window=W`` is the Hugging Face/Mistral
    convention (a query sees the ``W`` most recent keys, itself included), i.e. ``(W-1, 0)`` causal."""
    if value is None:
        return (-1, -1)
    if name == "sliding_window":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sliding_window must be a positive int or None, got {value!r}")
        return (value - 1, 0 if causal else value - 1)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    raise ValueError(f"window_size must be a pair (left, right), got {value!r}")


def _dropout_value(value: Any) -> float:
    if isinstance(value, torch.nn.Dropout):
        return float(value.p)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return 0.0


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` (rotate-half convention); the rest pass through."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (xr * cos + rotated * sin).to(x.dtype)
    return out if xp.shape[-1] == 0 else torch.cat((out, xp), dim=-1)


class DistributedAttention(torch.nn.Module):
    """BurstAttention with the interface of DeepSpeed-Ulysses' ``DistributedAttention``.

    Args:
        local_attention: the model's local attention module (or function); only its attributes are read.
        sequence_process_group: the sequence-parallel ``ProcessGroup`` (or a topology/``mpu``, or ``None``
            for the world).
        scatter_idx: accepted for compatibility; must be 2 (the head dimension).
        gather_idx: accepted for compatibility (0 or 1); the sequence dimension follows ``batch_dim_idx``.
        sp_stream: accepted for compatibility and ignored (the ring overlaps its own communication).
        num_kv_heads: optional KV head count; checked against the key tensor when given.
        **burst_options: ``causal``, ``softmax_scale``, ``window_size``, ``layout`` (how the shards were cut:
            ``"contiguous"``, the Ulysses default, or ``"zigzag"``), ``backward``, ``kernel``,
            ``deterministic``, ``check_inputs``, ``check_finite`` (see :func:`ds_burst.burst_attn_func`);
            ``record_max_logit=True``: every call also computes the per-head maximum logit and folds it into
            :func:`ds_burst.pop_max_logits` under this module (Muon's QK-clip).
    """

    def __init__(
        self,
        local_attention: Any,
        sequence_process_group: Any,
        scatter_idx: int = 2,
        gather_idx: int = 0,
        sp_stream: Any = None,
        num_kv_heads: int | None = None,
        **burst_options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(burst_options) - set(BURST_OPTIONS))
        if unknown:
            raise ValueError(f"DistributedAttention: unknown burst option(s) {unknown}; known: {list(BURST_OPTIONS)}")
        if scatter_idx != 2:
            raise ValueError(f"DistributedAttention: scatter_idx must be 2 (the head dimension), got {scatter_idx}")
        if gather_idx not in (0, 1):
            raise ValueError(f"DistributedAttention: gather_idx must be 0 or 1, got {gather_idx}")
        check_layout(burst_options.get("layout", "contiguous"))
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx = scatter_idx
        self.gather_idx = gather_idx
        self.sp_stream = sp_stream
        self.num_kv_heads = num_kv_heads
        self.burst_options = dict(burst_options)
        self._warned_causal = False

    def layer_sync(self, layer: Any) -> None:
        """Compatibility no-op (Ulysses synchronises its side stream here)."""

    # ------------------------------------------------------------------------------------------
    def _module_option(self, keys: tuple[str, ...]) -> tuple[str, Any] | None:
        for key in keys:
            if hasattr(self.local_attn, key):
                val = getattr(self.local_attn, key)
                if val is not None and not callable(val) or isinstance(val, torch.nn.Dropout):
                    return key, val
        return None

    def resolve_options(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The ``burst_attn_func`` keyword arguments of one call: call kwargs > burst_options > module
        attributes > defaults (causal, ``D**-0.5``, no window). Raises ``ValueError`` for masks/dropout."""
        for i, a in enumerate(args):
            if a is not None:
                what = "an attention mask tensor" if isinstance(a, torch.Tensor) else f"{type(a).__name__}"
                raise ValueError(
                    f"DistributedAttention (ds-burst): extra positional argument {i} ({what}) is not supported; "
                    "explicit attention masks cannot be used: masking is by causal/window_size options"
                )
        unknown = sorted(k for k, v in kwargs.items() if k not in _CALL_KEYS and v is not None)
        if unknown:
            raise ValueError(f"DistributedAttention (ds-burst): unsupported keyword argument(s) {unknown}")
        for key in _MASK_KEYS:
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"DistributedAttention (ds-burst): explicit mask {key!r} is not supported; "
                    "use causal=True and/or window_size instead"
                )
        training = bool(getattr(self.local_attn, "training", False))
        for key in _DROPOUT_KEYS:
            if _dropout_value(kwargs.get(key)) > 0:
                raise ValueError(f"DistributedAttention (ds-burst): attention dropout {key}={kwargs[key]} > 0 is "
                                 "not supported")
        found = self._module_option(_DROPOUT_KEYS)
        if found and training and _dropout_value(found[1]) > 0:
            raise ValueError(
                f"DistributedAttention (ds-burst): local_attention.{found[0]}={found[1]} (attention dropout > 0 "
                "in training) is not supported; set it to 0"
            )

        opts = {k: v for k, v in self.burst_options.items()
                if k not in ("causal", "softmax_scale", "window_size", "record_max_logit")}
        opts.setdefault("layout", "contiguous")

        # causal
        causal = next((bool(kwargs[k]) for k in _CAUSAL_KEYS if kwargs.get(k) is not None), None)
        if causal is None:
            causal = self.burst_options.get("causal")
        if causal is None:
            found = self._module_option(_CAUSAL_KEYS)
            if found:
                causal = bool(found[1])
            elif getattr(self.local_attn, "attn_mask_type", None) is not None:
                mask_type = self.local_attn.attn_mask_type
                causal = "causal" in str(getattr(mask_type, "name", mask_type))
        if causal is None:
            causal = True
            if not self._warned_causal:
                log.warning("ds-burst DistributedAttention: causality not found on local_attention; assuming "
                            "causal=True (pass causal=... to silence)")
                self._warned_causal = True
        opts["causal"] = bool(causal)

        # scale
        scale = next((kwargs[k] for k in _SCALE_KEYS if kwargs.get(k) is not None), None)
        if scale is None:
            scale = self.burst_options.get("softmax_scale")
        if scale is None:
            found = self._module_option(_SCALE_KEYS)
            scale = found[1] if found else None
        opts["softmax_scale"] = None if scale is None else float(scale)

        # window
        window = next(((k, kwargs[k]) for k in _WINDOW_KEYS if kwargs.get(k) is not None), None)
        if window is None and self.burst_options.get("window_size") is not None:
            window = ("window_size", self.burst_options["window_size"])
        if window is None:
            window = self._module_option(_WINDOW_KEYS)
        opts["window_size"] = _window_from(*window, causal) if window else (-1, -1)

        # logit softcapping and attention sinks (call kwargs > burst_options)
        softcap = next((kwargs[k] for k in _SOFTCAP_KEYS if kwargs.get(k) is not None), None)
        if softcap is None:
            softcap = self.burst_options.get("softcap")
        if softcap is not None:
            opts["softcap"] = float(softcap)
        sinks = next((kwargs[k] for k in _SINK_KEYS if kwargs.get(k) is not None), None)
        if sinks is not None:
            opts["sinks"] = sinks
        return opts

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        batch_dim_idx: int,
        rotary_pos_emb: Any = None,
        *args: Any,
        cu_seqlens: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attention over the whole sequence from this rank's contiguous shards.

        Args:
            query, key, value: ``[b, s/p, h, d]`` (``batch_dim_idx=0``) or ``[s/p, b, h, d]`` (``1``);
                key/value may have fewer heads (GQA/MQA, any count).
            batch_dim_idx: 0 or 1, as for DeepSpeed-Ulysses.
            rotary_pos_emb: optional ``(cos, sin)`` for the **full** sequence in DeepSpeed's convention
                (``cos.permute(1, 0, 2, 3)`` broadcasts against the full-sequence tensor); applied to this
                rank's tokens at their global positions.
            **kwargs: ``causal``/``is_causal``, ``softmax_scale``/``scale``, ``window_size``/``sliding_window``,
                ``softcap`` override the constructor's options; ``sinks``/``s_aux`` (``[Hq]``, GPT-OSS attention
                sinks) are applied; any other keyword raises ``ValueError``.
            cu_seqlens: packed documents: the global boundaries ``[0, e1, ..., S]`` of the full sequence (see
                :func:`ds_burst.burst_attn_func`); ``None``: one document.

        Returns:
            the attention output in the layout of ``query``.
        """
        if isinstance(batch_dim_idx, torch.Tensor) or batch_dim_idx not in (0, 1):
            what = "a tensor (an attention mask?)" if isinstance(batch_dim_idx, torch.Tensor) else repr(batch_dim_idx)
            raise ValueError(f"DistributedAttention (ds-burst): batch_dim_idx must be 0 or 1, got {what}")
        opts = self.resolve_options(args, kwargs)
        if batch_dim_idx == 1:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if self.num_kv_heads is not None and key.dim() == 4 and key.shape[2] != self.num_kv_heads:
            raise ValueError(f"DistributedAttention: num_kv_heads={self.num_kv_heads} but key has {key.shape[2]} heads")
        if rotary_pos_emb is not None:
            query, key = self._rotary(query, key, rotary_pos_emb, batch_dim_idx, opts["layout"])
        record = bool(self.burst_options.get("record_max_logit"))
        out = burst_attn_func(query, key, value, group=self.spg, cu_seqlens=cu_seqlens, return_max_logit=record,
                              **opts)
        if record:
            out, max_logit = out
            RECORD.add(self, max_logit)
        assert isinstance(out, torch.Tensor)
        return out if batch_dim_idx == 0 else out.transpose(0, 1).contiguous()

    def _rotary(self, q: torch.Tensor, k: torch.Tensor, rotary_pos_emb: Any, batch_dim_idx: int,
                layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        info = resolve_group(self.spg)
        s_local = q.shape[1]
        seq = s_local * info.world
        cos, sin = (rotary_pos_emb[i].permute(1, 0, 2, 3) for i in (0, 1))  # full-sequence layout, as DeepSpeed
        if batch_dim_idx == 1:
            cos, sin = cos.transpose(0, 1), sin.transpose(0, 1)  # -> batch-first
        if cos.shape[1] == seq and info.world > 1:
            idx = torch.tensor(global_index(layout, info.rank, info.world, seq), device=cos.device)
            cos, sin = cos.index_select(1, idx), sin.index_select(1, idx)
        elif cos.shape[1] not in (1, s_local) or (cos.shape[1] == s_local and info.world > 1):
            raise ValueError(
                f"rotary_pos_emb covers {cos.shape[1]} positions; expected the full sequence length {seq}"
            )
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


_ALST_MODULE = "deepspeed.runtime.sequence_parallel.ulysses_sp"
_ALST_NAMES = {"UlyssesSPAttentionHF": "BurstSPAttentionHF", "UlyssesSPDataLoaderAdapter": "BurstSPDataLoaderAdapter"}
# (module, attribute, DeepSpeed's object) for every binding patch_deepspeed replaced
_PATCHED: list[tuple[Any, str, Any]] = []
# (DeepSpeed's class, attribute, DeepSpeed's own method) for every method patch_deepspeed gave pinned globals
_PINNED: list[tuple[type, str, Any]] = []


def _rebind(module: Any, name: str, new: Any) -> None:
    old = getattr(module, name)
    if old is not new:
        _PATCHED.append((module, name, old))
        setattr(module, name, new)


class _PinnedGlobals(dict):
    """The globals of a copy of one of DeepSpeed's methods: the names :func:`patch_deepspeed` rebinds in the
    method's module resolve to DeepSpeed's own classes, every other name to the module's namespace, looked up at
    each use (a later change to the module is seen as by the original method)."""

    def __init__(self, module_globals: dict[str, Any], pinned: dict[str, Any]) -> None:
        super().__init__(pinned)
        self["__builtins__"] = module_globals.get("__builtins__", builtins)
        self.module_globals = module_globals
        self.pinned = frozenset(pinned)

    def __missing__(self, name: str) -> Any:
        return self.module_globals[name]


def _global_names(code: types.CodeType) -> set[str]:
    """Names a code object (with the functions nested in it) may load as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _pinned_copy(value: Any, scope: _PinnedGlobals) -> Any:
    """A copy of the function, classmethod, staticmethod or property ``value`` whose functions run with the globals
    ``scope``, or ``None`` when none of its functions names a pinned class."""
    if isinstance(value, types.FunctionType):
        if not _global_names(value.__code__) & scope.pinned:
            return None
        fn = types.FunctionType(value.__code__, scope, value.__name__, value.__defaults__, value.__closure__)
        fn.__kwdefaults__ = None if value.__kwdefaults__ is None else dict(value.__kwdefaults__)
        fn.__qualname__, fn.__doc__, fn.__module__ = value.__qualname__, value.__doc__, value.__module__
        fn.__annotations__ = dict(value.__annotations__)
        fn.__dict__.update(value.__dict__)
        return fn
    if isinstance(value, (classmethod, staticmethod)):
        inner = _pinned_copy(value.__func__, scope)
        return None if inner is None else type(value)(inner)
    if isinstance(value, property):
        parts = (value.fget, value.fset, value.fdel)
        copies = [None if f is None else _pinned_copy(f, scope) for f in parts]
        if all(c is None for c in copies):
            return None
        return property(*(c if c is not None else f for c, f in zip(copies, parts)), value.__doc__)
    return None


def _pin_methods(module: Any, pinned: dict[str, type]) -> None:
    """Keep DeepSpeed's classes ``pinned`` (global name in ``module`` -> class) working once the names are rebound:
    every method of theirs that refers to one of the names as a module global (``super(DistributedAttention,
    self)``, ``UlyssesSPAttentionHF(...)`` in ``register_with_transformers``) is replaced by a copy that resolves
    the names to DeepSpeed's own classes. Recorded in ``_PINNED`` for :func:`unpatch_deepspeed`."""
    scope = _PinnedGlobals(vars(module), pinned)
    for cls in pinned.values():
        for attr, value in list(vars(cls).items()):
            copy = _pinned_copy(value, scope)
            if copy is not None:
                _PINNED.append((cls, attr, value))
                setattr(cls, attr, copy)


def patch_deepspeed() -> None:
    """Make every DeepSpeed Ulysses entry point run BurstAttention.

    * ``deepspeed.sequence.layer.DistributedAttention`` -> :class:`DistributedAttention`, for code that looks the
      name up after this call;
    * ALST's ``deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF`` and
      ``UlyssesSPDataLoaderAdapter`` -> :class:`ds_burst.integrations.alst.BurstSPAttentionHF` and
      :class:`~ds_burst.integrations.alst.BurstSPDataLoaderAdapter` (same signatures), in that module and in every
      loaded module that bound the names at import time (``from ... import UlyssesSPAttentionHF``). Accelerate
      (``ParallelismConfig(sp_backend="deepspeed")``), the Hugging Face ``Trainer`` and TRL import them from that
      module when they prepare the model, so call this before ``Trainer(...)``/``accelerator.prepare``.

    DeepSpeed's own classes stay DeepSpeed's: a reference taken before this call (Megatron-DeepSpeed's
    ``from deepspeed.sequence.layer import DistributedAttention`` at import), a subclass of one, or an object of one
    still constructs and behaves exactly as DeepSpeed's, side by side with ds-burst's classes (their methods that
    name their class by its module global, e.g. ``super(DistributedAttention, self)``, get copies that resolve the
    name to DeepSpeed's class). Idempotent; undo with :func:`unpatch_deepspeed`.
    """
    import sys

    import deepspeed.runtime.sequence_parallel.ulysses_sp as ulysses_sp
    import deepspeed.sequence.layer as ds_layer

    if ds_layer.DistributedAttention is not DistributedAttention:
        _pin_methods(ds_layer, {"DistributedAttention": ds_layer.DistributedAttention})
        _rebind(ds_layer, "DistributedAttention", DistributedAttention)
    originals = {name: getattr(ulysses_sp, name) for name, burst in _ALST_NAMES.items()
                 if getattr(ulysses_sp, name) is not getattr(alst, burst)}  # not patched yet
    _pin_methods(ulysses_sp, originals)
    for name in originals:
        new = getattr(alst, _ALST_NAMES[name])
        _rebind(ulysses_sp, name, new)
        for mod in list(sys.modules.values()):
            if mod is None or mod is ulysses_sp or mod is alst:
                continue
            try:
                bound = mod.__dict__.get(name)
            except Exception:  # noqa: BLE001 - exotic module objects
                continue
            if bound is originals[name]:
                _rebind(mod, name, new)


def unpatch_deepspeed() -> None:
    """Restore DeepSpeed's own ``DistributedAttention``, ``UlyssesSPAttentionHF`` and
    ``UlyssesSPDataLoaderAdapter`` everywhere :func:`patch_deepspeed` replaced them, their own methods, and the
    transformers attention functions that ds-burst's ``register_with_transformers`` replaced (no-op if not
    patched)."""
    while _PATCHED:
        module, name, old = _PATCHED.pop()
        setattr(module, name, old)
    while _PINNED:
        cls, attr, method = _PINNED.pop()
        setattr(cls, attr, method)
    alst.unregister_from_transformers()
