"""The ``"burst_attention"`` section of a DeepSpeed JSON config, typed and validated.

Example (DeepSpeed keeps unknown top-level keys and leaves them alone)::

    {
      "train_micro_batch_size_per_gpu": 1,
      "sequence_parallel_size": 8,
      "zero_optimization": {"stage": 3},
      "burst_attention": {"schedule": "ring", "layout": "zigzag", "backward": "auto"}
    }

``BurstConfig.from_ds_config(path_or_dict)`` reads it; unknown keys and bad values raise ``ValueError``
naming the key. DeepSpeed's own top-level ``"sequence_parallel_size"`` is honoured (the section may repeat
it, but the two must agree).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from ds_burst.core.options import BACKWARDS, KERNELS, LAYOUTS, SCHEDULES
from ds_burst.dist.topology import LATER_SCHEDULES, ulysses_schedule

SECTION = "burst_attention"


@dataclass
class BurstConfig:
    """Options of ds-burst. Every field has a default, so an empty section is valid.

    Attributes:
        enabled: use BurstAttention (``False`` keeps the model's own attention; useful for A/B runs).
        sequence_parallel_size: ranks per sequence-parallel group (``P``); ``world = dp * P``.
            Taken from DeepSpeed's top-level ``"sequence_parallel_size"`` when present.
        schedule: ``"auto"`` (the double ring when the SP group spans whole nodes, else the flat ring),
            ``"ring"``, ``"double_ring"``, ``"ulysses_ring"`` or ``"ulysses"``.
        layout: how the data loader shards each sequence, ``"zigzag"`` (balanced causal ring, no exchange)
            or ``"contiguous"`` (what Ulysses loaders produce; attention then rebalances internally with
            one exchange of half of q/k/v). The drop-in ``DistributedAttention`` always receives contiguous
            shards and ignores this field.
        backward: ``"auto"`` (fewer bytes for the head counts), ``"burst"`` (Q, dO, lse, delta travel) or
            ``"ring"`` (K, V, dK, dV travel).
        kernel: ``"auto"`` (on CUDA the faster of Triton and sdpa per shape, measured once and cached; torch
            on CPU), ``"triton"``, ``"sdpa"`` or ``"torch"``.
        gpus_per_node: ranks per node; ``None`` detects ``LOCAL_WORLD_SIZE``.
        ulysses_degree: ``U``, the Ulysses x ring split (``init_sequence_parallel(..., ulysses_degree=U)``):
            all-to-all over ``U`` ranks, ring over ``P/U`` groups; ``null``: none.
        deterministic: bitwise-reproducible backward (no atomics).
        check_inputs: validate on every rank on the first call of each shape/option key (one small all-gather
            then, none on later calls); ``false``: local checks and a summary swap with the ring neighbours.
        check_finite: also raise on every rank when q, k, v (forward) or the output gradient (backward)
            hold NaN/Inf on any rank (one more read of the inputs; a small all-gather in backward).
        window_size: ``[left, right]`` sliding window for every layer, ``None`` = take it from the model.
        patch_deepspeed: make ``deepspeed.sequence.layer.DistributedAttention`` resolve to ds-burst's.
    """

    enabled: bool = True
    sequence_parallel_size: int = 1
    schedule: str = "auto"
    layout: str = "zigzag"
    backward: str = "auto"
    kernel: str = "auto"
    gpus_per_node: int | None = None
    ulysses_degree: int | None = None
    deterministic: bool = False
    check_inputs: bool = True
    check_finite: bool = False
    window_size: tuple[int, int] | None = None
    patch_deepspeed: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("enabled", "deterministic", "check_inputs", "check_finite", "patch_deepspeed"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")
        sp = self.sequence_parallel_size
        _check(_is_int(sp) and sp >= 1, "sequence_parallel_size", sp, "a positive integer")
        if self.schedule in LATER_SCHEDULES:
            raise ValueError(
                f"{SECTION}.schedule: {self.schedule!r} is not available yet in this version; "
                "use 'ring', 'double_ring' or 'auto'"
            )
        _check(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {SCHEDULES}")
        _check(self.layout in LAYOUTS, "layout", self.layout, f"one of {LAYOUTS}")
        _check(self.backward in BACKWARDS, "backward", self.backward, f"one of {BACKWARDS}")
        _check(self.kernel in KERNELS, "kernel", self.kernel, f"one of {KERNELS}")
        g = self.gpus_per_node
        _check(g is None or (_is_int(g) and g >= 1), "gpus_per_node", g, "a positive integer or null")
        u = self.ulysses_degree
        _check(u is None or (_is_int(u) and u >= 1 and sp % u == 0), "ulysses_degree", u,
               f"null or a positive integer dividing sequence_parallel_size={sp}")
        if u is not None:
            ulysses_schedule(sp, u, self.schedule)  # the schedule must agree (ValueError naming both)
        w = self.window_size
        if w is not None:
            ok = isinstance(w, (list, tuple)) and len(w) == 2 and all(_is_int(x) and x >= -1 for x in w)
            _check(ok, "window_size", w, "null or a pair [left, right] of integers >= -1")
            self.window_size = (int(w[0]), int(w[1]))

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, section: dict[str, Any] | None, sequence_parallel_size: int | None = None) -> BurstConfig:
        """Build from the ``"burst_attention"`` dict. ``sequence_parallel_size`` is DeepSpeed's top-level
        value, which wins over a missing one in the section and must equal one given there."""
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ValueError(f"{SECTION} must be a JSON object, got {type(section).__name__}")
        section = dict(section)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"{SECTION}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        if sequence_parallel_size is not None:
            inner = section.get("sequence_parallel_size")
            if inner is not None and inner != sequence_parallel_size:
                raise ValueError(
                    f"{SECTION}.sequence_parallel_size={inner} disagrees with the top-level "
                    f"sequence_parallel_size={sequence_parallel_size}"
                )
            section["sequence_parallel_size"] = sequence_parallel_size
        return cls(**section)

    @classmethod
    def from_ds_config(cls, ds_config: dict[str, Any] | str | os.PathLike) -> BurstConfig:
        """Build from a whole DeepSpeed config (dict or path to a JSON file)."""
        if not isinstance(ds_config, dict):
            with open(ds_config) as f:
                ds_config = json.load(f)
        assert isinstance(ds_config, dict)
        top = ds_config.get("sequence_parallel_size")
        if top is not None and not (_is_int(top) and top >= 1):
            raise ValueError(f"sequence_parallel_size: expected a positive integer, got {top!r}")
        return cls.from_dict(ds_config.get(SECTION), top)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field."""
        d = asdict(self)
        if d["window_size"] is not None:
            d["window_size"] = list(d["window_size"])
        return d

    def attn_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`ds_burst.burst_attn_func` (layout, backward, kernel, ...)."""
        kw: dict[str, Any] = {
            "layout": self.layout,
            "backward": self.backward,
            "kernel": self.kernel,
            "deterministic": self.deterministic,
            "check_inputs": self.check_inputs,
            "check_finite": self.check_finite,
        }
        if self.window_size is not None:
            kw["window_size"] = self.window_size
        return kw


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{SECTION}.{key}: expected {expected}, got {value!r}")
