"""Loss and accuracy over the whole (sharded) sequence: every rank holds a shard of the logits and labels;
the token-weighted mean over all labelled tokens of the SP group is what SP=1 reports. A rank without labelled
tokens contributes zero (never NaN)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ds_burst.dist.comm import GroupInfo, all_reduce_sum, is_cpu_backend, resolve_group
from ds_burst.dist.topology import get_topology


def _sp_info(group: Any) -> GroupInfo:
    """The SP group: ``group`` if given, else the current topology, else a single process (never WORLD)."""
    if group is None:
        group = get_topology()
    if group is None:
        return GroupInfo(None, 0, 1)
    return resolve_group(group)


def sequence_parallel_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: Any = None,
    ignore_index: int = -100,
    sp_grads_averaged: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy over all labelled tokens of the full sequence, from this rank's shard.

    ``labels`` are already shifted (``labels[t]`` is the target of ``logits[t]``), sharded like ``logits``.
    The returned value is the same on every rank of the SP group (the full-sequence mean, as SP=1 would
    report). Its gradient on this rank is that of ``local_sum / global_count``; summed over the SP ranks
    those give exactly the gradient of the full-sequence mean. Whether the engine then *sums* or
    *averages* the gradients over the SP ranks depends on the DeepSpeed code path (see
    :func:`sp_grads_averaged`); pass ``sp_grads_averaged=True`` when it averages (the gradient is then
    scaled by ``P``, so the average is the true gradient).
    """
    flat = labels.reshape(-1)
    logits = logits if logits.dtype == torch.float64 else logits.float()  # fp32 softmax; fp64 stays fp64
    ce = F.cross_entropy(logits.reshape(flat.numel(), -1), flat, ignore_index=ignore_index, reduction="sum")
    count = (flat != ignore_index).sum().to(torch.float64)
    return sequence_parallel_loss_from_sum(ce, count, group, sp_grads_averaged)


def sequence_parallel_loss_from_sum(
    ce_sum: torch.Tensor, count: torch.Tensor, group: Any = None, sp_grads_averaged: bool = False
) -> torch.Tensor:
    """:func:`sequence_parallel_loss` from this rank's summed token loss ``ce_sum`` and labelled-token
    ``count`` (e.g. from :func:`ds_burst.training.memory.chunked_lm_head_loss`): same value and gradients."""
    info = _sp_info(group)
    ce = ce_sum
    total = all_reduce_sum(info, count) if info.world > 1 else count
    local = ce / total.clamp(min=1).to(ce.dtype)
    value = all_reduce_sum(info, local.detach()) if info.world > 1 else local.detach()
    scaled = local * info.world if sp_grads_averaged else local
    return scaled + (value - scaled).detach()


#: First DeepSpeed release with deepspeedai/DeepSpeed#8854 (ZeRO-3 sums the SP ranks' gradients instead of averaging
#: them), the version transformers >= 5.25 tests for in ``deepspeed_sp_compute_loss``.
DEEPSPEED_ZERO3_SUMS_SP = "0.20.2"
#: First transformers release whose Trainer SP loss (``deepspeed_sp_compute_loss``) backpropagates each rank's own
#: share (scaled by ``sp_size`` only under ZeRO-3 with DeepSpeed < 0.20.2); 5.0-5.24 backpropagate the full mean
#: on every rank through a differentiable all_gather (the gradient scaled by ``sp_size`` always).
TRANSFORMERS_SP_LOSS_SHARE = "5.25.0"


def _version(v: str) -> Any:
    from packaging.version import Version  # a dependency of DeepSpeed and transformers

    return Version(v)


def _installed(package: str, given: str | None) -> str:
    """``given``, else the installed version of ``package`` (``importlib.metadata``)."""
    if given is not None:
        return str(given)
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"{package} is not installed: pass its version explicitly") from None


def _config_int(section: dict[str, Any], key: str, default: int, where: str) -> int:
    v = section.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise ValueError(f"{where}.{key}={v!r}: expected an integer (resolve \"auto\" values before asking which "
                         "gradient convention DeepSpeed uses)")
    return int(v)


def _config_bool(section: dict[str, Any], key: str, default: bool, where: str) -> bool:
    v = section.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{where}.{key}={v!r}: expected true or false")
    return v


def largest_param_numel(model: Any) -> int:
    """Elements of ``model``'s largest trainable parameter (the full size of a ZeRO-3 partitioned one)."""
    sizes = [int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad]
    return max(sizes, default=0)


def sp_grads_averaged(ds_config: dict[str, Any], deepspeed_version: str | None = None, model: Any = None) -> bool:
    """Whether DeepSpeed *averages* (``True``) or *sums* (``False``) gradients over the sequence-parallel ranks.

    With a sequence-parallel ``mpu`` DeepSpeed reduces gradients over all ``dp * sp`` ranks; the divisor depends on
    the version and the code path (read in the 0.19.8 source; every path below is checked against SP=1 gradients by
    ``tests/test_deepspeed_convention.py``, and training runs by ``tests/test_deepspeed_train.py``):

    * no ZeRO (``engine.allreduce_bucket`` with ``dp_world_size = world / sequence_parallel_size``), ZeRO-1/2 (every
      path of ``stage_1_and_2.py`` divides by ``world / sequence_parallel_size``): a **sum**;
    * ZeRO-3, DeepSpeed < 0.20.2: ``reduce_scatter_coalesced`` (``reduce_scatter: true``, the default, or
      ``contiguous_gradients: false``, or a bucket holding one parameter larger than ``reduce_bucket_size``)
      pre-divides by ``dp * sp``: an **average**; ``reduce_scatter: false`` with ``contiguous_gradients: true``
      all-reduces buckets of at most ``reduce_bucket_size`` elements divided by ``world / sequence_parallel_size``:
      a **sum**;
    * ZeRO-3, DeepSpeed >= 0.20.2 (deepspeedai/DeepSpeed#8854, as transformers 5.25 reads it): a **sum**;
    * ``gradient_allreduce_op: "sum"`` (ZeRO-0/1/2): no division at all, a **sum**.

    Args:
        ds_config: the DeepSpeed config (``zero_optimization``, ``gradient_predivide_factor``,
            ``gradient_allreduce_op`` are read; ``"auto"`` values must be resolved).
        deepspeed_version: the DeepSpeed version to answer for (default: the installed one).
        model: the model (plain or ZeRO-3 partitioned); needed only for ZeRO-3 < 0.20.2 with ``reduce_scatter:
            false`` and ``contiguous_gradients: true``, where the answer depends on the largest parameter.

    Raises:
        ValueError: a config whose convention is not one factor for every parameter (ZeRO-3 < 0.20.2 with
            ``reduce_scatter: false``, ``contiguous_gradients: true`` and a parameter larger than
            ``reduce_bucket_size``: that parameter is averaged, the others summed), that case without ``model``,
            ``gradient_predivide_factor != 1`` with ZeRO (not modelled), or an unreadable config value.
    """
    return _averaged(ds_config, deepspeed_version, model, model_optional=False)


def _averaged(ds_config: dict[str, Any], deepspeed_version: str | None, model: Any, model_optional: bool) -> bool:
    """:func:`sp_grads_averaged`; with ``model_optional`` a missing model in the case that needs one answers "sums"
    (what DeepSpeed does with every parameter up to ``reduce_bucket_size``: norms and biases at least)."""
    version = _version(_installed("deepspeed", deepspeed_version))
    zero = ds_config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ValueError(f"zero_optimization: expected an object, got {zero!r}")
    stage = _config_int(zero, "stage", 0, "zero_optimization")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage}: expected 0, 1, 2 or 3")
    op = str(ds_config.get("gradient_allreduce_op", "mean")).lower()
    if op not in ("mean", "sum"):
        raise ValueError(f"gradient_allreduce_op={op!r}: expected 'mean' or 'sum'")
    if op == "sum":  # no division at all (DeepSpeed refuses it with ZeRO-3)
        return False
    factor = ds_config.get("gradient_predivide_factor", 1.0)
    if stage >= 1 and factor != 1.0:
        raise ValueError(f"gradient_predivide_factor={factor!r} with ZeRO-{stage}: ds-burst does not model how "
                         "DeepSpeed then scales the sequence-parallel gradients (with a factor equal to the world "
                         "size some paths average over the SP ranks instead of summing); use 1.0")
    if stage < 3 or version >= _version(DEEPSPEED_ZERO3_SUMS_SP):
        return False
    if _config_bool(zero, "reduce_scatter", True, "zero_optimization"):
        return True
    if not _config_bool(zero, "contiguous_gradients", True, "zero_optimization"):
        return True
    bucket = _config_int(zero, "reduce_bucket_size", 500_000_000, "zero_optimization")
    if model is None and model_optional:
        return False
    if model is None:
        raise ValueError("ZeRO-3 with reduce_scatter=false and contiguous_gradients=true (DeepSpeed < "
                         f"{DEEPSPEED_ZERO3_SUMS_SP}) sums the SP ranks' gradients of parameters up to "
                         "reduce_bucket_size elements and averages larger ones: pass model= so that this can be "
                         "checked")
    largest = largest_param_numel(model)
    if largest > bucket:
        raise ValueError(f"ZeRO-3 with reduce_scatter=false and contiguous_gradients=true (DeepSpeed "
                         f"{version} < {DEEPSPEED_ZERO3_SUMS_SP}): a parameter of {largest} elements exceeds "
                         f"reduce_bucket_size={bucket}, so DeepSpeed averages its gradient over the SP ranks while "
                         "it sums the others'; no loss scaling makes both right. Use reduce_scatter=true (the "
                         f"default), raise reduce_bucket_size to >= {largest}, or DeepSpeed >= "
                         f"{DEEPSPEED_ZERO3_SUMS_SP}")
    return False


def trainer_loss_scales_by_sp(zero3: bool, transformers_version: str | None = None,
                              deepspeed_version: str | None = None) -> bool:
    """Whether the HF Trainer's SP loss (``deepspeed_sp_compute_loss`` in 5.25+, ``Trainer._deepspeed_sp_compute_loss``
    before) hands each rank a gradient scaled by ``sp_size`` (right when DeepSpeed *averages* over the SP ranks).

    transformers >= 5.25: only under ZeRO-3 (``is_deepspeed_zero3_enabled()``) with DeepSpeed < 0.20.2;
    5.0-5.24: always (each rank backpropagates the full mean through a differentiable all_gather). Versions
    default to the installed ones."""
    tf = _version(_installed("transformers", transformers_version))
    if tf < _version(TRANSFORMERS_SP_LOSS_SHARE):
        return True
    return zero3 and _version(_installed("deepspeed", deepspeed_version)) < _version(DEEPSPEED_ZERO3_SUMS_SP)


def trainer_sp_gradient_error(sequence_parallel_size: int, ds_config: dict[str, Any], model: Any = None,
                              transformers_version: str | None = None,
                              deepspeed_version: str | None = None) -> str | None:
    """Why the HF Trainer's SP loss and DeepSpeed's reduction together give gradients other than the SP=1 ones for
    this config (a message), or ``None`` when they agree. Raises ``ValueError`` where :func:`sp_grads_averaged`
    does (a config whose convention is not one factor for every parameter); without ``model`` the parameters up to
    ``reduce_bucket_size`` decide where the largest one would (ZeRO-3 < 0.20.2 with ``reduce_scatter: false``)."""
    if sequence_parallel_size <= 1:
        return None
    zero = ds_config.get("zero_optimization") or {}
    stage = _config_int(zero, "stage", 0, "zero_optimization")
    tf = _installed("transformers", transformers_version)
    ds = _installed("deepspeed", deepspeed_version)

    def agree(config: dict[str, Any], tf_version: str, ds_version: str) -> tuple[bool, bool, bool]:
        averaged = _averaged(config, ds_version, model, model_optional=True)
        scaled = trainer_loss_scales_by_sp(stage == 3, tf_version, ds_version)
        return scaled == averaged, scaled, averaged

    ok, scaled, averaged = agree(ds_config, tf, ds)
    if ok:
        return None
    fixes = []  # what would make the two agree, each checked with the same rules
    new_tf, new_ds = TRANSFORMERS_SP_LOSS_SHARE, DEEPSPEED_ZERO3_SUMS_SP
    if _version(tf) < _version(new_tf) and agree(ds_config, new_tf, ds)[0]:
        fixes.append(f"transformers >= {new_tf}")
    if stage == 3 and agree({**ds_config, "zero_optimization": {**zero, "reduce_scatter": True}}, tf, ds)[0]:
        fixes.append("zero_optimization.reduce_scatter=true (the default)")
    if _version(ds) < _version(new_ds) and agree(ds_config, tf, new_ds)[0]:
        fixes.append(f"DeepSpeed >= {new_ds}")
    if not fixes and agree(ds_config, new_tf, new_ds)[0]:
        fixes.append(f"transformers >= {new_tf} with DeepSpeed >= {new_ds}")
    fixes.append("a Trainer.compute_loss of your own returning ds_burst.training.losses.sequence_parallel_loss(..., "
                 "sp_grads_averaged=sp_grads_averaged(ds_config, model=model))")
    wrong = f"{sequence_parallel_size}x too large" if scaled else f"{sequence_parallel_size}x too small"
    return (f"ds-burst: the HF Trainer's sequence-parallel loss (transformers {tf}) "
            f"{'scales' if scaled else 'does not scale'} each rank's gradient by sp_size, but DeepSpeed {ds} with "
            f"ZeRO-{stage} {'averages' if averaged else 'sums'} the SP ranks' gradients: the gradients would be "
            f"{wrong} compared with SP=1. Use " + "; or ".join(fixes))


def _trainer_deepspeed_config() -> dict[str, Any] | None:
    """The DeepSpeed config of the running HF Trainer (Accelerate's DeepSpeed plugin holding transformers'
    ``HfTrainerDeepSpeedConfig``), or ``None`` when no Trainer drives DeepSpeed in this process."""
    try:
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    except ImportError:
        return None
    if not AcceleratorState._shared_state:
        return None
    plugin = getattr(AcceleratorState(), "deepspeed_plugin", None)
    hf_config = getattr(plugin, "hf_ds_config", None)
    if not isinstance(hf_config, HfTrainerDeepSpeedConfig):
        return None
    return hf_config.config


def check_trainer_sp_gradients(sequence_parallel_size: int, model: Any = None) -> None:
    """Raise ``ValueError`` when the HF Trainer drives this job (Accelerate's DeepSpeed plugin holds transformers'
    ``HfTrainerDeepSpeedConfig``) and its SP loss, with the installed transformers and DeepSpeed and the job's
    DeepSpeed config, would give gradients other than the SP=1 ones (see :func:`trainer_sp_gradient_error`).
    Nothing happens without a Trainer (Accelerate alone, your own loop: pass ``sp_grads_averaged`` to
    :func:`sequence_parallel_loss` yourself). The answer depends only on the config and the versions, so every
    rank raises the same error."""
    config = _trainer_deepspeed_config()
    if config is None:
        return
    msg = trainer_sp_gradient_error(sequence_parallel_size, config, model)
    if msg is not None:
        raise ValueError(msg)


@torch.no_grad()
def sequence_parallel_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, group: Any = None, ignore_index: int = -100
) -> tuple[int, int]:
    """``(correct, total)`` argmax predictions over the labelled tokens of the full sequence."""
    info = _sp_info(group)
    mask = labels != ignore_index
    correct = ((logits.argmax(-1) == labels) & mask).sum()
    t = torch.stack([correct, mask.sum()]).to(torch.int64)
    if info.world > 1:
        t = all_reduce_sum(info, t.cpu() if _gloo(info) else t)
    return int(t[0]), int(t[1])


def per_document_accuracy(logits: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor, num_docs: int,
                          group: Any = None, ignore_index: int = -100) -> tuple[list[int], list[int]]:
    """``(correct, total)`` per document (packed documents: ``doc_ids`` sharded like ``labels``) over the full
    sequence of every row."""
    info = _sp_info(group)
    mask = labels != ignore_index
    hit = (logits.argmax(-1) == labels) & mask
    t = torch.zeros(2, num_docs, dtype=torch.int64, device=labels.device)
    t[0].index_add_(0, doc_ids[mask], torch.ones_like(doc_ids[mask]).masked_fill_(~hit[mask], 0))
    t[1].index_add_(0, doc_ids[mask], torch.ones_like(doc_ids[mask]))
    if info.world > 1:
        t = all_reduce_sum(info, t.cpu() if _gloo(info) else t)
    return t[0].tolist(), t[1].tolist()


def _gloo(info: GroupInfo) -> bool:
    return is_cpu_backend(info)
