"""Public entry point ``burst_attn_func``.

A call builds its key from the shapes, dtypes, device, options, group and documents. The first call of a key
checks the input and builds the call plan (:mod:`ds_burst.attention.call_plan`); later calls only look it up.
On every call the ranks of the group swap a small fixed-size header over the group's CPU channel
(:mod:`ds_burst.attention.lookup`): ranks whose inputs disagree (also when only one of them changed its input
while the others reuse their plan) raise the same ``ValueError`` at once, naming what differs; no NCCL
collective and no device sync is added per call. Under ``torch.compile`` the call is one custom op
(:mod:`ds_burst.attention.compiled`).
"""

from __future__ import annotations

import torch

from ds_burst.attention import compiled
from ds_burst.attention.function import BurstAttnFunction, returns
from ds_burst.attention.lookup import lookup_plan
from ds_burst.attention.selective import active_keep
from ds_burst.attention.validate import check_mode


def burst_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    group: object = None,
    layout: str = "zigzag",
    backward: str = "auto",
    kernel: str = "auto",
    return_lse: bool = False,
    deterministic: bool = False,
    check_inputs: bool | str = True,
    schedule: str | None = None,
    check_finite: bool = False,
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | list[int] | tuple[int, ...] | None = None,
    position_ids: torch.Tensor | None = None,
    return_max_logit: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Exact attention over a sequence split across the ranks of ``group``.

    Args:
        q: ``[B, S_local, Hq, D]`` queries of this rank's tokens.
        k, v: ``[B, S_local, Hkv, D]`` and ``[B, S_local, Hkv, Dv]`` with ``Hq % Hkv == 0`` (GQA/MQA without
            repeating K/V); the value head dim ``Dv`` may differ from ``D`` (MLA, e.g. DeepSeek-V3's 192/128).
        causal: causal mask by *global* positions.
        softmax_scale: defaults to ``D ** -0.5``.
        window_size: ``(left, right)`` sliding window as in flash-attn, ``-1`` unbounded. Out-of-reach
            blocks and whole ring hops are skipped.
        group: process group, DeepSpeed ``mpu``/topology object, or ``None``: the sequence-parallel group of the
            current topology (:func:`ds_burst.init_sequence_parallel`) when one exists, else the world (a single
            process when torch.distributed is not initialised). Pass ``torch.distributed.group.WORLD`` for the
            world while a topology exists.
        layout: how the caller split the sequence, ``"contiguous"`` or ``"zigzag"``.
        backward: ``"burst"`` (Q, dO, lse, delta and dQ travel), ``"ring"`` (K, V, dK, dV travel) or
            ``"auto"`` (the one that sends fewer bytes for these head counts).
        kernel: ``"torch"``, ``"triton"``, ``"sdpa"`` (torch's fused cuDNN/flash ops per tile where the mask
            allows, per-block outputs rounded to the input dtype; uses the ring backward) or ``"auto"``
            (on CUDA the faster of Triton and sdpa for this shape, measured on first use, cached and agreed
            across ranks: :mod:`ds_burst.kernels.choice`; torch on CPU).
        return_lse: also return the natural-log log-sum-exp ``[B, Hq, S_local]`` (fp32, not differentiable).
        deterministic: bitwise-reproducible backward (no atomics in the kernels).
        check_inputs: ``True`` or ``"once"`` (default): check the input locally the first time this rank meets a
            shape/option key, and on every call swap a fixed-size header with the other ranks (CPU messages, no
            device sync) so that ranks making different calls raise the same ``ValueError`` at once;
            ``"always"``: also check locally and rebuild the plan on every call (debugging); ``False``: the
            header goes to the two ring neighbours only (two messages instead of ``P - 1``; a rank whose
            neighbours agree with it fails inside the ring when ranks further away disagree, bounded by the
            communication timeout).
        schedule: ``"ring"`` (flat), ``"double_ring"`` or ``"ulysses_ring"`` (both need ``group`` to be the
            topology from :func:`ds_burst.init_sequence_parallel` made with that schedule, or with
            ``ulysses_degree=U`` for the Ulysses x ring split; a double ring inside one node is the flat ring,
            Ulysses over a node that holds the whole group is ``"ulysses"``), ``"ulysses"`` (the all-to-all
            over heads across the whole group, any group; needs ``Hq % P == 0`` and ``Hkv`` dividing or divisible
            by ``P``) or ``"auto"``; ``None`` takes the topology's schedule (flat ring for a plain process group).
            ``"auto"`` keeps the flat ring for sliding windows, which stops early.
        check_finite: raise ``ValueError`` on every rank when any rank's q, k or v (forward) or output
            gradient (backward) holds NaN/Inf, naming the rank and tensor (a host read per call; the backward
            check is a collective per call).
            Without it NaN/Inf in q, k or v propagate into the output as in torch SDPA (never a zeroed row).
        softcap: logit softcapping (Gemma 2): scores become ``softcap * tanh(s / softcap)`` with ``s`` the scaled
            score; ``None`` for none.
        sinks: ``[Hq]`` attention sinks (GPT-OSS): a learned per-head logit in the softmax denominator, merged
            once after the ring; it gets a gradient (this rank's queries' part).
        cu_seqlens: packed documents: the global boundaries ``[0, e1, ..., S]`` of the documents in the *full*
            sequence (one packed row, the same for every row of the batch and on every rank), or flash-attn's
            offsets into the flattened batch ``[0, ..., B*S]`` when every row holds the same documents, or a pair
            ``(cu_seqlens_q, cu_seqlens_k)`` that must be equal; attention never crosses a boundary; empty
            documents (a repeated boundary) are allowed. A 1-D integer tensor or a list of ints; a tensor is read
            on the host once per tensor object (the same CUDA tensor passed to every layer costs one copy). Tiles
            and ring hops with no same-document work are skipped and the ranks' work is balanced from the
            document lengths (docs/API.md, "Packed documents"). ``None``: one document. Works under
            ``torch.compile``.
        position_ids: packed documents given as this rank's positions ``[B, S_local]`` or ``[S_local]`` (in the
            caller's ``layout``) that restart at 0 at every document start (Hugging Face packing); every rank's
            positions are gathered over the group's CPU channel once per tensor object and the boundaries taken
            from the full sequence. A jump that is not a restart at 0, or rows with different documents, raise
            ``ValueError``. Give ``cu_seqlens`` or ``position_ids``, not both.
        return_max_logit: also return ``max_logit [Hq]`` (fp32; fp64 for fp64 inputs; not differentiable): per
            query head, the largest scaled score ``softmax_scale * q.k`` (before softcapping; sinks are not scores)
            over this rank's queries in every batch row and the keys each of them attends to (masked pairs, other
            documents, keys outside the window excluded; ``-inf`` when none). Tracked by the kernels in the
            forward's own pass; reduce it over the group once per step with :func:`ds_burst.reduce_max_logits`
            (Muon's QK-clip, docs/API.md). ``kernel="auto"`` then runs the Triton tiles on CUDA (torch's fused ops do
            not expose the maximum; ``kernel="sdpa"`` runs such tiles on its Triton/PyTorch fallback).

    Kernels that cannot honour ``softcap`` or ``Dv != D`` (sdpa's fused ops) are replaced for the call by one that
    can (Triton on CUDA where it supports the inputs, else the PyTorch reference).

    Returns:
        ``out [B, S_local, Hq, Dv]`` (``Dv``: V's head dim) in the input dtype; with ``return_lse`` and/or
        ``return_max_logit`` a tuple ``(out, lse)``, ``(out, max_logit)`` or ``(out, lse, max_logit)``.
    """
    if torch.compiler.is_compiling():
        return compiled.call(q, k, v, causal, softmax_scale, window_size, group, layout, backward, kernel,
                             return_lse, deterministic, check_inputs, schedule, check_finite, softcap, sinks,
                             cu_seqlens, position_ids, bool(return_max_logit))
    plan = lookup_plan(q, k, v, causal, softmax_scale, window_size, group, layout, backward, kernel, return_lse,
                       deterministic, check_mode(check_inputs), schedule, check_finite, softcap, sinks,
                       cu_seqlens=cu_seqlens, position_ids=position_ids, max_logit=bool(return_max_logit))
    if plan.direct is not None and active_keep() is None:  # one rank, one fused op under torch's autograd
        out, lse = plan.direct(q, k, v)
        return returns(out, lse, None, return_lse)
    out, lse, max_logit = BurstAttnFunction.apply(q, k, v, plan, sinks)
    return returns(out, lse, max_logit, return_lse)

