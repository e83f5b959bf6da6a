"""Training data for sequence-parallel runs, sharded per layout with global position ids.

* :class:`RetrievalTask`: a synthetic long-range key-value retrieval task generated on the fly. The facts
  are stored in the first half of the sequence and asked in the second half, so an answer can be given only
  if attention reaches back across the sequence (across the sequence-parallel shards).
* :class:`TokenFile`: a memory-mapped flat ``uint16``/``uint32`` token file (nanoGPT-style ``.bin``).
* :class:`PackedRetrieval`: documents of varied lengths packed into one sequence, each its own retrieval task
  (attention must stay inside a document: ``cu_seqlens``), with per-document positions and accuracy.

Every sample is a pure function of ``(seed, sample index)``; the sample indices of a step are a pure
function of ``(step, micro step, data-parallel rank)``. Resuming therefore only needs the step number,
and every rank of an SP group builds the same sequence and keeps its own shard.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ds_burst.core.layout import check_layout, global_index, needs_divisor

IGNORE_INDEX = -100

# Reserved token id of the retrieval task (keys, values, pair tokens and filler follow it).
BOS = 0
_FIRST_FREE = 1


@dataclass
class RetrievalTask:
    """Synthetic associative recall over a long context.

    One sequence of ``seq_len`` tokens: ``BOS``; in the first half, ``num_pairs`` facts (distinct keys
    drawn from ``num_keys``, each with a random value out of ``num_values``), each written as a run of
    ``copies`` repetitions at a random place, filler tokens elsewhere; the whole second half is questions:
    key tokens of stored facts, ``num_queries`` of them evenly spaced (filler between them; by default
    every token of the second half is a question). Only the
    questions are labelled: ``labels[t]`` is the value of the key at ``t`` (the answer expected after that
    token, not the next input token; answers are never fed back, so every question must be answered from
    the first half). A model that cannot see the facts scores ``1 / num_values`` (loss ``log(num_values)``).

    Two ways to write a fact:

    * ``pair_tokens=True`` (default): one token per (key, value) combination; one attention layer answers
      by content (the question's key attends to the pair tokens of that key and reads the value off them).
      A 2-layer 64-wide model learns it in about a hundred small steps.
    * ``pair_tokens=False``: the key token followed by the value token (``k v k v ...``); answering needs an
      induction circuit (attend to the token after the earlier ``k``), which takes far longer to learn.

    :meth:`sources` gives, for every question, the span of its fact, so that :func:`make_batch` can mark
    the questions whose fact lies on another rank of the SP group (``far_labels``).

    Args:
        seq_len: tokens per sequence.
        vocab_size: model vocabulary (must hold BOS, the keys, the values, the pair tokens and >= 1 filler).
        num_pairs: stored facts per sequence (distinct keys).
        num_queries: questions in the second half (``None``: every token of it).
        num_keys: size of the key alphabet.
        num_values: size of the value alphabet.
        copies: repetitions of each fact in its run.
        pair_tokens: one token per (key, value) combination instead of ``key value``.
        seed: dataset seed.
    """

    seq_len: int
    vocab_size: int
    num_pairs: int = 8
    num_queries: int | None = None
    num_keys: int = 8
    num_values: int = 8
    copies: int = 8
    pair_tokens: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_queries is None:
            self.num_queries = self.seq_len - self.seq_len // 2
        for name in ("seq_len", "vocab_size", "num_pairs", "num_queries", "num_keys", "num_values", "copies"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"retrieval task: {name} must be a positive integer, got {v!r}")
        need = self._filler_start + 1
        if self.vocab_size < need:
            raise ValueError(f"retrieval task needs vocab_size >= {need}, got {self.vocab_size}")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} exceeds num_keys={self.num_keys}")
        if self.num_pairs * self._run > self.seq_len // 2 - 1:
            raise ValueError(f"seq_len={self.seq_len}: {self.num_pairs} facts x {self._run} tokens do not fit in the "
                             f"first half ({self.seq_len // 2 - 1} tokens after BOS); lower num_pairs or copies")
        if self.num_queries > self.seq_len - self.seq_len // 2:
            raise ValueError(f"num_queries={self.num_queries} exceeds the second half ({self.seq_len // 2} tokens)")

    @property
    def _run(self) -> int:
        return self.copies * (1 if self.pair_tokens else 2)

    @property
    def _filler_start(self) -> int:
        pairs = self.num_keys * self.num_values if self.pair_tokens else 0
        return _FIRST_FREE + self.num_keys + self.num_values + pairs

    def _draw(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``ids, labels, run starts [num_pairs], keys [num_pairs], question -> fact [num_queries]``."""
        rng = np.random.default_rng([self.seed, index])
        s, half, run = self.seq_len, self.seq_len // 2, self._run
        k0 = _FIRST_FREE
        v0 = k0 + self.num_keys
        p0 = v0 + self.num_values
        ids = rng.integers(self._filler_start, self.vocab_size, size=s, dtype=np.int64)
        ids[0] = BOS
        labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
        keys = rng.choice(self.num_keys, size=self.num_pairs, replace=False)
        vals = rng.integers(0, self.num_values, size=self.num_pairs)
        # runs at random non-overlapping places in [1, half): choose gaps between them
        free = half - 1 - self.num_pairs * run
        cuts = np.sort(rng.integers(0, free + 1, size=self.num_pairs))
        starts = 1 + cuts + run * np.arange(self.num_pairs)
        for st, kk, vv in zip(starts, keys, vals):
            if self.pair_tokens:
                ids[st:st + run] = p0 + kk * self.num_values + vv
            else:
                ids[st:st + run:2] = k0 + kk
                ids[st + 1:st + run:2] = v0 + vv
        asked = rng.integers(0, self.num_pairs, size=self.num_queries)
        pos = half + (np.arange(self.num_queries) * (s - half)) // self.num_queries
        ids[pos] = k0 + keys[asked]
        labels[pos] = v0 + vals[asked]
        return ids, labels, starts, keys, asked

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [S], labels [S])`` of sample ``index``; ``labels[t]`` is the answer after token ``t``."""
        ids, labels, _, _, _ = self._draw(index)
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def sources(self, index: int) -> torch.Tensor:
        """``[S, 2]``: for every labelled position the ``[start, end)`` span of the fact it asks; ``-1`` elsewhere."""
        _, labels, starts, _, asked = self._draw(index)
        out = np.full((self.seq_len, 2), -1, dtype=np.int64)
        pos = np.nonzero(labels != IGNORE_INDEX)[0]
        out[pos, 0] = starts[asked]
        out[pos, 1] = starts[asked] + self._run
        return torch.from_numpy(out)

    @property
    def chance_loss(self) -> float:
        """Answer loss of a model that knows the answers are values but cannot see the facts."""
        return float(np.log(self.num_values))

    @property
    def chance_accuracy(self) -> float:
        """Answer accuracy of such a model: ``1 / num_values``."""
        return 1.0 / self.num_values


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

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [S], labels [S])`` with ``labels[t] = token[t+1]``."""
        span = len(self.tokens) - self.seq_len - 1
        start = (index * self.seq_len) % span
        window = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        return torch.from_numpy(window[:-1].copy()), torch.from_numpy(window[1:].copy())


@dataclass
class PackedRetrieval:
    """Packed documents: the sequence holds documents of varied lengths, each a :class:`RetrievalTask` of its
    own length (facts in its first half, questions in its second), positions restarting at 0 per document.

    The document lengths of a micro batch are a pure function of ``(seed, first sample index)`` and shared by
    every row of the micro batch (one set of boundaries per call); they are drawn uniformly from
    ``[min_doc, max_doc]`` (a remainder below ``min_doc`` joins the last document). Per document the task keeps
    ``num_pairs`` facts when they fit in its first half, and fewer copies (then fewer facts) when not.
    """

    seq_len: int
    vocab_size: int
    min_doc: int = 32
    max_doc: int | None = None  # default: seq_len // 2
    num_pairs: int = 4
    num_queries: int | None = None  # per document (None: its whole second half)
    num_keys: int = 8
    num_values: int = 8
    copies: int = 4
    pair_tokens: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_doc is None:
            self.max_doc = max(self.min_doc, self.seq_len // 2)
        if not 4 <= self.min_doc <= self.max_doc or self.min_doc > self.seq_len:
            raise ValueError(f"packed retrieval: need 4 <= min_doc <= max_doc and min_doc <= seq_len, got "
                             f"min_doc={self.min_doc}, max_doc={self.max_doc}, seq_len={self.seq_len}")
        self._task(self.min_doc)  # the smallest document must be a valid task

    def _task(self, length: int) -> RetrievalTask:
        cache = self.__dict__.setdefault("_tasks", {})
        if length not in cache:
            cache[length] = self._make_task(length)
        return cache[length]

    def _make_task(self, length: int) -> RetrievalTask:
        pairs = min(self.num_pairs, self.num_keys)
        room = length // 2 - 1
        per = 1 if self.pair_tokens else 2
        copies = max(1, min(self.copies, room // (pairs * per)))
        pairs = max(1, min(pairs, room // (copies * per)))
        queries = length - length // 2 if self.num_queries is None else min(self.num_queries, length - length // 2)
        return RetrievalTask(length, self.vocab_size, num_pairs=pairs, num_queries=queries, num_keys=self.num_keys,
                             num_values=self.num_values, copies=copies, pair_tokens=self.pair_tokens, seed=self.seed)

    def lengths(self, index: int) -> list[int]:
        """Document lengths (summing to ``seq_len``) of the micro batch whose first sample is ``index``."""
        rng = np.random.default_rng([self.seed, index, 7])
        out, left = [], self.seq_len
        while left:
            n = min(left, int(rng.integers(self.min_doc, self.max_doc + 1)))  # type: ignore[operator]
            if left - n < self.min_doc:  # too little left for another document: this one takes it
                n = left
            out.append(n)
            left -= n
        return out

    def sample(self, index: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [S], labels [S])`` of sample ``index`` packed with document ``lengths``."""
        ids, labels = [], []
        for d, n in enumerate(lengths):
            i, lab = self._task(n).sample(index * 1009 + d)
            ids.append(i)
            labels.append(lab)
        return torch.cat(ids), torch.cat(labels)

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / self.num_values

    @property
    def chance_loss(self) -> float:
        return float(np.log(self.num_values))


def write_token_file(path: str | os.PathLike, tokens: Any, dtype: str = "uint16") -> None:
    """Write ``tokens`` as a flat binary token file readable by :class:`TokenFile`."""
    np.asarray(tokens, dtype=dtype).tofile(str(path))


def sample_indices(step: int, micro_step: int, grad_accum: int, dp_rank: int, dp_size: int,
                   micro_batch: int) -> list[int]:
    """Global sample indices of one micro batch on one data-parallel replica."""
    base = ((step * grad_accum + micro_step) * dp_size + dp_rank) * micro_batch
    return list(range(base, base + micro_batch))


@functools.lru_cache(maxsize=16)
def _global_index_np(layout: str, sp_rank: int, sp_size: int, seq_len: int) -> np.ndarray:
    """:func:`ds_burst.core.layout.global_index` as an int64 array (cached; never handed out, only copied)."""
    return np.asarray(global_index(layout, sp_rank, sp_size, seq_len), dtype=np.int64)


def shard_index(layout: str, sp_rank: int, sp_size: int, seq_len: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """``[seq_len // sp_size]`` int64 tensor on ``device``: the global positions (in local order) that SP rank
    ``sp_rank`` holds under ``layout``. Built from a host-side cache: a host-to-device copy, never a read back."""
    return torch.tensor(_global_index_np(layout, sp_rank, sp_size, seq_len), dtype=torch.long, device=device)


def shard_batch_local(
    input_ids: torch.Tensor, labels: torch.Tensor, sp_rank: int, sp_size: int, layout: str
) -> dict[str, torch.Tensor]:
    """This SP rank's shard of full-sequence ``[B, S]`` tensors under ``layout`` (no communication):
    ``input_ids``, ``labels`` and the global ``position_ids``. Each output stays on its input's device
    (``position_ids`` on ``input_ids``'); nothing is read back to the host."""
    check_layout(layout)
    seq = input_ids.shape[-1]
    if labels.shape[-1] != seq:
        raise ValueError(f"labels hold {labels.shape[-1]} positions, input_ids {seq}")
    div = needs_divisor(layout, sp_size)
    if seq % div:
        raise ValueError(f"sequence length {seq} is not divisible by {div} ({layout} layout over {sp_size} ranks)")
    idx = shard_index(layout, sp_rank, sp_size, seq, input_ids.device)
    lab_idx = idx if labels.device == input_ids.device else shard_index(layout, sp_rank, sp_size, seq, labels.device)
    return {
        "input_ids": input_ids.index_select(-1, idx),
        "labels": labels.index_select(-1, lab_idx),
        "position_ids": idx[None].expand(input_ids.shape[0], -1).contiguous(),
    }


@functools.lru_cache(maxsize=8)
def rank_of_positions(layout: str, sp_size: int, seq_len: int) -> np.ndarray:
    """``[seq_len]``: the SP rank holding each global position under ``layout`` (all 0 when ``sp_size == 1``).
    Cached; do not modify the returned array."""
    check_layout(layout)
    owner = np.zeros(seq_len, dtype=np.int64)
    for r in range(1, sp_size):
        owner[global_index(layout, r, sp_size, seq_len)] = r
    return owner


@functools.lru_cache(maxsize=8)
def _rank_counts(layout: str, sp_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rank per position, counts)`` with ``counts[r, i]`` = positions of rank ``r`` in ``[0, i)``; one rank
    is split into two halves that count as different ranks."""
    own = rank_of_positions(layout, sp_size, seq_len)
    if sp_size == 1:
        own = (np.arange(seq_len) >= seq_len // 2).astype(np.int64)
    counts = np.zeros((int(own.max()) + 1, seq_len + 1), dtype=np.int64)
    counts[own, np.arange(1, seq_len + 1)] = 1
    return own, counts.cumsum(axis=1)


def far_labels(labels: torch.Tensor, sources: torch.Tensor, layout: str, sp_size: int) -> torch.Tensor:
    """``labels [..., S]`` kept only where no token of the asked fact (``sources [..., S, 2]``, spans from
    :meth:`RetrievalTask.sources`) is on the SP rank that holds the question under ``layout``;
    ``IGNORE_INDEX`` elsewhere. With ``sp_size == 1`` the two halves of the sequence count as two ranks.
    Computed on ``labels``' device (``sources`` are moved there) without reading anything back to the host."""
    own_np, counts_np = _rank_counts(layout, sp_size, labels.shape[-1])
    device = labels.device
    own = torch.as_tensor(own_np, device=device)
    counts = torch.as_tensor(counts_np, device=device)
    src = sources.to(device)
    a, b = src[..., 0], src[..., 1]
    near = (a < 0) | (counts[own, b.clamp(min=0)] - counts[own, a.clamp(min=0)] > 0)
    return labels.masked_fill(near, IGNORE_INDEX)


def make_batch(
    source: RetrievalTask | TokenFile | PackedRetrieval,
    indices: list[int],
    sp_rank: int,
    sp_size: int,
    layout: str,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Build samples ``indices`` and return this SP rank's shard: ``input_ids``, ``labels``, ``position_ids``,
    and for :class:`RetrievalTask` also ``far_labels`` (the labels of the questions whose fact lies on
    another rank of the SP group under ``layout``, see :func:`far_labels`; ``IGNORE_INDEX`` elsewhere).

    :class:`PackedRetrieval`: ``position_ids`` restart at 0 in every document, ``doc_ids`` give each token's
    document and ``cu_seqlens`` (a list of ints, the same for every row) the documents' global boundaries."""
    if isinstance(source, PackedRetrieval):
        lengths = source.lengths(indices[0])
        rows = [source.sample(i, lengths) for i in indices]
        ids, labels = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        out = shard_batch_local(ids, labels, sp_rank, sp_size, layout)
        idx = out["position_ids"][0]
        in_doc = torch.cat([torch.arange(n, device=idx.device) for n in lengths])
        doc = torch.cat([torch.full((n,), d, device=idx.device) for d, n in enumerate(lengths)])
        out["position_ids"] = in_doc[idx][None].expand(ids.shape[0], -1).contiguous()
        out["doc_ids"] = doc[idx][None].expand(ids.shape[0], -1).contiguous()
        moved: dict[str, Any] = {k: v.to(device) for k, v in out.items()}
        moved["cu_seqlens"] = [0, *np.cumsum(lengths).tolist()]
        return moved
    pairs = [source.sample(i) for i in indices]
    ids = torch.stack([p[0] for p in pairs])
    labels = torch.stack([p[1] for p in pairs])
    out = shard_batch_local(ids, labels, sp_rank, sp_size, layout)
    if isinstance(source, RetrievalTask):
        far = far_labels(labels, torch.stack([source.sources(i) for i in indices]), layout, sp_size)
        out["far_labels"] = far.index_select(-1, shard_index(layout, sp_rank, sp_size, ids.shape[-1], far.device))
    return {k: v.to(device) for k, v in out.items()}


def boundaries_from_position_ids(position_ids: torch.Tensor) -> list[int] | None:
    """Global document boundaries ``[0, e1, ..., S]`` of a packed full-sequence ``position_ids`` (``[S]`` or
    ``[B, S]``) whose positions restart at 0 at every document (what transformers' packing collators pass), or
    ``None`` when they never restart (one document). Every row must hold the same documents (the boundaries
    apply to each row). Reads the tensor on the host (call it in the data path, not per layer)."""
    zero = (position_ids.reshape(-1, position_ids.shape[-1]) == 0).cpu()  # the one read back: a bool mask
    starts = [row.nonzero().flatten().tolist() for row in zero]
    if any(s != starts[0] for s in starts[1:]):
        raise ValueError("packed position_ids: the rows of the batch hold different documents; ds-burst applies one "
                         "set of document boundaries to every row (pack each row alike, or use batch size 1)")
    seq = zero.shape[-1]
    cu = sorted({0, *starts[0], seq})
    return None if len(cu) == 2 else cu


def boundaries_from_cu_seq_lens(cu_seq_lens: Any, batch: int, seq: int) -> list[int]:
    """Full-sequence boundaries from transformers' ``cu_seq_lens_q``/``_k``: offsets into the flattened, unsharded
    batch ``[B * S]`` (one packed row when ``B == 1``). With ``B > 1`` every row must hold the same documents."""
    cu = [int(x) for x in (cu_seq_lens.tolist() if isinstance(cu_seq_lens, torch.Tensor) else cu_seq_lens)]
    if batch == 1 or (cu and cu[-1] == seq):
        return cu
    if not cu or cu[-1] != batch * seq:
        raise ValueError(f"cu_seq_lens end at {cu[-1] if cu else None}, expected S={seq} or B*S={batch * seq}")
    rows = [sorted({0, seq, *(c - r * seq for c in cu if r * seq <= c <= (r + 1) * seq)}) for r in range(batch)]
    if any(r != rows[0] for r in rows[1:]):
        raise ValueError("cu_seq_lens: the rows of the batch hold different documents; ds-burst applies one set of "
                         "document boundaries to every row")
    return rows[0]
