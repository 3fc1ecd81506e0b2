"""Strategy "cooperative" of the LayerNorm recurrences: W_hh sliced over the SMs, statistics
reduced across programs every step.

The layout is the plain cooperative kernels' (``ops/cooperative.py``): a group (one direction,
one batch tile) has NJ programs, program j owns ``BLOCK_H`` hidden units and keeps their rows of
W_hh (forward; every gate stacked) or their columns (backward) in shared memory for the whole
sequence; the batch is the dots' N dimension. What LayerNorm adds is that a step's statistics
span every unit, so each program reduces its own units to a partial result per batch row, the
partials are exchanged through global memory (L2) and every program combines all NJ of them
after a grid barrier, in the same order (so every program holds the same statistics):

* LN_h (forward): each program's (mean, M2) of its G*BLOCK_H products, combined by Chan et al.'s
  pairwise formula, exact where the mean is large; LN_c (LSTM) the same over its units' c'.
* The backward's row sums (LN_c's two, LN_h's two): plain partial sums.

Forward step s, two phases and two grid barriers:

0. the state entering the step, for every unit: a GRU's from the exchanged h (y); an LSTM's
   formed by every program from the exchanged c' and o of step s-1 and LN_c's combined
   statistics (``h = o * tanh(LN_c(c'))``: cheaper than a third barrier; the owner writes its
   units' h to y); then ``q = W_j h`` and the partial LN_h statistics. Barrier.
1. LN_h's statistics combined; the normalised products, the cell; a GRU writes h', an LSTM c',
   o and the partial LN_c statistics. Barrier.

An LSTM's last h is formed after the last barrier (a finishing phase).

Backward step k (forward step s = T-1-k), where e = g_h * (gradient of LN_h's output) is what
the programs exchange, so that LN_h's backward ``dq = rstd * (e - mean(e) - q_hat * mean(e *
q_hat))`` is formed by every program for every unit as it is fed to ``dh = dq W_hh[:, own]``:

A. dh of the own units: what bypassed W_hh, dy, and the exchanged step's dq times W_hh's own
   columns (the owner writes its units' dq for dW_hh). An LSTM: LN_c's partial row sums. Barrier.
B. (LSTM; a GRU runs it in phase A) the gate gradients, e and its partial row sums. Barrier.

dh0 and dc0 are formed after the last barrier. Barriers per step: forward 2, backward 2 (LSTM)
or 1 (GRU). Under the Triton interpreter each phase is its own launch (the launch boundary is the
barrier), so the very per-phase code runs on the CPU with several programs per group.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._jit import (LSTM, act_sigmoid, act_tanh, gru_bwd_pointwise, gru_fwd_pointwise,
                   load_gate_tiles, lstm_new_cell, positive, prev_time, save_gates, split_gates,
                   step_time, store_gates)
from .args import acc_dtype
from . import cooperative
from .cooperative import (BLOCK_N, FLAG_STRIDE, _await, _group, _launch_state, _launch_options,
                          _own_columns, _own_rows, _program, _publish, _taking_step, _watch,
                          block_j, check_errors)
from .select import (DeviceSpec, DoesNotFit, KernelConfig, Plan, Problem, fast_activations,
                     launch_kernel)

EPS = tl.constexpr(1e-5)   # torch.nn.LayerNorm's default (as ops/layernorm.py)


@triton.jit
def _combine(part_ptr, rows, m_n, NJ, PER_UNIT: tl.constexpr, BLOCK_U: tl.constexpr, H,
             BLOCK_J: tl.constexpr):
    """(mean, variance) per row over every unit, from the NJ programs' (mean, M2) of their own
    ``BLOCK_U`` units (``PER_UNIT`` values each) at ``part_ptr[rows, j, :]``: Chan et al.'s
    pairwise combination. Returns two [N] blocks."""
    o_j = tl.arange(0, BLOCK_J)
    m = (o_j < NJ)[:, None] & m_n[None, :]
    p = part_ptr + (rows[None, :] * NJ + o_j[:, None]) * 2
    mean_j = tl.load(p, mask=m, other=0.0)
    m2_j = tl.load(p + 1, mask=m, other=0.0)
    n_j = PER_UNIT * tl.minimum(tl.maximum(H - o_j * BLOCK_U, 0), BLOCK_U)
    n_j = tl.where(o_j < NJ, n_j, 0).to(mean_j.dtype)[:, None]
    mean = tl.sum(n_j * mean_j, 0) / (PER_UNIT * H)
    d = tl.where(m, mean_j - mean[None, :], 0.0)
    return mean, (tl.sum(m2_j, 0) + tl.sum(n_j * d * d, 0)) / (PER_UNIT * H)


@triton.jit
def _sums(part_ptr, rows, m_n, NJ, BLOCK_J: tl.constexpr):
    """The two row sums over every unit, from the NJ programs' partial sums."""
    o_j = tl.arange(0, BLOCK_J)
    m = (o_j < NJ)[:, None] & m_n[None, :]
    p = part_ptr + (rows[None, :] * NJ + o_j[:, None]) * 2
    return tl.sum(tl.load(p, mask=m, other=0.0), 0), tl.sum(tl.load(p + 1, mask=m, other=0.0), 0)


@triton.jit
def _own_stats(a0, a1, a2, a3, m, n_own, G: tl.constexpr):
    """(mean, M2) per row (column) over the own units of G tiles [units, N]."""
    v = tl.where(m, a0, 0.0)
    if G >= 3:
        v += tl.where(m, a1 + a2, 0.0)
    if G == 4:
        v += tl.where(m, a3, 0.0)
    mean = tl.sum(v, 0) / n_own
    d0 = tl.where(m, a0 - mean[None, :], 0.0)
    m2 = d0 * d0
    if G >= 3:
        d1 = tl.where(m, a1 - mean[None, :], 0.0)
        d2 = tl.where(m, a2 - mean[None, :], 0.0)
        m2 += d1 * d1 + d2 * d2
    if G == 4:
        d3 = tl.where(m, a3 - mean[None, :], 0.0)
        m2 += d3 * d3
    return mean, tl.sum(m2, 0)


@triton.jit
def _put_pair(part_ptr, rows, i_j, NJ, a, b, m_n):
    p = part_ptr + (rows * NJ + i_j) * 2
    tl.store(p, a, mask=m_n)
    tl.store(p + 1, b, mask=m_n)


@triton.jit
def _state(y_ptr, stride_yt, stride_yb, h0_ptr, t_prev, has_prev, on64, o_f, m, i_d, B, H):
    """[units o_f, rows on64] of the state a step produced: y at ``t_prev`` where ``has_prev``
    ([1, N]), else h0; ``m`` masks the loads."""
    from_y = tl.load(y_ptr + t_prev * stride_yt + on64[None, :] * stride_yb + i_d * H
                     + o_f[:, None], mask=m & has_prev, other=0.0)
    from_h0 = tl.load(h0_ptr + (i_d * B + on64)[None, :] * H + o_f[:, None],
                      mask=m & (has_prev == 0), other=0.0)
    return tl.where(has_prev, from_y, from_h0)


@triton.jit
def _lstm_state(cbuf_ptr, obuf_ptr, rows, o_f, m, gc, bc, c_mean, c_rstd, H,
                FAST: tl.constexpr):
    """``h = o * tanh(g_c * LN(c') + b_c)`` of units o_f from the exchanged c' and o."""
    p = rows[None, :] * H + o_f[:, None]
    c = tl.load(cbuf_ptr + p, mask=m, other=0.0)
    o = tl.load(obuf_ptr + p, mask=m, other=0.0)
    c_hat = (c - c_mean[None, :]) * c_rstd[None, :]
    return o * act_tanh(gc[:, None] * c_hat + bc[:, None], FAST)


@triton.heuristics({"HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
                    "HAS_BHN": lambda a: a["b_hn_ptr"] is not None,
                    "FAST": lambda a: fast_activations(a["w_hh_ptr"].dtype)})
@triton.jit(do_not_specialize=["u_begin", "u_end", "T", "wait_ns"])
def _ln_fwd_coop_kernel(
    xg_ptr, stride_xt, stride_xb,      # [T, B, D*G*H] input side (normalised, biases folded)
    h0_ptr, c0_ptr,                    # [D, B, H]
    w_hh_ptr, b_hn_ptr, gh_ptr,        # [D, G*H, H], [D, H], [D, G*H] LN_h's gain
    gc_ptr, bc_ptr, len_ptr,           # [D, H] LN_c's gain and bias (LSTM); [B] lengths
    y_ptr, stride_yt, stride_yb,       # [T, B, D*H]
    hn_ptr, cn_ptr,                    # [D, B, H]
    gates_ptr, cell_ptr, qhat_ptr, stats_ptr,   # saved, as ops/layernorm.py
    qbuf_ptr,                          # [D, B, G*H] the own units' products (ACC)
    cbuf_ptr, obuf_ptr,                # [D, B, H] c' (starts as c0) and o, exchanged (ACC)
    qpart_ptr, cpart_ptr,              # [D, B, NJ, 2] partial (mean, M2) of LN_h and LN_c
    flags_ptr, err_ptr, wait_ns,
    u_begin, u_end, T, B, H, BT,       # phases to run (2 per step); batch rows per group
    CELL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NSAVE: tl.constexpr,
    SAVE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    SYNC: tl.constexpr, HAS_BHN: tl.constexpr, HAS_LENGTHS: tl.constexpr, FAST: tl.constexpr,
):
    """Phase u: step u // 2, phase u % 2 (module docstring); an LSTM's phase 2T forms the
    last h."""
    i_j, i_bt, i_d, NJ, NBT, D = _program()
    GH = G * H
    W_DTYPE = w_hh_ptr.dtype.element_ty
    Y_DTYPE = y_ptr.dtype.element_ty
    o_u = i_j * BLOCK_H + tl.arange(0, BLOCK_H)   # own units
    m_u = o_u < H
    o_k = tl.arange(0, BLOCK_K)                   # every unit
    m_k = o_k < H
    w = _own_rows(w_hh_ptr, i_d, i_j, o_k, m_k, H, G, GP, BLOCK_H)
    n_units = tl.minimum(H - i_j * BLOCK_H, BLOCK_H).to(ACC)   # own units (at least one)
    g0, g1, g2, g3 = load_gate_tiles(gh_ptr + i_d * GH + o_u, m_u, H, G)
    g0 = g0.to(ACC)[:, None]
    g1 = g1.to(ACC)[:, None]
    g2 = g2.to(ACC)[:, None]
    g3 = g3.to(ACC)[:, None]
    b_bhn = 0.0
    if HAS_BHN:
        b_bhn = tl.load(b_hn_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)[:, None]
    gc_k = tl.zeros([BLOCK_K], dtype=ACC)
    bc_k = gc_k
    gc_u = tl.zeros([BLOCK_H], dtype=ACC)
    bc_u = gc_u
    if CELL == LSTM:
        gc_k = tl.load(gc_ptr + i_d * H + o_k, mask=m_k, other=0.0).to(ACC)
        bc_k = tl.load(bc_ptr + i_d * H + o_k, mask=m_k, other=0.0).to(ACC)
        gc_u = tl.load(gc_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)
        bc_u = tl.load(bc_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)
    p_flags, b_lo, b_hi = _group(flags_ptr, i_bt, i_d, NJ, NBT, B, BT)
    alive = 1

    for u in range(u_begin, u_end):
        s = u // 2
        t = step_time(tl.minimum(s, T - 1), i_d, T)
        t64 = t.to(tl.int64)
        for c in range(b_lo, b_hi, BLOCK_N):
            o_n = c + tl.arange(0, BLOCK_N)
            m_n = o_n < b_hi
            on64 = o_n.to(tl.int64)
            rows = i_d * B + on64                      # rows of the [D, B, .] buffers
            m_un = m_u[:, None] & m_n[None, :]
            m_kn = m_k[:, None] & m_n[None, :]
            p_row = (t64 * B + on64) * D + i_d         # rows of the saved tensors
            has_prev = positive(s, o_n)[None, :]
            if u % 2 == 0:
                # Phase 0: the state entering step s, then the own units' products.
                if CELL == LSTM:
                    # h of step s-1 from the exchanged c' and o and LN_c's statistics; a row
                    # past its length (packed input) keeps the state before (y, or h0).
                    t1 = step_time(tl.maximum(s - 1, 0), i_d, T).to(tl.int64)
                    t_pp = prev_time(t1, i_d, T)
                    has_pp = positive(s - 1, o_n)[None, :]
                    c_mean, c_var = _combine(cpart_ptr, rows, m_n & positive(s, o_n), NJ, 1,
                                             BLOCK_H, H, BLOCK_J)
                    c_rstd = 1.0 / tl.sqrt(c_var + EPS)
                    fresh = has_prev
                    if HAS_LENGTHS:
                        fresh = fresh & (t1 < tl.load(len_ptr + o_n, mask=m_n, other=0))[None, :]
                    if s > 0:
                        h_own = tl.where(
                            fresh,
                            _lstm_state(cbuf_ptr, obuf_ptr, rows, o_u, m_un & fresh, gc_u, bc_u,
                                        c_mean, c_rstd, H, FAST),
                            _state(y_ptr, stride_yt, stride_yb, h0_ptr, t_pp, has_pp, on64, o_u,
                                   m_un & (fresh == 0), i_d, B, H).to(ACC)).to(Y_DTYPE)
                        tl.store(y_ptr + t1 * stride_yt + on64[None, :] * stride_yb + i_d * H
                                 + o_u[:, None], h_own, mask=m_un)
                        if s == T:
                            tl.store(hn_ptr + rows[None, :] * H + o_u[:, None],
                                     h_own.to(hn_ptr.dtype.element_ty), mask=m_un)
                            tl.store(cn_ptr + rows[None, :] * H + o_u[:, None],
                                     tl.load(cbuf_ptr + rows[None, :] * H + o_u[:, None],
                                             mask=m_un, other=0.0)
                                     .to(cn_ptr.dtype.element_ty), mask=m_un)
                        if SAVE and i_j == 0:
                            p_st = stats_ptr + ((t1 * B + on64) * D + i_d) * 4
                            tl.store(p_st + 1, c_mean, mask=m_n)
                            tl.store(p_st + 2, c_rstd, mask=m_n)
                    h_all = tl.where(
                        fresh,
                        _lstm_state(cbuf_ptr, obuf_ptr, rows, o_k, m_kn & fresh, gc_k, bc_k,
                                    c_mean, c_rstd, H, FAST).to(Y_DTYPE),
                        _state(y_ptr, stride_yt, stride_yb, h0_ptr, t_pp, has_pp, on64, o_k,
                               m_kn & (fresh == 0), i_d, B, H))
                else:
                    h_all = _state(y_ptr, stride_yt, stride_yb, h0_ptr,
                                   prev_time(t, i_d, T), has_prev, on64, o_k, m_kn, i_d, B, H)
                if s < T:
                    acc = tl.dot(w, h_all.to(W_DTYPE), input_precision=PRECISION).to(ACC)
                    q0, q1, q2, q3 = split_gates(acc, GP, BLOCK_H, BLOCK_N)
                    store_gates(qbuf_ptr + rows[None, :] * GH + o_u[:, None], q0, q1, q2, q3,
                                m_un, H, G)
                    mean_j, m2_j = _own_stats(q0, q1, q2, q3, m_un, G * n_units, G)
                    _put_pair(qpart_ptr, rows, i_j, NJ, mean_j, m2_j, m_n)
            else:
                # Phase 1: LN_h's statistics, the normalised products, the cell.
                mean, var = _combine(qpart_ptr, rows, m_n, NJ, G, BLOCK_H, H, BLOCK_J)
                rstd = 1.0 / tl.sqrt(var + EPS)
                q0, q1, q2, q3 = load_gate_tiles(qbuf_ptr + rows[None, :] * GH + o_u[:, None],
                                                 m_un, H, G)
                n0 = (q0 - mean[None, :]) * rstd[None, :]
                n1 = (q1 - mean[None, :]) * rstd[None, :]
                n2 = (q2 - mean[None, :]) * rstd[None, :]
                n3 = (q3 - mean[None, :]) * rstd[None, :]
                if SAVE:
                    store_gates(qhat_ptr + p_row[None, :] * GH + o_u[:, None], n0, n1, n2, n3,
                                m_un, H, G)
                    if i_j == 0:
                        tl.store(stats_ptr + p_row * 4, rstd, mask=m_n)
                x0, x1, x2, x3 = load_gate_tiles(xg_ptr + t64 * stride_xt
                                                 + on64[None, :] * stride_xb + i_d * GH
                                                 + o_u[:, None], m_un, H, G)
                act = _taking_step(len_ptr, t, o_n, m_n, HAS_LENGTHS)
                own = rows[None, :] * H + o_u[:, None]
                p_save = gates_ptr + p_row[None, :] * (NSAVE * H) + o_u[:, None]
                if CELL == LSTM:
                    i = act_sigmoid(x0.to(ACC) + g0 * n0, FAST)
                    f = act_sigmoid(x1.to(ACC) + g1 * n1, FAST)
                    g = act_tanh(x2.to(ACC) + g2 * n2, FAST)
                    o = act_sigmoid(x3.to(ACC) + g3 * n3, FAST)
                    c_in = tl.load(cbuf_ptr + own, mask=m_un, other=0.0)
                    c_new = tl.where(act, lstm_new_cell(i, f, g, c_in), c_in)
                    tl.store(cbuf_ptr + own, c_new, mask=m_un)
                    tl.store(obuf_ptr + own, o, mask=m_un)
                    cm_j, cm2_j = _own_stats(c_new, c_new, c_new, c_new, m_un, n_units, 1)
                    _put_pair(cpart_ptr, rows, i_j, NJ, cm_j, cm2_j, m_n)
                    if SAVE:
                        save_gates(p_save, i, f, g, o, m_un, H)
                        tl.store(cell_ptr + p_row[None, :] * H + o_u[:, None],
                                 c_new.to(cell_ptr.dtype.element_ty), mask=m_un)
                else:
                    s3 = g2 * n2 + b_bhn
                    h_in = _state(y_ptr, stride_yt, stride_yb, h0_ptr, prev_time(t, i_d, T),
                                  has_prev, on64, o_u, m_un, i_d, B, H).to(ACC)
                    r, z, n, h_new = gru_fwd_pointwise(x0.to(ACC) + g0 * n0,
                                                       x1.to(ACC) + g1 * n1, x2.to(ACC), s3,
                                                       h_in, FAST)
                    if SAVE:
                        save_gates(p_save, r, z, n, s3, m_un, H)
                    h_new = tl.where(act, h_new, h_in).to(Y_DTYPE)
                    tl.store(y_ptr + t64 * stride_yt + on64[None, :] * stride_yb + i_d * H
                             + o_u[:, None], h_new, mask=m_un)
                    if s == T - 1:
                        tl.store(hn_ptr + own, h_new.to(hn_ptr.dtype.element_ty), mask=m_un)
        if SYNC and u + 1 < u_end:
            _publish(p_flags + i_j * FLAG_STRIDE, u + 1)
            alive = _await(p_flags, NJ, u + 1, err_ptr, alive, wait_ns, BLOCK_J, FLAG_STRIDE)


@triton.heuristics({"HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
                    "FAST": lambda a: fast_activations(a["w_hh_ptr"].dtype)})
@triton.jit(do_not_specialize=["u_begin", "u_end", "T", "wait_ns"])
def _ln_bwd_coop_kernel(
    dy_ptr, stride_dyt, stride_dyb,    # [T, B, D*H] gradient of the outputs
    y_ptr, stride_yt, stride_yb,       # [T, B, D*H] forward states
    h0_ptr, c0_ptr,                    # [D, B, H]
    gates_ptr, cell_ptr, qhat_ptr, stats_ptr,   # saved by the forward
    w_hh_ptr, gh_ptr, gc_ptr, bc_ptr, len_ptr,
    dgx_ptr, dgh_ptr, dq_ptr,          # [T, B, D*G*H], as ops/layernorm.py
    dh0_ptr, dc0_ptr,                  # [D, B, H]
    keep_ptr, dcbuf_ptr, dhs_ptr,      # [D, B, H] ACC, own units: dh past W_hh (starts as dh_n),
                                       # dc (starts as dc_n), the step's dh (LSTM)
    ebuf_ptr, epart_ptr,               # [2, D, B, G*H] e exchanged; [2, D, B, NJ, 2] its sums
    spart_ptr,                         # [D, B, NJ, 2] LN_c's partial row sums (LSTM)
    dgc_ptr,                           # [batch tiles, D, 2, H] LN_c's gain / bias gradients
    flags_ptr, err_ptr, wait_ns,
    u_begin, u_end, T, B, H, BT,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    SYNC: tl.constexpr, HAS_LENGTHS: tl.constexpr, FAST: tl.constexpr,
):
    """Phase u: an LSTM's step u // 2, phase u % 2; a GRU's step u (module docstring). Step T
    (phase A only) forms dh0 and dc0."""
    i_j, i_bt, i_d, NJ, NBT, D = _program()
    GH = G * H
    W_DTYPE = w_hh_ptr.dtype.element_ty
    o_u = i_j * BLOCK_H + tl.arange(0, BLOCK_H)
    m_u = o_u < H
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < H
    b_w0, b_w1, b_w2, b_w3 = _own_columns(w_hh_ptr, i_d, o_u, m_u, o_k, m_k, H, G)
    g0, g1, g2, g3 = load_gate_tiles(gh_ptr + i_d * GH + o_u, m_u, H, G)
    g0 = g0.to(ACC)[:, None]
    g1 = g1.to(ACC)[:, None]
    g2 = g2.to(ACC)[:, None]
    g3 = g3.to(ACC)[:, None]
    gc = tl.zeros([BLOCK_H, 1], dtype=ACC)
    bc = gc
    if CELL == LSTM:
        gc = tl.load(gc_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)[:, None]
        bc = tl.load(bc_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)[:, None]
    p_dgc = dgc_ptr + (i_bt * D + i_d) * (2 * H) + o_u
    p_flags, b_lo, b_hi = _group(flags_ptr, i_bt, i_d, NJ, NBT, B, BT)
    alive = 1
    PART = D * B * NJ * 2      # one slot of epart

    for u in range(u_begin, u_end):
        if CELL == LSTM:
            k = u // 2
            phase = u % 2
        else:
            k = u
            phase = u * 0
        s = tl.maximum(T - 1 - k, 0)
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        t_prev = prev_time(t, i_d, T)
        t_q = step_time(tl.minimum(T - k, T - 1), i_d, T).to(tl.int64)  # the step after s
        for c in range(b_lo, b_hi, BLOCK_N):
            o_n = c + tl.arange(0, BLOCK_N)
            m_n = o_n < b_hi
            on64 = o_n.to(tl.int64)
            rows = i_d * B + on64
            m_un = m_u[:, None] & m_n[None, :]
            own = rows[None, :] * H + o_u[:, None]
            p_row = (t64 * B + on64) * D + i_d
            act = _taking_step(len_ptr, t, o_n, m_n, HAS_LENGTHS) & m_un
            has_prev = positive(s, o_n)[None, :]
            c_mean = tl.load(stats_ptr + p_row * 4 + 1, mask=m_n, other=0.0)[None, :]
            c_rstd = tl.load(stats_ptr + p_row * 4 + 2, mask=m_n, other=0.0)[None, :]
            if phase == 0:
                # A. dh of the own units: LN_h's backward of the step after (every unit, from
                # the exchanged e), through W_hh's own columns.
                has_q = positive(k, o_n) & m_n
                slot = (k + 1) % 2
                e1, e2 = _sums(epart_ptr + slot * PART, rows, has_q, NJ, BLOCK_J)
                e1 = (e1 / GH)[None, :]
                e2 = (e2 / GH)[None, :]
                p_row_q = (t_q * B + on64) * D + i_d
                rstd_q = tl.load(stats_ptr + p_row_q * 4, mask=has_q, other=0.0)[None, :]
                m_kq = m_k[:, None] & has_q[None, :]
                p_e = ebuf_ptr + slot * (D * B * GH) + rows[None, :] * GH
                p_qh = qhat_ptr + p_row_q[None, :] * GH
                rec = tl.dot(b_w0, _dq(p_e, p_qh, o_k, m_kq, rstd_q, e1, e2).to(W_DTYPE),
                             input_precision=PRECISION).to(ACC)
                if G >= 3:
                    rec += tl.dot(b_w1, _dq(p_e + H, p_qh + H, o_k, m_kq, rstd_q, e1, e2)
                                  .to(W_DTYPE), input_precision=PRECISION).to(ACC)
                    rec += tl.dot(b_w2, _dq(p_e + 2 * H, p_qh + 2 * H, o_k, m_kq, rstd_q, e1,
                                            e2).to(W_DTYPE), input_precision=PRECISION).to(ACC)
                if G == 4:
                    rec += tl.dot(b_w3, _dq(p_e + 3 * H, p_qh + 3 * H, o_k, m_kq, rstd_q, e1,
                                            e2).to(W_DTYPE), input_precision=PRECISION).to(ACC)
                if k > 0:  # the own units' dq, for dW_hh
                    m_uq = m_u[:, None] & has_q[None, :]
                    dq0 = _dq(p_e, p_qh, o_u, m_uq, rstd_q, e1, e2)
                    dq1 = _dq(p_e + H, p_qh + H, o_u, m_uq, rstd_q, e1, e2)
                    dq2 = _dq(p_e + 2 * H, p_qh + 2 * H, o_u, m_uq, rstd_q, e1, e2)
                    dq3 = dq2
                    if G == 4:
                        dq3 = _dq(p_e + 3 * H, p_qh + 3 * H, o_u, m_uq, rstd_q, e1, e2)
                    store_gates(dq_ptr + p_row_q[None, :] * GH + o_u[:, None], dq0, dq1, dq2,
                                dq3, m_uq, H, G)
                keep = tl.load(keep_ptr + own, mask=m_un, other=0.0)
                if k == T:  # past the first step: the initial states' gradients
                    tl.store(dh0_ptr + own, (keep + rec).to(dh0_ptr.dtype.element_ty),
                             mask=m_un)
                    if CELL == LSTM:
                        tl.store(dc0_ptr + own, tl.load(dcbuf_ptr + own, mask=m_un, other=0.0)
                                 .to(dc0_ptr.dtype.element_ty), mask=m_un)
                else:
                    dh = keep + rec + tl.load(dy_ptr + t64 * stride_dyt
                                              + on64[None, :] * stride_dyb + i_d * H
                                              + o_u[:, None], mask=m_un, other=0.0).to(ACC)
                    if CELL == LSTM:
                        # LN_c's partial row sums, and its gain's and bias's gradients.
                        du, c_hat, tu, o = _lstm_du(dh, gates_ptr, cell_ptr, p_row, o_u, m_un,
                                                    act, c_mean, c_rstd, gc, bc, H, NSAVE, ACC,
                                                    FAST)
                        _put_pair(spart_ptr, rows, i_j, NJ, tl.sum(du * gc, 0),
                                  tl.sum(du * gc * c_hat, 0), m_n)
                        tl.store(p_dgc, tl.load(p_dgc, mask=m_u, other=0.0)
                                 + tl.sum(du * c_hat, 1), mask=m_u)
                        tl.store(p_dgc + H, tl.load(p_dgc + H, mask=m_u, other=0.0)
                                 + tl.sum(du, 1), mask=m_u)
                        tl.store(dhs_ptr + own, dh, mask=m_un)
                    else:
                        sv0, sv1, sv2, sv3 = load_gate_tiles(
                            gates_ptr + p_row[None, :] * (NSAVE * H) + o_u[:, None], m_un, H, 4)
                        h_prev = _state(y_ptr, stride_yt, stride_yb, h0_ptr, t_prev, has_prev,
                                        on64, o_u, m_un, i_d, B, H).to(ACC)
                        d0, d1, dnx, d2, dhz = gru_bwd_pointwise(
                            dh, sv0.to(ACC), sv1.to(ACC), sv2.to(ACC), sv3.to(ACC), h_prev)
                        d0 = tl.where(act, d0, 0.0)
                        d1 = tl.where(act, d1, 0.0)
                        d2 = tl.where(act, d2, 0.0)
                        tl.store(keep_ptr + own, tl.where(act, dhz, dh), mask=m_un)
                        p_dg = p_row[None, :] * GH + o_u[:, None]
                        store_gates(dgx_ptr + p_dg, d0, d1, tl.where(act, dnx, 0.0), d2, m_un,
                                    H, 3)
                        store_gates(dgh_ptr + p_dg, d0, d1, d2, d2, m_un, H, 3)
                        _exchange_e(ebuf_ptr + (k % 2) * (D * B * GH),
                                    epart_ptr + (k % 2) * PART, qhat_ptr, rows, p_row, o_u,
                                    m_un, m_n, i_j, NJ, d0, d1, d2, d2, g0, g1, g2, g3, H, G)
            elif CELL == LSTM:
                # B. LN_c's backward, the gate gradients, e.
                s1, s2 = _sums(spart_ptr, rows, m_n, NJ, BLOCK_J)
                s1 = (s1 / H)[None, :]
                s2 = (s2 / H)[None, :]
                dh = tl.load(dhs_ptr + own, mask=m_un, other=0.0)
                du, c_hat, tu, o = _lstm_du(dh, gates_ptr, cell_ptr, p_row, o_u, m_un, act,
                                            c_mean, c_rstd, gc, bc, H, NSAVE, ACC, FAST)
                sv0, sv1, sv2, sv3 = load_gate_tiles(
                    gates_ptr + p_row[None, :] * (NSAVE * H) + o_u[:, None], m_un, H, 4)
                sv0 = sv0.to(ACC)
                sv1 = sv1.to(ACC)
                sv2 = sv2.to(ACC)
                dc_in = tl.load(dcbuf_ptr + own, mask=m_un, other=0.0)
                dc = c_rstd * (du * gc - s1 - c_hat * s2) + dc_in
                p_row_prev = (t_prev * B + on64) * D + i_d
                c_prev = tl.where(has_prev,
                                  tl.load(cell_ptr + p_row_prev[None, :] * H + o_u[:, None],
                                          mask=m_un & has_prev, other=0.0),
                                  tl.load(c0_ptr + own, mask=m_un & (has_prev == 0),
                                          other=0.0)).to(ACC)
                d0 = tl.where(act, dc * sv2 * sv0 * (1.0 - sv0), 0.0)
                d1 = tl.where(act, dc * c_prev * sv1 * (1.0 - sv1), 0.0)
                d2 = tl.where(act, dc * sv0 * (1.0 - sv2 * sv2), 0.0)
                d3 = tl.where(act, dh * tu * o * (1.0 - o), 0.0)
                tl.store(dcbuf_ptr + own, tl.where(act, dc * sv1, dc_in), mask=m_un)
                tl.store(keep_ptr + own, tl.where(act, 0.0, dh), mask=m_un)
                store_gates(dgx_ptr + p_row[None, :] * GH + o_u[:, None], d0, d1, d2, d3, m_un,
                            H, 4)
                _exchange_e(ebuf_ptr + (k % 2) * (D * B * GH), epart_ptr + (k % 2) * PART,
                            qhat_ptr, rows, p_row, o_u, m_un, m_n, i_j, NJ, d0, d1, d2, d3,
                            g0, g1, g2, g3, H, G)
        if SYNC and u + 1 < u_end:
            _publish(p_flags + i_j * FLAG_STRIDE, u + 1)
            alive = _await(p_flags, NJ, u + 1, err_ptr, alive, wait_ns, BLOCK_J, FLAG_STRIDE)


@triton.jit
def _dq(p_e, p_qh, o_f, m, rstd, e1, e2):
    """LN_h's backward for units o_f of one gate: ``rstd * (e - mean(e) - q_hat * mean(e *
    q_hat))``, [units, N] (zero where masked)."""
    e = tl.load(p_e + o_f[:, None], mask=m, other=0.0)
    q_hat = tl.load(p_qh + o_f[:, None], mask=m, other=0.0)
    return tl.where(m, rstd * (e - e1 - q_hat * e2), 0.0)


@triton.jit
def _lstm_du(dh, gates_ptr, cell_ptr, p_row, o_u, m_un, act, c_mean, c_rstd, gc, bc, H,
             NSAVE: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr):
    """For h' = o * tanh(u), u = g_c * c_hat + b_c: the gradient of u (zero on inactive rows),
    c_hat (zero on padding), tanh(u) and o of the own units."""
    o = tl.load(gates_ptr + p_row[None, :] * (NSAVE * H) + 3 * H + o_u[:, None], mask=m_un,
                other=0.0).to(ACC)
    c_hat = (tl.load(cell_ptr + p_row[None, :] * H + o_u[:, None], mask=m_un,
                     other=0.0).to(ACC) - c_mean) * c_rstd
    tu = act_tanh(gc * c_hat + bc, FAST)
    du = tl.where(act, dh * o * (1.0 - tu * tu), 0.0)
    return du, tl.where(m_un, c_hat, 0.0), tu, o


@triton.jit
def _exchange_e(ebuf_ptr, epart_ptr, qhat_ptr, rows, p_row, o_u, m_un, m_n, i_j, NJ,
                d0, d1, d2, d3, g0, g1, g2, g3, H, G: tl.constexpr):
    """e = g_h * (gradient of LN_h's output) of the own units into the exchange, with its
    partial row sums (of e and of e * q_hat)."""
    GH = G * H
    e0 = g0 * d0
    e1 = g1 * d1
    e2 = g2 * d2
    e3 = g3 * d3
    store_gates(ebuf_ptr + rows[None, :] * GH + o_u[:, None], e0, e1, e2, e3, m_un, H, G)
    n0, n1, n2, n3 = load_gate_tiles(qhat_ptr + p_row[None, :] * GH + o_u[:, None], m_un, H, G)
    a = e0
    b = e0 * n0
    if G >= 3:
        a += e1 + e2
        b += e1 * n1 + e2 * n2
    if G == 4:
        a += e3
        b += e3 * n3
    _put_pair(epart_ptr, rows, i_j, NJ, tl.sum(tl.where(m_un, a, 0.0), 0),
              tl.sum(tl.where(m_un, b, 0.0), 0), m_n)


# ---------------------------------------------------------------------------------------------
# Planning and launching.

KERNELS = ("_ln_fwd_coop_kernel", "_ln_bwd_coop_kernel")
INTERPRETER_GROUP_ROWS = 0   # batch rows per group under the interpreter (0: one group; tests)


def plan(problem: Problem, spec: DeviceSpec) -> Plan:
    """The plain cooperative kernels' slices and groups (``cooperative.plan``), for the
    LayerNorm kernels; launches: one per pass on a GPU (or under the interpreter with one
    program per group), else one per phase."""
    base = cooperative.plan(problem, spec)
    if not spec.interpreter and (base.kernels[0].gates != cooperative._gates_padded(problem.G)
                                 or base.kernels[0].column_tiles != 1):
        # These kernels hold the slice padded and whole, beside a whole state chunk.
        raise DoesNotFit("the slice fits only unpadded or in column tiles (GRU H > 1024), "
                         "which the LayerNorm kernels do not take")
    # Warps (compiled for sm_90, bf16 H=512; bench/kernel_resources.py --layernorm): the
    # forward spilled 536 bytes per thread with 4 and 72 with 8; the backward 472 with 4 and
    # 920 with 8 (its W_hh columns are mma.sync operands held in registers; the plain
    # cooperative backward's reduce-scatter of partial products removed them there, not yet
    # here).
    fwd, bwd = (KernelConfig(name, c.block_b, c.block_h, c.block_k, warps, c.num_stages,
                             c.shared_bytes, min(255, spec.regs_per_sm // (32 * warps)))
                for name, c, warps in zip(KERNELS, base.kernels, (8, 4)))
    nj, _, D = grid = base.grid
    if spec.interpreter and INTERPRETER_GROUP_ROWS:
        # Several batch groups under the interpreter (tests), as a GPU runs large batches.
        rows = INTERPRETER_GROUP_ROWS
        fwd, bwd = (dataclasses.replace(k, block_b=rows) for k in (fwd, bwd))
        grid = (nj, triton.cdiv(problem.B, rows), D)
    if spec.interpreter and nj > 1:
        lstm = problem.G == 4
        per_step, fixed = (2, 2 if lstm else 1), (1 if lstm else 0, 1)
    else:
        per_step, fixed = (0, 0), (1, 1)
    return Plan("cooperative", (fwd, bwd), grid=grid, launches_per_step=per_step,
                launches_fixed=fixed)


def forward(a, the_plan: Plan) -> None:
    """``a``: ``LayerNormArgs`` (ops/recurrence_ln.py)."""
    check_errors()
    cfg = the_plan.config("_ln_fwd_coop_kernel")
    device = a.y.device
    nj, nbt, on_gpu, stepped, flags, err, wait = _launch_state(the_plan, a.D, device)
    acc = acc_dtype(a.y.dtype)
    is_lstm = a.c0 is not None
    G = a.G
    qbuf = torch.empty(a.D, a.B, G * a.H, device=device, dtype=acc)
    cbuf = torch.empty(a.D, a.B, a.H, device=device, dtype=acc).copy_(a.c0) if is_lstm else qbuf
    obuf = torch.empty(a.D, a.B, a.H, device=device, dtype=acc) if is_lstm else qbuf
    qpart = torch.zeros(a.D, a.B, nj, 2, device=device, dtype=acc)
    cpart = torch.zeros(a.D, a.B, nj, 2, device=device, dtype=acc) if is_lstm else qpart
    for u_begin, u_end in cooperative.phases(2 * a.T + (1 if is_lstm else 0), stepped):
        launch_kernel(
            _ln_fwd_coop_kernel, (nj, nbt, a.D),
            xg_ptr=a.xg, stride_xt=a.xg.stride(0), stride_xb=a.xg.stride(1),
            h0_ptr=a.h0, c0_ptr=a.c0, w_hh_ptr=a.w_hh, b_hn_ptr=a.b_hn, gh_ptr=a.g_h,
            gc_ptr=a.g_c, bc_ptr=a.b_c, len_ptr=a.lengths,
            y_ptr=a.y, stride_yt=a.y.stride(0), stride_yb=a.y.stride(1), hn_ptr=a.hn,
            cn_ptr=a.cn, gates_ptr=a.gates, cell_ptr=a.cell, qhat_ptr=a.qhat,
            stats_ptr=a.stats, qbuf_ptr=qbuf, cbuf_ptr=cbuf, obuf_ptr=obuf, qpart_ptr=qpart,
            cpart_ptr=cpart, flags_ptr=flags, err_ptr=err, wait_ns=wait,
            u_begin=u_begin, u_end=u_end, T=a.T, B=a.B, H=a.H, BT=cfg.block_b,
            CELL=a.mode, G=G, GP=4 if G == 3 else G, NSAVE=a.NSAVE, SAVE=a.save, ACC=a.ACC,
            PRECISION=a.precision, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            BLOCK_N=BLOCK_N, BLOCK_J=block_j(nj), SYNC=on_gpu,
            **_launch_options(cfg, on_gpu))
    _watch(err, "LayerNorm forward")


def backward(b, the_plan: Plan) -> None:
    """``b``: ``LayerNormGradArgs`` (ops/recurrence_ln.py); its scratch's keep and dc start as
    dh_n and dc_n."""
    check_errors()
    cfg = the_plan.config("_ln_bwd_coop_kernel")
    device = b.dy.device
    nj, nbt, on_gpu, stepped, flags, err, wait = _launch_state(the_plan, b.D, device)
    acc = acc_dtype(b.dy.dtype)
    is_lstm = b.c0 is not None
    G = b.G
    dhs, keep, dcs, _ = b.scratch
    ebuf = torch.zeros(2, b.D, b.B, G * b.H, device=device, dtype=acc)
    epart = torch.zeros(2, b.D, b.B, nj, 2, device=device, dtype=acc)
    spart = torch.zeros(b.D, b.B, nj, 2, device=device, dtype=acc) if is_lstm else epart
    dcbuf = dcs[b.T % 2]
    for u_begin, u_end in cooperative.phases((2 if is_lstm else 1) * b.T + 1, stepped):
        launch_kernel(
            _ln_bwd_coop_kernel, (nj, nbt, b.D),
            dy_ptr=b.dy, stride_dyt=b.dy.stride(0), stride_dyb=b.dy.stride(1),
            y_ptr=b.y, stride_yt=b.y.stride(0), stride_yb=b.y.stride(1),
            h0_ptr=b.h0, c0_ptr=b.c0, gates_ptr=b.gates, cell_ptr=b.cell, qhat_ptr=b.qhat,
            stats_ptr=b.stats, w_hh_ptr=b.w_hh, gh_ptr=b.g_h, gc_ptr=b.g_c, bc_ptr=b.b_c,
            len_ptr=b.lengths, dgx_ptr=b.dgx, dgh_ptr=b.dgh, dq_ptr=b.dq, dh0_ptr=b.dh0,
            dc0_ptr=b.dc0, keep_ptr=keep, dcbuf_ptr=dcbuf, dhs_ptr=dhs, ebuf_ptr=ebuf,
            epart_ptr=epart, spart_ptr=spart,
            dgc_ptr=b.dgc if b.dgc is not None else dhs,  # (an LSTM's only)
            flags_ptr=flags, err_ptr=err, wait_ns=wait,
            u_begin=u_begin, u_end=u_end, T=b.T, B=b.B, H=b.H, BT=cfg.block_b,
            CELL=b.mode, G=G, NSAVE=b.NSAVE, ACC=b.ACC, PRECISION=b.precision,
            BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, BLOCK_N=BLOCK_N,
            BLOCK_J=block_j(nj), SYNC=on_gpu, **_launch_options(cfg, on_gpu))
    _watch(err, "LayerNorm backward")
