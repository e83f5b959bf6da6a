"""Hopper (sm_90) backward tiles in Gluon, with precomputed global ``lse`` and ``delta``: one program per key tile
(128 keys) and kv head adds this block's dK, dV and dQ.

Same contract as :func:`ds_burst.kernels.triton_attn.bwd_step` for the calls :func:`applicable` accepts: what
:mod:`ds_burst.kernels.hopper_attn` covers (sm_90, fp16/bf16, ``D = Dv`` in {64, 128}, softcap or not, at least
128 rows, TMA-addressable q/k/v/dout), fp32 ``lse``/``delta`` rows TMA can read, an fp32 ``dq`` accumulator TMA can
address (heads side by side), fp32 ``dk``/``dv`` with a contiguous head dim, and ``deterministic=False``: dQ is
added with TMA reduce-adds from many programs (``deterministic=True`` stays on the ``tl`` kernels, whose separate
dQ pass adds none).

Partitions of one program (warp specialisation)::

    producer, 1 warp     K and V once (two 64-key halves; K again as two 64-column halves), then Q, dO, lse and
                         delta of every visible 64-row query tile of every query head of the kv head, into a
                         2-slot ring (TMA, mbarriers)
    consumer 0 and 1     4 warps each, 64 of the 128 keys each; step i:
                           S^T = K Q^T, dP^T = V dO^T            (wgmma, fp32 in registers)
                           P^T = exp2(S^T * scale * log2 e - lse * log2 e), masked by global positions
                             (softcap: T^T = tanh(S^T * scale / softcap), masked to -inf, then
                             P^T = exp2(T^T * softcap * log2 e - lse * log2 e))
                           dS^T = P^T * (dP^T - delta)           (softcap: times 1 - T^T * T^T, clamped to >= 0)
                           dV += P^T dO, dK += dS^T Q             (P^T, dS^T as register A operands)
                           dS^T -> shared memory (both halves, double-buffered; ready/free mbarriers)
                           dQ of step i - 1: dQ[:, wg * D/2 : (wg + 1) * D/2] = dS K over all 128 keys,
                             through a shared staging tile into a TMA reduce-add (fp32) on the accumulator
    epilogue             dK * scale and dV added to the fp32 accumulators (red.global.add.v2.f32)

dQ runs one step behind so that a warpgroup never waits for the other's dS^T of the step it is on: the two drift
apart by up to a step and their softmax phases stop coinciding (in lockstep the tensor cores idle through both).
"""

from __future__ import annotations

import torch

from ds_burst.kernels import tile_math
from ds_burst.kernels.fast_launch import Desc, Launcher
from ds_burst.kernels.hopper_common import AVAILABLE, desc_spec, tma_aligned, why_not

__all__ = ["applicable", "bwd_step"]

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from ds_burst.kernels.hopper_common import span, tanh_approx

    if hasattr(tma, "async_atomic_add"):  # public from triton 3.7 on
        _tma_add = tma.async_atomic_add
    else:  # triton 3.6: the builder's TMA reduce (cp.reduce.async.bulk.tensor ... .add)
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def _tma_add(tensor_desc, coord, src, _semantic=None):
            """``global[tensor_desc at coord] += src`` (shared memory, fp32) by TMA; rows outside the tensor are
            dropped."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)

    @gluon.jit
    def _program_keys(Hkv, Sq, Sk, delta0, win_l, win_r, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """This program's batch, kv head, first key row and query span (:func:`tile_math.span`, backward; the
        first tile 16-row aligned for the TMA reads of lse and delta, rows before the band masked to zero):
        ``(b, hk, n0, start, nq, n_a, n_b)`` with ``nq`` query tiles, the first ``n_a`` and those from
        ``n_a + n_b`` on masked; the same in every partition."""
        pid_bh = gl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        n0 = gl.program_id(0) * BLOCK_N
        start, n_a, n_b, n_c = span(n0, Sk, Sq, delta0, win_l, win_r, HAS_LO, HAS_HI, True, 16, BLOCK_N, BLOCK_M)
        return b, hk, n0, start, n_a + n_b + n_c, n_a, n_b

    @gluon.jit
    def _red_add_v2(ptrs, vals, ok):
        """``*ptrs += vals`` where ``ok``, as ``red.global.add.v2.f32`` on the two consecutive columns each thread
        holds in a wgmma accumulator (sm_90): half the atomic operations of one-float atomics, no layout change.
        ``ptrs`` of both elements of a pair point at the first (so the compiler keeps one address per pair)."""
        return gl.inline_asm_elementwise(
            asm="""{
            .reg .pred p;
            setp.ne.b32 p, $4, 0;
            @p red.relaxed.gpu.global.add.v2.f32 [$2], {$6, $7};
            mov.b32 $0, 0; mov.b32 $1, 0;
            }""",
            constraints="=r,=r,l,l,r,r,r,r",
            args=[ptrs.to(gl.int64, bitcast=True), ok.to(gl.int32), vals.to(gl.int32, bitcast=True)],
            dtype=gl.int32, is_pure=False, pack=2)

    @gluon.jit
    def _add_dq(dq_desc, stage, b, row, col, dq):
        """``dQ[b, row:, col:] += dq`` by a TMA reduce-add from the warpgroup's staging buffer ``stage`` (rows
        past the tensor are dropped); first waits until the previous reduce has read ``stage``."""
        tma.store_wait(0)
        stage.reshape([dq.shape[0], dq.shape[1]]).store(dq)
        fence_async_shared()
        _tma_add(dq_desc, [b, row, col], stage)

    @gluon.jit
    def _bwd_producer(descs, bufs, bars, outs, dims, wg, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
                      HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      KV_OUT: gl.constexpr, SOFTCAP: gl.constexpr):
        """One warp: K and V of the program's key tile (two row halves, and K again in two column halves for
        dQ), then Q, dO, lse and delta of every visible query tile of every query head of the kv head, in the
        consumers' order, into a ``STAGES``-slot ring."""
        q_desc, k_desc, kc_desc, v_desc, do_desc, lse_desc, dl_desc = descs
        q_smem, k_smem, kc_smem, v_smem, do_smem, lse_smem, dl_smem, ds_smem, dq_smem = bufs
        kv_bar, q_ready, do_ready, q_empty, do_empty, ds_ready, ds_free = bars
        Hkv, Sq, Sk, G, delta0, win_l, win_r, qk_scale, sm_scale, cap2 = dims
        HALF: gl.constexpr = BLOCK_N // 2
        b, hk, n0, start, nq, n_a, n_b = _program_keys(Hkv, Sq, Sk, delta0, win_l, win_r, HAS_LO, HAS_HI, BLOCK_M,
                                                       BLOCK_N)
        col_k = hk * HEAD_DIM
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes
                        + 2 * kc_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, n0, col_k], kv_bar, k_smem.index(0))
        tma.async_copy_global_to_shared(k_desc, [b, n0 + HALF, col_k], kv_bar, k_smem.index(1))
        tma.async_copy_global_to_shared(v_desc, [b, n0, col_k], kv_bar, v_smem.index(0))
        tma.async_copy_global_to_shared(v_desc, [b, n0 + HALF, col_k], kv_bar, v_smem.index(1))
        tma.async_copy_global_to_shared(kc_desc, [b, n0, col_k], kv_bar, kc_smem.index(0))
        tma.async_copy_global_to_shared(kc_desc, [b, n0, col_k + HEAD_DIM // 2], kv_bar, kc_smem.index(1))
        for it in range(G * nq):
            hh = it // nq
            row = start + (it - hh * nq) * BLOCK_M
            hq = hk * G + hh
            slot = it % STAGES
            ph = ((it // STAGES) & 1) ^ 1
            mbarrier.wait(q_empty.index(slot), ph)
            mbarrier.expect(q_ready.index(slot), q_desc.block_type.nbytes + lse_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, row, hq * HEAD_DIM], q_ready.index(slot), q_smem.index(slot))
            tma.async_copy_global_to_shared(lse_desc, [b, hq, row], q_ready.index(slot), lse_smem.index(slot))
            mbarrier.wait(do_empty.index(slot), ph)
            mbarrier.expect(do_ready.index(slot), do_desc.block_type.nbytes + dl_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [b, row, hq * HEAD_DIM], do_ready.index(slot),
                                            do_smem.index(slot))
            tma.async_copy_global_to_shared(dl_desc, [b, hq, row], do_ready.index(slot), dl_smem.index(slot))

    @gluon.jit
    def _bwd_consumer(descs, bufs, bars, outs, dims, wg, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
                      HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      KV_OUT: gl.constexpr, SOFTCAP: gl.constexpr):
        """One warpgroup: dK and dV of keys ``n0 + wg * BLOCK_N / 2`` onwards (half the tile), and dQ's columns
        ``wg * HEAD_DIM / 2`` onwards over all the tile's keys (both halves of dS^T, through shared memory).
        ``SOFTCAP``: logits ``tanh(q.k * qk_scale) * cap2`` (log2 domain) and dS times ``1 - tanh^2``, as in the
        ``tl`` kernels."""
        q_desc, k_desc, kc_desc, v_desc, do_desc, lse_desc, dl_desc = descs
        q_smem, k_smem, kc_smem, v_smem, do_smem, lse_smem, dl_smem, ds_smem, dq_smem = bufs
        kv_bar, q_ready, do_ready, q_empty, do_empty, ds_ready, ds_free = bars
        dq_desc, DK, DV, skb, sks, skh, svb, svs, svh = outs
        Hkv, Sq, Sk, G, delta0, win_l, win_r, qk_scale, sm_scale, cap2 = dims
        dtype: gl.constexpr = q_desc.dtype
        HALF: gl.constexpr = BLOCK_N // 2
        DQC: gl.constexpr = HEAD_DIM // 2
        b, hk, n0, start, nq, n_a, n_b = _program_keys(Hkv, Sq, Sk, delta0, win_l, win_r, HAS_LO, HAS_HI, BLOCK_M,
                                                       BLOCK_N)
        k0 = n0 + wg * HALF

        # S^T, dP^T: [HALF keys, BLOCK_M queries]; dK, dV: [HALF keys, HEAD_DIM]; dQ part: [BLOCK_M, DQC].
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, DQC, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        key_l: gl.constexpr = gl.SliceLayout(1, st_layout)
        qry_l: gl.constexpr = gl.SliceLayout(0, st_layout)

        k_tile = k_smem.index(wg).reshape([HALF, HEAD_DIM])
        v_tile = v_smem.index(wg).reshape([HALF, HEAD_DIM])
        kc_tile = kc_smem.index(wg).reshape([BLOCK_N, DQC])
        offs_k = k0 + gl.arange(0, HALF, layout=key_l)
        offs_q = gl.arange(0, BLOCK_M, layout=qry_l)
        dk = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
        b64 = b.to(gl.int64)
        dq_stage = dq_smem.index(wg)
        mbarrier.wait(kv_bar, phase=0)
        n_it = G * nq
        prev_m = Sq  # query rows and dQ column of the previous step, whose dQ this step adds (none before step 0)
        prev_c = hk * G * HEAD_DIM + wg * DQC

        for it in range(n_it):
            hh = it // nq
            t = it - hh * nq
            m = start + t * BLOCK_M
            slot = it % STAGES
            ph = (it // STAGES) & 1
            par = it & 1
            q_tile = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
            do_tile = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])

            mbarrier.wait(q_ready.index(slot), ph)
            st_tok = warpgroup_mma(k_tile, q_tile.permute((1, 0)), gl.zeros([HALF, BLOCK_M], gl.float32, st_layout),
                                   use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(slot), ph)
            dpt_tok = warpgroup_mma(v_tile, do_tile.permute((1, 0)),
                                    gl.zeros([HALF, BLOCK_M], gl.float32, st_layout), use_acc=False, is_async=True)
            qm = m + offs_q
            lse = lse_smem.index(slot).reshape([BLOCK_M]).load(qry_l)
            # rows past Sq (zero-filled by TMA) and rows that saw no key contribute nothing
            lse2 = gl.where((lse == float("-inf")) | (qm >= Sq), float("inf"), lse * 1.4426950408889634)
            st = warpgroup_mma_wait(num_outstanding=1, deps=(st_tok,))
            if SOFTCAP:  # logits tanh(S^T * qk_scale) * cap2 (qk_scale = scale / softcap, cap2 = softcap * log2(e))
                tt = tanh_approx(st * qk_scale)
            else:
                pt = gl.exp2(st * qk_scale - lse2[None, :])
            if t < n_a or t >= n_a + n_b:
                # Key j sees queries j - delta0 - win_r .. j - delta0 + win_l: bounds per key row.
                ok = (qm < Sq)[None, :] & (offs_k < Sk)[:, None]
                if HAS_LO:
                    ok = ok & (qm[None, :] <= (offs_k - delta0 + win_l)[:, None])
                if HAS_HI:
                    ok = ok & (qm[None, :] >= (offs_k - delta0 - win_r)[:, None])
                if SOFTCAP:  # -inf: P^T = 0 and 1 - T^2 clamped to 0 below (T^T alone lives through the branch)
                    tt = gl.where(ok, tt, float("-inf"))
                else:
                    pt = gl.where(ok, pt, 0.0)
            if SOFTCAP:  # P^T of the capped logits; d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2, in [0, 1]
                pt = gl.exp2(tt * cap2 - lse2[None, :])
                gt = gl.maximum(1.0 - tt * tt, 0.0)
            dlt = dl_smem.index(slot).reshape([BLOCK_M]).load(qry_l)
            dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt_tok,))
            dst = pt * (dpt - dlt[None, :])
            if SOFTCAP:  # as the tl kernels: dS^T = P^T (dP^T - delta) (1 - T^2), scale applied at the end
                dst = dst * gt
            pt16 = gl.convert_layout(pt.to(dtype), a_layout)
            dv_tok = warpgroup_mma(pt16, do_tile, dv, is_async=True)
            ds16 = dst.to(dtype)
            # dS^T of both warpgroups goes through shared memory (double-buffered by parity) for dQ = dS K.
            mbarrier.wait(ds_free.index(par), ((it // 2) & 1) ^ 1)
            if wg == 0:  # this warpgroup's half of the rows (slices take constant offsets)
                ds_smem.index(par).slice(0, HALF, dim=0).store(ds16)
            else:
                ds_smem.index(par).slice(HALF, HALF, dim=0).store(ds16)
            ds_op = gl.convert_layout(ds16, a_layout)
            dk_tok = warpgroup_mma(ds_op, q_tile, dk, is_async=True)
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(par), count=1)
            # dQ of the previous step, one step behind, so that neither warpgroup waits for the other's dS^T of
            # this step (step 0 multiplies a buffer not yet written and adds nothing: prev_m = Sq).
            mbarrier.wait(ds_ready.index(1 - par), ((it + 1) // 2 + 1) & 1)
            dq_tok = warpgroup_mma(ds_smem.index(1 - par).permute((1, 0)), kc_tile,
                                   gl.zeros([BLOCK_M, DQC], gl.float32, dq_layout), use_acc=False, is_async=True)
            dv, dk, dq, pt16, ds_op = warpgroup_mma_wait(num_outstanding=0,
                                                         deps=(dv_tok, dk_tok, dq_tok, pt16, ds_op))
            mbarrier.arrive(q_empty.index(slot), count=1)
            mbarrier.arrive(do_empty.index(slot), count=1)
            mbarrier.arrive(ds_free.index(1 - par), count=1, pred=it > 0)
            _add_dq(dq_desc, dq_stage, b, prev_m, prev_c, dq * sm_scale)
            prev_m = m
            prev_c = (hk * G + hh) * HEAD_DIM + wg * DQC

        if n_it > 0:  # the last step's dQ
            last = n_it - 1
            mbarrier.wait(ds_ready.index(last & 1), (last // 2) & 1)
            dq = warpgroup_mma(ds_smem.index(last & 1).permute((1, 0)), kc_tile,
                               gl.zeros([BLOCK_M, DQC], gl.float32, dq_layout), use_acc=False)
            _add_dq(dq_desc, dq_stage, b, prev_m, prev_c, dq * sm_scale)
        tma.store_wait(0)

        # dK * scale and dV: stored (KV_OUT) or added to the accumulators (this program is the only one writing
        # these rows)
        rows_k = gl.arange(0, HALF, layout=gl.SliceLayout(1, acc_layout))
        cols_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        if not KV_OUT:
            cols_d = (cols_d // 2) * 2  # pairs address their first column (_red_add_v2)
        k_ok = ((k0 + rows_k) < Sk)[:, None] & (cols_d >= 0)[None, :]
        hk64 = hk.to(gl.int64)
        k064 = k0.to(gl.int64)
        # one pointer tensor at a time (each takes 2 registers an element)
        dk_ptrs = (DK + b64 * skb + hk64 * skh + k064 * sks) + (rows_k[:, None] * sks + cols_d[None, :])
        if KV_OUT:
            gl.store(dk_ptrs, dk * sm_scale, mask=k_ok)
        else:
            _red_add_v2(dk_ptrs, dk * sm_scale, k_ok)
        dv_ptrs = (DV + b64 * svb + hk64 * svh + k064 * svs) + (rows_k[:, None] * svs + cols_d[None, :])
        if KV_OUT:
            gl.store(dv_ptrs, dv, mask=k_ok)
        else:
            _red_add_v2(dv_ptrs, dv, k_ok)

    @gluon.jit(do_not_specialize=["delta0", "win_l", "win_r"])
    def _bwd_kernel(q_desc, k_desc, kc_desc, v_desc, do_desc, lse_desc, dl_desc, dq_desc, DK, DV,
                    skb, sks, skh, svb, svs, svh,
                    Hkv, Sq, Sk, G, delta0, win_l, win_r, qk_scale, sm_scale, cap2,
                    HAS_LO: gl.constexpr, HAS_HI: gl.constexpr, HEAD_DIM: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, KV_OUT: gl.constexpr,
                    SOFTCAP: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        HALF: gl.constexpr = BLOCK_N // 2
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_DIM], do_desc.layout)
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, 1, BLOCK_M], lse_desc.layout)
        dl_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, 1, BLOCK_M], dl_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [2, 1, HALF, HEAD_DIM], k_desc.layout)
        kc_smem = gl.allocate_shared_memory(dtype, [2, 1, BLOCK_N, HEAD_DIM // 2], kc_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, 1, HALF, HEAD_DIM], v_desc.layout)
        ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, 1, BLOCK_M, HEAD_DIM // 2], dq_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        do_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # both consumer warpgroups release a slot
            mbarrier.init(do_empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)
            mbarrier.init(ds_free.index(i), count=2)
        fence_async_shared()
        descs = (q_desc, k_desc, kc_desc, v_desc, do_desc, lse_desc, dl_desc)
        bufs = (q_smem, k_smem, kc_smem, v_smem, do_smem, lse_smem, dl_smem, ds_smem, dq_smem)
        bars = (kv_bar, q_ready, do_ready, q_empty, do_empty, ds_ready, ds_free)
        outs = (dq_desc, DK, DV, skb, sks, skh, svb, svs, svh)
        dims = (Hkv, Sq, Sk, G, delta0, win_l, win_r, qk_scale, sm_scale, cap2)
        zero = gl.program_id(0) * 0  # the warpgroup index, as a run-time value (the workers share one signature)
        gl.warp_specialize([
            (_bwd_consumer, (descs, bufs, bars, outs, dims, zero, HAS_LO, HAS_HI, HEAD_DIM, BLOCK_M, BLOCK_N,
                             STAGES, KV_OUT, SOFTCAP)),
            (_bwd_consumer, (descs, bufs, bars, outs, dims, zero + 1, HAS_LO, HAS_HI, HEAD_DIM, BLOCK_M, BLOCK_N,
                             STAGES, KV_OUT, SOFTCAP)),
            (_bwd_producer, (descs, bufs, bars, outs, dims, zero, HAS_LO, HAS_HI, HEAD_DIM, BLOCK_M, BLOCK_N,
                             STAGES, KV_OUT, SOFTCAP)),
        ], [4, 1], [240, 24])


# (BLOCK_M queries per step, BLOCK_N keys per program, STAGES of the Q/dO ring)
_CONFIGS: dict[int, tuple[int, int, int]] = {128: (64, 128, 2), 64: (64, 128, 2)}


_ROW_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3) if AVAILABLE else None
"""Unswizzled fp32 rows: the shared layout of the lse / delta blocks."""


def _row_desc(t: torch.Tensor, rows: int) -> Desc:
    """TMA descriptor over the fp32 ``t [B, H, S]`` (``lse``, ``delta``), block ``[1, 1, rows]``."""
    return Desc(t, tuple(t.shape), tuple(t.stride()), (1, 1, rows), _ROW_LAYOUT)


def _tma_acc(t: torch.Tensor) -> bool:
    """Whether TMA can address the fp32 ``[B, S, H, D]`` accumulator ``t`` as ``[B, S, H * D]`` (heads side by
    side, 16-byte aligned)."""
    return t.dtype == torch.float32 and t.stride(3) == 1 and t.stride(2) == t.shape[3] and tma_aligned(t)


def _tma_rows(t: torch.Tensor) -> bool:
    """Whether the fp32 ``[B, H, S]`` tensor ``t`` can be read by TMA (contiguous rows, 16-byte aligned)."""
    return t.dtype == torch.float32 and t.stride(2) == 1 and tma_aligned(t)


_BWD = Launcher(_bwd_kernel, {"maxnreg": 168}) if AVAILABLE else None


def applicable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
               delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, softcap: float | None,
               deterministic: bool, kv_out: bool = False) -> bool:
    """Whether :func:`bwd_step` runs this call: the forward's rules (:func:`hopper_common.why_not`) for q/k/v and
    dout, ``deterministic=False`` (dQ by atomics), TMA-readable fp32 ``lse``/``delta``, an fp32 ``dq`` TMA can
    address (heads side by side) and fp32 ``dk``/``dv`` with contiguous head dims (with ``kv_out``, the outputs
    ``dk``/``dv`` of :func:`bwd_step` may have any float dtype)."""
    if deterministic or why_not(q, k, v, softcap) is not None:
        return False
    if why_not(dout, k, v, None) is not None or dout.dtype != q.dtype:
        return False
    if not (_tma_rows(lse) and _tma_rows(delta)):
        return False
    return _tma_acc(dq) and all((kv_out and t.is_floating_point() or t.dtype == torch.float32) and t.stride(3) == 1
                                for t in (dk, dv))


def bwd_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
             delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, *, scale: float,
             q_offset: int = 0, k_offset: int = 0, causal: bool = False, window: tuple[int, int] = (-1, -1),
             kv_out: bool = False, softcap: float | None = None) -> None:
    """Add this block's gradients to the fp32 ``dq``, ``dk``, ``dv`` (``triton_attn.bwd_step``'s contract, for
    the calls :func:`applicable` accepts; the caller checks shapes).

    ``kv_out=True``: ``dk`` and ``dv`` are outputs, not accumulators: every row is written (rounded once to
    their dtype, which may be any float type) and their contents are ignored; ``dq`` is still added to. ``softcap``:
    logits ``softcap * tanh(scale * q.k / softcap)``, as in the forward that produced ``lse``."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    has_lo, has_hi, win_l, win_r = tile_math.mask_args(causal, window)
    qk_scale, cap2 = tile_math.softcap_args(scale, softcap)
    bm, bn, stages = _CONFIGS[d]
    grid = (-(-sk // bn), b * hkv)
    _BWD(grid, (desc_spec(q, bm), desc_spec(k, bn // 2), desc_spec(k, bn, d // 2), desc_spec(v, bn // 2),
                desc_spec(dout, bm), _row_desc(lse, bm), _row_desc(delta, bm), desc_spec(dq, bm, d // 2)),
         (dk, dv, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
          hkv, sq, sk, hq // hkv, q_offset - k_offset, win_l, win_r, qk_scale, float(scale), cap2),
         {"HAS_LO": has_lo, "HAS_HI": has_hi, "HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "STAGES": stages,
          "KV_OUT": kv_out, "SOFTCAP": softcap is not None, "num_warps": 4})
