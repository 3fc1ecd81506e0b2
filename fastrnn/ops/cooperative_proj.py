"""Strategy "cooperative" for an LSTM with ``proj_size`` (LSTMP): one launch per layer and pass,
two grid barriers per step.

The layout is the plain cooperative kernels' (``ops/cooperative.py``): a group (one direction,
one batch tile) has NJ programs, the batch is the dots' N dimension, and program j owns
``BLOCK_H`` cell units, keeping their rows of W_hh [4*BLOCK_H, P] (the gates stacked: one 64-row
product, wgmma on sm_90) in shared memory for the whole sequence, in both passes. With a
projection the state h (P values) and the cell (H values) live in different spaces, so each
step has two exchanges. Programs j < ceil(P / BLOCK_H) also own BLOCK_H rows of the projected
state (P < H, so some program owns every row).

Forward step s:

A. every program: ``W_j h_{t-1}`` (K = P, h read from L2), the cell of its units, their
   ``r = o * tanh(c)`` to L2. Barrier.
B. owners of state rows: ``h_t[rows] = W_hr[rows] r`` (K = H; W_hr's [BLOCK_H, H] rows
   streamed, ``_streamed_product``: mma.sync), zoneout and lengths in the state's space, y and
   h to L2. Barrier.

Backward step k (forward step s = T-1-k):

1. owners of state rows: ``dh_t[rows]`` = dy + what bypassed W_hh + the sum of every program's
   partial product of the step before (a reduce-scatter, as the plain cooperative backward);
   clipping, resets and zoneout in the state's space; dh to L2 (and to ``dhp`` for dW_hr).
   Barrier.
2. every program: ``dr[own] = W_hr[:, own]^T dh`` (W_hr's columns of its units streamed, K = P),
   the cell's backward, its gate gradients dG_j and its partial product ``W_j^T dG_j`` [P, N]
   for every state row. Barrier.

A last backward step forms dh0 (phase 1) and dc0 (phase 2). The buffers are single: each is
written in one phase and read in the next, with a barrier between and a barrier before it is
written again. Under the Triton interpreter each phase is its own launch (the launch boundary is
the barrier), as the LayerNorm cooperative kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import (LSTM, cell_backward, cell_forward, clamp_grad, collect_at_reset,
                   entering_reset, load_gate_tiles, load_gates, next_time,
                   positive, prev_time, save_gates, split_gates, stack_gates, step_time,
                   store_gates, zone_mix, zone_split)
from . import cooperative
from .args import BackwardArgs, ForwardArgs, acc_dtype
from .cooperative import (BLOCK_N, FLAG_STRIDE, _LENGTHS, _await, _cell_states, _group,
                          _launch_options, _launch_state, _program, _publish, _slice_tiles,
                          _state_tile, _taking_step, _tile_partial, _tile_product, _watch,
                          block_j, check_errors, column_tiles)
from .select import (DeviceSpec, DoesNotFit, KernelConfig, Plan, Problem, block, launch_kernel,
                     operand_copies)

_BWD_OPTIONAL = {**_LENGTHS, "HAS_DCELL": lambda a: a["dcell_ptr"] is not None,
                 "CLIP": lambda a: a["clip"] > 0}


@triton.jit
def _streamed_product(w_ptr, stride_m, stride_k, o_m, m_m, x_ptr, rows, m_n, K,
                      DR_K: tl.constexpr, W_DTYPE: tl.constexpr, ACC: tl.constexpr,
                      PRECISION: tl.constexpr):
    """``W x`` for a batch chunk, W [M, K] (element (m, k) at ``w_ptr + m * stride_m + k *
    stride_k``: W_hr's rows or its columns, read each step, from L1 after the first) times K
    values per batch row read from L2 at ``x_ptr + rows``; DR_K of K at a time, [M, N] in ACC.
    A product of 16 rows is mma.sync, whose operands Triton holds in registers: held whole and
    resident, W_hr's 16 rows or columns spilled (sm_90 bf16 H=1024 P=256 backward: 255
    registers and 4 spill instructions per step with 8 warps; TF32 H=255 forward: 2)."""
    acc = tl.zeros([o_m.shape[0], m_n.shape[0]], dtype=ACC)
    for k0 in range(0, K, DR_K):
        o_k = k0 + tl.arange(0, DR_K)
        m_k = o_k < K
        w = tl.load(w_ptr + o_m[:, None] * stride_m + o_k[None, :] * stride_k,
                    mask=m_m[:, None] & m_k[None, :], other=0.0)
        x = tl.load(x_ptr + rows + o_k[:, None], mask=m_k[:, None] & m_n[None, :], other=0.0,
                    cache_modifier=".cg")
        acc = tl.dot(w, x.to(W_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _product(w0, w1, w2, w3, src_ptr, rows, rm_ptr, o_c, m_n, K, KC: tl.constexpr,
             NKC: tl.constexpr, HAS_RMASK: tl.constexpr, W_DTYPE: tl.constexpr,
             PRECISION: tl.constexpr):
    """``W x`` for a batch chunk: resident tiles w0..w3 [M, KC] (NKC of them) times the chunk's
    K values read from L2 at ``src_ptr + rows`` (masked by the recurrent dropout mask at
    ``rm_ptr + rows``), a column tile at a time; [M, N] (fp32; fp64 for fp64 layers)."""
    x = _state_tile(src_ptr, rows, rm_ptr, rows, o_c, m_n, K, HAS_RMASK, W_DTYPE)
    acc, _ = _tile_product(w0, w0, x, None, None, 1, PRECISION)
    if NKC >= 2:
        x = _state_tile(src_ptr, rows, rm_ptr, rows, o_c + KC, m_n, K, HAS_RMASK, W_DTYPE)
        acc, _ = _tile_product(w1, w1, x, acc, None, 1, PRECISION)
    if NKC == 4:
        x = _state_tile(src_ptr, rows, rm_ptr, rows, o_c + 2 * KC, m_n, K, HAS_RMASK, W_DTYPE)
        acc, _ = _tile_product(w2, w2, x, acc, None, 1, PRECISION)
        x = _state_tile(src_ptr, rows, rm_ptr, rows, o_c + 3 * KC, m_n, K, HAS_RMASK, W_DTYPE)
        acc, _ = _tile_product(w3, w3, x, acc, None, 1, PRECISION)
    return acc


@triton.heuristics(_LENGTHS)
@triton.jit(do_not_specialize=["q_begin", "q_end", "T", "wait_ns"])
def _lstmp_fwd_coop_kernel(
    xg_ptr, stride_xt, stride_xb,      # [T, B, D*4*H] input projections
    w_hh_ptr, w_hr_ptr, len_ptr,       # [D, 4*H, P], [D, P, H], [B]
    rs_ptr, stride_rt, stride_rb,      # [T, B] uint8 episode starts (resets)
    rm_ptr,                            # [D, B, P] recurrent dropout mask
    zh_ptr, zc_ptr, zf_ptr,            # zoneout: [T, B, D, P], [T, B, D, H] uint8; [2] factors
    h0_ptr, c0_ptr,                    # [D, B, P], [D, B, H] initial states
    y_ptr, stride_yt, stride_yb,       # [T, B, D*P]
    gates_ptr, cell_ptr,               # saved for backward: [T, B, D, 4*H], [T, B, D, H]
    hbuf_ptr,                          # [D, B, P] the state entering the step (starts as h0)
    rbuf_ptr,                          # [D, B, H] the step's o * tanh(c), W_hh's dtype
    cbuf_ptr,                          # [D, B, H] the cell state (accumulation dtype)
    flags_ptr, err_ptr, wait_ns,       # [D * NBT, NJ * 8] int32 zeroed; [1] int32; bound
    q_begin, q_end, T, B, H, P, BT,    # phases to run (2 per step); batch rows per group
    SAVE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    NKC: tl.constexpr, DR_K: tl.constexpr, SYNC: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_RMASK: tl.constexpr,
    ZH: tl.constexpr, ZC: tl.constexpr, FAST: tl.constexpr,
):
    """Phase q is step q // 2, part A (q even) or B (module docstring)."""
    i_j, i_bt, i_d, NJ, NBT, D = _program()
    W_DTYPE = w_hh_ptr.dtype.element_ty
    Y_DTYPE = y_ptr.dtype.element_ty
    o_u = i_j * BLOCK_H + tl.arange(0, BLOCK_H)   # own cell units
    m_u = o_u < H
    m_p = o_u < P                                  # own state rows (the same offsets)
    # Resident: W_hh's rows of the own units, [4*BLOCK_H, P] in NKC column tiles of KC.
    KC: tl.constexpr = BLOCK_K // NKC
    o_c = tl.arange(0, KC)
    a0, _b0, a1, _b1, a2, _b2, a3, _b3 = _slice_tiles(w_hh_ptr, i_d, i_j, H, P, 4, 4, BLOCK_H,
                                                      KC, NKC)
    p_flags, b_lo, b_hi = _group(flags_ptr, i_bt, i_d, NJ, NBT, B, BT)
    alive = 1
    # The input projections of the first batch chunk, one step ahead (loaded while waiting).
    o_n = b_lo + tl.arange(0, BLOCK_N)
    p_x = xg_ptr + step_time(q_begin // 2, i_d, T).to(tl.int64) * stride_xt \
        + o_n.to(tl.int64)[None, :] * stride_xb + i_d * (4 * H) + o_u[:, None]
    n0, n1, n2, n3 = load_gate_tiles(p_x, m_u[:, None] & (o_n < b_hi)[None, :], H, 4)

    for q in range(q_begin, q_end):
        s = q // 2
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        if q % 2 == 0:
            # A: the gates of the own units from every state row, the cell, r to L2.
            for c in range(b_lo, b_hi, BLOCK_N):
                o_n = c + tl.arange(0, BLOCK_N)
                m_n = o_n < b_hi
                on64 = o_n.to(tl.int64)
                m_un = m_u[:, None] & m_n[None, :]
                acc = _product(a0, a1, a2, a3, hbuf_ptr, (i_d * B + on64)[None, :] * P, rm_ptr,
                               o_c, m_n, P, KC, NKC, HAS_RMASK, W_DTYPE, PRECISION)
                q0, q1, q2, q3 = split_gates(acc.to(ACC), 4, BLOCK_H, BLOCK_N)
                state = (i_d * B + on64)[None, :] * H + o_u[:, None]   # own units' rows
                c_prev = tl.load(cbuf_ptr + state, mask=m_un, other=0.0).to(ACC)
                if c == b_lo:
                    x0, x1, x2, x3 = n0, n1, n2, n3
                else:
                    p_x = xg_ptr + t64 * stride_xt + on64[None, :] * stride_xb + i_d * (4 * H) \
                        + o_u[:, None]
                    x0, x1, x2, x3 = load_gate_tiles(p_x, m_un, H, 4)
                r, c_new, s0, s1, s2, s3 = cell_forward(x0, x1, x2, x3, q0, q1, q2, q3, c_prev,
                                                        c_prev, 0.0, LSTM, False, ACC, FAST)
                act = _taking_step(len_ptr, t, o_n, m_n, HAS_LENGTHS)
                p_row = (t64 * B + on64)[None, :] * D + i_d  # row of the saved activations
                if SAVE:
                    save_gates(gates_ptr + p_row * (4 * H) + o_u[:, None], s0, s1, s2, s3, m_un,
                               H)
                if ZC != 0:
                    c_new = zone_mix(c_new, c_prev, zc_ptr, p_row * H + o_u[:, None], m_un,
                                     zf_ptr, 1, ZC)
                c_new = tl.where(act, c_new, c_prev)
                c_next = c_new
                if HAS_RESETS:  # an episode starts at the next step: its initial cell state
                    start = entering_reset(rs_ptr, stride_rt, stride_rb, s + 1, i_d, T, o_n,
                                           m_n)[None, :] > 0
                    c_next = tl.where(start, tl.load(c0_ptr + state, mask=m_un,
                                                     other=0.0).to(ACC), c_new)
                tl.store(cbuf_ptr + state, c_next.to(cbuf_ptr.dtype.element_ty), mask=m_un)
                if SAVE:
                    tl.store(cell_ptr + p_row * H + o_u[:, None],
                             c_new.to(cell_ptr.dtype.element_ty), mask=m_un,
                             eviction_policy="evict_first")
                tl.store(rbuf_ptr + state, tl.where(m_un, r, 0.0).to(W_DTYPE), mask=m_un)
        elif i_j * BLOCK_H < P:
            # B: the own state rows, W_hr[rows] r, from every unit's r.
            for c in range(b_lo, b_hi, BLOCK_N):
                o_n = c + tl.arange(0, BLOCK_N)
                m_n = o_n < b_hi
                on64 = o_n.to(tl.int64)
                m_pn = m_p[:, None] & m_n[None, :]
                h_new = _streamed_product(w_hr_ptr + i_d * (P * H), H, 1, o_u, m_p, rbuf_ptr,
                                          (i_d * B + on64)[None, :] * H, m_n, H, DR_K, W_DTYPE,
                                          ACC, PRECISION).to(ACC)
                state = (i_d * B + on64)[None, :] * P + o_u[:, None]   # own state rows
                h_prev = tl.load(hbuf_ptr + state, mask=m_pn, other=0.0,
                                 cache_modifier=".cg").to(ACC)
                p_row = (t64 * B + on64)[None, :] * D + i_d
                if ZH != 0:
                    h_new = zone_mix(h_new, h_prev, zh_ptr, p_row * P + o_u[:, None], m_pn,
                                     zf_ptr, 0, ZH)
                act = _taking_step(len_ptr, t, o_n, m_n, HAS_LENGTHS)
                # The state is stored, and carried, at the precision of the layer's dtype.
                h_new = tl.where(act, h_new.to(Y_DTYPE).to(ACC), h_prev)
                tl.store(y_ptr + t64 * stride_yt + on64[None, :] * stride_yb + i_d * P
                         + o_u[:, None], h_new.to(Y_DTYPE), mask=m_pn,
                         eviction_policy="evict_first")
                h_next = h_new
                if HAS_RESETS:
                    start = entering_reset(rs_ptr, stride_rt, stride_rb, s + 1, i_d, T, o_n,
                                           m_n)[None, :] > 0
                    h_next = tl.where(start, tl.load(h0_ptr + state, mask=m_pn,
                                                     other=0.0).to(ACC), h_new)
                tl.store(hbuf_ptr + state, h_next.to(hbuf_ptr.dtype.element_ty), mask=m_pn)
        if SYNC and q + 1 < q_end:  # between phases only
            _publish(p_flags + i_j * FLAG_STRIDE, q + 1)
        if q % 2 == 1:  # the next step's input projections, while the others finish
            o_n = b_lo + tl.arange(0, BLOCK_N)
            p_x = xg_ptr + next_time(s, i_d, T) * stride_xt \
                + o_n.to(tl.int64)[None, :] * stride_xb + i_d * (4 * H) + o_u[:, None]
            n0, n1, n2, n3 = load_gate_tiles(p_x, m_u[:, None] & (o_n < b_hi)[None, :], H, 4)
        if SYNC and q + 1 < q_end:
            alive = _await(p_flags, NJ, q + 1, err_ptr, alive, wait_ns, BLOCK_J, FLAG_STRIDE)


@triton.heuristics(_BWD_OPTIONAL)
@triton.jit(do_not_specialize=["q_begin", "q_end", "T", "wait_ns"])
def _lstmp_bwd_coop_kernel(
    dy_ptr, stride_dyt, stride_dyb,    # [T, B, D*P] gradient of the outputs
    c0_ptr, gates_ptr, cell_ptr,       # [D, B, H]; saved activations
    w_hh_ptr, w_hr_ptr, len_ptr,       # [D, 4*H, P], [D, P, H], [B]
    rs_ptr, stride_rt, stride_rb,      # [T, B] uint8 episode starts (resets)
    rm_ptr,                            # [D, B, P] recurrent dropout mask
    zh_ptr, zc_ptr, zf_ptr,            # zoneout: [T, B, D, P], [T, B, D, H] uint8; [2] factors
    dcell_ptr,                         # [T, B, D, H] gradient of every step's cell state
    dgx_ptr, dhp_ptr,                  # [T, B, D, 4*H]; [T, B, D*P] dh per step (for dW_hr)
    dh0_ptr, dc0_ptr,                  # [D, B, P], [D, B, H]
    pbuf_ptr,                          # [D, NJ, B, P] each program's partial product
    dxbuf_ptr,                         # [D, B, P] the step's dh, W_hh's dtype
    dhbuf_ptr, dcbuf_ptr,              # [D, B, P] carried dh (what bypasses W_hh), [D, B, H] dc
    d0buf_ptr,                         # [D, B, P + H] dh0 and dc0 collected at resets
    flags_ptr, err_ptr, wait_ns, clip,
    q_begin, q_end, T, B, H, P, BT,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    NKC: tl.constexpr, JSUM: tl.constexpr, DR_K: tl.constexpr, SYNC: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_RMASK: tl.constexpr,
    HAS_DCELL: tl.constexpr, CLIP: tl.constexpr, ZH: tl.constexpr, ZC: tl.constexpr,
    FAST: tl.constexpr,
):
    """Phase q is backward step k = q // 2 (forward step s = T-1-k), part 1 (q even) or 2
    (module docstring); step k == T forms dh0 and dc0."""
    i_j, i_bt, i_d, NJ, NBT, D = _program()
    W_DTYPE = w_hh_ptr.dtype.element_ty
    P_DTYPE = pbuf_ptr.dtype.element_ty
    o_u = i_j * BLOCK_H + tl.arange(0, BLOCK_H)
    m_u = o_u < H
    m_p = o_u < P
    KC: tl.constexpr = BLOCK_K // NKC
    o_c = tl.arange(0, KC)
    a0, _b0, a1, _b1, a2, _b2, a3, _b3 = _slice_tiles(w_hh_ptr, i_d, i_j, H, P, 4, 4, BLOCK_H,
                                                      KC, NKC)
    p_flags, b_lo, b_hi = _group(flags_ptr, i_bt, i_d, NJ, NBT, B, BT)
    o_js = tl.arange(0, JSUM)
    alive = 1

    for q in range(q_begin, q_end):
        k = q // 2
        last = k == T                  # past the last step: only dh0 and dc0 remain
        s = tl.maximum(T - 1 - k, 0)
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        if q % 2 == 0:
            if i_j * BLOCK_H < P:
                # 1: dh of the own state rows.
                for c in range(b_lo, b_hi, BLOCK_N):
                    o_n = c + tl.arange(0, BLOCK_N)
                    m_n = o_n < b_hi
                    on64 = o_n.to(tl.int64)
                    m_pn = m_p[:, None] & m_n[None, :]
                    state = (i_d * B + on64)[None, :] * P + o_u[:, None]
                    dh = tl.load(dhbuf_ptr + state, mask=m_pn, other=0.0)
                    # Every program's partial product of the step before (none at k = 0),
                    # summed in a fixed order, JSUM at a time.
                    has_q = positive(k, o_n)[None, :] & m_n[None, :]
                    rec = tl.zeros([BLOCK_H, BLOCK_N], dtype=ACC)
                    p_in = pbuf_ptr + (((i_d * NJ).to(tl.int64) * B + on64[None, None, :]) * P
                                       + o_u[None, :, None])
                    for j in range(0, NJ, JSUM):
                        m_j = ((j + o_js) < NJ)[:, None, None] & m_pn[None, :, :] \
                            & has_q[None, :, :]
                        rec += tl.sum(tl.load(p_in + ((j + o_js).to(tl.int64) * B
                                                      * P)[:, None, None],
                                              mask=m_j, other=0.0,
                                              cache_modifier=".cg").to(ACC), axis=0)
                    if HAS_RMASK:  # the product saw mask * h
                        rec = rec * tl.load(rm_ptr + state, mask=m_pn, other=0.0).to(ACC)
                    dh = dh + rec
                    # dh belongs to the state that entered forward step s + 1 (0 at k == T).
                    if CLIP:
                        dh = tl.where(has_q, clamp_grad(dh, clip, CLIP), dh)
                    if HAS_RESETS:
                        start = entering_reset(rs_ptr, stride_rt, stride_rb, T - k, i_d, T, o_n,
                                               m_n)[None, :] > 0
                        dh = collect_at_reset(d0buf_ptr + (i_d * B + on64)[None, :] * (P + H)
                                              + o_u[:, None], dh, m_pn, start, last)
                    if last:
                        tl.store(dh0_ptr + state, dh.to(dh0_ptr.dtype.element_ty), mask=m_pn)
                    else:
                        p_row = (t64 * B + on64)[None, :] * D + i_d
                        dh += tl.load(dy_ptr + t64 * stride_dyt + on64[None, :] * stride_dyb
                                      + i_d * P + o_u[:, None], mask=m_pn, other=0.0).to(ACC)
                        dh_zone = dh * 0.0
                        if ZH != 0:  # zoneout: d_h * dh to the state before
                            dh, dh_zone = zone_split(dh, zh_ptr, p_row * P + o_u[:, None], m_pn,
                                                     zf_ptr, 0, ZH)
                        act = _taking_step(len_ptr, t, o_n, m_n, HAS_LENGTHS)
                        tl.store(dhp_ptr + p_row * P + o_u[:, None],
                                 tl.where(act, dh, 0.0).to(dhp_ptr.dtype.element_ty), mask=m_pn)
                        tl.store(dxbuf_ptr + state, tl.where(m_pn, dh, 0.0).to(W_DTYPE),
                                 mask=m_pn)
                        # Rows past their length took no step: dh passes through.
                        tl.store(dhbuf_ptr + state, tl.where(act, 0.0, dh) + dh_zone, mask=m_pn)
        else:
            # 2: the own units' cell backward, gate gradients, partial product.
            t_prev = prev_time(t, i_d, T)
            for c in range(b_lo, b_hi, BLOCK_N):
                o_n = c + tl.arange(0, BLOCK_N)
                m_n = o_n < b_hi
                on64 = o_n.to(tl.int64)
                m_un = m_u[:, None] & m_n[None, :]
                state = (i_d * B + on64)[None, :] * H + o_u[:, None]
                has_q = positive(k, o_n)[None, :] & m_n[None, :]
                dc = tl.load(dcbuf_ptr + state, mask=m_un, other=0.0)
                if CLIP:
                    dc = tl.where(has_q, clamp_grad(dc, clip, CLIP), dc)
                if HAS_RESETS:
                    start = entering_reset(rs_ptr, stride_rt, stride_rb, T - k, i_d, T, o_n,
                                           m_n)[None, :] > 0
                    dc = collect_at_reset(d0buf_ptr + (i_d * B + on64)[None, :] * (P + H) + P
                                          + o_u[:, None], dc, m_un, start, last)
                if last:
                    tl.store(dc0_ptr + state, dc.to(dc0_ptr.dtype.element_ty), mask=m_un)
                else:
                    dr = _streamed_product(w_hr_ptr + i_d * (P * H), 1, H, o_u, m_u, dxbuf_ptr,
                                           (i_d * B + on64)[None, :] * P, m_n, P, DR_K, W_DTYPE,
                                           ACC, PRECISION).to(ACC)
                    has_prev = positive(s, o_n)[None, :]
                    if HAS_RESETS:
                        has_prev = has_prev & (entering_reset(rs_ptr, stride_rt, stride_rb, s,
                                                              i_d, T, o_n, m_n)[None, :] == 0)
                    p_row = (t64 * B + on64)[None, :] * D + i_d
                    p_row_prev = (t_prev * B + on64)[None, :] * D + i_d
                    s0, s1, s2, s3 = load_gates(gates_ptr + p_row * (4 * H) + o_u[:, None], m_un,
                                                H, ACC)
                    c_t, c_prev, dc, dc_zone = _cell_states(
                        cell_ptr, c0_ptr, dcell_ptr, zc_ptr, zf_ptr, p_row, p_row_prev, state,
                        o_u, m_un, has_prev, dc, s0, s1, s2, H, ACC, HAS_DCELL, ZC)
                    act = _taking_step(len_ptr, t, o_n, m_n, HAS_LENGTHS) & m_un
                    g0, g1, g2, g3, _gh2, _keep, dc_prev = cell_backward(
                        dr, dc, s0, s1, s2, s3, c_t, c_prev, dr, dr, act, LSTM, FAST)
                    if ZC != 0:
                        dc_prev += dc_zone
                    store_gates(dgx_ptr + p_row * (4 * H) + o_u[:, None], g0, g1, g2, g3, m_un,
                                H, 4)
                    tl.store(dcbuf_ptr + state, dc_prev, mask=m_un)
                    # This program's partial product for every state row, P_j = W_j^T dG_j.
                    dga = stack_gates(g0, g1, g2, g3, 4, BLOCK_H, BLOCK_N).to(W_DTYPE)
                    p_p = pbuf_ptr + ((((i_d * NJ + i_j).to(tl.int64) * B + on64[None, :]) * P
                                       + o_c[:, None]))
                    tl.store(p_p, _tile_partial(a0, a0, dga, dga, 4, PRECISION).to(P_DTYPE),
                             mask=m_n[None, :] & (o_c < P)[:, None])
                    if NKC >= 2:
                        tl.store(p_p + KC, _tile_partial(a1, a1, dga, dga, 4, PRECISION)
                                 .to(P_DTYPE), mask=m_n[None, :] & (o_c + KC < P)[:, None])
                    if NKC == 4:
                        tl.store(p_p + 2 * KC, _tile_partial(a2, a2, dga, dga, 4, PRECISION)
                                 .to(P_DTYPE), mask=m_n[None, :] & (o_c + 2 * KC < P)[:, None])
                        tl.store(p_p + 3 * KC, _tile_partial(a3, a3, dga, dga, 4, PRECISION)
                                 .to(P_DTYPE), mask=m_n[None, :] & (o_c + 3 * KC < P)[:, None])
        if SYNC and q + 1 < q_end:
            _publish(p_flags + i_j * FLAG_STRIDE, q + 1)
            alive = _await(p_flags, NJ, q + 1, err_ptr, alive, wait_ns, BLOCK_J, FLAG_STRIDE)


# ---------------------------------------------------------------------------------------------
# Planning and launching.

DR_K = 64   # columns of W_hr's rows or columns per iteration of ``_streamed_product``


def takes(problem: Problem) -> bool:
    """This module runs the cooperative strategy's LSTMs with a projection (``dispatch``)."""
    return problem.has_proj


def plan(problem: Problem, spec: DeviceSpec) -> Plan:
    """Slices of BLOCK_H cell units (and as many state rows), one program each, every direction
    and batch tile its own group, as ``cooperative.plan``; W_hh's rows of a program's units
    [4*BLOCK_H, P] resident in shared memory in both passes (W_hr's rows and columns streamed,
    ``_streamed_product``)."""
    if not problem.has_proj:
        raise DoesNotFit("for LSTMs with proj_size only")
    H, P, D, B = problem.H, problem.P, problem.D, problem.B
    K = block(P)
    isz = problem.itemsize * operand_copies(problem)
    if spec.interpreter:
        # One launch per phase (two per step) with several programs per group, as on a GPU;
        # a group of one program runs the whole sequence in one launch.
        bh = cooperative.INTERPRETER_SLICE
        nkc = min(cooperative.INTERPRETER_COLUMN_TILES, max(1, K // 16))
        nj = triton.cdiv(H, bh)
        cfg = dict(block_b=triton.cdiv(B, BLOCK_N) * BLOCK_N, block_h=bh, block_k=K,
                   num_warps=4, shared_bytes=(4 * bh * K + K * BLOCK_N) * isz)
        per_step, fixed = ((2, 2), (0, 2)) if nj > 1 else ((0, 0), (1, 1))
        return Plan("cooperative", _configs(nkc, nkc, {}, **cfg), grid=(nj, 1, D),
                    launches_per_step=per_step, launches_fixed=fixed)
    reasons = {}
    for bh in cooperative._SLICES:
        nj = triton.cdiv(H, bh)
        if nj * D > spec.sm_count:
            reasons.setdefault("sms", f"{nj * D} programs of {bh} units > {spec.sm_count} SMs")
            continue
        # The slice and a chunk of h [P, N] (forward) or the gate gradients (backward); and
        # W_hr's streamed tiles [BLOCK_H, DR_K] with their chunk [DR_K, N].
        w_hh = 4 * bh * K * isz
        stream = (bh + BLOCK_N) * DR_K * isz
        nkc_b = column_tiles(K)
        shared = w_hh + stream + max(K, 4 * bh) * BLOCK_N * isz
        if shared > spec.smem_per_block:
            reasons.setdefault("smem", f"{bh}-unit slices need {shared} B of shared memory > "
                                       f"{spec.smem_per_block}")
            continue
        stage = K * BLOCK_N * isz  # the state chunk, through registers (cooperative.plan)
        if stage > cooperative.STAGE_REGS * 4 * 32 * 8:
            reasons.setdefault("regs", f"a [{K}, {BLOCK_N}] state chunk needs more registers "
                                       "than 8 warps have to spare")
            continue
        # 8 warps from a 16 KiB chunk (the plain forward's bound is inclusive; with the
        # streamed projection beside it, 4 warps spilled at the bound: sm_90 bf16 H=1000
        # P=333, 12 spill instructions per step; 0 with 8).
        warps = 4 if stage < cooperative.STAGE_REGS // 2 * 4 * 32 * 4 else 8
        nbt = max(1, min(triton.cdiv(B, BLOCK_N), spec.sm_count // (nj * D)))
        bt = triton.cdiv(triton.cdiv(B, nbt), BLOCK_N) * BLOCK_N
        nbt = triton.cdiv(B, bt)
        cfg = dict(block_b=bt, block_h=bh, block_k=K, num_warps=warps, shared_bytes=shared,
                   maxnreg=min(255, spec.regs_per_sm // (32 * warps)))
        # The backward's warps: the forward's, or 8 where the plain cooperative backward takes
        # 8 (its slice is K = P wide).
        slice_regs = 4 * bh * K * isz // 4 // 128
        wide = K >= 1024 if spec.arch >= 90 else slice_regs > 64
        bwd = dict(num_warps=8, maxnreg=min(255, spec.regs_per_sm // 256)) if wide else {}
        if spec.arch < 90 and slice_regs > 64 and K >= 64:
            # mma.sync holds the slice as register operands there: in 4 column tiles it spilled
            # 1 instruction per step (A100 bf16 H=1000 P=333 D=2, 32-unit slices), in 2 107.
            nkc_b = 4
        return Plan("cooperative", _configs(1, nkc_b, bwd, **cfg), grid=(nj, nbt, D))
    raise DoesNotFit(", or ".join(reasons.values()) or "no slice fits")


def _configs(nkc_f: int, nkc_b: int, bwd: dict, **cfg) -> tuple:
    return (KernelConfig("_lstmp_fwd_coop_kernel", gates=4, column_tiles=nkc_f, **cfg),
            KernelConfig("_lstmp_bwd_coop_kernel", gates=4, column_tiles=nkc_b,
                         **{**cfg, **bwd}))


KERNELS = {"fwd": ("_lstmp_fwd_coop_kernel",), "bwd": ("_lstmp_bwd_coop_kernel",)}


def forward(a: ForwardArgs, the_plan: Plan) -> None:
    check_errors()
    cfg = the_plan.config("_lstmp_fwd_coop_kernel")
    device = a.y.device
    nj, nbt, on_gpu, stepped, flags, err, wait = _launch_state(the_plan, a.D, device)
    hbuf = a.h0.to(a.y.dtype).contiguous().clone()
    rbuf = torch.empty(a.D, a.B, a.H, device=device, dtype=a.w_hh.dtype)
    cbuf = a.c0.to(acc_dtype(a.y.dtype)).contiguous().clone()
    for q_begin, q_end in cooperative.phases(2 * a.T, stepped):
        launch_kernel(
            _lstmp_fwd_coop_kernel, (nj, nbt, a.D),
            xg_ptr=a.xg, stride_xt=a.xg.stride(0), stride_xb=a.xg.stride(1),
            w_hh_ptr=a.w_hh, w_hr_ptr=a.w_hr, len_ptr=a.lengths, **a.reset_args(),
            rm_ptr=a.rmask, **a.zone_args(), h0_ptr=a.h0, c0_ptr=a.c0,
            y_ptr=a.y, stride_yt=a.y.stride(0), stride_yb=a.y.stride(1),
            gates_ptr=a.gates, cell_ptr=a.cell, hbuf_ptr=hbuf, rbuf_ptr=rbuf, cbuf_ptr=cbuf,
            flags_ptr=flags, err_ptr=err, wait_ns=wait, q_begin=q_begin, q_end=q_end, T=a.T,
            B=a.B, H=a.H, P=a.P, BT=cfg.block_b, SAVE=a.save, ACC=a.ACC,
            PRECISION=a.precision, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            BLOCK_N=BLOCK_N, BLOCK_J=block_j(nj),
            NKC=cfg.column_tiles, DR_K=DR_K, SYNC=on_gpu,
            **_launch_options(cfg, on_gpu))
    a.hn.copy_(hbuf)
    a.cn.copy_(cbuf)
    _watch(err, "forward")


def backward(b: BackwardArgs, the_plan: Plan) -> None:
    check_errors()
    cfg = the_plan.config("_lstmp_bwd_coop_kernel")
    device = b.dy.device
    nj, nbt, on_gpu, stepped, flags, err, wait = _launch_state(the_plan, b.D, device)
    acc = acc_dtype(b.dy.dtype)
    # Each program's partial products for every state row, in the layer's dtype (as the plain
    # cooperative backward's); the step's dh in W_hh's dtype (what W_hr^T multiplies).
    pbuf = torch.empty(b.D, nj, b.B, b.P, device=device, dtype=b.dgx.dtype)
    dxbuf = torch.empty(b.D, b.B, b.P, device=device, dtype=b.w_hh.dtype)
    dhbuf = b.dhn.to(acc).contiguous().clone()
    dcbuf = b.dcn.to(acc).contiguous().clone()
    d0buf = torch.zeros(b.D, b.B, b.P + b.H, device=device, dtype=acc) \
        if b.resets is not None else None
    nj_tile = block_j(nj)
    for q_begin, q_end in cooperative.phases(2 * (b.T + 1), stepped):
        launch_kernel(
            _lstmp_bwd_coop_kernel, (nj, nbt, b.D),
            dy_ptr=b.dy, stride_dyt=b.dy.stride(0), stride_dyb=b.dy.stride(1),
            c0_ptr=b.c0, gates_ptr=b.gates, cell_ptr=b.cell, w_hh_ptr=b.w_hh, w_hr_ptr=b.w_hr,
            len_ptr=b.lengths, **b.reset_args(), rm_ptr=b.rmask, **b.zone_args(),
            dcell_ptr=b.dcell, dgx_ptr=b.dgx, dhp_ptr=b.dhp, dh0_ptr=b.dh0, dc0_ptr=b.dc0,
            pbuf_ptr=pbuf, dxbuf_ptr=dxbuf, dhbuf_ptr=dhbuf, dcbuf_ptr=dcbuf, d0buf_ptr=d0buf,
            flags_ptr=flags, err_ptr=err, wait_ns=wait, clip=b.clip,
            q_begin=q_begin, q_end=q_end, T=b.T, B=b.B, H=b.H, P=b.P, BT=cfg.block_b,
            ACC=b.ACC, PRECISION=b.precision, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            BLOCK_N=BLOCK_N, BLOCK_J=nj_tile, NKC=cfg.column_tiles,
            JSUM=min(cooperative.JSUM, nj_tile), DR_K=DR_K, SYNC=on_gpu,
            **_launch_options(cfg, on_gpu))
    _watch(err, "backward")
