"""The data helpers (ds_burst/training/data.py, ``ds_burst.hf.shard_batch``) on accelerator tensors: indices are built
on the input's device, outputs stay there, and nothing is read back to the host except what the host needs.

On a CPU-only machine the ``meta`` device stands in for CUDA, under :class:`SameDevice`, a dispatch mode that
raises where CUDA raises "Expected all tensors to be on the same device" (an op whose tensor arguments live on two
devices; copies between devices and 0-dim CPU scalars are allowed, as on CUDA); a meta tensor cannot be read back
(``.item()``, ``.tolist()``, ``bool()``, ``.cpu()``, ``nonzero`` raise), so a host read fails too. The ``gpu`` tests
run the same helpers on a real GPU and compare them with the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import ds_burst.hf as bhf
from ds_burst.core.layout import global_index
from ds_burst.integrations import hf as hf_module
from ds_burst.training.data import (
    IGNORE_INDEX,
    PackedRetrieval,
    RetrievalTask,
    TokenFile,
    boundaries_from_position_ids,
    far_labels,
    make_batch,
    shard_batch_local,
    shard_index,
    write_token_file,
)

DEV = torch.device("meta")  # the stand-in for a CUDA device
_COPIES = {"copy_", "_to_copy", "lift_fresh", "lift_fresh_copy", "_copy_from", "_copy_from_and_resize"}


class SameDevice(TorchDispatchMode):
    """Raise ``RuntimeError`` for an op (other than a copy) whose tensor arguments live on several devices, 0-dim CPU
    tensors aside: what CUDA refuses."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ not in _COPIES:
            devices = {t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                       and not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                raise RuntimeError(f"{func}: tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_the_harness_catches_a_cpu_index_and_a_host_read():
    """What the old code did (an index built on the CPU for device ids) fails here, as it does on a GPU."""
    with SameDevice():
        ids = torch.zeros(2, 8, dtype=torch.long, device=DEV)
        with pytest.raises(RuntimeError, match="tensors on"):
            ids.index_select(-1, torch.tensor(global_index("zigzag", 0, 2, 8), dtype=torch.long))
        ids.index_select(-1, torch.tensor(global_index("zigzag", 0, 2, 8), dtype=torch.long, device=DEV))
        for read in (ids.tolist, lambda: bool(ids.all()), ids.cpu, ids.nonzero):
            with pytest.raises((RuntimeError, NotImplementedError)):
                read()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_batch_local_stays_on_the_input_device(layout):
    with SameDevice():
        ids = torch.randint(0, 10, (2, 16), device=DEV)
        labels = torch.randint(0, 10, (2, 16), device=DEV)
        out = shard_batch_local(ids, labels, 1, 2, layout)
        assert all(v.device == DEV for v in out.values()), {k: v.device for k, v in out.items()}
        assert out["input_ids"].shape == out["labels"].shape == out["position_ids"].shape == (2, 8)
        cpu_labels = torch.randint(0, 10, (2, 16))  # labels elsewhere: indexed on their own device
        mixed = shard_batch_local(ids, cpu_labels, 1, 2, layout)
        assert mixed["input_ids"].device == DEV and mixed["labels"].device == torch.device("cpu")
        assert shard_index(layout, 1, 2, 16, ids.device).device == DEV


def test_far_labels_on_the_labels_device():
    task = RetrievalTask(seq_len=64, vocab_size=128, num_pairs=2, num_queries=8, num_keys=8, num_values=8, copies=4)
    with SameDevice():
        labels = torch.randint(0, 10, (2, 64), device=DEV)
        for sources in (torch.randint(-1, 32, (2, 64, 2), device=DEV), torch.randint(-1, 32, (2, 64, 2))):
            assert far_labels(labels, sources, "zigzag", 2).device == DEV
    # batched rows give what each row gives alone (real tensors)
    ids, lab = zip(*(task.sample(i) for i in range(3)))
    src = torch.stack([task.sources(i) for i in range(3)])
    rows = torch.stack([far_labels(lab[i], src[i], "zigzag", 2) for i in range(3)])
    assert torch.equal(far_labels(torch.stack(lab), src, "zigzag", 2), rows)
    assert (rows != IGNORE_INDEX).any() and ((rows == IGNORE_INDEX) | (rows == torch.stack(lab))).all()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_hf_shard_batch_on_device_tensors(monkeypatch, layout):
    seen = []

    def boundaries(position_ids: torch.Tensor) -> list[int]:  # host-bound by design: checked apart below
        seen.append(position_ids.device)
        return [0, 5, 16]

    monkeypatch.setattr(hf_module, "boundaries_from_position_ids", boundaries)
    with SameDevice():
        ids = torch.randint(0, 10, (2, 16), device=DEV)
        out = bhf.shard_batch({"input_ids": ids, "labels": ids}, None, layout=layout)
        assert {k: v.device for k, v in out.items()} == {k: DEV for k in ("input_ids", "shift_labels",
                                                                           "position_ids")}
        pos = torch.arange(16, device=DEV)[None].expand(2, -1)
        out = bhf.shard_batch({"input_ids": ids, "shift_labels": ids, "position_ids": pos}, None, layout=layout)
        assert out["position_ids"].device == DEV and out["cu_seq_lens_q"] == [0, 5, 16] and seen == [DEV]
        out = bhf.shard_batch({"input_ids": ids, "labels": ids, "cu_seq_lens_q": [0, 7, 16]}, None, layout=layout)
        assert out["input_ids"].device == DEV and out["cu_seq_lens_k"] == [0, 7, 16]
        cpu_pos = torch.arange(16)[None].expand(2, -1)  # given elsewhere: sharded there, handed back on ids' device
        out = bhf.shard_batch({"input_ids": ids, "labels": ids, "position_ids": cpu_pos}, None, layout=layout)
        assert out["position_ids"].device == DEV


def test_boundaries_from_position_ids_reads_one_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]] * 2)
    assert boundaries_from_position_ids(pos) == [0, 3, 5, 8]
    assert boundaries_from_position_ids(torch.arange(8)) is None


@pytest.fixture
def sources(tmp_path):
    path = tmp_path / "t.bin"
    write_token_file(path, np.arange(2000) % 300)
    return {
        "retrieval": RetrievalTask(seq_len=64, vocab_size=128, num_pairs=2, num_queries=8, copies=4),
        "packed": PackedRetrieval(seq_len=128, vocab_size=128, min_doc=32, max_doc=64, num_pairs=2, copies=2),
        "tokens": TokenFile(path, seq_len=64),
    }


@pytest.mark.parametrize("kind", ["retrieval", "packed", "tokens"])
def test_make_batch_on_a_device(sources, kind):
    with SameDevice():
        b = make_batch(sources[kind], [3, 4], 1, 2, "zigzag", device=DEV)
        tensors = {k: v.device for k, v in b.items() if isinstance(v, torch.Tensor)}
        assert tensors and all(d == DEV for d in tensors.values()), tensors
        assert ("far_labels" in b) == (kind == "retrieval") and ("doc_ids" in b) == (kind == "packed")


# ---------------------------------------------------------------------------------------------
# on a real GPU


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _same(got: dict, want: dict) -> None:
    """``got`` (CUDA) holds on the GPU what ``want`` (CPU) holds."""
    assert got.keys() == want.keys()
    for k in got:
        if isinstance(got[k], torch.Tensor):
            assert got[k].device.type == "cuda" and torch.equal(got[k].cpu(), want[k]), k
        else:
            assert got[k] == want[k], k


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_gpu_shard_batch(layout):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 32), generator=g)
    pos = torch.cat([torch.arange(12), torch.arange(20)])[None].expand(2, -1).contiguous()
    batches = [
        {"input_ids": ids, "labels": ids},
        {"input_ids": ids, "shift_labels": ids, "position_ids": pos},
        {"input_ids": ids, "labels": ids, "cu_seq_lens_q": torch.tensor([0, 12, 32]),
         "attention_mask": torch.ones_like(ids)},
    ]
    for batch in batches:
        _same(bhf.shard_batch({k: v.cuda() for k, v in batch.items()}, None, layout=layout),
              bhf.shard_batch(batch, None, layout=layout))
    for r in range(2):
        _same(shard_batch_local(ids.cuda(), ids.cuda(), r, 2, layout), shard_batch_local(ids, ids, r, 2, layout))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", ["retrieval", "packed", "tokens"])
def test_gpu_make_batch(sources, kind):
    _same(make_batch(sources[kind], [3, 4], 1, 2, "zigzag", device=DEV),
          make_batch(sources[kind], [3, 4], 1, 2, "zigzag"))
    if kind == "retrieval":
        task = sources[kind]
        full = torch.stack([task.sample(i)[1] for i in (3, 4)])
        src = torch.stack([task.sources(i) for i in (3, 4)])
        want = far_labels(full, src, "zigzag", 2)
        assert torch.equal(far_labels(full.cuda(), src.cuda(), "zigzag", 2).cpu(), want)
        assert torch.equal(far_labels(full.cuda(), src, "zigzag", 2).cpu(), want)
