"""Test-session setup: Triton's interpreter on machines without CUDA, and the fast tier.

The fast tier: ``python -m pytest -q -m fast`` runs the unit tests and a few small multi-rank cases (under
3 minutes on 2 cores: 112 s measured), a first answer before the whole suite. A test is in the tier when its
module is listed in ``FAST_MODULES`` or its node id starts with an entry of ``FAST_TESTS``."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides at decoration time whether a kernel runs in its interpreter: without CUDA the kernels run on CPU
# tensors, so the flag must be set before any test module imports ds_burst.kernels.triton_attn.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FAST_MODULES = {
    "test_layers.py",
    "test_core_units.py",
    "test_kernel_choice.py",
    "test_hot_path.py",
    "test_kernel_conformance.py",
    "test_docs.py",
    "test_ring_host.py",
}
FAST_TESTS = (
    "tests/test_core_ring.py::test_float64_matches_reference[causal-zigzag-burst-2-",
    "tests/test_reliability.py::test_bad_input",
    "tests/test_plan.py::test_predict",
    "tests/test_ulysses_schedule.py::test_ulysses_is_a_schedule_everywhere",
    "tests/test_ulysses_schedule.py::test_ulysses_degree_picks_the_schedule",
    "tests/test_ulysses_schedule.py::test_auto_never_picks_heads_it_cannot_split",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in FAST_MODULES or item.nodeid.startswith(FAST_TESTS):
            item.add_marker(pytest.mark.fast)
