"""The LayerNorm recurrences (``LayerNormLSTM``, ``LayerNormGRU``): kernels, plans, launchers.

The recurrent LayerNorm needs statistics over all G*H gate pre-activations of a step, and an
LSTM's LN_c over all H units of its new cell state. Here one program owns whole rows: a program
per (batch tile, direction) walks the steps, and per step

1. forms ``q = h W_hh^T`` for every unit, in unit chunks (W_hh streamed from L2, the state from
   the previous step's output), writing q to a scratch row and summing it;
2. takes the variance from the scratch (two passes: exact where the mean is large);
3. normalises, adds the input side and runs the cell for every unit chunk (GRU: done);
4. (LSTM) takes the new cell state's statistics and writes ``h' = o * tanh(LN_c(c'))``.

The passes hand data between the program's threads through global memory (L1/L2) with a
barrier between them; no other program reads them, so nothing crosses programs and the kernel
runs under the Triton interpreter as on a GPU, for any hidden size. Parallelism is the batch
tiles times the directions; ``ops/layernorm_coop.py`` slices W_hh over the SMs instead and
reduces the statistics across programs every step (strategy ``cooperative``).

The backward walks the steps in reverse: the carried dh (``dq_{t+1} @ W_hh`` plus what bypasses
W_hh), LN_c's backward (LSTM: two passes for its two row sums), the cell's gate gradients and
LN_h's backward (two row sums), writing ``dq`` (the gradient of ``h W_hh^T``) for the carried dh
of the step before and for dW_hh, a whole-sequence GEMM afterwards.

Strategies: ``persistent`` runs every step in one launch; ``stepwise`` launches the same kernel
once per step (the launch boundary is the barrier between steps); ``cooperative`` is
``ops/layernorm_coop.py``'s (the default on a GPU where W_hh's slices fit on the SMs).

Folded parameters (``functional``): the input side ``xg = LN_x(W_ih x) + b_ih`` plus LN_h's bias
and b_hh (GRU: but their n parts, ``b_hn = beta_h[n] + b_hh[n]``, which sit inside r *); the
kernels take LN_h's gain ``g_h`` [D, G*H] and LN_c's gain and bias ``g_c``, ``b_c`` [D, H].
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import (LSTM, act_sigmoid, act_tanh, gru_bwd_pointwise, gru_fwd_pointwise,
                   load_gate_tiles, lstm_new_cell, next_time, positive, prev_time,
                   recurrent_products, save_gates, step_time, store_gates)
from . import layernorm_coop
from .select import (DeviceSpec, DoesNotFit, KernelConfig, Plan, Problem, fast_activations,
                     launch_kernel, operand_copies)

EPS = tl.constexpr(1e-5)   # torch.nn.LayerNorm's default
STATS = 4                  # saved per row and step: rstd of LN_h, mean and rstd of LN_c, unused


@triton.jit
def _gate_sum(a0, a1, a2, a3, m, G: tl.constexpr):
    """Row sums of the G gate tiles over the real lanes ``m``."""
    v = a0 + a1 + a2
    if G == 4:
        v += a3
    return tl.sum(tl.where(m, v, 0.0), 1)


@triton.jit
def _state_tile(y_ptr, stride_yt, stride_yb, h0_ptr, t_prev, has_prev, ob64, m_b, o_f, m_f,
                i_d, B, H):
    """The state entering the step for features ``o_f``: y at ``t_prev``, or h0 where
    ``has_prev`` is false (the first step)."""
    m = m_b[:, None] & m_f[None, :]
    from_y = tl.load(y_ptr + t_prev * stride_yt + ob64[:, None] * stride_yb + i_d * H
                     + o_f[None, :], mask=m & has_prev, other=0.0)
    from_h0 = tl.load(h0_ptr + (i_d * B + ob64)[:, None] * H + o_f[None, :],
                      mask=m & (has_prev == 0), other=0.0)
    return tl.where(has_prev, from_y, from_h0)


@triton.jit
def _normalised(p_q, o_u, m_bu, mean, rstd, H, G: tl.constexpr):
    """The normalised products (q - mean) * rstd of a unit chunk, per gate, from the scratch."""
    q0, q1, q2, q3 = load_gate_tiles(p_q + o_u[None, :], m_bu, H, G)
    return ((q0 - mean) * rstd, (q1 - mean) * rstd, (q2 - mean) * rstd, (q3 - mean) * rstd)


@triton.jit
def _gains(g_ptr, o_u, m_u, H, G: tl.constexpr):
    g0, g1, g2, g3 = load_gate_tiles(g_ptr + o_u, m_u, H, G)
    return g0[None, :], g1[None, :], g2[None, :], g3[None, :]


@triton.heuristics({"HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
                    "HAS_BHN": lambda a: a["b_hn_ptr"] is not None,
                    "FAST": lambda a: fast_activations(a["w_hh_ptr"].dtype)})
@triton.jit(do_not_specialize=["s_begin", "s_end", "T"])
def _ln_fwd_kernel(
    xg_ptr, stride_xt, stride_xb,      # [T, B, D*G*H] input side (normalised, biases folded)
    h0_ptr, c0_ptr,                    # [D, B, H] contiguous
    w_hh_ptr, b_hn_ptr, gh_ptr,        # [D, G*H, H], [D, H], [D, G*H] LN_h's gain
    gc_ptr, bc_ptr,                    # [D, H] LN_c's gain and bias (LSTM)
    len_ptr,                           # [B] int32 sequence lengths (packed input)
    y_ptr, stride_yt, stride_yb,       # [T, B, D*H] states after every step
    hn_ptr, cn_ptr,                    # [D, B, H] final states
    q_ptr, cs_ptr,                     # scratch: [D, B, G*H] products, [2, D, B, H] cell state
    gates_ptr, cell_ptr,               # saved: [T, B, D, NSAVE*H], [T, B, D, H]
    qhat_ptr, stats_ptr,               # saved: [T, B, D, G*H] normalised products, [T, B, D, 4]
    s_begin, s_end, T, B, H,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr, SAVE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BHN: tl.constexpr, HAS_LENGTHS: tl.constexpr, FAST: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    D = tl.num_programs(1)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    ob64 = o_b.to(tl.int64)
    o_j = tl.arange(0, BLOCK_H)
    o_k = tl.arange(0, BLOCK_K)
    W_DTYPE = w_hh_ptr.dtype.element_ty
    Y_DTYPE = y_ptr.dtype.element_ty
    GH = G * H
    p_rows = (i_d * B + ob64)[:, None]          # this program's rows of [D, B, .] tensors
    p_q = q_ptr + p_rows * GH
    w_base = w_hh_ptr + i_d * (GH * H)
    if HAS_LENGTHS:
        b_len = tl.load(len_ptr + o_b, mask=m_b, other=0)

    for s in range(s_begin, s_end):
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        t_prev = prev_time(t, i_d, T)
        has_prev = positive(s, o_b)[:, None]
        last = positive(s - T + 2, o_b)[:, None]       # the final step: h_n and c_n
        if HAS_LENGTHS:
            act = (t < b_len)[:, None]
        else:
            act = m_b[:, None]
        p_row = (t64 * B + ob64)[:, None] * D + i_d   # row of the saved tensors
        p_x = xg_ptr + t64 * stride_xt + ob64[:, None] * stride_xb + i_d * GH
        p_y = y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * H
        p_c_in = cs_ptr + ((s % 2) * D * B) * H + p_rows * H
        p_c_out = cs_ptr + (((s + 1) % 2) * D * B) * H + p_rows * H

        # 1. q = h W_hh^T for every unit chunk and gate, into the scratch; row sums.
        q_sum = tl.zeros([BLOCK_B], dtype=ACC)
        for j0 in range(0, H, BLOCK_H):
            o_u = j0 + o_j
            m_u = o_u < H
            m_bu = m_b[:, None] & m_u[None, :]
            a0 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
            a1 = a0
            a2 = a0
            a3 = a0
            for k0 in range(0, H, BLOCK_K):
                o_f = k0 + o_k
                m_f = o_f < H
                b_h = _state_tile(y_ptr, stride_yt, stride_yb, h0_ptr, t_prev, has_prev, ob64,
                                  m_b, o_f, m_f, i_d, B, H).to(W_DTYPE)
                # Gate k of W_hh[d] as a [BLOCK_K, BLOCK_H] tile: the K x N operand.
                w0, w1, w2, w3 = load_gate_tiles(w_base + o_u[None, :] * H + o_f[:, None],
                                                 m_f[:, None] & m_u[None, :], H * H, G)
                p0, p1, p2, p3 = recurrent_products(b_h, w0, w1, w2, w3, G, ACC, PRECISION)
                a0 += p0
                a1 += p1
                a2 += p2
                a3 += p3
            store_gates(p_q + o_u[None, :], a0, a1, a2, a3, m_bu, H, G)
            q_sum += _gate_sum(a0, a1, a2, a3, m_bu, G)
        tl.debug_barrier()
        mean = (q_sum / GH)[:, None]
        # 2. The variance, from the scratch.
        q_var = tl.zeros([BLOCK_B], dtype=ACC)
        for j0 in range(0, H, BLOCK_H):
            o_u = j0 + o_j
            m_bu = m_b[:, None] & (o_u < H)[None, :]
            n0, n1, n2, n3 = _normalised(p_q, o_u, m_bu, mean, 1.0, H, G)
            q_var += _gate_sum(n0 * n0, n1 * n1, n2 * n2, n3 * n3, m_bu, G)
        rstd = (1.0 / tl.sqrt(q_var / GH + EPS))[:, None]
        # 3. The cell, per unit chunk.
        c_sum = tl.zeros([BLOCK_B], dtype=ACC)
        for j0 in range(0, H, BLOCK_H):
            o_u = j0 + o_j
            m_u = o_u < H
            m_bu = m_b[:, None] & m_u[None, :]
            n0, n1, n2, n3 = _normalised(p_q, o_u, m_bu, mean, rstd, H, G)
            g0, g1, g2, g3 = _gains(gh_ptr + i_d * GH, o_u, m_u, H, G)
            x0, x1, x2, x3 = load_gate_tiles(p_x + o_u[None, :], m_bu, H, G)
            if SAVE:
                store_gates(qhat_ptr + p_row * GH + o_u[None, :], n0, n1, n2, n3, m_bu, H, G)
            if CELL == LSTM:
                i = act_sigmoid(x0.to(ACC) + g0 * n0, FAST)
                f = act_sigmoid(x1.to(ACC) + g1 * n1, FAST)
                g = act_tanh(x2.to(ACC) + g2 * n2, FAST)
                o = act_sigmoid(x3.to(ACC) + g3 * n3, FAST)
                c_in = tl.where(has_prev,
                                tl.load(p_c_in + o_u[None, :], mask=m_bu & has_prev, other=0.0),
                                tl.load(c0_ptr + p_rows * H + o_u[None, :],
                                        mask=m_bu & (has_prev == 0), other=0.0).to(ACC))
                c_new = tl.where(act, lstm_new_cell(i, f, g, c_in), c_in)
                tl.store(p_c_out + o_u[None, :], c_new, mask=m_bu)
                c_sum += tl.sum(tl.where(m_bu, c_new, 0.0), 1)
                if SAVE:
                    save_gates(gates_ptr + p_row * (NSAVE * H) + o_u[None, :], i, f, g, o,
                               m_bu, H)
                    tl.store(cell_ptr + p_row * H + o_u[None, :],
                             c_new.to(cell_ptr.dtype.element_ty), mask=m_bu)
                tl.store(cn_ptr + p_rows * H + o_u[None, :], c_new.to(cn_ptr.dtype.element_ty),
                         mask=m_bu & last)
            else:
                s3 = g2 * n2
                if HAS_BHN:
                    s3 += tl.load(b_hn_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)[None, :]
                h_in = _state_tile(y_ptr, stride_yt, stride_yb, h0_ptr, t_prev, has_prev, ob64,
                                   m_b, o_u, m_u, i_d, B, H).to(ACC)
                r, z, n, h_new = gru_fwd_pointwise(x0.to(ACC) + g0 * n0, x1.to(ACC) + g1 * n1,
                                                   x2.to(ACC), s3, h_in, FAST)
                if SAVE:
                    save_gates(gates_ptr + p_row * (NSAVE * H) + o_u[None, :], r, z, n, s3,
                               m_bu, H)
                h_new = tl.where(act, h_new, h_in).to(Y_DTYPE)
                tl.store(p_y + o_u[None, :], h_new, mask=m_bu)
                tl.store(hn_ptr + p_rows * H + o_u[None, :], h_new.to(hn_ptr.dtype.element_ty),
                         mask=m_bu & last)
        if CELL == LSTM:
            # 4. LN_c's statistics, then h' = o * tanh(LN_c(c')).
            tl.debug_barrier()
            c_mean = (c_sum / H)[:, None]
            c_var = tl.zeros([BLOCK_B], dtype=ACC)
            for j0 in range(0, H, BLOCK_H):
                o_u = j0 + o_j
                m_bu = m_b[:, None] & (o_u < H)[None, :]
                dc = tl.load(p_c_out + o_u[None, :], mask=m_bu, other=0.0) - c_mean
                c_var += tl.sum(tl.where(m_bu, dc * dc, 0.0), 1)
            c_rstd = (1.0 / tl.sqrt(c_var / H + EPS))[:, None]
            for j0 in range(0, H, BLOCK_H):
                o_u = j0 + o_j
                m_u = o_u < H
                m_bu = m_b[:, None] & m_u[None, :]
                q3 = tl.load(p_q + 3 * H + o_u[None, :], mask=m_bu, other=0.0)
                g3 = tl.load(gh_ptr + i_d * GH + 3 * H + o_u, mask=m_u, other=0.0)[None, :]
                x3 = tl.load(p_x + 3 * H + o_u[None, :], mask=m_bu, other=0.0).to(ACC)
                o = act_sigmoid(x3 + g3 * ((q3 - mean) * rstd), FAST)
                c_hat = (tl.load(p_c_out + o_u[None, :], mask=m_bu, other=0.0) - c_mean) * c_rstd
                gc = tl.load(gc_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)[None, :]
                bc = tl.load(bc_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)[None, :]
                h_new = o * act_tanh(gc * c_hat + bc, FAST)
                if HAS_LENGTHS:  # a row past its length keeps its state
                    h_in = _state_tile(y_ptr, stride_yt, stride_yb, h0_ptr, t_prev, has_prev,
                                       ob64, m_b, o_u, m_u, i_d, B, H).to(ACC)
                    h_new = tl.where(act, h_new, h_in)
                h_new = h_new.to(Y_DTYPE)
                tl.store(p_y + o_u[None, :], h_new, mask=m_bu)
                tl.store(hn_ptr + p_rows * H + o_u[None, :], h_new.to(hn_ptr.dtype.element_ty),
                         mask=m_bu & last)
            if SAVE:
                p_st = stats_ptr + p_row * 4
                tl.store(p_st + 1, c_mean, mask=m_b[:, None])
                tl.store(p_st + 2, c_rstd, mask=m_b[:, None])
        if SAVE:
            tl.store(stats_ptr + p_row * 4, rstd, mask=m_b[:, None])
        tl.debug_barrier()   # this step's y before the next step reads it


@triton.jit
def _carried_dh(dst_ptr, dy_ptr, stride_dyt, stride_dyb, t64, dq_ptr, t_next, has_next,
                keep_ptr, w_base, p_rows, ob64, m_b, o_j, o_k, i_d, D, B, H,
                ADD_DY: tl.constexpr, G: tl.constexpr, ACC: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """dh of the state a step produced: ``dq`` of the step after it times W_hh (where there is
    one), plus what bypassed W_hh (``keep``), plus the step's output gradient (``ADD_DY``)."""
    GH = G * H
    W_DTYPE = w_base.dtype.element_ty
    p_dq = dq_ptr + ((t_next * B + ob64)[:, None] * D + i_d) * GH
    for f0 in range(0, H, BLOCK_K):
        o_f = f0 + o_k
        m_f = o_f < H
        m_bf = m_b[:, None] & m_f[None, :]
        acc = tl.load(keep_ptr + p_rows * H + o_f[None, :], mask=m_bf, other=0.0)
        if ADD_DY:
            acc += tl.load(dy_ptr + t64 * stride_dyt + ob64[:, None] * stride_dyb + i_d * H
                           + o_f[None, :], mask=m_bf, other=0.0).to(ACC)
        for j0 in range(0, H, BLOCK_H):
            o_u = j0 + o_j
            m_u = o_u < H
            m_du = m_b[:, None] & m_u[None, :] & has_next
            # Gate k of W_hh[d] as its natural [BLOCK_H, BLOCK_K] tile.
            w0, w1, w2, w3 = load_gate_tiles(w_base + o_u[:, None] * H + o_f[None, :],
                                             m_u[:, None] & m_f[None, :], H * H, G)
            d0, d1, d2, d3 = load_gate_tiles(p_dq + o_u[None, :], m_du, H, G)
            acc += tl.dot(d0.to(W_DTYPE), w0, input_precision=PRECISION).to(ACC)
            acc += tl.dot(d1.to(W_DTYPE), w1, input_precision=PRECISION).to(ACC)
            acc += tl.dot(d2.to(W_DTYPE), w2, input_precision=PRECISION).to(ACC)
            if G == 4:
                acc += tl.dot(d3.to(W_DTYPE), w3, input_precision=PRECISION).to(ACC)
        tl.store(dst_ptr + p_rows * H + o_f[None, :], acc.to(dst_ptr.dtype.element_ty),
                 mask=m_bf)


@triton.heuristics({"HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
                    "FAST": lambda a: fast_activations(a["w_hh_ptr"].dtype)})
@triton.jit(do_not_specialize=["k_begin", "k_end", "T"])
def _ln_bwd_kernel(
    dy_ptr, stride_dyt, stride_dyb,    # [T, B, D*H] gradient of the outputs
    y_ptr, stride_yt, stride_yb,       # [T, B, D*H] forward states
    h0_ptr, c0_ptr,                    # [D, B, H]
    gates_ptr, cell_ptr, qhat_ptr, stats_ptr,   # saved by the forward
    w_hh_ptr, gh_ptr, gc_ptr, bc_ptr, len_ptr,
    dgx_ptr, dgh_ptr, dq_ptr,          # [T, B, D*G*H]: input side, LN_h's output (GRU), q
    dh0_ptr, dc0_ptr,                  # [D, B, H]
    dh_ptr, keep_ptr, dcs_ptr, e_ptr,  # scratch: [D, B, H] x2, [2, D, B, H], [D, B, G*H]
    dgc_ptr,                           # [programs over B, D, 2, H] LN_c's gain / bias grads
    k_begin, k_end, T, B, H,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, FAST: tl.constexpr,
):
    """``keep`` starts as dh_n and ``dcs[T % 2]`` as dc_n (the launcher fills them)."""
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    D = tl.num_programs(1)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    ob64 = o_b.to(tl.int64)
    o_j = tl.arange(0, BLOCK_H)
    o_k = tl.arange(0, BLOCK_K)
    GH = G * H
    p_rows = (i_d * B + ob64)[:, None]
    w_base = w_hh_ptr + i_d * (GH * H)
    p_e = e_ptr + p_rows * GH
    p_dgc = dgc_ptr + (i_b * D + i_d) * (2 * H)
    if HAS_LENGTHS:
        b_len = tl.load(len_ptr + o_b, mask=m_b, other=0)

    for k in range(k_begin, k_end):
        s = T - 1 - k                      # the forward step being undone
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        t_prev = prev_time(t, i_d, T)
        has_prev = positive(s, o_b)[:, None]
        if HAS_LENGTHS:
            act = (t < b_len)[:, None] & m_b[:, None]
        else:
            act = m_b[:, None]
        p_row = (t64 * B + ob64)[:, None] * D + i_d
        p_row_prev = (t_prev * B + ob64)[:, None] * D + i_d
        p_dc_in = dcs_ptr + (((s + 1) % 2) * D * B) * H + p_rows * H   # from the step after
        p_dc_out = dcs_ptr + ((s % 2) * D * B) * H + p_rows * H

        # 1. dh of this step's state.
        _carried_dh(dh_ptr, dy_ptr, stride_dyt, stride_dyb, t64, dq_ptr, next_time(s, i_d, T),
                    positive(k, o_b)[:, None], keep_ptr, w_base, p_rows, ob64, m_b, o_j, o_k,
                    i_d, D, B, H, True, G, ACC, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
        tl.debug_barrier()
        if CELL == LSTM:
            # 2. LN_c's row sums: h' = o * tanh(u), u = g_c * c_hat + b_c.
            c_mean = tl.load(stats_ptr + p_row * 4 + 1, mask=m_b[:, None], other=0.0)
            c_rstd = tl.load(stats_ptr + p_row * 4 + 2, mask=m_b[:, None], other=0.0)
            s1 = tl.zeros([BLOCK_B], dtype=ACC)
            s2 = tl.zeros([BLOCK_B], dtype=ACC)
            for j0 in range(0, H, BLOCK_H):
                o_u = j0 + o_j
                m_u = o_u < H
                m_bu = m_b[:, None] & m_u[None, :]
                du, c_hat, gc, tu, o = _ln_cell_grad(dh_ptr, gates_ptr, cell_ptr, gc_ptr, bc_ptr,
                                                     p_rows, p_row, o_u, m_u, m_bu, act, c_mean,
                                                     c_rstd, i_d, H, NSAVE, ACC, FAST)
                s1 += tl.sum(du * gc, 1)
                s2 += tl.sum(du * gc * c_hat, 1)
                p_g = p_dgc + o_u
                tl.store(p_g, tl.load(p_g, mask=m_u, other=0.0) + tl.sum(du * c_hat, 0),
                         mask=m_u)
                tl.store(p_g + H, tl.load(p_g + H, mask=m_u, other=0.0) + tl.sum(du, 0),
                         mask=m_u)
            s1 = (s1 / H)[:, None]
            s2 = (s2 / H)[:, None]
        # 3. The gate gradients (dL: of LN_h's output), and e = g_h * dL with its row sums.
        e1 = tl.zeros([BLOCK_B], dtype=ACC)
        e2 = tl.zeros([BLOCK_B], dtype=ACC)
        for j0 in range(0, H, BLOCK_H):
            o_u = j0 + o_j
            m_u = o_u < H
            m_bu = m_b[:, None] & m_u[None, :]
            dh = tl.load(dh_ptr + p_rows * H + o_u[None, :], mask=m_bu, other=0.0)
            sv0, sv1, sv2, sv3 = load_gate_tiles(gates_ptr + p_row * (NSAVE * H) + o_u[None, :],
                                                 m_bu, H, 4)
            sv0 = sv0.to(ACC)
            sv1 = sv1.to(ACC)
            sv2 = sv2.to(ACC)
            sv3 = sv3.to(ACC)
            if CELL == LSTM:
                du, c_hat, gc, tu, o = _ln_cell_grad(dh_ptr, gates_ptr, cell_ptr, gc_ptr, bc_ptr,
                                                     p_rows, p_row, o_u, m_u, m_bu, act, c_mean,
                                                     c_rstd, i_d, H, NSAVE, ACC, FAST)
                dc_in = tl.load(p_dc_in + o_u[None, :], mask=m_bu, other=0.0)
                dc = c_rstd * (du * gc - s1 - c_hat * s2) + dc_in
                c_prev = tl.where(has_prev,
                                  tl.load(cell_ptr + p_row_prev * H + o_u[None, :],
                                          mask=m_bu & has_prev, other=0.0),
                                  tl.load(c0_ptr + p_rows * H + o_u[None, :],
                                          mask=m_bu & (has_prev == 0), other=0.0)).to(ACC)
                d0 = tl.where(act, dc * sv2 * sv0 * (1.0 - sv0), 0.0)
                d1 = tl.where(act, dc * c_prev * sv1 * (1.0 - sv1), 0.0)
                d2 = tl.where(act, dc * sv0 * (1.0 - sv2 * sv2), 0.0)
                d3 = tl.where(act, dh * tu * o * (1.0 - o), 0.0)
                tl.store(p_dc_out + o_u[None, :], tl.where(act, dc * sv1, dc_in), mask=m_bu)
                tl.store(keep_ptr + p_rows * H + o_u[None, :], tl.where(act, 0.0, dh),
                         mask=m_bu)
                store_gates(dgx_ptr + p_row * GH + o_u[None, :], d0, d1, d2, d3, m_bu, H, 4)
            else:
                h_prev = _state_tile(y_ptr, stride_yt, stride_yb, h0_ptr, t_prev, has_prev,
                                     ob64, m_b, o_u, m_u, i_d, B, H).to(ACC)
                d0, d1, dnx, d2, dhz = gru_bwd_pointwise(dh, sv0, sv1, sv2, sv3, h_prev)
                d0 = tl.where(act, d0, 0.0)
                d1 = tl.where(act, d1, 0.0)
                d2 = tl.where(act, d2, 0.0)
                d3 = d2
                tl.store(keep_ptr + p_rows * H + o_u[None, :], tl.where(act, dhz, dh), mask=m_bu)
                store_gates(dgx_ptr + p_row * GH + o_u[None, :], d0, d1,
                            tl.where(act, dnx, 0.0), d3, m_bu, H, 3)
                store_gates(dgh_ptr + p_row * GH + o_u[None, :], d0, d1, d2, d3, m_bu, H, 3)
            g0, g1, g2, g3 = _gains(gh_ptr + i_d * GH, o_u, m_u, H, G)
            n0, n1, n2, n3 = load_gate_tiles(qhat_ptr + p_row * GH + o_u[None, :], m_bu, H, G)
            e0 = g0 * d0
            ee1 = g1 * d1
            e2_ = g2 * d2
            e3 = g3 * d3
            store_gates(p_e + o_u[None, :], e0, ee1, e2_, e3, m_bu, H, G)
            e1 += _gate_sum(e0, ee1, e2_, e3, m_bu, G)
            e2 += _gate_sum(e0 * n0, ee1 * n1, e2_ * n2, e3 * n3, m_bu, G)
        tl.debug_barrier()
        # 4. LN_h's backward: dq = rstd * (e - mean(e) - q_hat * mean(e * q_hat)).
        rstd = tl.load(stats_ptr + p_row * 4, mask=m_b[:, None], other=0.0)
        e1 = (e1 / GH)[:, None]
        e2 = (e2 / GH)[:, None]
        for j0 in range(0, H, BLOCK_H):
            o_u = j0 + o_j
            m_bu = m_b[:, None] & (o_u < H)[None, :]
            v0, v1, v2, v3 = load_gate_tiles(p_e + o_u[None, :], m_bu, H, G)
            n0, n1, n2, n3 = load_gate_tiles(qhat_ptr + p_row * GH + o_u[None, :], m_bu, H, G)
            store_gates(dq_ptr + p_row * GH + o_u[None, :], rstd * (v0 - e1 - n0 * e2),
                        rstd * (v1 - e1 - n1 * e2), rstd * (v2 - e1 - n2 * e2),
                        rstd * (v3 - e1 - n3 * e2), m_bu, H, G)
        tl.debug_barrier()
        if CELL == LSTM:
            # The initial cell state's gradient, after the first step.
            for j0 in range(0, H, BLOCK_H):
                o_u = j0 + o_j
                m_bu = m_b[:, None] & (o_u < H)[None, :] & (has_prev == 0)
                tl.store(dc0_ptr + p_rows * H + o_u[None, :],
                         tl.load(p_dc_out + o_u[None, :], mask=m_bu, other=0.0).to(
                             dc0_ptr.dtype.element_ty), mask=m_bu)
        if s == 0:
            # The initial state's gradient: dq of the first step times W_hh, plus what
            # bypassed W_hh.
            _carried_dh(dh0_ptr, dy_ptr, stride_dyt, stride_dyb, t64, dq_ptr, t64,
                        positive(1, o_b)[:, None], keep_ptr, w_base, p_rows, ob64, m_b, o_j, o_k,
                        i_d, D, B, H, False, G, ACC, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)


@triton.jit
def _ln_cell_grad(dh_ptr, gates_ptr, cell_ptr, gc_ptr, bc_ptr, p_rows, p_row, o_u, m_u, m_bu,
                  act, c_mean, c_rstd, i_d, H, NSAVE: tl.constexpr, ACC: tl.constexpr,
                  FAST: tl.constexpr):
    """LSTM: for h' = o * tanh(u), u = g_c * c_hat + b_c, the gradient of u (zero on inactive
    rows and padding lanes), c_hat, g_c, tanh(u) and o of a unit chunk."""
    dh = tl.load(dh_ptr + p_rows * H + o_u[None, :], mask=m_bu, other=0.0)
    o = tl.load(gates_ptr + p_row * (NSAVE * H) + 3 * H + o_u[None, :], mask=m_bu,
                other=0.0).to(ACC)
    c_hat = (tl.load(cell_ptr + p_row * H + o_u[None, :], mask=m_bu, other=0.0).to(ACC)
             - c_mean) * c_rstd
    gc = tl.load(gc_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)[None, :]
    bc = tl.load(bc_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)[None, :]
    tu = act_tanh(gc * c_hat + bc, FAST)
    du = tl.where(act & m_bu, dh * o * (1.0 - tu * tu), 0.0)
    return du, tl.where(m_bu, c_hat, 0.0), gc, tu, o


# ---------------------------------------------------------------------------------------------
# Planning and launchers.

BLOCK_B = 16
STRATEGIES = ("persistent", "cooperative", "stepwise")
KERNELS = ("_ln_fwd_kernel", "_ln_bwd_kernel")   # persistent and stepwise


def kernels(strategy: str) -> tuple:
    """(forward, backward) kernel names of a LayerNorm strategy."""
    return layernorm_coop.KERNELS if strategy == "cooperative" else KERNELS


def _tile(n: int) -> int:
    return min(64, max(16, triton.next_power_of_2(n)))


def plan(problem: Problem, spec: DeviceSpec, strategy: str = "") -> Plan:
    """The plan of a LayerNorm recurrence: the forced ``strategy``, or the choice: on a GPU
    ``cooperative`` where W_hh's slices fit on the SMs, else ``persistent``; under the
    interpreter ``persistent`` (``cooperative`` runs there when forced). Raises DoesNotFit."""
    if strategy and strategy not in STRATEGIES:
        raise DoesNotFit(f"a LayerNorm layer runs one of {STRATEGIES}")
    if problem.has_proj:
        raise DoesNotFit("no proj_size")
    if strategy == "cooperative":
        return layernorm_coop.plan(problem, spec)
    if not strategy and not spec.interpreter:
        try:
            return layernorm_coop.plan(problem, spec)
        except DoesNotFit:
            pass
    strategy = strategy or "persistent"
    bh = bk = min(32, _tile(problem.H))
    # Per unit chunk and feature chunk the dots stage G weight tiles and the state tile.
    shared = (problem.G * bk * bh + BLOCK_B * bk) * problem.itemsize * operand_copies(problem)
    if shared > spec.smem_per_block:
        raise DoesNotFit(f"needs about {shared} bytes of shared memory, the device has "
                         f"{spec.smem_per_block} per block")
    # Compiled for sm_90/sm_80/sm_89 (bench/kernel_resources.py --layernorm): 32-unit and
    # 32-feature chunks, 8 warps and ptxas allowed 255 registers leave no spills but 8 bytes in
    # one variant (LSTM backward, fp32 as tf32x3, sm_90); 64-unit chunks at 4 warps spilled
    # 100-1000 bytes per thread, and ptxas capped some variants at 128 registers.
    warps = 8
    fwd = KernelConfig("_ln_fwd_kernel", BLOCK_B, bh, bk, warps, 1, shared, 255)
    bwd = KernelConfig("_ln_bwd_kernel", BLOCK_B, bh, bk, warps, 1, shared, 255)
    stepped = strategy == "stepwise"
    return Plan(strategy, (fwd, bwd), grid=(triton.cdiv(problem.B, BLOCK_B), problem.D),
                launches_per_step=(1, 1) if stepped else (0, 0),
                launches_fixed=(0, 0) if stepped else (1, 1))


def _ranges(T: int, stepped: bool):
    return [(s, s + 1) for s in range(T)] if stepped else [(0, T)]


def forward(a, the_plan: Plan) -> None:
    """``a``: ``LayerNormArgs`` (ops/recurrence_ln.py) of the forward."""
    if the_plan.strategy == "cooperative":
        return layernorm_coop.forward(a, the_plan)
    cfg = the_plan.config("_ln_fwd_kernel")
    grid = (triton.cdiv(a.B, cfg.block_b), a.D)
    for s_begin, s_end in _ranges(a.T, the_plan.strategy == "stepwise"):
        launch_kernel(
            _ln_fwd_kernel, grid,
            xg_ptr=a.xg, stride_xt=a.xg.stride(0), stride_xb=a.xg.stride(1),
            h0_ptr=a.h0, c0_ptr=a.c0, w_hh_ptr=a.w_hh, b_hn_ptr=a.b_hn, gh_ptr=a.g_h,
            gc_ptr=a.g_c, bc_ptr=a.b_c, len_ptr=a.lengths,
            y_ptr=a.y, stride_yt=a.y.stride(0), stride_yb=a.y.stride(1), hn_ptr=a.hn,
            cn_ptr=a.cn, q_ptr=a.scratch[0], cs_ptr=a.scratch[1], gates_ptr=a.gates,
            cell_ptr=a.cell, qhat_ptr=a.qhat, stats_ptr=a.stats,
            s_begin=s_begin, s_end=s_end, T=a.T, B=a.B, H=a.H,
            CELL=a.mode, G=a.G, NSAVE=a.NSAVE, SAVE=a.save, ACC=a.ACC, PRECISION=a.precision,
            BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            **cfg.launch_options())


def backward(b, the_plan: Plan) -> None:
    """``b``: ``LayerNormGradArgs`` (ops/recurrence_ln.py) of the backward."""
    if the_plan.strategy == "cooperative":
        return layernorm_coop.backward(b, the_plan)
    cfg = the_plan.config("_ln_bwd_kernel")
    grid = (triton.cdiv(b.B, cfg.block_b), b.D)
    dh, keep, dcs, e = b.scratch
    for k_begin, k_end in _ranges(b.T, the_plan.strategy == "stepwise"):
        launch_kernel(
            _ln_bwd_kernel, grid,
            dy_ptr=b.dy, stride_dyt=b.dy.stride(0), stride_dyb=b.dy.stride(1),
            y_ptr=b.y, stride_yt=b.y.stride(0), stride_yb=b.y.stride(1),
            h0_ptr=b.h0, c0_ptr=b.c0, gates_ptr=b.gates, cell_ptr=b.cell, qhat_ptr=b.qhat,
            stats_ptr=b.stats, w_hh_ptr=b.w_hh, gh_ptr=b.g_h, gc_ptr=b.g_c, bc_ptr=b.b_c,
            len_ptr=b.lengths, dgx_ptr=b.dgx, dgh_ptr=b.dgh, dq_ptr=b.dq, dh0_ptr=b.dh0,
            dc0_ptr=b.dc0, dh_ptr=dh, keep_ptr=keep, dcs_ptr=dcs, e_ptr=e,
            dgc_ptr=b.dgc if b.dgc is not None else dh,  # (an LSTM's only)
            k_begin=k_begin, k_end=k_end, T=b.T, B=b.B, H=b.H,
            CELL=b.mode, G=b.G, NSAVE=b.NSAVE, ACC=b.ACC, PRECISION=b.precision,
            BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            **cfg.launch_options())
