"""Strategy "stepwise": one launch per time step, for any hidden size.

Programs tile (batch, hidden units, direction); each computes all gates of its hidden units, so
the recurrent GEMM and the cell's pointwise maths are fused and only h crosses programs, through
global memory between launches. Both directions advance in the same launch. With proj_size a
second launch per step applies W_hr. General, and correct under the interpreter; on a GPU it pays
a launch per step, which is why the persistent strategies exist.

Backward, per step in reverse: launch A forms the total dh of the step (dy plus the recurrent term
``dG_{next} @ W_hh``), launch B the cell's pointwise gradients; a final launch A forms dh0.
"""

import triton
import triton.language as tl

from ._jit import (GRU, LSTM, cell_forward, gru_bwd_pointwise, load_gate_tiles, load_gates,
                   lstm_bwd_pointwise, positive, prev_time, rnn_act_bwd, step_time, store_gates)


@triton.jit
def _load_prev(y_ptr, stride_yt, stride_yb, t_prev, init_ptr, init_rows, init_width, s,
               o_b, o_f, m, i_d, P):
    """State before forward step s: y at t_prev, or the initial state when s == 0."""
    ob64 = o_b.to(tl.int64)
    has_prev = positive(s, o_b)[:, None]
    first = positive(1 - s, o_b)[:, None]
    from_y = tl.load(y_ptr + t_prev * stride_yt + ob64[:, None] * stride_yb + i_d * P
                     + o_f[None, :], mask=m & has_prev, other=0.0)
    from_init = tl.load(init_ptr + (init_rows + ob64)[:, None] * init_width + o_f[None, :],
                        mask=m & first, other=0.0)
    return tl.where(has_prev, from_y, from_init)


@triton.jit
def _recurrence_fwd_step_kernel(
    xg_ptr, stride_xt, stride_xb,      # [T, B, D*G*H]
    h0_ptr, c0_ptr,                    # [D, B, P], [D, B, H]
    w_hh_ptr, b_hn_ptr, len_ptr,       # [D, G*H, P], [D, H], [B]
    y_ptr, stride_yt, stride_yb,       # [T, B, D*P]
    r_ptr,                             # [D, B, H] o*tanh(c) of this step (projection only)
    gates_ptr, cell_ptr,               # [T, B, D, NSAVE*H], [T, B, D, H]
    s, T, B, H, P,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    HAS_BHN: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    SAVE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_h = tl.program_id(1)
    i_d = tl.program_id(2)
    D = tl.num_programs(2)
    t = step_time(s, i_d, T)
    t64 = t.to(tl.int64)
    t_prev = prev_time(t, i_d, T)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_b = o_b < B
    m_h = o_h < H
    m_bh = m_b[:, None] & m_h[None, :]
    ob64 = o_b.to(tl.int64)
    W_DTYPE = w_hh_ptr.dtype.element_ty
    Y_DTYPE = y_ptr.dtype.element_ty

    acc0 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc1 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc2 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc3 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for k0 in range(0, P, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < P
        b_h = _load_prev(y_ptr, stride_yt, stride_yb, t_prev, h0_ptr, i_d * B, P, s,
                         o_b, o_k, m_b[:, None] & m_k[None, :], i_d, P).to(W_DTYPE)
        p_w = w_hh_ptr + i_d * (G * H * P) + o_h[None, :] * P + o_k[:, None]
        m_w = m_k[:, None] & m_h[None, :]
        acc0 += tl.dot(b_h, tl.load(p_w, mask=m_w, other=0.0), input_precision=PRECISION).to(ACC)
        if G >= 3:
            acc1 += tl.dot(b_h, tl.load(p_w + H * P, mask=m_w, other=0.0),
                           input_precision=PRECISION).to(ACC)
            acc2 += tl.dot(b_h, tl.load(p_w + 2 * H * P, mask=m_w, other=0.0),
                           input_precision=PRECISION).to(ACC)
        if G == 4:
            acc3 += tl.dot(b_h, tl.load(p_w + 3 * H * P, mask=m_w, other=0.0),
                           input_precision=PRECISION).to(ACC)

    p_x = xg_ptr + t64 * stride_xt + ob64[:, None] * stride_xb + i_d * (G * H) + o_h[None, :]
    p_row = (t64 * B + ob64)[:, None] * D + i_d
    p_y = y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * P + o_h[None, :]
    if HAS_LENGTHS:
        act = (t < tl.load(len_ptr + o_b, mask=m_b, other=0))[:, None]
    else:
        act = m_b[:, None]
    # h_prev (the own units' previous state) is read only where it is used: GRU's update, and
    # the state an inactive row keeps; the cell state travels through the (fp32) cell buffer.
    h_prev = acc0
    c = acc0
    if CELL == LSTM:
        c = _load_prev(cell_ptr, B * D * H, D * H, t_prev, c0_ptr, i_d * B, H, s,
                       o_b, o_h, m_bh, i_d, H).to(ACC)
    if CELL != LSTM or not HAS_PROJ:
        h_prev = _load_prev(y_ptr, stride_yt, stride_yb, t_prev, h0_ptr, i_d * B, P, s,
                            o_b, o_h, m_bh, i_d, P).to(ACC)
    b_bhn = 0.0
    if HAS_BHN:
        b_bhn = tl.load(b_hn_ptr + i_d * H + o_h, mask=m_h, other=0.0).to(ACC)[None, :]
    x0, x1, x2, x3 = load_gate_tiles(p_x, m_bh, H, G)
    h_new, c_new, s0, s1, s2, s3 = cell_forward(x0, x1, x2, x3, acc0, acc1, acc2, acc3, h_prev, c,
                                                b_bhn, CELL, HAS_BHN, ACC)
    if SAVE and NSAVE > 0:
        store_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], s0, s1, s2, s3, m_bh, H, 4)
    if CELL == LSTM:
        tl.store(cell_ptr + p_row * H + o_h[None, :],
                 tl.where(act, c_new, c).to(cell_ptr.dtype.element_ty), mask=m_bh)
    if HAS_PROJ:  # the projection launch makes h_t from o * tanh(c_t)
        tl.store(r_ptr + (i_d * B + ob64)[:, None] * H + o_h[None, :],
                 h_new.to(r_ptr.dtype.element_ty), mask=m_bh)
    else:
        tl.store(p_y, tl.where(act, h_new, h_prev).to(Y_DTYPE), mask=m_bh)


@triton.jit
def _projection_step_kernel(
    r_ptr, w_hr_ptr, h0_ptr, len_ptr,  # [D, B, H], [D, P, H], [D, B, P], [B]
    y_ptr, stride_yt, stride_yb,
    s, T, B, H, P,
    HAS_LENGTHS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """LSTM with proj_size: h_t = r_t @ W_hr^T (inactive rows keep their state)."""
    i_b = tl.program_id(0)
    i_p = tl.program_id(1)
    i_d = tl.program_id(2)
    t = step_time(s, i_d, T)
    t64 = t.to(tl.int64)
    t_prev = prev_time(t, i_d, T)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_b = o_b < B
    m_p = o_p < P
    m_bp = m_b[:, None] & m_p[None, :]
    ob64 = o_b.to(tl.int64)
    W_DTYPE = w_hr_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_B, BLOCK_P], dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        b_r = tl.load(r_ptr + (i_d * B + ob64)[:, None] * H + o_k[None, :],
                      mask=m_b[:, None] & m_k[None, :], other=0.0).to(W_DTYPE)
        b_w = tl.load(w_hr_ptr + i_d * (P * H) + o_p[None, :] * H + o_k[:, None],
                      mask=m_k[:, None] & m_p[None, :], other=0.0)
        acc += tl.dot(b_r, b_w, input_precision=PRECISION).to(ACC)
    h_new = acc
    if HAS_LENGTHS:
        act = (t < tl.load(len_ptr + o_b, mask=m_b, other=0))[:, None]
        h_prev = _load_prev(y_ptr, stride_yt, stride_yb, t_prev, h0_ptr, i_d * B, P, s,
                            o_b, o_p, m_bp, i_d, P).to(ACC)
        h_new = tl.where(act, h_new, h_prev)
    tl.store(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * P + o_p[None, :],
             h_new.to(y_ptr.dtype.element_ty), mask=m_bp)


@triton.jit
def _recurrence_bwd_step_dh_kernel(
    dy_ptr, stride_dyt, stride_dyb,    # [T, B, D*P]
    gates_ptr, w_hh_ptr, len_ptr,
    dgh_ptr,                           # [T, B, D, G*H] gradients of W_hh h (+ b_hh) so far
    dh_ptr,                            # [D, B, P] (ACC) total dh of the previous step, updated
    dhp_ptr, dh0_ptr,                  # [T, B, D, P] (projection), [D, B, P] (FINAL)
    k, T, B, H, P,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, FINAL: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Total dh of backward step k (forward step s = T-1-k): dy_t plus what flows back from the
    step undone before it, ``dG_q @ W_hh + keep_q * dh_q``. FINAL: the same for dh0 (no dy)."""
    i_b = tl.program_id(0)
    i_p = tl.program_id(1)
    i_d = tl.program_id(2)
    D = tl.num_programs(2)
    if FINAL:
        s = 0 * k                          # forward step 0, the one undone last
        q = s
    else:
        s = T - 1 - k
        q = s + 1                          # the forward step undone just before (q == T: none)
    t = step_time(s, i_d, T)
    t_q = step_time(q, i_d, T)
    tq = tl.minimum(tl.maximum(t_q, 0), T - 1).to(tl.int64)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_b = o_b < B
    m_p = o_p < P
    m_bp = m_b[:, None] & m_p[None, :]
    ob64 = o_b.to(tl.int64)
    has_q = positive(T - q, o_b)[:, None]
    W_DTYPE = w_hh_ptr.dtype.element_ty
    p_rowq = (tq * B + ob64)[:, None] * D + i_d

    acc = tl.zeros([BLOCK_B, BLOCK_P], dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        m_g = m_b[:, None] & m_k[None, :] & has_q
        m_w = m_k[:, None] & m_p[None, :]
        p_g = dgh_ptr + p_rowq * (G * H) + o_k[None, :]
        p_w = w_hh_ptr + i_d * (G * H * P) + o_k[:, None] * P + o_p[None, :]
        for gate in tl.static_range(G):
            acc += tl.dot(tl.load(p_g + gate * H, mask=m_g, other=0.0).to(W_DTYPE),
                          tl.load(p_w + gate * H * P, mask=m_w, other=0.0),
                          input_precision=PRECISION).to(ACC)
    # keep: how much of dh_q passes straight to the state before step q.
    if HAS_LENGTHS:
        act_q = (t_q < tl.load(len_ptr + o_b, mask=m_b, other=0))[:, None] & has_q
    else:
        act_q = m_b[:, None] & has_q
    if CELL == GRU:
        z_q = tl.load(gates_ptr + p_rowq * (NSAVE * H) + H + o_p[None, :], mask=m_bp & has_q,
                      other=0.0).to(ACC)
        keep = tl.where(act_q, z_q, 1.0)
    else:
        keep = tl.where(act_q, 0.0, 1.0)
    p_dh = dh_ptr + (i_d * B + ob64)[:, None] * P + o_p[None, :]
    dh = acc + keep * tl.load(p_dh, mask=m_bp, other=0.0)
    if FINAL:
        tl.store(dh0_ptr + (i_d * B + ob64)[:, None] * P + o_p[None, :],
                 dh.to(dh0_ptr.dtype.element_ty), mask=m_bp)
    else:
        t64 = t.to(tl.int64)
        dh += tl.load(dy_ptr + t64 * stride_dyt + ob64[:, None] * stride_dyb + i_d * P
                      + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
        tl.store(p_dh, dh, mask=m_bp)
        if HAS_PROJ:
            if HAS_LENGTHS:
                act = (t < tl.load(len_ptr + o_b, mask=m_b, other=0))[:, None]
                dh_p = tl.where(act, dh, 0.0)
            else:
                dh_p = dh
            tl.store(dhp_ptr + ((t64 * B + ob64)[:, None] * D + i_d) * P + o_p[None, :],
                     dh_p.to(dhp_ptr.dtype.element_ty), mask=m_bp)


@triton.jit
def _recurrence_bwd_step_gates_kernel(
    y_ptr, stride_yt, stride_yb, h0_ptr, c0_ptr,
    gates_ptr, cell_ptr, w_hr_ptr, len_ptr,
    dh_ptr, dc_ptr,                    # [D, B, P] total dh of this step, [D, B, H] dc (updated)
    dgx_ptr, dgh_ptr,                  # [T, B, D, G*H]
    k, T, B, H, P,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gradients of the gate pre-activations of forward step s = T-1-k, for a hidden tile."""
    i_b = tl.program_id(0)
    i_h = tl.program_id(1)
    i_d = tl.program_id(2)
    D = tl.num_programs(2)
    s = T - 1 - k
    t = step_time(s, i_d, T)
    t64 = t.to(tl.int64)
    t_prev = prev_time(t, i_d, T)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_b = o_b < B
    m_h = o_h < H
    m_bh = m_b[:, None] & m_h[None, :]
    ob64 = o_b.to(tl.int64)
    G_DTYPE = dgx_ptr.dtype.element_ty
    p_row = (t64 * B + ob64)[:, None] * D + i_d
    p_dg = dgx_ptr + p_row * (G * H) + o_h[None, :]
    if HAS_LENGTHS:
        act = (t < tl.load(len_ptr + o_b, mask=m_b, other=0))[:, None]
    else:
        act = m_b[:, None]

    if HAS_PROJ:
        W_DTYPE = w_hr_ptr.dtype.element_ty
        dr = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        for k0 in range(0, P, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < P
            b_dh = tl.load(dh_ptr + (i_d * B + ob64)[:, None] * P + o_k[None, :],
                           mask=m_b[:, None] & m_k[None, :], other=0.0).to(W_DTYPE)
            b_w = tl.load(w_hr_ptr + i_d * (P * H) + o_k[:, None] * H + o_h[None, :],
                          mask=m_k[:, None] & m_h[None, :], other=0.0)
            dr += tl.dot(b_dh, b_w, input_precision=PRECISION).to(ACC)
    else:
        dr = tl.load(dh_ptr + (i_d * B + ob64)[:, None] * P + o_h[None, :], mask=m_bh,
                     other=0.0).to(ACC)

    if CELL == LSTM:
        i, f, g, o = load_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], m_bh, H, ACC)
        c_t = tl.load(cell_ptr + p_row * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
        c_prev = _load_prev(cell_ptr, B * D * H, D * H, t_prev, c0_ptr, i_d * B, H, s,
                            o_b, o_h, m_bh, i_d, H).to(ACC)
        p_dc = dc_ptr + (i_d * B + ob64)[:, None] * H + o_h[None, :]
        dc = tl.load(p_dc, mask=m_bh, other=0.0)
        di, df, dg, do, dc_prev = lstm_bwd_pointwise(dr, dc, i, f, g, o, c_t, c_prev)
        store_gates(p_dg, tl.where(act, di, 0.0), tl.where(act, df, 0.0),
                    tl.where(act, dg, 0.0), tl.where(act, do, 0.0), m_bh, H, 4)
        tl.store(p_dc, tl.where(act, dc_prev, dc), mask=m_bh)
    elif CELL == GRU:
        r, z, n, hn = load_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], m_bh, H, ACC)
        h_prev = _load_prev(y_ptr, stride_yt, stride_yb, t_prev, h0_ptr, i_d * B, P, s,
                            o_b, o_h, m_bh, i_d, P).to(ACC)
        d_r, d_z, dnx, dnh, _ = gru_bwd_pointwise(dr, r, z, n, hn, h_prev)
        d_r = tl.where(act, d_r, 0.0)
        d_z = tl.where(act, d_z, 0.0)
        dnx = tl.where(act, dnx, 0.0)
        dnh = tl.where(act, dnh, 0.0)
        store_gates(p_dg, d_r, d_z, dnx, dnx, m_bh, H, 3)
        store_gates(dgh_ptr + p_row * (G * H) + o_h[None, :], d_r, d_z, dnh, dnh, m_bh, H, 3)
    else:
        h_t = tl.load(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * P
                      + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
        tl.store(p_dg, tl.where(act, rnn_act_bwd(dr, h_t, CELL), 0.0).to(G_DTYPE), mask=m_bh)


# ---------------------------------------------------------------------------------------------
# Launchers. ``f`` / ``b`` are the Forward / Backward problems built in recurrence.py.

def _tile(n, cap=64):
    return min(cap, max(16, triton.next_power_of_2(n)))


def forward(f):
    import torch

    BB, BH, BK = _tile(f.B), _tile(f.H), _tile(f.P)
    cell = f.cell
    if f.mode == 2 and cell.numel() == 0:
        # Inference: the cell state still travels between launches through a buffer.
        cell = torch.empty(f.T, f.B, f.D, f.H, device=f.y.device, dtype=f.cell_dtype)
    r = f.y
    if f.has_proj:
        r = torch.empty(f.D, f.B, f.H, device=f.y.device, dtype=f.y.dtype)
    grid = (triton.cdiv(f.B, BB), triton.cdiv(f.H, BH), f.D)
    grid_p = (triton.cdiv(f.B, BB), triton.cdiv(f.P, _tile(f.P)), f.D)
    launches = 0
    for s in range(f.T):
        _recurrence_fwd_step_kernel[grid](
            f.xg, f.xg.stride(0), f.xg.stride(1),
            f.h0, f.c0, f.w_hh, f.b_hn, f.lengths,
            f.y, f.y.stride(0), f.y.stride(1),
            r, f.gates, cell,
            s, f.T, f.B, f.H, f.P,
            CELL=f.mode, G=f.G, NSAVE=f.NSAVE,
            HAS_BHN=f.has_bhn, HAS_PROJ=f.has_proj, HAS_LENGTHS=f.has_lengths,
            SAVE=f.save, ACC=f.acc, PRECISION=f.precision,
            BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK,
        )
        launches += 1
        if f.has_proj:
            _projection_step_kernel[grid_p](
                r, f.w_hr, f.h0, f.lengths,
                f.y, f.y.stride(0), f.y.stride(1),
                s, f.T, f.B, f.H, f.P,
                HAS_LENGTHS=f.has_lengths, ACC=f.acc, PRECISION=f.precision,
                BLOCK_B=BB, BLOCK_P=_tile(f.P), BLOCK_K=_tile(f.H),
            )
            launches += 1
    # Final states: the state after each direction's last step (carried past a row's length).
    P = f.P
    y4 = f.y.unflatten(-1, (f.D, P))
    f.hn[0].copy_(y4[f.T - 1, :, 0])
    if f.D == 2:
        f.hn[1].copy_(y4[0, :, 1])
    if f.mode == 2:
        f.cn[0].copy_(cell[f.T - 1, :, 0])
        if f.D == 2:
            f.cn[1].copy_(cell[0, :, 1])
    return launches


def backward(b):
    import torch

    BB, BP, BH = _tile(b.B), _tile(b.P), _tile(b.H)
    dh = b.dhn.to(b.acc_dtype).clone()
    dc = b.dcn.to(b.acc_dtype).clone() if b.mode == 2 else dh
    grid_p = (triton.cdiv(b.B, BB), triton.cdiv(b.P, BP), b.D)
    grid_h = (triton.cdiv(b.B, BB), triton.cdiv(b.H, BH), b.D)
    common = dict(CELL=b.mode, G=b.G, NSAVE=b.NSAVE, HAS_PROJ=b.has_proj,
                  HAS_LENGTHS=b.has_lengths, ACC=b.acc, PRECISION=b.precision)
    launches = 0
    for k in range(b.T + 1):
        final = k == b.T
        _recurrence_bwd_step_dh_kernel[grid_p](
            b.dy, b.dy.stride(0), b.dy.stride(1),
            b.gates, b.w_hh, b.lengths, b.dgh, dh, b.dhp, b.dh0,
            k, b.T, b.B, b.H, b.P, FINAL=final, **common,
            BLOCK_B=BB, BLOCK_P=BP, BLOCK_K=BH,
        )
        launches += 1
        if final:
            break
        _recurrence_bwd_step_gates_kernel[grid_h](
            b.y, b.y.stride(0), b.y.stride(1), b.h0, b.c0,
            b.gates, b.cell, b.w_hr, b.lengths, dh, dc, b.dgx, b.dgh,
            k, b.T, b.B, b.H, b.P, **common,
            BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BP,
        )
        launches += 1
    if b.mode == 2:
        b.dc0.copy_(dc)
    return launches
