"""``deepspeed.initialize`` with a ds-burst topology, made safe for ZeRO-3 (parameters partitioned over the
sequence-data-parallel group)."""

from __future__ import annotations

import json
from typing import Any

from ds_burst.dist.comm import group_size
from ds_burst.dist.topology import Topology


def deepspeed_initialize(model: Any, config: dict[str, Any] | str, topology: Topology, **kwargs: Any) -> tuple:
    """``deepspeed.initialize(model=model, config=config, mpu=topology, **kwargs)``, made safe for ZeRO-3.

    DeepSpeed 0.19.8 converts a plain model to ZeRO-3 parameters partitioned over
    ``mpu.get_data_parallel_group()`` (``runtime/zero/parameter_offload.py``), i.e. over the DP replicas
    only; the gradients of the SP ranks would then never be summed. This wrapper converts the model with
    ``deepspeed.zero.Init(module=model, data_parallel_group=<sequence-data-parallel group>)`` first (a no-op
    for a model already built under such a ``zero.Init``), calls ``deepspeed.initialize`` and checks that
    every ZeRO-3 parameter is partitioned over all ``dp * sp`` ranks (``RuntimeError`` otherwise).

    Returns what ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    import deepspeed

    if not isinstance(config, dict):
        with open(config) as f:
            config = json.load(f)
    assert isinstance(config, dict)
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        partition_over_sequence_data_parallel(model, config, topology)
    kwargs.setdefault("model_parameters", [p for p in model.parameters() if p.requires_grad])
    out = deepspeed.initialize(model=model, config=config, mpu=topology, **kwargs)
    if stage == 3:
        check_zero3_partitioning(out[0].module, topology)
    return out


def partition_over_sequence_data_parallel(model: Any, config: dict[str, Any], topology: Topology) -> None:
    """Convert ``model``'s not yet partitioned parameters to ZeRO-3 parameters partitioned over the
    sequence-data-parallel group (``deepspeed.zero.Init(module=model, ...)`` with ``config``); a no-op for a model
    already built under such a ``zero.Init``."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    if any(not is_zero_param(p) for p in model.parameters()):
        deepspeed.zero.Init(module=model, data_parallel_group=topology.get_sequence_data_parallel_group(),
                            config_dict_or_path=config, mpu=topology)


def check_zero3_partitioning(module: Any, topology: Topology) -> None:
    """Raise ``RuntimeError`` if a ZeRO-3 parameter of ``module`` is not partitioned over all ``dp * sp`` ranks
    (gradients of the sequence-parallel ranks would not be summed)."""
    want = topology.get_sequence_data_parallel_world_size()
    for name, p in module.named_parameters():
        group = getattr(p, "ds_process_group", None)
        if group is None:
            continue
        size = group_size(group)
        if size != want:
            raise RuntimeError(
                f"ZeRO-3 parameter {name} is partitioned over {size} ranks, not the {want} ranks of the "
                "sequence-data-parallel group: build the model under deepspeed.zero.Init(data_parallel_group="
                "topology.get_sequence_data_parallel_group()) or use ds_burst.deepspeed_initialize"
            )
