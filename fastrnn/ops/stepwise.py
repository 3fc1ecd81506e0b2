"""Strategy "stepwise": one launch per time step, for any hidden size.

Programs tile (batch, hidden units, direction); each computes all gates of its hidden units, so
the recurrent GEMM and the cell's pointwise maths are fused and only h crosses programs, through
global memory between launches. Both directions advance in the same launch. With proj_size a
second launch per step applies W_hr.

Backward, per step in reverse: launch A forms the total dh of the step (dy plus the recurrent term
``dG_{next} @ W_hh``), launch B the cell's pointwise gradients; a final launch A forms dh0.

The host cost of a launch through Triton's JIT (binding some 35 arguments, specialising, hashing
the cache key) is 25-65 us; ``StepLauncher`` pays it once per sequence and each further step goes
straight to the compiled kernel's launcher with only the step index changed.
"""

import torch
import triton
import triton.language as tl

from ._jit import (LSTM, GRU, cell_backward, cell_forward, clamp_grad, entering_reset,
                   load_gate_tiles, load_gates, positive, prev_time, save_gates, step_time,
                   store_gates, lstm_new_cell, zone_factor, zone_mix, zone_split)
from .args import BackwardArgs, ForwardArgs, acc_dtype
from .select import (LAUNCHES, DeviceSpec, DoesNotFit, KernelConfig, Plan, Problem,
                     fast_activations, kernel_name, launch_kernel, operand_copies,
                     resolve_heuristics)

_LENGTHS = {"HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
            "HAS_RESETS": lambda a: a["rs_ptr"] is not None}
_RMASK = {"HAS_RMASK": lambda a: a["rm_ptr"] is not None}


@triton.jit
def _first(rs_ptr, stride_rt, stride_rb, s, i_d, T, o_b, m_b, HAS_RESETS: tl.constexpr):
    """[BLOCK_B, 1] int32: 1 where the state entering forward step s is the initial state (the
    first step, or an episode start), else 0."""
    first = positive(1 - s, o_b).to(tl.int32)
    if HAS_RESETS:
        first = tl.maximum(first, entering_reset(rs_ptr, stride_rt, stride_rb, s, i_d, T, o_b,
                                                 m_b))
    return first[:, None]


@triton.jit
def _load_prev(y_ptr, stride_yt, stride_yb, t_prev, init_ptr, init_rows, init_width, first,
               o_b, o_f, m, i_d, P):
    """State before forward step s: y at t_prev, or the initial state where ``first``
    (``_first``)."""
    ob64 = o_b.to(tl.int64)
    has_prev = first == 0
    from_y = tl.load(y_ptr + t_prev * stride_yt + ob64[:, None] * stride_yb + i_d * P
                     + o_f[None, :], mask=m & has_prev, other=0.0)
    from_init = tl.load(init_ptr + (init_rows + ob64)[:, None] * init_width + o_f[None, :],
                        mask=m & (first > 0), other=0.0)
    return tl.where(has_prev, from_y, from_init)


@triton.heuristics({**_LENGTHS, **_RMASK, "HAS_BHN": lambda a: a["b_hn_ptr"] is not None,
                    "FAST": lambda a: fast_activations(a["w_hh_ptr"].dtype)})
@triton.jit(do_not_specialize=["s"])  # one compiled kernel for every step
def _recurrence_fwd_step_kernel(
    xg_ptr, stride_xt, stride_xb,      # [T, B, D*G*H]
    h0_ptr, c0_ptr,                    # [D, B, P], [D, B, H]
    w_hh_ptr, b_hn_ptr, len_ptr,       # [D, G*H, P], [D, H], [B]
    rs_ptr, stride_rt, stride_rb,      # [T, B] uint8 episode starts (resets)
    rm_ptr,                            # [D, B, P] recurrent dropout mask
    zh_ptr, zc_ptr, zf_ptr,            # zoneout: [T, B, D, P], [T, B, D, H] uint8; [2] factors
    y_ptr, stride_yt, stride_yb,       # [T, B, D*P]
    r_ptr,                             # [D, B, H] o*tanh(c) of this step (projection only)
    gates_ptr, cell_ptr,               # [T, B, D, NSAVE*H], [T, B, D, H]
    s, T, B, H, P,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr, HAS_PROJ: tl.constexpr,
    SAVE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BHN: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
    HAS_RMASK: tl.constexpr, ZH: tl.constexpr, ZC: tl.constexpr, FAST: tl.constexpr,
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
    first = _first(rs_ptr, stride_rt, stride_rb, s, i_d, T, o_b, m_b, HAS_RESETS)

    acc0 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc1 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc2 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc3 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for k0 in range(0, P, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < P
        b_h = _load_prev(y_ptr, stride_yt, stride_yb, t_prev, h0_ptr, i_d * B, P, first,
                         o_b, o_k, m_b[:, None] & m_k[None, :], i_d, P)
        if HAS_RMASK:  # recurrent dropout: the product sees mask * h
            b_h = b_h * tl.load(rm_ptr + (i_d * B + ob64)[:, None] * P + o_k[None, :],
                                mask=m_b[:, None] & m_k[None, :], other=0.0)
        b_h = b_h.to(W_DTYPE)
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
        c = _load_prev(cell_ptr, B * D * H, D * H, t_prev, c0_ptr, i_d * B, H, first,
                       o_b, o_h, m_bh, i_d, H).to(ACC)
    if CELL != LSTM or not HAS_PROJ:
        h_prev = _load_prev(y_ptr, stride_yt, stride_yb, t_prev, h0_ptr, i_d * B, P, first,
                            o_b, o_h, m_bh, i_d, P).to(ACC)
    b_bhn = 0.0
    if HAS_BHN:
        b_bhn = tl.load(b_hn_ptr + i_d * H + o_h, mask=m_h, other=0.0).to(ACC)[None, :]
    x0, x1, x2, x3 = load_gate_tiles(p_x, m_bh, H, G)
    h_new, c_new, s0, s1, s2, s3 = cell_forward(x0, x1, x2, x3, acc0, acc1, acc2, acc3, h_prev, c,
                                                b_bhn, CELL, HAS_BHN, ACC, FAST)
    if SAVE and NSAVE > 0:
        save_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], s0, s1, s2, s3, m_bh, H)
    if CELL == LSTM:
        if ZC != 0:  # zoneout: keep the previous cell state with factor d_c
            c_new = zone_mix(c_new, c, zc_ptr, p_row * H + o_h[None, :], m_bh, zf_ptr, 1, ZC)
        tl.store(cell_ptr + p_row * H + o_h[None, :],
                 tl.where(act, c_new, c).to(cell_ptr.dtype.element_ty), mask=m_bh)
    if HAS_PROJ:  # the projection launch makes h_t from o * tanh(c_t) (and zones it)
        tl.store(r_ptr + (i_d * B + ob64)[:, None] * H + o_h[None, :],
                 h_new.to(r_ptr.dtype.element_ty), mask=m_bh)
    else:
        if ZH != 0:  # zoneout: keep the previous state with factor d_h
            if SAVE and CELL != LSTM and CELL != GRU:  # an RNN's backward needs the new h
                tl.store(cell_ptr + p_row * H + o_h[None, :],
                         h_new.to(cell_ptr.dtype.element_ty), mask=m_bh)
            h_new = zone_mix(h_new, h_prev, zh_ptr, p_row * P + o_h[None, :], m_bh, zf_ptr, 0,
                             ZH)
        tl.store(p_y, tl.where(act, h_new, h_prev).to(Y_DTYPE), mask=m_bh)


@triton.heuristics(_LENGTHS)
@triton.jit(do_not_specialize=["s"])  # one compiled kernel for every step
def _projection_step_kernel(
    r_ptr, w_hr_ptr, h0_ptr, len_ptr,  # [D, B, H], [D, P, H], [D, B, P], [B]
    rs_ptr, stride_rt, stride_rb,      # [T, B] uint8 episode starts (resets)
    zh_ptr, zf_ptr,                    # zoneout of h: [T, B, D, P] uint8; [2] factors
    y_ptr, stride_yt, stride_yb,
    s, T, B, H, P,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, ZH: tl.constexpr,
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
    if HAS_LENGTHS or ZH != 0:
        first = _first(rs_ptr, stride_rt, stride_rb, s, i_d, T, o_b, m_b, HAS_RESETS)
        h_prev = _load_prev(y_ptr, stride_yt, stride_yb, t_prev, h0_ptr, i_d * B, P, first,
                            o_b, o_p, m_bp, i_d, P).to(ACC)
    if ZH != 0:  # zoneout: keep the previous (projected) state with factor d_h
        p_row = (t64 * B + ob64)[:, None] * tl.num_programs(2) + i_d
        h_new = zone_mix(h_new, h_prev, zh_ptr, p_row * P + o_p[None, :], m_bp, zf_ptr, 0, ZH)
    if HAS_LENGTHS:
        act = (t < tl.load(len_ptr + o_b, mask=m_b, other=0))[:, None]
        h_new = tl.where(act, h_new, h_prev)
    tl.store(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * P + o_p[None, :],
             h_new.to(y_ptr.dtype.element_ty), mask=m_bp)


@triton.heuristics({**_LENGTHS, **_RMASK})
@triton.jit(do_not_specialize=["k"])  # one compiled kernel for every step
def _recurrence_bwd_step_dh_kernel(
    dy_ptr, stride_dyt, stride_dyb,    # [T, B, D*P]
    gates_ptr, w_hh_ptr, len_ptr,
    rs_ptr, stride_rt, stride_rb,      # [T, B] uint8 episode starts (resets)
    rm_ptr,                            # [D, B, P] recurrent dropout mask
    zh_ptr, zf_ptr,                    # zoneout of h: [T, B, D, P] uint8; [2] factors
    dgh_ptr,                           # [T, B, D, G*H] gradients of W_hh h (+ b_hh) so far
    dh_ptr,                            # [D, B, P] (ACC) total dh of the previous step, updated
    dhp_ptr, dh0_ptr,                  # [T, B, D, P] (projection), [D, B, P] (last launch)
    d0_ptr,                            # [D, B, P] (ACC) dh0 collected at episode starts
    clip,                              # recurrent gradient clip (CLIP)
    k, T, B, H, P,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr, HAS_PROJ: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_RMASK: tl.constexpr,
    CLIP: tl.constexpr, ZH: tl.constexpr,
):
    """Total dh of backward step k (forward step s = T-1-k): dy_t plus what flows back from the
    step undone before it, ``dG_q @ W_hh + keep_q * dh_q``. k == T (the last launch): the same
    for dh0, with no dy."""
    i_b = tl.program_id(0)
    i_p = tl.program_id(1)
    i_d = tl.program_id(2)
    D = tl.num_programs(2)
    final = k == T
    s = tl.maximum(T - 1 - k, 0)           # the final launch reads like forward step 0
    q = tl.where(final, 0, s + 1)          # the forward step undone just before (q == T: none)
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
    if ZH != 0:  # zoneout at q: d_q * dh_q passes straight, the cell saw (1 - d_q) * dh_q
        d_q = zone_factor(zh_ptr, p_rowq * P + o_p[None, :], m_bp & has_q, zf_ptr, 0, ZH)
        keep = keep * (1.0 - d_q) + d_q
    p_dh = dh_ptr + (i_d * B + ob64)[:, None] * P + o_p[None, :]
    if HAS_RMASK:  # the product saw mask * h
        acc = acc * tl.load(rm_ptr + (i_d * B + ob64)[:, None] * P + o_p[None, :], mask=m_bp,
                            other=0.0).to(ACC)
    dh = acc + keep * tl.load(p_dh, mask=m_bp, other=0.0)
    # Past k = 0, dh belongs to the state that entered forward step q: clipped there; at an
    # episode start (q > 0), the initial state's.
    if CLIP:
        dh = tl.where(has_q, clamp_grad(dh, clip, CLIP), dh)
    if HAS_RESETS:
        p_d0 = d0_ptr + (i_d * B + ob64)[:, None] * P + o_p[None, :]
        d0 = tl.load(p_d0, mask=m_bp, other=0.0)
        if final:
            dh += d0
        else:
            start = entering_reset(rs_ptr, stride_rt, stride_rb, q, i_d, T, o_b, m_b)[:, None] > 0
            tl.store(p_d0, d0 + tl.where(start, dh, 0.0), mask=m_bp)
            dh = tl.where(start, 0.0, dh)
    if final:
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
            if ZH != 0:  # W_hr made the new state before zoneout: (1 - d) of dh reached it
                dh_p = dh_p * (1.0 - zone_factor(zh_ptr, ((t64 * B + ob64)[:, None] * D + i_d)
                                                 * P + o_p[None, :], m_bp, zf_ptr, 0, ZH))
            tl.store(dhp_ptr + ((t64 * B + ob64)[:, None] * D + i_d) * P + o_p[None, :],
                     dh_p.to(dhp_ptr.dtype.element_ty), mask=m_bp)


@triton.heuristics({**_LENGTHS, "HAS_PROJ": lambda a: a["w_hr_ptr"] is not None,
                    "HAS_DCELL": lambda a: a["dcell_ptr"] is not None,
                    "CLIP": lambda a: a["clip"] > 0,
                    "FAST": lambda a: fast_activations(a["dgx_ptr"].dtype)})
@triton.jit(do_not_specialize=["k"])  # one compiled kernel for every step
def _recurrence_bwd_step_gates_kernel(
    y_ptr, stride_yt, stride_yb, h0_ptr, c0_ptr,
    gates_ptr, cell_ptr, w_hr_ptr, len_ptr,
    rs_ptr, stride_rt, stride_rb,      # [T, B] uint8 episode starts (resets)
    zh_ptr, zc_ptr, zf_ptr,            # zoneout: [T, B, D, P], [T, B, D, H] uint8; [2] factors
    dcell_ptr,                         # [T, B, D, H] gradient of every step's cell state
    dh_ptr, dc_ptr,                    # [D, B, P] total dh of this step, [D, B, H] dc (updated)
    dc0_ptr,                           # [D, B, H] (ACC) dc0 collected at episode starts
    dgx_ptr, dgh_ptr,                  # [T, B, D, G*H]
    clip,                              # recurrent gradient clip (CLIP)
    k, T, B, H, P,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_PROJ: tl.constexpr,
    HAS_DCELL: tl.constexpr, CLIP: tl.constexpr, ZH: tl.constexpr, ZC: tl.constexpr,
    FAST: tl.constexpr,
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
    first = _first(rs_ptr, stride_rt, stride_rb, s, i_d, T, o_b, m_b, HAS_RESETS)
    if HAS_LENGTHS:
        act = (t < tl.load(len_ptr + o_b, mask=m_b, other=0))[:, None] & m_bh
    else:
        act = m_bh

    if HAS_PROJ:
        W_DTYPE = w_hr_ptr.dtype.element_ty
        dr = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        for k0 in range(0, P, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < P
            b_dh = tl.load(dh_ptr + (i_d * B + ob64)[:, None] * P + o_k[None, :],
                           mask=m_b[:, None] & m_k[None, :], other=0.0)
            if ZH != 0:  # the projection's output before zoneout got (1 - d) of dh
                b_dh = b_dh * (1.0 - zone_factor(zh_ptr, p_row * P + o_k[None, :],
                                                 m_b[:, None] & m_k[None, :], zf_ptr, 0, ZH))
            b_dh = b_dh.to(W_DTYPE)
            b_w = tl.load(w_hr_ptr + i_d * (P * H) + o_k[:, None] * H + o_h[None, :],
                          mask=m_k[:, None] & m_h[None, :], other=0.0)
            dr += tl.dot(b_dh, b_w, input_precision=PRECISION).to(ACC)
    else:
        dr = tl.load(dh_ptr + (i_d * B + ob64)[:, None] * P + o_h[None, :], mask=m_bh,
                     other=0.0).to(ACC)
        if ZH != 0:  # the cell's new state got (1 - d) of dh (the rest went to the previous)
            dr = dr * (1.0 - zone_factor(zh_ptr, p_row * P + o_h[None, :], m_bh, zf_ptr, 0, ZH))

    s0, s1, s2, s3 = dr, dr, dr, dr
    if CELL == LSTM or CELL == GRU:
        s0, s1, s2, s3 = load_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], m_bh, H, ACC)
    c_t = dr
    c_prev = dr
    h_prev = dr
    h_t = dr
    dc = dr
    if CELL == LSTM:
        c_t = tl.load(cell_ptr + p_row * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
        c_prev = _load_prev(cell_ptr, B * D * H, D * H, t_prev, c0_ptr, i_d * B, H, first,
                            o_b, o_h, m_bh, i_d, H).to(ACC)
        dc = tl.load(dc_ptr + (i_d * B + ob64)[:, None] * H + o_h[None, :], mask=m_bh, other=0.0)
        if HAS_DCELL:  # return_states: the gradient of this step's cell state
            dc += tl.load(dcell_ptr + p_row * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
        if ZC != 0:  # the saved c_t is zoned: the cell's own c~ = f * c_prev + i * g
            dc, dc_zone = zone_split(dc, zc_ptr, p_row * H + o_h[None, :], m_bh, zf_ptr, 1, ZC)
            c_t = lstm_new_cell(s0, s1, s2, c_prev)
    elif CELL == GRU:
        h_prev = _load_prev(y_ptr, stride_yt, stride_yb, t_prev, h0_ptr, i_d * B, P, first,
                            o_b, o_h, m_bh, i_d, P).to(ACC)
    elif ZH != 0:  # an RNN's new state before zoneout, saved by the forward
        h_t = tl.load(cell_ptr + p_row * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
    else:
        h_t = tl.load(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * P
                      + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
    g0, g1, g2, g3, gh2, _, dc_prev = cell_backward(dr, dc, s0, s1, s2, s3, c_t, c_prev, h_prev,
                                                    h_t, act, CELL, FAST)
    if CELL == LSTM and ZC != 0:
        dc_prev += dc_zone
    p_dg = dgx_ptr + p_row * (G * H) + o_h[None, :]
    if G == 1:
        tl.store(p_dg, g0.to(G_DTYPE), mask=m_bh)
    else:
        store_gates(p_dg, g0, g1, g2, g3, m_bh, H, G)
    if CELL == LSTM:
        # dc of the state that entered step s: clipped; at the first step or an episode start,
        # the initial state's (collected in dc0).
        dc_prev = clamp_grad(dc_prev, clip, CLIP)
        if HAS_RESETS:
            p_dc0 = dc0_ptr + (i_d * B + ob64)[:, None] * H + o_h[None, :]
            tl.store(p_dc0, tl.load(p_dc0, mask=m_bh, other=0.0)
                     + tl.where(first > 0, dc_prev, 0.0), mask=m_bh)
            dc_prev = tl.where(first > 0, 0.0, dc_prev)
        tl.store(dc_ptr + (i_d * B + ob64)[:, None] * H + o_h[None, :], dc_prev, mask=m_bh)
    elif CELL == GRU:
        store_gates(dgh_ptr + p_row * (G * H) + o_h[None, :], g0, g1, gh2, gh2, m_bh, H, 3)


# ---------------------------------------------------------------------------------------------
# Planning.

WARPS = 4
BLOCK_B = 16           # batch rows per program: many programs per step, few accumulators
RESERVE = 2048         # shared memory Triton keeps beside the operand buffers


def _tile(n: int) -> int:
    return 16 if n <= 16 else 64


def _loop_kernel(name: str, problem: Problem, spec: DeviceSpec, cols: int, k_extent: int,
                 operands: int) -> KernelConfig:
    """A kernel with ``operands`` accumulators [BLOCK_B, cols tile] over an inner loop of
    ``k_extent``. fp32 operands are software-pipelined as deep as the shared memory allows (the
    depth changes nothing else); narrower ones are not pipelined by Triton here."""
    isz = problem.itemsize * operand_copies(problem)
    acc = 8 if problem.dtype == torch.float64 else 4
    bc = _tile(cols)
    epilogue = operands * BLOCK_B * bc * acc       # layout conversions of the accumulators
    # A shorter inner tile where shared memory is short.
    for bk in dict.fromkeys(min(_tile(k_extent), c) for c in (64, 32, 16)):
        per_stage = (BLOCK_B * bk + operands * bk * bc) * isz
        stages = 1
        if problem.itemsize >= 4:
            for depth in (3, 2):
                if depth * per_stage + epilogue + RESERVE <= spec.smem_per_block:
                    stages = depth
                    break
        shared = stages * per_stage + epilogue
        if shared + RESERVE <= spec.smem_per_block:
            break
    else:
        raise DoesNotFit(f"{name} needs about {shared} bytes of shared memory, the device has "
                         f"{spec.smem_per_block} per block")
    return KernelConfig(name, BLOCK_B, bc, bk, WARPS, stages, shared)


def plan(problem: Problem, spec: DeviceSpec) -> Plan:
    G, H, P, B = problem.G, problem.H, problem.P, problem.B
    fwd = _loop_kernel("_recurrence_fwd_step_kernel", problem, spec, H, P, G)
    kernels = [fwd]
    if problem.has_proj:
        kernels.append(_loop_kernel("_projection_step_kernel", problem, spec, P, H, 1))
    kernels.append(_loop_kernel("_recurrence_bwd_step_dh_kernel", problem, spec, P, H, G))
    kernels.append(_loop_kernel("_recurrence_bwd_step_gates_kernel", problem, spec, H, P, 1))
    grid = (triton.cdiv(B, fwd.block_b), triton.cdiv(H, fwd.block_h), problem.D)
    per_step_fwd = 2 if problem.has_proj else 1
    return Plan("stepwise", tuple(kernels), grid=grid, launches_per_step=(per_step_fwd, 2),
                launches_fixed=(0, 1))


# ---------------------------------------------------------------------------------------------
# Launching.

class StepLauncher:
    """Launch one kernel once per step with only the step argument changing.

    The first launch goes through Triton's JIT (binding, specialisation, compilation or cache
    lookup) and keeps the compiled kernel; later ones call its launcher directly with the bound
    argument list, the step replaced. Where Triton's JIT does not hand back a compiled kernel
    (the interpreter), every step takes the JIT path.
    """

    def __init__(self, kernel, grid, step_arg: str, **kwargs):
        self.kernel, self.grid, self.step_arg, self.kwargs = kernel, grid, step_arg, kwargs
        self.name = kernel_name(kernel)
        self._fast = None

    def _bind(self, compiled) -> None:
        jit, values = resolve_heuristics(self.kernel, self.kwargs)
        if compiled.__class__.__name__ != "CompiledKernel" or not all(
                hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return
        args = []
        for name in jit.arg_names:
            value = values.get(name)
            # The launcher takes raw addresses as well as tensors: no data_ptr() per launch.
            args.append(value.data_ptr() if isinstance(value, torch.Tensor) else value)
        from triton import knobs

        self._fast = (compiled.run, compiled.function, compiled.packed_metadata,
                      _current_stream(), knobs.runtime.launch_enter_hook,
                      knobs.runtime.launch_exit_hook, args, jit.arg_names.index(self.step_arg))

    def __call__(self, step: int) -> None:
        fast = self._fast
        if fast is not None:
            run, function, metadata, stream, enter, exit_, args, i = fast
            args[i] = step
            g = self.grid
            run(g[0], g[1], g[2], stream, function, metadata, None, enter, exit_, *args)
            LAUNCHES[self.name] += 1
            return
        compiled = launch_kernel(self.kernel, self.grid, **{**self.kwargs, self.step_arg: step})
        if compiled is not None and compiled.__class__.__name__ == "CompiledKernel":
            jit, _ = resolve_heuristics(self.kernel, self.kwargs)
            check_step_signature(getattr(compiled, "src", None), jit.arg_names, self.step_arg,
                                 self.name)
            try:
                self._bind(compiled)
            except Exception:  # an unknown Triton launcher: keep the JIT path (slower, correct)
                self._fast = None


def check_step_signature(src, arg_names: list, step_arg: str, name: str) -> None:
    """Raise unless the compiled kernel ``src`` (Triton's ASTSource) takes the step as a plain
    runtime integer and its parameters are ``arg_names``, in order: the fast launcher reuses the
    kernel for every step, so a step baked in as a constant (Triton specialises an int equal to
    1) or as a divisibility assumption (a multiple of 16, like 0) would rerun that step, or break
    the assumption, silently."""
    signature = getattr(src, "signature", None)
    if not isinstance(signature, dict):
        return  # a Triton without this record: nothing to check against
    problems = []
    if list(signature) != list(arg_names):
        problems.append(f"its parameters are {list(signature)}, the launcher passes {arg_names}")
    else:
        i = list(arg_names).index(step_arg)
        kind = signature[step_arg]
        if kind == "constexpr" or (i,) in getattr(src, "constants", {}):
            problems.append(f"{step_arg!r} is compiled in as a constant")
        elif not str(kind).startswith(("i", "u")):
            problems.append(f"{step_arg!r} is compiled as {kind!r}, not an integer")
        attrs = getattr(src, "attrs", {}).get((i,))
        if attrs:
            problems.append(f"{step_arg!r} is specialised ({attrs})")
    if problems:
        raise RuntimeError(f"fastrnn: the stepwise kernel {name} cannot be relaunched per step: "
                           + "; ".join(problems))


def _current_stream():
    """The stream Triton launches on now (the capture stream inside a CUDA graph capture)."""
    device = torch.cuda.current_device()
    return triton.runtime.driver.active.get_current_stream(device)


KERNELS = {"fwd": ("_recurrence_fwd_step_kernel", "_projection_step_kernel"),
           "bwd": ("_recurrence_bwd_step_dh_kernel", "_recurrence_bwd_step_gates_kernel")}


def forward(a: ForwardArgs, the_plan: Plan) -> None:
    cfg = the_plan.config("_recurrence_fwd_step_kernel")
    device = a.y.device
    cell = a.cell
    if a.is_lstm and cell is None:
        # Inference: the cell state still travels between launches through a buffer.
        cell = torch.empty(a.T, a.B, a.D, a.H, device=device, dtype=acc_dtype(a.y.dtype))
    r = torch.empty(a.D, a.B, a.H, device=device, dtype=a.y.dtype) if a.w_hr is not None else None
    zone = a.zone_args()
    grid = (triton.cdiv(a.B, cfg.block_b), triton.cdiv(a.H, cfg.block_h), a.D)
    step = StepLauncher(
        _recurrence_fwd_step_kernel, grid, "s",
        xg_ptr=a.xg, stride_xt=a.xg.stride(0), stride_xb=a.xg.stride(1),
        h0_ptr=a.h0, c0_ptr=a.c0, w_hh_ptr=a.w_hh, b_hn_ptr=a.b_hn, len_ptr=a.lengths,
        **a.reset_args(), rm_ptr=a.rmask, **zone, y_ptr=a.y, stride_yt=a.y.stride(0),
        stride_yb=a.y.stride(1), r_ptr=r,
        gates_ptr=a.gates, cell_ptr=cell, s=0, T=a.T, B=a.B, H=a.H, P=a.P,
        CELL=a.mode, G=a.G, NSAVE=a.NSAVE, HAS_PROJ=a.w_hr is not None, SAVE=a.save,
        ACC=a.ACC, PRECISION=a.precision,
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, **cfg.launch_options())
    project = None
    if a.w_hr is not None:
        pcfg = the_plan.config("_projection_step_kernel")
        project = StepLauncher(
            _projection_step_kernel,
            (triton.cdiv(a.B, pcfg.block_b), triton.cdiv(a.P, pcfg.block_h), a.D), "s",
            r_ptr=r, w_hr_ptr=a.w_hr, h0_ptr=a.h0, len_ptr=a.lengths, **a.reset_args(),
            zh_ptr=a.zh, zf_ptr=zone["zf_ptr"], ZH=zone["ZH"],
            y_ptr=a.y, stride_yt=a.y.stride(0), stride_yb=a.y.stride(1),
            s=0, T=a.T, B=a.B, H=a.H, P=a.P, ACC=a.ACC, PRECISION=a.precision,
            BLOCK_B=pcfg.block_b, BLOCK_P=pcfg.block_h, BLOCK_K=pcfg.block_k,
            **pcfg.launch_options())
    for s in range(a.T):
        step(s)
        if project is not None:
            project(s)
    # Final states: the state after each direction's last step (carried past a row's length).
    y4 = a.y.unflatten(-1, (a.D, a.P))
    a.hn[0].copy_(y4[a.T - 1, :, 0])
    if a.D == 2:
        a.hn[1].copy_(y4[0, :, 1])
    if a.is_lstm:
        a.cn[0].copy_(cell[a.T - 1, :, 0])
        if a.D == 2:
            a.cn[1].copy_(cell[0, :, 1])


def backward(b: BackwardArgs, the_plan: Plan) -> None:
    dcfg = the_plan.config("_recurrence_bwd_step_dh_kernel")
    gcfg = the_plan.config("_recurrence_bwd_step_gates_kernel")
    acc = acc_dtype(b.dy.dtype)
    dh = b.dhn.to(acc).clone()
    dc = b.dcn.to(acc).clone() if b.is_lstm else None
    zone = b.zone_args()
    # dh0 and dc0 as the episode starts (resets) collect them.
    d0 = torch.zeros(b.D, b.B, b.P, device=dh.device, dtype=acc) if b.resets is not None \
        else None
    dc0 = torch.zeros_like(dc) if b.resets is not None and b.is_lstm else None
    common = dict(CELL=b.mode, G=b.G, NSAVE=b.NSAVE, ACC=b.ACC, PRECISION=b.precision,
                  len_ptr=b.lengths, **b.reset_args(), clip=b.clip, k=0, T=b.T, B=b.B, H=b.H,
                  P=b.P)
    dh_args = dict(
        dy_ptr=b.dy, stride_dyt=b.dy.stride(0), stride_dyb=b.dy.stride(1),
        gates_ptr=b.gates, w_hh_ptr=b.w_hh, dgh_ptr=b.dgh if b.dgh is not None else b.dgx,
        dh_ptr=dh, dhp_ptr=b.dhp, dh0_ptr=b.dh0, d0_ptr=d0, rm_ptr=b.rmask,
        zh_ptr=b.zh, zf_ptr=zone["zf_ptr"], ZH=zone["ZH"],
        HAS_PROJ=b.w_hr is not None,
        CLIP=b.clip > 0,
        BLOCK_B=dcfg.block_b, BLOCK_P=dcfg.block_h, BLOCK_K=dcfg.block_k,
        **common, **dcfg.launch_options())
    grid_p = (triton.cdiv(b.B, dcfg.block_b), triton.cdiv(b.P, dcfg.block_h), b.D)
    step_dh = StepLauncher(_recurrence_bwd_step_dh_kernel, grid_p, "k", **dh_args)
    step_gates = StepLauncher(
        _recurrence_bwd_step_gates_kernel,
        (triton.cdiv(b.B, gcfg.block_b), triton.cdiv(b.H, gcfg.block_h), b.D), "k",
        y_ptr=b.y, stride_yt=b.y.stride(0), stride_yb=b.y.stride(1), h0_ptr=b.h0, c0_ptr=b.c0,
        gates_ptr=b.gates, cell_ptr=b.cell, w_hr_ptr=b.w_hr, dcell_ptr=b.dcell, dh_ptr=dh,
        **zone,
        dc_ptr=dc, dc0_ptr=dc0, dgx_ptr=b.dgx, dgh_ptr=b.dgh,
        BLOCK_B=gcfg.block_b, BLOCK_H=gcfg.block_h, BLOCK_K=gcfg.block_k,
        **common, **gcfg.launch_options())
    for k in range(b.T):
        step_dh(k)
        step_gates(k)
    step_dh(b.T)  # dh0
    if b.is_lstm:
        b.dc0.copy_(dc if dc0 is None else dc0)
