"""Training data for sequence-parallel runs, sharded per layout with global position ids.

* :class:`RetrievalTask`: a synthetic long-range key-value retrieval task generated on the fly. Key-value
  pairs are scattered over the whole sequence and queried at its end, so the answer loss falls below
  ``log(num_values)`` only if attention reaches across the whole sequence (i.e. across SP ranks).
* :class:`TokenFile`: a memory-mapped flat ``uint16``/``uint32`` token file (nanoGPT-style ``.bin``).

Every sample is a pure function of ``(seed, sample index)``; the sample indices of a step are a pure
function of ``(step, micro step, data-parallel rank)``. Resuming therefore only needs the step number,
and every rank of an SP group builds the same sequence and keeps its own shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .layout import check_layout, global_index, needs_divisor

IGNORE_INDEX = -100

# Reserved token ids of the retrieval task.
BOS, KV_MARK, QUERY_MARK, FILL_MARK = 0, 1, 2, 3
_FIRST_FREE = 4


@dataclass
class RetrievalTask:
    """Synthetic associative recall over a long context.

    Layout of one sequence of ``seq_len`` tokens: ``BOS``, filler tokens with ``num_pairs`` triples
    ``KV_MARK key value`` at random, non-overlapping places in the first ``seq_len - 3*num_queries``
    tokens, then ``num_queries`` triples ``QUERY_MARK key value`` asking keys stored earlier. Only the
    answer (``value`` after a query key) is labelled; its loss is ``log(num_values)`` for a model that knows
    the format but cannot see the pairs, lower only when attention retrieves them.

    With ``disjoint_values=True`` (default) every key has its own alphabet of ``num_values`` values, so one
    attention layer solves it by content (the query key attends to the tokens of its alphabet wherever
    they are): a tiny model learns it in a few hundred steps. With ``False`` all keys share one alphabet and
    the model must match keys (an induction circuit), which takes far longer to learn.

    Args:
        seq_len: tokens per sequence.
        vocab_size: model vocabulary (must hold 4 reserved ids, the keys, the values and >= 1 filler).
        num_pairs: stored pairs per sequence (distinct keys).
        num_queries: questions at the end of each sequence.
        num_keys: size of the key alphabet.
        num_values: values per key (``disjoint_values``) or in the shared value alphabet.
        disjoint_values: a separate value alphabet per key.
        seed: dataset seed.
    """

    seq_len: int
    vocab_size: int
    num_pairs: int = 16
    num_queries: int = 16
    num_keys: int = 64
    num_values: int = 16
    disjoint_values: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        need = _FIRST_FREE + self.num_keys + self._value_ids + 1
        if self.vocab_size < need:
            raise ValueError(f"retrieval task needs vocab_size >= {need}, got {self.vocab_size}")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} exceeds num_keys={self.num_keys}")
        if 1 + 3 * (self.num_pairs + self.num_queries) > self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} too short for {self.num_pairs} pairs and {self.num_queries} "
                             "queries")

    @property
    def _value_ids(self) -> int:
        return self.num_values * (self.num_keys if self.disjoint_values else 1)

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [S], labels [S])`` of sample ``index``; ``labels[t]`` is the target after token ``t``."""
        rng = np.random.default_rng([self.seed, index])
        s = self.seq_len
        k0, v0 = _FIRST_FREE, _FIRST_FREE + self.num_keys
        f0 = v0 + self._value_ids
        ids = rng.integers(f0, self.vocab_size, size=s, dtype=np.int64)
        ids[0] = BOS
        labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
        keys = rng.choice(self.num_keys, size=self.num_pairs, replace=False)
        vals = rng.integers(0, self.num_values, size=self.num_pairs)
        if self.disjoint_values:
            vals = vals + keys * self.num_values
        body = s - 3 * self.num_queries - 1  # tokens 1 .. body hold filler and pairs
        slots = body // 3
        starts = 1 + 3 * np.sort(rng.choice(slots, size=self.num_pairs, replace=False))
        for st, kk, vv in zip(starts, keys, vals):
            ids[st:st + 3] = (KV_MARK, k0 + kk, v0 + vv)
        asked = rng.integers(0, self.num_pairs, size=self.num_queries)
        q0 = s - 3 * self.num_queries
        for j, a in enumerate(asked):
            p = q0 + 3 * j
            ids[p:p + 3] = (QUERY_MARK, k0 + keys[a], v0 + vals[a])
            labels[p + 1] = v0 + vals[a]  # after the query key, predict its value
        return torch.from_numpy(ids), torch.from_numpy(labels)

    @property
    def chance_loss(self) -> float:
        """Answer loss of a model that only knows answers are values: ``log(num_values)``."""
        return float(np.log(self.num_values))


class TokenFile:
    """A flat binary file of token ids, memory-mapped; sample ``i`` is the window starting at
    ``(i * seq_len) mod (n - seq_len - 1)``.

    Args:
        path: the ``.bin`` file.
        seq_len: tokens per sample.
        dtype: ``"uint16"`` or ``"uint32"``; ``None`` picks ``uint32`` for names ending in ``.u32.bin``
            and ``uint16`` otherwise.
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, dtype: str | None = None) -> None:
        if dtype is None:
            dtype = "uint32" if str(path).endswith(".u32.bin") else "uint16"
        if dtype not in ("uint16", "uint32"):
            raise ValueError(f"token file dtype must be 'uint16' or 'uint32', got {dtype!r}")
        self.path = str(path)
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")
        self.seq_len = seq_len
        if len(self.tokens) < seq_len + 2:
            raise ValueError(f"{self.path}: {len(self.tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")

    @property
    def _value_ids(self) -> int:
        return self.num_values * (self.num_keys if self.disjoint_values else 1)

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [S], labels [S])`` with ``labels[t] = token[t+1]``."""
        span = len(self.tokens) - self.seq_len - 1
        start = (index * self.seq_len) % span
        window = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        return torch.from_numpy(window[:-1].copy()), torch.from_numpy(window[1:].copy())


def write_token_file(path: str | os.PathLike, tokens: Any, dtype: str = "uint16") -> None:
    """Write ``tokens`` as a flat binary token file readable by :class:`TokenFile`."""
    np.asarray(tokens, dtype=dtype).tofile(str(path))


def sample_indices(step: int, micro_step: int, grad_accum: int, dp_rank: int, dp_size: int,
                   micro_batch: int) -> list[int]:
    """Global sample indices of one micro batch on one data-parallel replica."""
    base = ((step * grad_accum + micro_step) * dp_size + dp_rank) * micro_batch
    return list(range(base, base + micro_batch))


def shard_batch_local(
    input_ids: torch.Tensor, labels: torch.Tensor, sp_rank: int, sp_size: int, layout: str
) -> dict[str, torch.Tensor]:
    """This SP rank's shard of full-sequence ``[B, S]`` tensors under ``layout`` (no communication):
    ``input_ids``, ``labels`` and the global ``position_ids``."""
    check_layout(layout)
    seq = input_ids.shape[-1]
    div = needs_divisor(layout, sp_size)
    if seq % div:
        raise ValueError(f"sequence length {seq} is not divisible by {div} ({layout} layout over {sp_size} ranks)")
    idx = torch.tensor(global_index(layout, sp_rank, sp_size, seq), dtype=torch.long)
    return {
        "input_ids": input_ids.index_select(-1, idx),
        "labels": labels.index_select(-1, idx),
        "position_ids": idx[None].expand(input_ids.shape[0], -1).contiguous(),
    }


def make_batch(
    source: RetrievalTask | TokenFile,
    indices: list[int],
    sp_rank: int,
    sp_size: int,
    layout: str,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Build samples ``indices`` and return this SP rank's shard (``input_ids``, ``labels``, ``position_ids``)."""
    pairs = [source.sample(i) for i in indices]
    ids = torch.stack([p[0] for p in pairs])
    labels = torch.stack([p[1] for p in pairs])
    return {k: v.to(device) for k, v in shard_batch_local(ids, labels, sp_rank, sp_size, layout).items()}
