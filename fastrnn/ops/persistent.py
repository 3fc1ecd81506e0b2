"""Strategy "persistent": one program per (batch tile, direction) runs the whole time loop.

The program loads its direction's W_hh (and W_hr) once, keeps h (and c) in registers, and walks
the sequence: per step one tile of input projections in, ``h @ W_hh^T`` on the tensor cores, the
cell's pointwise maths, one tile of outputs (and saved activations) out. No cross-program
communication, so it also runs under the Triton interpreter. It suits small hidden sizes, where
all of W_hh fits on one SM (``select_strategy`` in recurrence.py decides).

Backward walks the sequence in reverse with dh (and dc) in registers and writes the gradients of
the gate pre-activations; the weight gradients are whole-sequence GEMMs afterwards.
"""

import triton
import triton.language as tl

from ._jit import (GRU, LSTM, cell_forward, gru_bwd_pointwise, load_gate_tiles, load_gates,
                   lstm_bwd_pointwise, positive, prev_time, recurrent_products, rnn_act_bwd,
                   step_time, store_gates)


@triton.jit(do_not_specialize=["T"])
def _recurrence_fwd_persistent_kernel(
    xg_ptr, stride_xt, stride_xb,      # [T, B, D*G*H] input projections (feature dim contiguous)
    h0_ptr, c0_ptr,                    # [D, B, P], [D, B, H] contiguous
    w_hh_ptr, b_hn_ptr, w_hr_ptr,      # [D, G*H, P], [D, H], [D, P, H] contiguous
    len_ptr,                           # [B] int32 sequence lengths (packed input)
    y_ptr, stride_yt, stride_yb,       # [T, B, D*P] states after every step
    hn_ptr, cn_ptr,                    # [D, B, P], [D, B, H] final states
    gates_ptr, cell_ptr,               # [T, B, D, NSAVE*H], [T, B, D, H] saved for backward
    T, B, H, P,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    HAS_BHN: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    SAVE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    D = tl.num_programs(1)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_h = tl.arange(0, BLOCK_H)
    o_p = tl.arange(0, BLOCK_P)
    m_b = o_b < B
    m_h = o_h < H
    m_p = o_p < P
    m_bh = m_b[:, None] & m_h[None, :]
    m_bp = m_b[:, None] & m_p[None, :]
    ob64 = o_b.to(tl.int64)
    W_DTYPE = w_hh_ptr.dtype.element_ty
    Y_DTYPE = y_ptr.dtype.element_ty

    # Gate k of W_hh[d] as a [P, H] tile: the K x N operand of h @ W_hh^T.
    p_w = w_hh_ptr + i_d * (G * H * P) + o_h[None, :] * P + o_p[:, None]
    b_w0, b_w1, b_w2, b_w3 = load_gate_tiles(p_w, m_p[:, None] & m_h[None, :], H * P, G)
    if HAS_PROJ:
        # W_hr[d] is [P, H]; as an [H, P] tile for r @ W_hr^T.
        b_wr = tl.load(w_hr_ptr + i_d * (P * H) + o_p[None, :] * H + o_h[:, None],
                       mask=m_h[:, None] & m_p[None, :], other=0.0)
    b_bhn = 0.0
    if HAS_BHN:
        b_bhn = tl.load(b_hn_ptr + i_d * H + o_h, mask=m_h, other=0.0).to(ACC)[None, :]

    p_state = (i_d * B + ob64)[:, None]
    h = tl.load(h0_ptr + p_state * P + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
    c = h  # only an LSTM has a cell state
    if CELL == LSTM:
        c = tl.load(c0_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
    if HAS_LENGTHS:
        b_len = tl.load(len_ptr + o_b, mask=m_b, other=0)
    p_x = xg_ptr + ob64[:, None] * stride_xb + i_d * (G * H) + o_h[None, :]

    for s in range(0, T):
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        # The step's input projections are loaded first: they do not depend on h, so their
        # latency overlaps the recurrent products.
        x0, x1, x2, x3 = load_gate_tiles(p_x + t64 * stride_xt, m_bh, H, G)
        # Padding lanes are zeroed in every operand: an inf in a real lane times a zero weight
        # in a padding column would otherwise leave NaN there, and the next product spreads it.
        b_hw = tl.where(m_bp, h, 0.0).to(W_DTYPE)
        q0, q1, q2, q3 = recurrent_products(b_hw, b_w0, b_w1, b_w2, b_w3, G, ACC, PRECISION)
        h_new, c_new, s0, s1, s2, s3 = cell_forward(x0, x1, x2, x3, q0, q1, q2, q3, h, c, b_bhn,
                                                    CELL, HAS_BHN, ACC)
        p_row = (t64 * B + ob64)[:, None] * D + i_d  # row of the saved-activation tensors
        if SAVE and NSAVE > 0:
            store_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], s0, s1, s2, s3, m_bh, H,
                        4)
        if CELL == LSTM:
            if HAS_PROJ:
                h_new = tl.dot(tl.where(m_bh, h_new, 0.0).to(W_DTYPE), b_wr,
                               input_precision=PRECISION).to(ACC)
            if HAS_LENGTHS:
                c = tl.where((t < b_len)[:, None], c_new, c)
            else:
                c = c_new
            if SAVE:
                # The carried state: backward reads it as the cell state before the next step.
                tl.store(cell_ptr + p_row * H + o_h[None, :], c.to(cell_ptr.dtype.element_ty),
                         mask=m_bh)
        # The state is stored, and carried, at the precision of the layer's dtype.
        h_new = h_new.to(Y_DTYPE).to(ACC)
        if HAS_LENGTHS:
            h = tl.where((t < b_len)[:, None], h_new, h)
        else:
            h = h_new
        tl.store(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * P + o_p[None, :],
                 h.to(Y_DTYPE), mask=m_bp)

    tl.store(hn_ptr + p_state * P + o_p[None, :], h.to(hn_ptr.dtype.element_ty), mask=m_bp)
    if CELL == LSTM:
        tl.store(cn_ptr + p_state * H + o_h[None, :], c.to(cn_ptr.dtype.element_ty), mask=m_bh)


@triton.jit(do_not_specialize=["T"])
def _recurrence_bwd_persistent_kernel(
    dy_ptr, stride_dyt, stride_dyb,    # [T, B, D*P] gradient of the outputs
    dhn_ptr, dcn_ptr,                  # [D, B, P], [D, B, H] gradients of the final states
    y_ptr, stride_yt, stride_yb,       # [T, B, D*P] forward states
    h0_ptr, c0_ptr,                    # [D, B, P], [D, B, H]
    gates_ptr, cell_ptr,               # saved activations
    w_hh_ptr, w_hr_ptr, len_ptr,
    dgx_ptr, dgh_ptr,                  # [T, B, D, G*H] grads of xg and of W_hh h (+ b_hh)
    dhp_ptr,                           # [T, B, D, P] total dh per step (projection only)
    dh0_ptr, dc0_ptr,                  # [D, B, P], [D, B, H]
    T, B, H, P,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    D = tl.num_programs(1)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_h = tl.arange(0, BLOCK_H)
    o_p = tl.arange(0, BLOCK_P)
    m_b = o_b < B
    m_h = o_h < H
    m_p = o_p < P
    m_bh = m_b[:, None] & m_h[None, :]
    m_bp = m_b[:, None] & m_p[None, :]
    ob64 = o_b.to(tl.int64)
    W_DTYPE = w_hh_ptr.dtype.element_ty
    G_DTYPE = dgx_ptr.dtype.element_ty

    # Gate k of W_hh[d] as an [H, P] tile (its natural layout): the K x N operand of dG @ W_hh.
    p_w = w_hh_ptr + i_d * (G * H * P) + o_h[:, None] * P + o_p[None, :]
    b_w0, b_w1, b_w2, b_w3 = load_gate_tiles(p_w, m_h[:, None] & m_p[None, :], H * P, G)
    if HAS_PROJ:
        # W_hr[d] as its natural [P, H] tile, for dh @ W_hr.
        b_wr = tl.load(w_hr_ptr + i_d * (P * H) + o_p[:, None] * H + o_h[None, :],
                       mask=m_p[:, None] & m_h[None, :], other=0.0)

    p_state = (i_d * B + ob64)[:, None]
    dh_c = tl.load(dhn_ptr + p_state * P + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
    if CELL == LSTM:
        dc_c = tl.load(dcn_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
        b_c0 = tl.load(c0_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
    if CELL == GRU:
        b_h0 = tl.load(h0_ptr + p_state * P + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
    if HAS_LENGTHS:
        b_len = tl.load(len_ptr + o_b, mask=m_b, other=0)

    for k in range(0, T):
        s = T - 1 - k                      # forward step being undone
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        has_prev = positive(s, o_b)[:, None]
        t_prev = prev_time(t, i_d, T)
        p_row = (t64 * B + ob64)[:, None] * D + i_d
        p_row_prev = (t_prev * B + ob64)[:, None] * D + i_d
        dh = dh_c + tl.load(dy_ptr + t64 * stride_dyt + ob64[:, None] * stride_dyb + i_d * P
                            + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
        if HAS_LENGTHS:
            act = (t < b_len)[:, None]
        else:
            act = m_b[:, None]
        p_dg = dgx_ptr + p_row * (G * H) + o_h[None, :]
        if CELL == LSTM:
            if HAS_PROJ:
                dr = tl.dot(tl.where(m_bp, dh, 0.0).to(W_DTYPE), b_wr,
                            input_precision=PRECISION).to(ACC)
            else:
                dr = dh
            i, f, g, o = load_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], m_bh, H, ACC)
            c_t = tl.load(cell_ptr + p_row * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
            c_prev = tl.where(has_prev, tl.load(cell_ptr + p_row_prev * H + o_h[None, :],
                                                mask=m_bh & has_prev, other=0.0).to(ACC), b_c0)
            di, df, dg, do, dc_prev = lstm_bwd_pointwise(dr, dc_c, i, f, g, o, c_t, c_prev)
            act_h = act & m_h[None, :]  # inactive rows and padding lanes: zero
            di = tl.where(act_h, di, 0.0)
            df = tl.where(act_h, df, 0.0)
            dg = tl.where(act_h, dg, 0.0)
            do = tl.where(act_h, do, 0.0)
            store_gates(p_dg, di, df, dg, do, m_bh, H, 4)
            dh_new = (tl.dot(di.to(W_DTYPE), b_w0, input_precision=PRECISION).to(ACC)
                      + tl.dot(df.to(W_DTYPE), b_w1, input_precision=PRECISION).to(ACC)
                      + tl.dot(dg.to(W_DTYPE), b_w2, input_precision=PRECISION).to(ACC)
                      + tl.dot(do.to(W_DTYPE), b_w3, input_precision=PRECISION).to(ACC))
            dc_c = tl.where(act, dc_prev, dc_c)
        elif CELL == GRU:
            r, z, n, hn = load_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], m_bh, H, ACC)
            h_prev = tl.where(has_prev, tl.load(
                y_ptr + t_prev * stride_yt + ob64[:, None] * stride_yb + i_d * P + o_p[None, :],
                mask=m_bp & has_prev, other=0.0).to(ACC), b_h0)
            dr, dz, dnx, dnh, dh_z = gru_bwd_pointwise(dh, r, z, n, hn, h_prev)
            act_h = act & m_h[None, :]
            dr = tl.where(act_h, dr, 0.0)
            dz = tl.where(act_h, dz, 0.0)
            dnx = tl.where(act_h, dnx, 0.0)
            dnh = tl.where(act_h, dnh, 0.0)
            store_gates(p_dg, dr, dz, dnx, dnx, m_bh, H, 3)
            store_gates(dgh_ptr + p_row * (G * H) + o_h[None, :], dr, dz, dnh, dnh, m_bh, H, 3)
            dh_new = (tl.dot(dr.to(W_DTYPE), b_w0, input_precision=PRECISION).to(ACC)
                      + tl.dot(dz.to(W_DTYPE), b_w1, input_precision=PRECISION).to(ACC)
                      + tl.dot(dnh.to(W_DTYPE), b_w2, input_precision=PRECISION).to(ACC)
                      + dh_z)
        else:
            h_t = tl.load(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * P
                          + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
            da = tl.where(act & m_h[None, :], rnn_act_bwd(dh, h_t, CELL), 0.0)
            tl.store(p_dg, da.to(G_DTYPE), mask=m_bh)
            dh_new = tl.dot(da.to(W_DTYPE), b_w0, input_precision=PRECISION).to(ACC)
        if HAS_PROJ:
            tl.store(dhp_ptr + p_row * P + o_p[None, :],
                     tl.where(act, dh, 0.0).to(dhp_ptr.dtype.element_ty), mask=m_bp)
        # An inactive row (past its length) passes its gradient through unchanged.
        dh_c = tl.where(act, dh_new, dh)

    tl.store(dh0_ptr + p_state * P + o_p[None, :], dh_c.to(dh0_ptr.dtype.element_ty), mask=m_bp)
    if CELL == LSTM:
        tl.store(dc0_ptr + p_state * H + o_h[None, :], dc_c.to(dc0_ptr.dtype.element_ty),
                 mask=m_bh)


# ---------------------------------------------------------------------------------------------
# Launchers. ``f`` / ``b`` are the Forward / Backward problems built in recurrence.py.

BLOCK_B = 16


def _grid(B, D):
    return (triton.cdiv(B, BLOCK_B), D)


def forward(f):
    _recurrence_fwd_persistent_kernel[_grid(f.B, f.D)](
        f.xg, f.xg.stride(0), f.xg.stride(1),
        f.h0, f.c0, f.w_hh, f.b_hn, f.w_hr, f.lengths,
        f.y, f.y.stride(0), f.y.stride(1),
        f.hn, f.cn, f.gates, f.cell,
        f.T, f.B, f.H, f.P,
        CELL=f.mode, G=f.G, NSAVE=f.NSAVE,
        HAS_BHN=f.has_bhn, HAS_PROJ=f.has_proj, HAS_LENGTHS=f.has_lengths,
        SAVE=f.save, ACC=f.acc, PRECISION=f.precision,
        BLOCK_B=BLOCK_B, BLOCK_H=f.block_h, BLOCK_P=f.block_p,
    )
    return 1


def backward(b):
    _recurrence_bwd_persistent_kernel[_grid(b.B, b.D)](
        b.dy, b.dy.stride(0), b.dy.stride(1),
        b.dhn, b.dcn,
        b.y, b.y.stride(0), b.y.stride(1),
        b.h0, b.c0, b.gates, b.cell,
        b.w_hh, b.w_hr, b.lengths,
        b.dgx, b.dgh, b.dhp, b.dh0, b.dc0,
        b.T, b.B, b.H, b.P,
        CELL=b.mode, G=b.G, NSAVE=b.NSAVE,
        HAS_PROJ=b.has_proj, HAS_LENGTHS=b.has_lengths,
        ACC=b.acc, PRECISION=b.precision,
        BLOCK_B=BLOCK_B, BLOCK_H=b.block_h, BLOCK_P=b.block_p,
    )
    return 1
