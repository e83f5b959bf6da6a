"""Hopper (sm_90) forward tiles in Gluon: a producer warp streams K and V through a multi-stage shared-memory ring
by TMA, two consumer warpgroups each run the online softmax of half of a 128-row query tile with ``wgmma``, the
probabilities fed to the second matmul from registers, and the next tile's ``Q K^T`` issued before this tile's
softmax so that the tensor cores and the softmax overlap.

Same contract as :func:`ds_burst.kernels.triton_attn.fwd_step` (and the reference): the carried state
``out [B, Sq, Hq, D]`` (fp32, normalised) and ``lse [B, Hq, Sq]`` (fp32, natural log, ``-inf`` = no key yet) is
loaded, continued over the keys of this call and stored; masks by global positions (``q_offset - k_offset``,
causal, windows) with the same three key ranges as the ``tl`` kernel (masked, mask-free, masked); GQA by index.
``fwd_step(..., fresh=True)`` starts from no state: nothing is read, every row is written, and ``out`` may have the
input dtype (the one-rank path, :func:`ds_burst.kernels.triton_attn.attend`). ``max_out=`` (``HAS_MAX``): each
consumer also keeps its rows' largest visible raw ``q.k`` and raises ``max_out`` to it times ``scale`` at the end.
``softcap=`` (``SOFTCAP``): the ``tl`` kernel's logits ``softcap * tanh(scale * q.k / softcap)``, in the log2
domain ``tanh(q.k * qk_scale) * cap2`` (``qk_scale = scale / softcap``, ``cap2 = softcap * log2(e)``,
:func:`~ds_burst.kernels.tile_math.softcap_args`) with ``tanh.approx.f32``; ``max_out`` is taken before the cap.

What it covers: CUDA devices of compute capability 9.x, fp16/bf16, ``D = Dv`` in {64, 128}, softcap once its
variants are checked on a GPU (``hopper_common.SOFTCAP_CHECKED``), at least 128 query and key rows, and q/k/v
whose heads sit side by side in a row (stride of the head dim 1, of the heads ``D``, 16-byte aligned), so that a
3-D TMA descriptor ``[B, S, H * D]`` addresses them. :func:`why_not` names what a call lacks;
:mod:`ds_burst.kernels.triton_attn` asks :func:`applicable` and keeps its ``tl`` kernel for everything else
(other GPUs, the CPU interpreter, where Gluon does not run).

One program (query tile of ``BLOCK_M = 128`` rows, one query head; heaviest causal tiles first)::

    producer, 1 warp, 24 registers   Q halves once; K_j, V_j into slot j % STAGES after both consumers freed it
    consumer 0 / 1, 4 warps each,    rows m0 + 64 * wg .. + 64:
    240 registers                      S = Q K^T (wgmma, fp32 in registers), softmax in the log2 domain,
                                       P (bf16/fp16, registers) as the A operand of O += P V

Consumer loop over key tiles ``j`` (after a peeled first tile)::

    wait K_j; issue S_j = Q K_j^T; wait V_{j-1}; issue O += P_{j-1} V_{j-1}
    wait S_j (K_j's slot is free); softmax of S_j while O += P V runs
    wait O (V_{j-1}'s slot is free); rescale O by exp2(m_old - m_new)
"""

from __future__ import annotations

import torch

from ds_burst.kernels import tile_math
from ds_burst.kernels.fast_launch import Launcher
from ds_burst.kernels.hopper_common import AVAILABLE, ENABLED, desc_spec, tma_aligned, why_not

__all__ = ["AVAILABLE", "ENABLED", "applicable", "fwd_step", "tma_aligned", "why_not"]

if AVAILABLE:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from ds_burst.kernels.hopper_common import finish, span, tanh_approx


    @gluon.jit
    def _masked_scores(s, n, offs_m, offs_n, Sk, delta0, win_l, win_r, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr):
        """``s`` with keys outside ``[0, Sk)`` or outside the window/causal band set to ``-inf``."""
        # Query row i sees keys i + delta0 - win_l .. i + delta0 + win_r: bounds per row, no 2-D index tensor.
        kn = n + offs_n
        ok = (kn < Sk)[None, :] & (offs_m >= 0)[:, None]
        if HAS_LO:
            ok = ok & (kn[None, :] >= (offs_m + delta0 - win_l)[:, None])
        if HAS_HI:
            ok = ok & (kn[None, :] <= (offs_m + delta0 + win_r)[:, None])
        return gl.where(ok, s, float("-inf"))

    @gluon.jit
    def _opaque(x):
        """``x`` (int32) through a move the compiler can neither see through nor move (not pure)."""
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _state_ptrs(Out, Lse, b, h, m0, Sq, sob, sos, soh, sod, slb, slh, sls, layout: gl.constexpr,
                    BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Pointers and masks of the carried ``out`` rows (in ``layout``) and ``lse`` entries of one query tile."""
        # Row indices through an opaque move: the compiler then neither keeps the [rows, HEAD_DIM] offsets of the
        # state load live through the key loop for the store (they spilled: 1.2 KB a thread) nor shares them;
        # recomputing them after the loop costs a few integer ops.
        rows = _opaque(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout)))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        row_ok = (m0 + rows) < Sq
        m64 = m0.to(gl.int64)
        b64 = b.to(gl.int64)
        h64 = h.to(gl.int64)
        l_ptrs = (Lse + b64 * slb + h64 * slh + m64 * sls) + rows * sls
        # 32-bit offsets from a scalar base: a tile spans far less than 2**31 elements.
        o_ptrs = (Out + b64 * sob + h64 * soh + m64 * sos) + (rows[:, None] * sos + offs_d[None, :] * sod)
        o_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        return o_ptrs, o_mask, l_ptrs, row_ok

    @gluon.jit
    def _softmax_step(s, m_i, l_i, qk_scale):
        """Online-softmax update in the log2 domain (logits ``s * qk_scale``): returns ``(p, alpha, m_new, l_new)``."""
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_new = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_new

    @gluon.jit
    def _program_tile(Hq, Sq, Sk, delta0, win_l, win_r, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """This program's batch, query head, first query row (heaviest causal tiles first) and key span
        (:func:`tile_math.span`), the same in every partition."""
        pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        m0 = pid_m * BLOCK_M
        start, n_a, n_b, n_c = span(m0, Sq, Sk, delta0, win_l, win_r, HAS_LO, HAS_HI, False, 1, BLOCK_M, BLOCK_N)
        return b, h, m0, start, n_a, n_b, n_c

    @gluon.jit
    def _fwd_producer(descs, bufs, bars, state, dims, mxs, wg, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
                      HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      FRESH: gl.constexpr, HAS_MAX: gl.constexpr, SOFTCAP: gl.constexpr):
        """One warp: the two Q halves, then every K and V tile of the span, each into the next free ring slot."""
        q_desc, k_desc, v_desc = descs
        q_smem, k_smem, v_smem = bufs
        q_bar, k_ready, v_ready, k_empty, v_empty = bars
        Hq, Sq, Sk, G, delta0, win_l, win_r, qk_scale, cap2 = dims
        b, h, m0, start, n_a, n_b, n_c = _program_tile(Hq, Sq, Sk, delta0, win_l, win_r, HAS_LO, HAS_HI, BLOCK_M,
                                                       BLOCK_N)
        total = n_a + n_b + n_c
        col_k = (h // G) * HEAD_DIM
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, m0, h * HEAD_DIM], q_bar, q_smem.index(0))
        tma.async_copy_global_to_shared(q_desc, [b, m0 + BLOCK_M // 2, h * HEAD_DIM], q_bar, q_smem.index(1))
        for t in range(total):
            slot = t % STAGES
            ph = ((t // STAGES) & 1) ^ 1  # fresh barriers count as released once
            row = start + t * BLOCK_N
            mbarrier.wait(k_empty.index(slot), ph)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, row, col_k], k_ready.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), ph)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [b, row, col_k], v_ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def _fwd_consumer(descs, bufs, bars, state, dims, mxs, wg, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
                      HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      FRESH: gl.constexpr, HAS_MAX: gl.constexpr, SOFTCAP: gl.constexpr):
        """One warpgroup: the online softmax of query rows ``m0 + wg * BLOCK_M / 2`` onwards (half the tile) over
        every tile of the span; arrives on a slot's empty barrier once its matmul on the slot is done. ``HAS_MAX``:
        also raises ``max_out`` (``mxs``) to the rows' largest visible ``scale * q.k``. ``SOFTCAP``: logits
        ``tanh(q.k * qk_scale) * cap2`` (log2 domain), the maximum taken before the cap, as in the ``tl`` kernel."""
        q_desc, k_desc, v_desc = descs
        q_smem, k_smem, v_smem = bufs
        q_bar, k_ready, v_ready, k_empty, v_empty = bars
        Out, Lse, sob, sos, soh, sod, slb, slh, sls = state
        Hq, Sq, Sk, G, delta0, win_l, win_r, qk_scale, cap2 = dims
        Max, sxb, sxh, sxs, sm_scale = mxs
        dtype: gl.constexpr = q_desc.dtype
        HALF: gl.constexpr = BLOCK_M // 2
        b, h, m0, start, n_a, n_b, n_c = _program_tile(Hq, Sq, Sk, delta0, win_l, win_r, HAS_LO, HAS_HI, BLOCK_M,
                                                       BLOCK_N)
        total = n_a + n_b + n_c
        r0 = m0 + wg * HALF

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        srow: gl.constexpr = gl.SliceLayout(1, s_layout)
        orow: gl.constexpr = gl.SliceLayout(1, o_layout)

        if FRESH:  # no state yet: nothing to read
            acc = gl.zeros([HALF, HEAD_DIM], gl.float32, o_layout)
            m_i = gl.full([HALF], float("-inf"), gl.float32, srow)
            l_i = gl.zeros([HALF], gl.float32, srow)
        else:
            o_ptrs, o_mask, l_ptrs, row_ok = _state_ptrs(Out, Lse, b, h, r0, Sq, sob, sos, soh, sod, slb, slh, sls,
                                                         o_layout, HALF, HEAD_DIM)
            lse_in = gl.load(l_ptrs, mask=row_ok, other=float("-inf"))
            has_prev = lse_in != float("-inf")
            acc = gl.load(o_ptrs, mask=o_mask & has_prev[:, None], other=0.0)
            m_i = gl.convert_layout(gl.where(has_prev, lse_in * 1.4426950408889634, float("-inf")), srow)
            l_i = gl.convert_layout(gl.where(has_prev, 1.0, 0.0), srow)

        offs_ms = r0 + gl.arange(0, HALF, layout=srow)
        offs_ns = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        if HAS_MAX:  # the rows' largest visible raw q.k of this call
            mx = gl.full([HALF], float("-inf"), gl.float32, srow)
        # the softmax's factor to log2-domain logits: q.k * qk_scale, or with softcap tanh(q.k * qk_scale) * cap2
        p_scale = cap2 if SOFTCAP else qk_scale
        q_tile = q_smem.index(wg).reshape([HALF, HEAD_DIM])
        mbarrier.wait(q_bar, phase=0)

        if total > 0:
            mbarrier.wait(k_ready.index(0), phase=0)
            s_tok = warpgroup_mma(q_tile, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                                  gl.zeros([HALF, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(0), count=1)
            if SOFTCAP:
                if HAS_MAX:  # the maximum logit is taken before the cap
                    if n_a > 0 or n_b == 0:
                        mx = gl.maximum(mx, gl.max(_masked_scores(s, start, offs_ms, offs_ns, Sk, delta0, win_l,
                                                                  win_r, HAS_LO, HAS_HI), 1))
                    else:
                        mx = gl.maximum(mx, gl.max(s, 1))
                s = tanh_approx(s * qk_scale)
            if n_a > 0 or n_b == 0:
                s = _masked_scores(s, start, offs_ms, offs_ns, Sk, delta0, win_l, win_r, HAS_LO, HAS_HI)
            if HAS_MAX:
                if not SOFTCAP:
                    mx = gl.maximum(mx, gl.max(s, 1))
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, p_scale)
            acc = acc * gl.convert_layout(alpha, orow)[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)

            for j in range(1, total):
                slot = j % STAGES
                prev = (j - 1) % STAGES
                mbarrier.wait(k_ready.index(slot), phase=(j // STAGES) & 1)
                s_tok = warpgroup_mma(q_tile, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                                      gl.zeros([HALF, BLOCK_N], gl.float32, s_layout), use_acc=False,
                                      is_async=True)
                mbarrier.wait(v_ready.index(prev), phase=((j - 1) // STAGES) & 1)
                o_tok = warpgroup_mma(p_op, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
                mbarrier.arrive(k_empty.index(slot), count=1)
                if SOFTCAP:
                    if HAS_MAX:  # the maximum logit is taken before the cap
                        if j < n_a or j >= n_a + n_b:
                            mx = gl.maximum(mx, gl.max(_masked_scores(s, start + j * BLOCK_N, offs_ms, offs_ns, Sk,
                                                                      delta0, win_l, win_r, HAS_LO, HAS_HI), 1))
                        else:
                            mx = gl.maximum(mx, gl.max(s, 1))
                    s = tanh_approx(s * qk_scale)
                if j < n_a or j >= n_a + n_b:
                    s = _masked_scores(s, start + j * BLOCK_N, offs_ms, offs_ns, Sk, delta0, win_l, win_r,
                                       HAS_LO, HAS_HI)
                if HAS_MAX:
                    if not SOFTCAP:
                        mx = gl.maximum(mx, gl.max(s, 1))
                p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, p_scale)
                p16 = p.to(dtype)
                acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
                mbarrier.arrive(v_empty.index(prev), count=1)
                acc = acc * gl.convert_layout(alpha, orow)[:, None]
                p_op = gl.convert_layout(p16, p_layout)

            last = (total - 1) % STAGES
            mbarrier.wait(v_ready.index(last), phase=((total - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))[0]
            mbarrier.arrive(v_empty.index(last), count=1)

        o_ptrs, o_mask, l_ptrs, row_ok = _state_ptrs(Out, Lse, b, h, r0, Sq, sob, sos, soh, sod, slb, slh, sls,
                                                     o_layout, HALF, HEAD_DIM)
        if FRESH:
            lse_in = gl.full([HALF], float("-inf"), gl.float32, orow)
        else:
            lse_in = gl.load(l_ptrs, mask=row_ok, other=float("-inf"))
        _store_state(o_ptrs, o_mask, l_ptrs, row_ok, acc, lse_in, l_i, m_i, orow)
        if HAS_MAX:  # max_out = max(max_out, scale * max q.k) on the rows of this half
            x_rows = gl.arange(0, HALF, layout=srow)
            x_ptrs = (Max + b.to(gl.int64) * sxb + h.to(gl.int64) * sxh + r0.to(gl.int64) * sxs) + x_rows * sxs
            x_ok = offs_ms < Sq
            x_old = gl.load(x_ptrs, mask=x_ok, other=float("-inf"))
            gl.store(x_ptrs, gl.maximum(x_old, mx * sm_scale), mask=x_ok)

    @gluon.jit
    def _store_state(o_ptrs, o_mask, l_ptrs, row_ok, acc, lse_in, l_i, m_i, orow: gl.constexpr):
        """Normalise and store ``(out, lse)`` (``out`` rounded to the output's dtype); rows that saw no key in
        this call keep their ``lse`` bitwise."""
        has_prev = lse_in != float("-inf")
        m_in = gl.where(has_prev, lse_in * 1.4426950408889634, float("-inf"))
        l_o = gl.convert_layout(l_i, orow)
        m_o = gl.convert_layout(m_i, orow)
        out, lse_out = finish(acc, l_o, m_o, lse_in, has_prev, m_in)
        gl.store(o_ptrs, out, mask=o_mask)
        gl.store(l_ptrs, lse_out, mask=row_ok)

    @gluon.jit(do_not_specialize=["delta0", "win_l", "win_r"])
    def _fwd_kernel(q_desc, k_desc, v_desc, Out, Lse, Max,
                    sob, sos, soh, sod, slb, slh, sls, sxb, sxh, sxs,
                    Hq, Sq, Sk, G, delta0, win_l, win_r, qk_scale, cap2, sm_scale,
                    HAS_LO: gl.constexpr, HAS_HI: gl.constexpr, HEAD_DIM: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FRESH: gl.constexpr,
                    HAS_MAX: gl.constexpr, SOFTCAP: gl.constexpr, num_warps: gl.constexpr):
        """Warp-specialised forward (``FRESH``: no carried state to read, ``out`` of any float dtype; ``HAS_MAX``:
        ``Max`` is raised to the rows' maximum logit; ``SOFTCAP``: logits ``tanh(q.k * qk_scale) * cap2``, log2
        domain): the default partition (4 warps) and one worker (4 warps) each run :func:`_fwd_consumer` on half of
        the query tile; one worker warp runs :func:`_fwd_producer`."""
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2, 1, BLOCK_M // 2, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release a slot
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()
        descs = (q_desc, k_desc, v_desc)
        bufs = (q_smem, k_smem, v_smem)
        bars = (q_bar, k_ready, v_ready, k_empty, v_empty)
        state = (Out, Lse, sob, sos, soh, sod, slb, slh, sls)
        dims = (Hq, Sq, Sk, G, delta0, win_l, win_r, qk_scale, cap2)
        mxs = (Max, sxb, sxh, sxs, sm_scale)
        zero = gl.program_id(0) * 0  # the warpgroup index, as a run-time value (the workers share one signature)
        gl.warp_specialize([
            (_fwd_consumer, (descs, bufs, bars, state, dims, mxs, zero, HAS_LO, HAS_HI, HEAD_DIM, BLOCK_M, BLOCK_N,
                             STAGES, FRESH, HAS_MAX, SOFTCAP)),
            (_fwd_consumer, (descs, bufs, bars, state, dims, mxs, zero + 1, HAS_LO, HAS_HI, HEAD_DIM, BLOCK_M,
                             BLOCK_N, STAGES, FRESH, HAS_MAX, SOFTCAP)),
            (_fwd_producer, (descs, bufs, bars, state, dims, mxs, zero, HAS_LO, HAS_HI, HEAD_DIM, BLOCK_M, BLOCK_N,
                             STAGES, FRESH, HAS_MAX, SOFTCAP)),
        ], [4, 1], [240, 24])


# Tiles per head dim: (BLOCK_M, BLOCK_N, STAGES). Shared memory: Q + STAGES * (K + V) tiles (224 KiB at D = 128).
_CONFIGS: dict[int, tuple[int, int, int]] = {128: (128, 128, 3), 64: (128, 128, 4)}


# 4 + 4 consumer warps and a producer warp (12 after rounding to warpgroups): 168 registers a thread at launch;
# the producer gives its warpgroup's down to 24 and the consumers take 240 each.
_FWD = Launcher(_fwd_kernel, {"maxnreg": 168}) if AVAILABLE else None


def applicable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None = None) -> bool:
    """Whether :func:`fwd_step` runs this call (see :func:`why_not`)."""
    return why_not(q, k, v, softcap) is None


def fwd_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
             scale: float, q_offset: int = 0, k_offset: int = 0, causal: bool = False,
             window: tuple[int, int] = (-1, -1), fresh: bool = False, max_out: torch.Tensor | None = None,
             softcap: float | None = None) -> None:
    """Continue ``(out, lse)`` over ``k, v`` in place: :func:`ds_burst.kernels.triton_attn.fwd_step`'s contract,
    for the calls :func:`applicable` accepts (the caller checks; shapes are checked there).

    ``fresh=True``: no state yet, so ``out`` and ``lse`` are only written (their contents are ignored; every row
    is written, rows without keys as ``0`` / ``-inf``) and ``out`` may have any float dtype (the normalised
    output is rounded to it once). ``max_out [B, Hq, Sq]`` (fp32, may be a view; read even with ``fresh``):
    raised in place to each row's largest visible ``scale * q.k`` (before the cap), in the same launch. ``softcap``:
    logits ``softcap * tanh(scale * q.k / softcap)`` (a positive finite number, or ``None``: none)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    has_lo, has_hi, win_l, win_r = tile_math.mask_args(causal, window)
    qk_scale, cap2 = tile_math.softcap_args(scale, softcap)
    bm, bn, stages = _CONFIGS[d]
    grid = (triton.cdiv(sq, bm), b * hq)
    mx = lse if max_out is None else max_out  # a dummy pointer without max_out (never read)
    _FWD(grid, (desc_spec(q, bm // 2), desc_spec(k, bn), desc_spec(v, bn)),
         (out, lse, mx, *out.stride(), *lse.stride(), *mx.stride(),
          hq, sq, sk, hq // hkv, q_offset - k_offset, win_l, win_r, qk_scale, cap2, float(scale)),
         {"HAS_LO": has_lo, "HAS_HI": has_hi, "HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "STAGES": stages,
          "FRESH": fresh, "HAS_MAX": max_out is not None, "SOFTCAP": softcap is not None, "num_warps": 4})
