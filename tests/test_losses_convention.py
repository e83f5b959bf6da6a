"""Which gradient convention DeepSpeed applies over the sequence-parallel ranks, per version, ZeRO stage and
reduction path (``ds_burst.training.losses.sp_grads_averaged``), what the HF Trainer's SP loss assumes per
transformers version (``trainer_loss_scales_by_sp``), and the check that refuses a Trainer job whose two disagree
(``trainer_sp_gradient_error`` / ``check_trainer_sp_gradients``). Single process, no DeepSpeed engine: the table
itself is checked against real DeepSpeed training in tests/test_deepspeed_convention.py."""

from __future__ import annotations

import importlib.metadata
import types

import pytest
import torch

from ds_burst.training import losses
from ds_burst.training.losses import (
    check_trainer_sp_gradients,
    largest_param_numel,
    sp_grads_averaged,
    trainer_loss_scales_by_sp,
    trainer_sp_gradient_error,
)

OLD, NEW = "0.19.8", "0.20.2"  # before / since deepspeedai/DeepSpeed#8854


def _model(*sizes: int, partitioned: bool = False) -> torch.nn.Module:
    """Parameters of the given element counts; ``partitioned``: empty local tensors with ``ds_numel`` (ZeRO-3)."""
    m = torch.nn.Module()
    for i, n in enumerate(sizes):
        p = torch.nn.Parameter(torch.zeros(0 if partitioned else n))
        if partitioned:
            p.ds_numel = n
        m.register_parameter(f"p{i}", p)
    return m


def _cfg(**zero) -> dict:
    return {"zero_optimization": zero}


# (zero_optimization, DeepSpeed 0.19.8 averages?, >= 0.20.2 averages?) -- read in the 0.19.8 source (engine.py,
# stage_1_and_2.py, stage3.py) and measured against SP=1 by tests/test_deepspeed_convention.py
TABLE = [
    ({"stage": 0}, False, False),
    ({"stage": 0, "reduce_scatter": False}, False, False),
    ({"stage": 1}, False, False),
    ({"stage": 1, "reduce_scatter": False}, False, False),
    ({"stage": 2}, False, False),
    ({"stage": 2, "reduce_scatter": False}, False, False),
    ({"stage": 2, "contiguous_gradients": False}, False, False),
    ({"stage": 3}, True, False),
    ({"stage": 3, "contiguous_gradients": False}, True, False),
    ({"stage": 3, "reduce_scatter": False, "contiguous_gradients": False}, True, False),
    ({"stage": 3, "reduce_scatter": False}, False, False),  # every parameter fits reduce_bucket_size (5e8)
    ({"stage": 3, "reduce_scatter": False, "reduce_bucket_size": 100}, False, False),  # the model's largest: 100
]


@pytest.mark.parametrize("zero,old,new", TABLE)
def test_convention_per_version_stage_and_path(zero, old, new):
    model = _model(10, 100)
    assert sp_grads_averaged(_cfg(**zero), OLD, model) is old
    for version in (NEW, "0.21.0", "1.0.0"):
        assert sp_grads_averaged(_cfg(**zero), version, model) is new
    assert sp_grads_averaged(_cfg(**zero), "0.20.1", model) is old
    assert sp_grads_averaged(_cfg(**zero), "0.20.2rc1", model) is old  # a pre-release of 0.20.2 is older (PEP 440)
    assert sp_grads_averaged({}, OLD) is False  # no zero_optimization: no ZeRO


def test_zero3_allreduce_path_with_a_parameter_above_the_bucket_is_refused():
    cfg = _cfg(stage=3, reduce_scatter=False, reduce_bucket_size=100)
    for model in (_model(10, 101), _model(10, 101, partitioned=True)):
        assert largest_param_numel(model) == 101
        with pytest.raises(ValueError, match="101 elements exceeds reduce_bucket_size=100"):
            sp_grads_averaged(cfg, OLD, model)
        assert sp_grads_averaged(cfg, NEW, model) is False  # #8854: ZeRO-3 sums on every path
    frozen = _model(10, 101)
    frozen.p1.requires_grad_(False)  # a frozen parameter is never reduced
    assert sp_grads_averaged(cfg, OLD, frozen) is False
    with pytest.raises(ValueError, match="pass model="):
        sp_grads_averaged(_cfg(stage=3, reduce_scatter=False), OLD)
    # the paths that do not depend on the model need none
    assert sp_grads_averaged(_cfg(stage=3), OLD) is True
    assert sp_grads_averaged(_cfg(stage=3, reduce_scatter=False, contiguous_gradients=False), OLD) is True


def test_configs_whose_convention_is_not_modelled_are_refused():
    with pytest.raises(ValueError, match="gradient_predivide_factor"):
        sp_grads_averaged({"zero_optimization": {"stage": 2}, "gradient_predivide_factor": 2.0}, OLD)
    with pytest.raises(ValueError, match="gradient_predivide_factor"):
        sp_grads_averaged({"zero_optimization": {"stage": 3}, "gradient_predivide_factor": 2.0}, NEW)
    assert sp_grads_averaged({"zero_optimization": {"stage": 0}, "gradient_predivide_factor": 2.0}, OLD) is False
    assert sp_grads_averaged({"zero_optimization": {"stage": 2}, "gradient_allreduce_op": "sum"}, OLD) is False
    with pytest.raises(ValueError, match="gradient_allreduce_op"):
        sp_grads_averaged({"zero_optimization": {"stage": 2}, "gradient_allreduce_op": "max"}, OLD)
    with pytest.raises(ValueError, match="auto"):
        sp_grads_averaged(_cfg(stage=3, reduce_scatter=False, reduce_bucket_size="auto"), OLD, _model(3))
    with pytest.raises(ValueError, match="stage"):
        sp_grads_averaged(_cfg(stage="auto"), OLD)
    with pytest.raises(ValueError, match="expected 0, 1, 2 or 3"):
        sp_grads_averaged(_cfg(stage=4), OLD)
    with pytest.raises(ValueError, match="reduce_scatter"):
        sp_grads_averaged(_cfg(stage=3, reduce_scatter="no"), OLD)


def test_default_is_the_installed_deepspeed(monkeypatch):
    installed = importlib.metadata.version("deepspeed")
    cfg = _cfg(stage=3)
    assert sp_grads_averaged(cfg) is sp_grads_averaged(cfg, installed)
    real = importlib.metadata.version
    for pretend, averaged in ((OLD, True), (NEW, False)):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=pretend: v if name == "deepspeed"
                            else real(name))
        assert sp_grads_averaged(cfg) is averaged

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ValueError, match="deepspeed is not installed"):
        sp_grads_averaged(cfg)
    assert sp_grads_averaged(cfg, NEW) is False  # an explicit version needs no DeepSpeed


# transformers version -> does its Trainer SP loss scale each rank's gradient by sp_size, per (ZeRO-3, DeepSpeed)
@pytest.mark.parametrize("tf,expected", [
    ("5.0.0", {(True, OLD): True, (False, OLD): True, (True, NEW): True, (False, NEW): True}),
    ("5.24.0", {(True, OLD): True, (False, OLD): True, (True, NEW): True, (False, NEW): True}),
    ("5.25.0", {(True, OLD): True, (False, OLD): False, (True, NEW): False, (False, NEW): False}),
    ("5.26.1", {(True, OLD): True, (False, OLD): False, (True, NEW): False, (False, NEW): False}),
])
def test_trainer_loss_scaling_per_transformers_version(tf, expected):
    for (zero3, ds), scaled in expected.items():
        assert trainer_loss_scales_by_sp(zero3, tf, ds) is scaled, (tf, zero3, ds)


# (transformers, DeepSpeed, zero_optimization) -> the gradients the Trainer path gives vs SP=1 (None: equal)
@pytest.mark.parametrize("tf,ds,zero,wrong", [
    ("5.25.0", OLD, {"stage": 0}, None),
    ("5.25.0", OLD, {"stage": 2}, None),
    ("5.25.0", OLD, {"stage": 3}, None),
    ("5.25.0", OLD, {"stage": 3, "reduce_scatter": False, "contiguous_gradients": False}, None),
    ("5.25.0", OLD, {"stage": 3, "reduce_scatter": False}, "2x too large"),  # 5.25 itself raises in train()
    ("5.25.0", NEW, {"stage": 2}, None),
    ("5.25.0", NEW, {"stage": 3}, None),
    ("5.25.0", NEW, {"stage": 3, "reduce_scatter": False}, None),
    ("5.24.0", OLD, {"stage": 0}, "2x too large"),
    ("5.24.0", OLD, {"stage": 1}, "2x too large"),
    ("5.24.0", OLD, {"stage": 2}, "2x too large"),
    ("5.24.0", OLD, {"stage": 3}, None),
    ("5.24.0", OLD, {"stage": 3, "reduce_scatter": False}, "2x too large"),
    ("5.24.0", NEW, {"stage": 3}, "2x too large"),
])
def test_trainer_path_gradient_check(tf, ds, zero, wrong):
    msg = trainer_sp_gradient_error(2, _cfg(**zero), _model(10), tf, ds)
    if wrong is None:
        assert msg is None
    else:
        assert msg is not None and wrong in msg and f"transformers {tf}" in msg and f"DeepSpeed {ds}" in msg, msg
        # every fix the message names makes the check pass
        fixes = msg.split(": the gradients would be")[1].split(" Use ")[1].split("; or ")
        assert fixes[-1].startswith("a Trainer.compute_loss of your own"), fixes
        for fix in fixes[:-1]:
            tf2 = "5.25.0" if "transformers >= 5.25.0" in fix else tf
            ds2 = NEW if f"DeepSpeed >= {NEW}" in fix else ds
            zero2 = dict(zero, reduce_scatter=True) if "reduce_scatter=true" in fix else zero
            assert (tf2, ds2, zero2) != (tf, ds, zero), fix
            assert trainer_sp_gradient_error(2, _cfg(**zero2), _model(10), tf2, ds2) is None, fix
    assert trainer_sp_gradient_error(1, _cfg(**zero), _model(10), tf, ds) is None  # no SP, nothing to check


def test_trainer_path_check_with_a_mixed_config_is_refused():
    with pytest.raises(ValueError, match="exceeds reduce_bucket_size"):
        trainer_sp_gradient_error(2, _cfg(stage=3, reduce_scatter=False, reduce_bucket_size=5), _model(6),
                                  "5.25.0", OLD)
    # a model given by name (not loaded yet): the small parameters, summed by DeepSpeed, decide
    msg = trainer_sp_gradient_error(2, _cfg(stage=3, reduce_scatter=False), None, "5.25.0", OLD)
    assert msg is not None and "2x too large" in msg
    assert trainer_sp_gradient_error(2, _cfg(stage=3, reduce_scatter=False), None, "5.25.0", NEW) is None


class _State:
    """Stands in for ``accelerate.state.AcceleratorState`` (a shared-state singleton) holding a DeepSpeed plugin."""

    _shared_state: dict = {}
    plugin = None

    @property
    def deepspeed_plugin(self):
        return type(self).plugin


def test_check_trainer_sp_gradients_reads_the_running_trainer(monkeypatch):
    pytest.importorskip("accelerate")
    import accelerate.state
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    real = importlib.metadata.version
    versions = {"transformers": "5.25.0", "deepspeed": OLD}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions.get(name) or real(name))
    monkeypatch.setattr(accelerate.state, "AcceleratorState", _State)
    wrong = _cfg(stage=3, reduce_scatter=False, train_micro_batch_size_per_gpu=1)
    try:
        check_trainer_sp_gradients(2, _model(10))  # no Accelerate state: nothing to check
        _State._shared_state = {"initialized": True}
        _State.plugin = types.SimpleNamespace(hf_ds_config=HfDeepSpeedConfig(wrong))
        check_trainer_sp_gradients(2, _model(10))  # Accelerate without the Trainer: the loss is the user's
        _State.plugin = types.SimpleNamespace(hf_ds_config=HfTrainerDeepSpeedConfig(wrong))
        assert losses._trainer_deepspeed_config() is _State.plugin.hf_ds_config.config
        with pytest.raises(ValueError, match="2x too large compared with SP=1"):
            check_trainer_sp_gradients(2, _model(10))
        check_trainer_sp_gradients(1, _model(10))
        _State.plugin = types.SimpleNamespace(hf_ds_config=HfTrainerDeepSpeedConfig(_cfg(stage=3)))
        check_trainer_sp_gradients(2, _model(10))  # ZeRO-3 reduce-scatter averages, transformers scales: right
        versions["transformers"] = "5.24.0"
        _State.plugin = types.SimpleNamespace(hf_ds_config=HfTrainerDeepSpeedConfig(_cfg(stage=2)))
        with pytest.raises(ValueError, match="transformers 5.24.0"):
            check_trainer_sp_gradients(2, _model(10))
    finally:
        _State._shared_state, _State.plugin = {}, None
        unset_hf_deepspeed_config()
