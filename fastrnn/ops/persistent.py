"""Strategy "persistent": one program per (batch tile, direction) runs the whole time loop.

The program loads its direction's W_hh (and W_hr) once, keeps h (and c) in registers, and walks
the sequence: per step one tile of input projections in, ``h @ W_hh^T`` on the tensor cores, the
cell's pointwise maths, one tile of outputs (and saved activations) out. No cross-program
communication, so it also runs under the Triton interpreter. It suits small hidden sizes, where
all of W_hh sits on one SM (``plan`` below sizes it; ``select`` chooses).

Backward walks the sequence in reverse with dh (and dc) in registers and writes the gradients of
the gate pre-activations; the weight gradients are whole-sequence GEMMs afterwards.
"""

import triton
import triton.language as tl

from ._jit import (LSTM, GRU, cell_backward, cell_forward, clamp_grad, entering_reset,
                   load_gate_tiles, load_gates, positive, prev_time, recurrent_products, save_gates,
                   step_time, store_gates, lstm_new_cell, zone_mix, zone_split)
from .args import BackwardArgs, ForwardArgs
from .select import (DeviceSpec, DoesNotFit, KernelConfig, Plan, Problem, block,
                     fast_activations, launch_kernel, operand_copies)

_SHARED = {
    "HAS_PROJ": lambda a: a["w_hr_ptr"] is not None,
    "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
    "HAS_RESETS": lambda a: a["rs_ptr"] is not None,
    "HAS_RMASK": lambda a: a["rm_ptr"] is not None,
    "FAST": lambda a: fast_activations(a["w_hh_ptr"].dtype),
}
_OPTIONAL = {**_SHARED, "HAS_BHN": lambda a: a["b_hn_ptr"] is not None}
_BWD_OPTIONAL = {**_SHARED, "HAS_DCELL": lambda a: a["dcell_ptr"] is not None,
                 "CLIP": lambda a: a["clip"] > 0}


@triton.heuristics(_OPTIONAL)
@triton.jit(do_not_specialize=["T"])
def _recurrence_fwd_persistent_kernel(
    xg_ptr, stride_xt, stride_xb,      # [T, B, D*G*H] input projections (feature dim contiguous)
    h0_ptr, c0_ptr,                    # [D, B, P], [D, B, H] contiguous
    w_hh_ptr, b_hn_ptr, w_hr_ptr,      # [D, G*H, P], [D, H], [D, P, H] contiguous
    len_ptr,                           # [B] int32 sequence lengths (packed input)
    rs_ptr, stride_rt, stride_rb,      # [T, B] uint8 episode starts (resets)
    rm_ptr,                            # [D, B, P] recurrent dropout mask
    zh_ptr, zc_ptr, zf_ptr,            # zoneout: [T, B, D, P], [T, B, D, H] uint8; [2] factors
    y_ptr, stride_yt, stride_yb,       # [T, B, D*P] states after every step
    hn_ptr, cn_ptr,                    # [D, B, P], [D, B, H] final states
    gates_ptr, cell_ptr,               # [T, B, D, NSAVE*H], [T, B, D, H] saved for backward
    T, B, H, P,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr, SAVE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_BHN: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_RESETS: tl.constexpr, HAS_RMASK: tl.constexpr, ZH: tl.constexpr, ZC: tl.constexpr,
    FAST: tl.constexpr,
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
    if HAS_RMASK:  # recurrent dropout: the same mask on h at every step
        b_rm = tl.load(rm_ptr + p_state * P + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
    b_h0 = h  # the initial state, which a reset brings back
    b_c0 = c
    p_x = xg_ptr + ob64[:, None] * stride_xb + i_d * (G * H) + o_h[None, :]

    for s in range(0, T):
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        if HAS_RESETS:
            start = entering_reset(rs_ptr, stride_rt, stride_rb, s, i_d, T, o_b, m_b)[:, None] > 0
            h = tl.where(start, b_h0, h)
            if CELL == LSTM:
                c = tl.where(start, b_c0, c)
        # The step's input projections are loaded first: they do not depend on h, so their
        # latency overlaps the recurrent products.
        x0, x1, x2, x3 = load_gate_tiles(p_x + t64 * stride_xt, m_bh, H, G)
        # Padding lanes are zeroed in every operand: an inf in a real lane times a zero weight
        # in a padding column would otherwise leave NaN there, and the next product spreads it.
        b_hw = tl.where(m_bp, h, 0.0)
        if HAS_RMASK:
            b_hw = b_hw * b_rm
        b_hw = b_hw.to(W_DTYPE)
        q0, q1, q2, q3 = recurrent_products(b_hw, b_w0, b_w1, b_w2, b_w3, G, ACC, PRECISION)
        h_new, c_new, s0, s1, s2, s3 = cell_forward(x0, x1, x2, x3, q0, q1, q2, q3, h, c, b_bhn,
                                                    CELL, HAS_BHN, ACC, FAST)
        p_row = (t64 * B + ob64)[:, None] * D + i_d  # row of the saved-activation tensors
        if SAVE and NSAVE > 0:
            save_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], s0, s1, s2, s3, m_bh, H)
        if CELL == LSTM:
            if HAS_PROJ:
                h_new = tl.dot(tl.where(m_bh, h_new, 0.0).to(W_DTYPE), b_wr,
                               input_precision=PRECISION).to(ACC)
            if ZC != 0:  # zoneout: keep the previous cell state with factor d_c
                c_new = zone_mix(c_new, c, zc_ptr, p_row * H + o_h[None, :], m_bh, zf_ptr, 1, ZC)
            if HAS_LENGTHS:
                c = tl.where((t < b_len)[:, None], c_new, c)
            else:
                c = c_new
            if SAVE:
                # The carried state: backward reads it as the cell state before the next step.
                tl.store(cell_ptr + p_row * H + o_h[None, :], c.to(cell_ptr.dtype.element_ty),
                         mask=m_bh, eviction_policy="evict_first")
        if ZH != 0:  # zoneout: keep the previous state with factor d_h
            if SAVE and CELL != LSTM and CELL != GRU:  # an RNN's backward needs the new state
                tl.store(cell_ptr + p_row * H + o_h[None, :], h_new.to(cell_ptr.dtype.element_ty),
                         mask=m_bh, eviction_policy="evict_first")
            h_new = zone_mix(h_new, h, zh_ptr, p_row * P + o_p[None, :], m_bp, zf_ptr, 0, ZH)
        # The state is stored, and carried, at the precision of the layer's dtype.
        h_new = h_new.to(Y_DTYPE).to(ACC)
        if HAS_LENGTHS:
            h = tl.where((t < b_len)[:, None], h_new, h)
        else:
            h = h_new
        tl.store(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * P + o_p[None, :],
                 h.to(Y_DTYPE), mask=m_bp, eviction_policy="evict_first")

    tl.store(hn_ptr + p_state * P + o_p[None, :], h.to(hn_ptr.dtype.element_ty), mask=m_bp)
    if CELL == LSTM:
        tl.store(cn_ptr + p_state * H + o_h[None, :], c.to(cn_ptr.dtype.element_ty), mask=m_bh)


@triton.heuristics(_BWD_OPTIONAL)
@triton.jit(do_not_specialize=["T"])
def _recurrence_bwd_persistent_kernel(
    dy_ptr, stride_dyt, stride_dyb,    # [T, B, D*P] gradient of the outputs
    dhn_ptr, dcn_ptr,                  # [D, B, P], [D, B, H] gradients of the final states
    y_ptr, stride_yt, stride_yb,       # [T, B, D*P] forward states
    h0_ptr, c0_ptr,                    # [D, B, P], [D, B, H]
    gates_ptr, cell_ptr,               # saved activations
    w_hh_ptr, w_hr_ptr, len_ptr,
    rs_ptr, stride_rt, stride_rb,      # [T, B] uint8 episode starts (resets)
    rm_ptr,                            # [D, B, P] recurrent dropout mask
    zh_ptr, zc_ptr, zf_ptr,            # zoneout: [T, B, D, P], [T, B, D, H] uint8; [2] factors
    dcell_ptr,                         # [T, B, D, H] gradient of every step's cell state
    dgx_ptr, dgh_ptr,                  # [T, B, D, G*H] grads of xg and of W_hh h (+ b_hh)
    dhp_ptr,                           # [T, B, D, P] total dh per step (projection only)
    dh0_ptr, dc0_ptr,                  # [D, B, P], [D, B, H]
    clip,                              # recurrent gradient clip (CLIP)
    T, B, H, P,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
    HAS_RMASK: tl.constexpr, HAS_DCELL: tl.constexpr, CLIP: tl.constexpr, ZH: tl.constexpr,
    ZC: tl.constexpr, FAST: tl.constexpr,
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
    dc_c = dh_c
    b_c0 = dh_c
    b_h0 = dh_c
    if CELL == LSTM:
        dc_c = tl.load(dcn_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
        b_c0 = tl.load(c0_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
    if CELL == GRU:
        b_h0 = tl.load(h0_ptr + p_state * P + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
    if HAS_LENGTHS:
        b_len = tl.load(len_ptr + o_b, mask=m_b, other=0)
    if HAS_RMASK:  # recurrent dropout: the product saw mask * h
        b_rm = tl.load(rm_ptr + p_state * P + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
    dh0_acc = dh_c * 0.0  # what the steps that began from the initial state (resets) sent it
    dc0_acc = dc_c * 0.0

    for k in range(0, T):
        s = T - 1 - k                      # forward step being undone
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        has_prev = positive(s, o_b)[:, None]
        if HAS_RESETS:
            r_in = entering_reset(rs_ptr, stride_rt, stride_rb, s, i_d, T, o_b, m_b)[:, None]
            start = r_in > 0
            has_prev = has_prev & (r_in == 0)
        t_prev = prev_time(t, i_d, T)
        p_row = (t64 * B + ob64)[:, None] * D + i_d
        p_row_prev = (t_prev * B + ob64)[:, None] * D + i_d
        dh = dh_c + tl.load(dy_ptr + t64 * stride_dyt + ob64[:, None] * stride_dyb + i_d * P
                            + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
        dh_zone = dh * 0.0
        if ZH != 0:  # zoneout: d_h * dh straight to the state before, the rest to the new one
            dh, dh_zone = zone_split(dh, zh_ptr, p_row * P + o_p[None, :], m_bp, zf_ptr, 0, ZH)
        if HAS_LENGTHS:
            row_act = (t < b_len)[:, None]
        else:
            row_act = m_b[:, None]
        act = row_act & m_bh  # inactive rows and padding lanes: no gate gradient
        s0, s1, s2, s3 = dh, dh, dh, dh
        if CELL == LSTM or CELL == GRU:
            s0, s1, s2, s3 = load_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], m_bh, H,
                                        ACC)
        dr = dh
        c_t = dh
        c_prev = dh
        h_prev = dh
        h_t = dh
        if CELL == LSTM:
            if HAS_PROJ:
                dr = tl.dot(tl.where(m_bp, dh, 0.0).to(W_DTYPE), b_wr,
                            input_precision=PRECISION).to(ACC)
            if HAS_DCELL:  # return_states: the gradient of this step's cell state
                dc_c += tl.load(dcell_ptr + p_row * H + o_h[None, :], mask=m_bh,
                                other=0.0).to(ACC)
            c_t = tl.load(cell_ptr + p_row * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
            c_prev = tl.where(has_prev, tl.load(cell_ptr + p_row_prev * H + o_h[None, :],
                                                mask=m_bh & has_prev, other=0.0).to(ACC), b_c0)
            if ZC != 0:  # the saved c_t is zoned: the cell's own c~ = f * c_prev + i * g
                dc_c, dc_zone = zone_split(dc_c, zc_ptr, p_row * H + o_h[None, :], m_bh, zf_ptr,
                                           1, ZC)
                c_t = lstm_new_cell(s0, s1, s2, c_prev)
        elif CELL == GRU:
            h_prev = tl.where(has_prev, tl.load(
                y_ptr + t_prev * stride_yt + ob64[:, None] * stride_yb + i_d * P + o_p[None, :],
                mask=m_bp & has_prev, other=0.0).to(ACC), b_h0)
        elif ZH != 0:  # an RNN's new state before zoneout, saved by the forward
            h_t = tl.load(cell_ptr + p_row * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
        else:
            h_t = tl.load(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * P
                          + o_p[None, :], mask=m_bp, other=0.0).to(ACC)
        g0, g1, g2, g3, gh2, dh_keep, dc_c = cell_backward(dr, dc_c, s0, s1, s2, s3, c_t, c_prev,
                                                           h_prev, h_t, act, CELL, FAST)
        if CELL == LSTM and ZC != 0:
            dc_c += dc_zone
        p_dg = dgx_ptr + p_row * (G * H) + o_h[None, :]
        if G == 1:
            tl.store(p_dg, g0.to(G_DTYPE), mask=m_bh)
        else:
            store_gates(p_dg, g0, g1, g2, g3, m_bh, H, G)
        if CELL == GRU:
            store_gates(dgh_ptr + p_row * (G * H) + o_h[None, :], g0, g1, gh2, gh2, m_bh, H, 3)
        # dh of the step before: dG @ W_hh over the gates, plus what bypasses W_hh.
        rec = tl.dot(g0.to(W_DTYPE), b_w0, input_precision=PRECISION).to(ACC)
        if G >= 3:
            rec += tl.dot(g1.to(W_DTYPE), b_w1, input_precision=PRECISION).to(ACC)
            rec += tl.dot(gh2.to(W_DTYPE), b_w2, input_precision=PRECISION).to(ACC)
        if G == 4:
            rec += tl.dot(g3.to(W_DTYPE), b_w3, input_precision=PRECISION).to(ACC)
        if HAS_RMASK:
            rec = rec * b_rm
        if HAS_PROJ:
            tl.store(dhp_ptr + p_row * P + o_p[None, :],
                     tl.where(row_act, dh, 0.0).to(dhp_ptr.dtype.element_ty),
                     mask=m_bp)
        # Inactive rows (past their length) got zero gate gradients: dh passes through.
        if CELL == LSTM and HAS_PROJ:
            dh_c = rec + tl.where(row_act, 0.0, dh)
        else:
            dh_c = rec + dh_keep
        if ZH != 0:
            dh_c += dh_zone
        # dh_c and dc_c now belong to the state that entered step s.
        dh_c = clamp_grad(dh_c, clip, CLIP)
        dc_c = clamp_grad(dc_c, clip, CLIP)
        if HAS_RESETS:  # it was the initial state: its gradient goes there
            dh0_acc += tl.where(start, dh_c, 0.0)
            dh_c = tl.where(start, 0.0, dh_c)
            if CELL == LSTM:
                dc0_acc += tl.where(start, dc_c, 0.0)
                dc_c = tl.where(start, 0.0, dc_c)

    if HAS_RESETS:
        dh_c += dh0_acc
        dc_c += dc0_acc
    tl.store(dh0_ptr + p_state * P + o_p[None, :], dh_c.to(dh0_ptr.dtype.element_ty), mask=m_bp)
    if CELL == LSTM:
        tl.store(dc0_ptr + p_state * H + o_h[None, :], dc_c.to(dc0_ptr.dtype.element_ty),
                 mask=m_bh)


# ---------------------------------------------------------------------------------------------
# Planning and launchers.

# Largest padded weight footprint (elements of W_hh, plus W_hr) kept by one program. Measured on
# an H100 (fp16 LSTM, B=16): at H=64 (16384 elements) persistent beat cooperative, 2.5 against
# 3.3 us per step; at H=128 (65536) it lost, 5.4 against 3.7.
MAX_WEIGHTS = 16384
BLOCK_B = 16
TILES = (16, 64, 128)   # the hidden / projection tiles a program may use (padding is masked)


def _tile(n: int) -> int:
    return next(t for t in TILES if n <= t) if n <= TILES[-1] else block(n)


def plan(problem: Problem, spec: DeviceSpec) -> Plan:
    bh, bp = _tile(problem.H), _tile(problem.P)
    weights = problem.G * bh * bp + (bh * bp if problem.has_proj else 0)
    if weights > MAX_WEIGHTS:
        raise DoesNotFit(f"W_hh is {weights} padded elements, more than one program holds "
                         f"({MAX_WEIGHTS})")
    # Triton stages every dot operand in shared memory: the weights (the tiles are
    # loop-invariant), the state tile, and the projection's operand; tf32x3 splits each
    # fp32 operand in two.
    shared = (weights + BLOCK_B * (bp + bh)) * problem.itemsize * operand_copies(problem)
    if shared > spec.smem_per_block:
        raise DoesNotFit(f"needs about {shared} bytes of shared memory, the device has "
                         f"{spec.smem_per_block} per block")
    # 8 warps for a projection over 64-unit tiles (H 17..64, P <= 16): with 4 its kernels spilled
    # inside the time loop on sm_90 (bf16: 31 instructions forward, 178 backward; with 8: 0 and
    # 73; TF32 122/179 -> 50/133), on sm_80 (bf16 19/96 -> 0/0) and sm_89 (bf16 15/105 -> 0/59).
    warps = 8 if problem.has_proj and bh >= 64 else 4
    fwd = KernelConfig("_recurrence_fwd_persistent_kernel", BLOCK_B, bh, bp, warps, 1, shared)
    bwd = KernelConfig("_recurrence_bwd_persistent_kernel", BLOCK_B, bh, bp, warps, 1, shared)
    return Plan("persistent", (fwd, bwd), grid=(triton.cdiv(problem.B, BLOCK_B), problem.D))


KERNELS = {"fwd": ("_recurrence_fwd_persistent_kernel",),
           "bwd": ("_recurrence_bwd_persistent_kernel",)}


def forward(a: ForwardArgs, the_plan: Plan) -> None:
    cfg = the_plan.config("_recurrence_fwd_persistent_kernel")
    launch_kernel(
        _recurrence_fwd_persistent_kernel, (triton.cdiv(a.B, cfg.block_b), a.D),
        xg_ptr=a.xg, stride_xt=a.xg.stride(0), stride_xb=a.xg.stride(1),
        h0_ptr=a.h0, c0_ptr=a.c0, w_hh_ptr=a.w_hh, b_hn_ptr=a.b_hn, w_hr_ptr=a.w_hr,
        len_ptr=a.lengths, **a.reset_args(), rm_ptr=a.rmask, **a.zone_args(),
        y_ptr=a.y, stride_yt=a.y.stride(0), stride_yb=a.y.stride(1), hn_ptr=a.hn, cn_ptr=a.cn,
        gates_ptr=a.gates, cell_ptr=a.cell,
        T=a.T, B=a.B, H=a.H, P=a.P,
        CELL=a.mode, G=a.G, NSAVE=a.NSAVE, SAVE=a.save, ACC=a.ACC, PRECISION=a.precision,
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_P=cfg.block_k,
        **cfg.launch_options(),
    )


def backward(b: BackwardArgs, the_plan: Plan) -> None:
    cfg = the_plan.config("_recurrence_bwd_persistent_kernel")
    launch_kernel(
        _recurrence_bwd_persistent_kernel, (triton.cdiv(b.B, cfg.block_b), b.D),
        dy_ptr=b.dy, stride_dyt=b.dy.stride(0), stride_dyb=b.dy.stride(1),
        dhn_ptr=b.dhn, dcn_ptr=b.dcn, y_ptr=b.y, stride_yt=b.y.stride(0),
        stride_yb=b.y.stride(1), h0_ptr=b.h0, c0_ptr=b.c0, gates_ptr=b.gates, cell_ptr=b.cell,
        w_hh_ptr=b.w_hh, w_hr_ptr=b.w_hr, len_ptr=b.lengths, **b.reset_args(), rm_ptr=b.rmask,
        **b.zone_args(),
        dcell_ptr=b.dcell, dgx_ptr=b.dgx, dgh_ptr=b.dgh, dhp_ptr=b.dhp, dh0_ptr=b.dh0,
        dc0_ptr=b.dc0, clip=b.clip,
        T=b.T, B=b.B, H=b.H, P=b.P,
        CELL=b.mode, G=b.G, NSAVE=b.NSAVE, ACC=b.ACC, PRECISION=b.precision,
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_P=cfg.block_k,
        **cfg.launch_options(),
    )
