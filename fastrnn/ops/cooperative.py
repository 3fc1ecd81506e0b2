"""Strategy "cooperative": a persistent grid that shares one recurrence (Persistent-RNN design).

Programs are grouped per (batch tile, direction); the programs of a group each own a slice of
hidden units (all gates of those units, so only h crosses programs), keep their slice of W_hh on
chip for the whole sequence, and loop over time together with one grid barrier per step: each
program writes its slice of h_t to a double-buffered global buffer, signals an atomic counter
(release), waits for every program of its group (acquire), and reads the whole h_t back for the
next step's product. Groups never wait on each other, so directions and batch tiles run
concurrently. The whole grid must be resident at once: it is sized to at most one program per
SM, and launched as a cooperative grid where Triton supports it, so an oversubscribed launch
fails loudly instead of hanging.

Backward mirrors it: each program owns the same hidden slice, holds the matching columns of
W_hh, and exchanges the gate gradients dG_t through a double-buffered buffer, one barrier per step.

Not for proj_size (h and the cell state live in different spaces, which would need a second
barrier per step). In the Triton interpreter programs run one after another, so this strategy
runs there only with one program per group (the barrier is then passed at once); that still
executes the exact kernel code, barrier included, which is how the CPU tests check its maths.
"""

import torch
import triton
import triton.language as tl

from .. import _modes
from ..backend import interpreting
from ._jit import (GRU, LSTM, cell_forward, gru_bwd_pointwise, load_gate_tiles, load_gates,
                   lstm_bwd_pointwise, next_time, positive, prev_time, recurrent_products,
                   rnn_act_bwd, step_time, store_gates)


@triton.jit
def _arrive(sync_ptr):
    """Count this program in at the group's barrier; its stores before it become visible."""
    tl.debug_barrier()  # every thread of the program has issued its stores
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(sync_ptr, target):
    """Wait until the group's counter reaches ``target``; what others stored before arriving
    is visible after it."""
    while tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _grid_barrier(sync_ptr, target):
    _arrive(sync_ptr)
    _wait(sync_ptr, target)


@triton.jit(do_not_specialize=["T"])
def _recurrence_fwd_coop_kernel(
    xg_ptr, stride_xt, stride_xb,      # [T, B, D*G*H]
    h0_ptr, c0_ptr,                    # [D, B, H] (P == H here)
    w_hh_ptr, b_hn_ptr, len_ptr,       # [D, G*H, H], [D, H], [B]
    y_ptr, stride_yt, stride_yb,       # [T, B, D*H]
    hn_ptr, cn_ptr, gates_ptr, cell_ptr,
    hbuf_ptr,                          # [2, D, B, H] the shared state, double-buffered
    sync_ptr,                          # [D * NBT] int32 barrier counters, zeroed
    T, B, H,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    HAS_BHN: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_j = tl.program_id(0)             # hidden slice owned by this program
    i_b = tl.program_id(1)
    i_d = tl.program_id(2)
    NJ = tl.num_programs(0)
    NBT = tl.num_programs(1)
    D = tl.num_programs(2)
    p_sync = sync_ptr + i_d * NBT + i_b
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_h = i_j * BLOCK_H + tl.arange(0, BLOCK_H)   # own units
    o_k = tl.arange(0, BLOCK_K)                   # all units (the product's inner dimension)
    m_b = o_b < B
    m_h = o_h < H
    m_k = o_k < H
    m_bh = m_b[:, None] & m_h[None, :]
    m_bk = m_b[:, None] & m_k[None, :]
    ob64 = o_b.to(tl.int64)
    W_DTYPE = w_hh_ptr.dtype.element_ty
    Y_DTYPE = y_ptr.dtype.element_ty

    # This program's slice of W_hh[d]: for each gate, the rows of its own units, as [K, own].
    p_w = w_hh_ptr + i_d * (G * H * H) + o_h[None, :] * H + o_k[:, None]
    b_w0, b_w1, b_w2, b_w3 = load_gate_tiles(p_w, m_k[:, None] & m_h[None, :], H * H, G)
    b_bhn = 0.0
    if HAS_BHN:
        b_bhn = tl.load(b_hn_ptr + i_d * H + o_h, mask=m_h, other=0.0).to(ACC)[None, :]

    p_state = (i_d * B + ob64)[:, None]
    h_own = tl.load(h0_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
    c = h_own  # only an LSTM has a cell state
    if CELL == LSTM:
        c = tl.load(c0_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
    if HAS_LENGTHS:
        b_len = tl.load(len_ptr + o_b, mask=m_b, other=0)
    # The whole state, read by every program: h0 for the first step.
    b_h = tl.load(h0_ptr + p_state * H + o_k[None, :], mask=m_bk, other=0.0).to(W_DTYPE)
    p_x = xg_ptr + ob64[:, None] * stride_xb + i_d * (G * H) + o_h[None, :]
    x0, x1, x2, x3 = load_gate_tiles(p_x + step_time(0, i_d, T).to(tl.int64) * stride_xt, m_bh, H,
                                     G)

    for s in range(0, T):
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        p_row = (t64 * B + ob64)[:, None] * D + i_d
        q0, q1, q2, q3 = recurrent_products(b_h, b_w0, b_w1, b_w2, b_w3, G, ACC, PRECISION)
        h_new, c_new, s0, s1, s2, s3 = cell_forward(x0, x1, x2, x3, q0, q1, q2, q3, h_own, c,
                                                    b_bhn, CELL, HAS_BHN, ACC)
        if SAVE and NSAVE > 0:
            store_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], s0, s1, s2, s3, m_bh, H,
                        4)
        if CELL == LSTM:
            if HAS_LENGTHS:
                c = tl.where((t < b_len)[:, None], c_new, c)
            else:
                c = c_new
            if SAVE:
                tl.store(cell_ptr + p_row * H + o_h[None, :], c.to(cell_ptr.dtype.element_ty),
                         mask=m_bh)
        h_new = h_new.to(Y_DTYPE).to(ACC)
        if HAS_LENGTHS:
            h_own = tl.where((t < b_len)[:, None], h_new, h_own)
        else:
            h_own = h_new
        h_own = tl.where(m_bh, h_own, 0.0)
        tl.store(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * H + o_h[None, :],
                 h_own.to(Y_DTYPE), mask=m_bh)
        # Publish this slice of h_t, wait for the group, read the whole h_t back. The next
        # step's input projections are loaded while the program waits.
        p_buf = hbuf_ptr + (((s + 1) % 2) * D + i_d) * B * H + ob64[:, None] * H
        tl.store(p_buf + o_h[None, :], h_own.to(hbuf_ptr.dtype.element_ty), mask=m_bh)
        _arrive(p_sync)
        x0, x1, x2, x3 = load_gate_tiles(p_x + next_time(s, i_d, T) * stride_xt, m_bh, H, G)
        _wait(p_sync, (s + 1) * NJ)
        b_h = tl.load(p_buf + o_k[None, :], mask=m_bk, other=0.0,
                      cache_modifier=".cg").to(W_DTYPE)

    tl.store(hn_ptr + p_state * H + o_h[None, :], h_own.to(hn_ptr.dtype.element_ty), mask=m_bh)
    if CELL == LSTM:
        tl.store(cn_ptr + p_state * H + o_h[None, :], c.to(cn_ptr.dtype.element_ty), mask=m_bh)


@triton.jit(do_not_specialize=["T"])
def _recurrence_bwd_coop_kernel(
    dy_ptr, stride_dyt, stride_dyb,
    dhn_ptr, dcn_ptr,
    y_ptr, stride_yt, stride_yb,
    h0_ptr, c0_ptr, gates_ptr, cell_ptr,
    w_hh_ptr, len_ptr,
    dgx_ptr, dgh_ptr, dh0_ptr, dc0_ptr,
    gbuf_ptr,                          # [2, D, B, G*H] the shared gate gradients, double-buffered
    sync_ptr,
    T, B, H,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_j = tl.program_id(0)
    i_b = tl.program_id(1)
    i_d = tl.program_id(2)
    NJ = tl.num_programs(0)
    NBT = tl.num_programs(1)
    D = tl.num_programs(2)
    p_sync = sync_ptr + i_d * NBT + i_b
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_h = i_j * BLOCK_H + tl.arange(0, BLOCK_H)
    o_k = tl.arange(0, BLOCK_K)
    m_b = o_b < B
    m_h = o_h < H
    m_k = o_k < H
    m_bh = m_b[:, None] & m_h[None, :]
    m_bk = m_b[:, None] & m_k[None, :]
    ob64 = o_b.to(tl.int64)
    W_DTYPE = w_hh_ptr.dtype.element_ty
    G_DTYPE = dgx_ptr.dtype.element_ty

    # The columns of W_hh[d] for the own units, per gate as [K, own]: dh[:, own] = dG @ W[:, own].
    p_w = w_hh_ptr + i_d * (G * H * H) + o_k[:, None] * H + o_h[None, :]
    b_w0, b_w1, b_w2, b_w3 = load_gate_tiles(p_w, m_k[:, None] & m_h[None, :], H * H, G)

    p_state = (i_d * B + ob64)[:, None]
    dh_c = tl.load(dhn_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
    if CELL == LSTM:
        dc_c = tl.load(dcn_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
        b_c0 = tl.load(c0_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
    if CELL == GRU:
        b_h0 = tl.load(h0_ptr + p_state * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
    if HAS_LENGTHS:
        b_len = tl.load(len_ptr + o_b, mask=m_b, other=0)

    for k in range(0, T):
        s = T - 1 - k
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        has_prev = positive(s, o_b)[:, None]
        t_prev = prev_time(t, i_d, T)
        p_row = (t64 * B + ob64)[:, None] * D + i_d
        p_row_prev = (t_prev * B + ob64)[:, None] * D + i_d
        dh = dh_c + tl.load(dy_ptr + t64 * stride_dyt + ob64[:, None] * stride_dyb + i_d * H
                            + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
        if HAS_LENGTHS:
            act = (t < b_len)[:, None] & m_bh
        else:
            act = m_bh
        p_dg = dgx_ptr + p_row * (G * H) + o_h[None, :]
        p_buf = gbuf_ptr + ((k % 2) * D + i_d) * B * (G * H) + ob64[:, None] * (G * H)
        if CELL == LSTM:
            i, f, g, o = load_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], m_bh, H, ACC)
            c_t = tl.load(cell_ptr + p_row * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
            c_prev = tl.where(has_prev, tl.load(cell_ptr + p_row_prev * H + o_h[None, :],
                                                mask=m_bh & has_prev, other=0.0).to(ACC), b_c0)
            di, df, dg, do, dc_prev = lstm_bwd_pointwise(dh, dc_c, i, f, g, o, c_t, c_prev)
            di = tl.where(act, di, 0.0)
            df = tl.where(act, df, 0.0)
            dg = tl.where(act, dg, 0.0)
            do = tl.where(act, do, 0.0)
            store_gates(p_dg, di, df, dg, do, m_bh, H, G)
            store_gates(p_buf + o_h[None, :], di, df, dg, do, m_bh, H, G)
            dc_c = tl.where(act, dc_prev, dc_c)
            keep = tl.where(act, 0.0, 1.0)
        elif CELL == GRU:
            r, z, n, hn = load_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], m_bh, H, ACC)
            h_prev = tl.where(has_prev, tl.load(
                y_ptr + t_prev * stride_yt + ob64[:, None] * stride_yb + i_d * H + o_h[None, :],
                mask=m_bh & has_prev, other=0.0).to(ACC), b_h0)
            dr, dz, dnx, dnh, _ = gru_bwd_pointwise(dh, r, z, n, hn, h_prev)
            dr = tl.where(act, dr, 0.0)
            dz = tl.where(act, dz, 0.0)
            dnh = tl.where(act, dnh, 0.0)
            store_gates(p_dg, dr, dz, tl.where(act, dnx, 0.0), dnh, m_bh, H, 3)
            store_gates(dgh_ptr + p_row * (G * H) + o_h[None, :], dr, dz, dnh, dnh, m_bh, H, G)
            store_gates(p_buf + o_h[None, :], dr, dz, dnh, dnh, m_bh, H, G)
            keep = tl.where(act, z, 1.0)
        else:
            h_t = tl.load(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * H
                          + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
            da = tl.where(act, rnn_act_bwd(dh, h_t, CELL), 0.0).to(G_DTYPE)
            tl.store(p_dg, da, mask=m_bh)
            tl.store(p_buf + o_h[None, :], da, mask=m_bh)
            keep = tl.where(act, 0.0, 1.0)
        # Wait for the group's gate gradients of this step, then form dh of the step before.
        _grid_barrier(p_sync, (k + 1) * NJ)
        p_all = p_buf + o_k[None, :]
        rec = tl.dot(tl.load(p_all, mask=m_bk, other=0.0, cache_modifier=".cg").to(W_DTYPE),
                     b_w0, input_precision=PRECISION).to(ACC)
        if G >= 3:
            rec += tl.dot(tl.load(p_all + H, mask=m_bk, other=0.0,
                                  cache_modifier=".cg").to(W_DTYPE),
                          b_w1, input_precision=PRECISION).to(ACC)
            rec += tl.dot(tl.load(p_all + 2 * H, mask=m_bk, other=0.0,
                                  cache_modifier=".cg").to(W_DTYPE),
                          b_w2, input_precision=PRECISION).to(ACC)
        if G == 4:
            rec += tl.dot(tl.load(p_all + 3 * H, mask=m_bk, other=0.0,
                                  cache_modifier=".cg").to(W_DTYPE),
                          b_w3, input_precision=PRECISION).to(ACC)
        dh_c = rec + keep * dh

    tl.store(dh0_ptr + p_state * H + o_h[None, :], dh_c.to(dh0_ptr.dtype.element_ty), mask=m_bh)
    if CELL == LSTM:
        tl.store(dc0_ptr + p_state * H + o_h[None, :], dc_c.to(dc0_ptr.dtype.element_ty),
                 mask=m_bh)


# ---------------------------------------------------------------------------------------------
# Planning and launchers.

# Padded W_hh elements one program may hold (its slice, all gates): beyond it registers spill.
MAX_SLICE_WEIGHTS = 16384
_SLICES = (16, 32, 64, 128)


def _cooperative_launch_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


def sm_count(device: torch.device):
    """Multiprocessors of a CUDA device (None elsewhere): the largest co-resident grid."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(mode: int, H: int, P: int, B: int, D: int, device: torch.device):
    """(BLOCK_B, BLOCK_H, BLOCK_K, programs per group, groups) for a problem, or None where the
    cooperative strategy does not apply (projection, slices too large, grid larger than the GPU;
    under the interpreter, more than one program per group)."""
    if P != H:
        return None
    G = _modes.NUM_GATES[mode]
    block_b = min(64, max(16, triton.next_power_of_2(B)))
    block_k = max(16, triton.next_power_of_2(H))
    groups = triton.cdiv(B, block_b) * D
    if interpreting():
        return (block_b, block_k, block_k, 1, groups)
    sms = sm_count(device)
    if sms is None:
        return None
    for block_h in _SLICES:
        per_group = triton.cdiv(H, block_h)
        if per_group * groups <= sms and G * block_h * block_k <= MAX_SLICE_WEIGHTS:
            return (block_b, block_h, block_k, per_group, groups)
    return None


def _launch_options(block_h, block_k, G):
    opts = {"num_warps": 8 if G * block_h * block_k > 8192 else 4}
    if not interpreting() and _cooperative_launch_supported():
        opts["launch_cooperative_grid"] = True
    return opts


def _require_plan(p):
    layout = plan(p.mode, p.H, p.P, p.B, p.D, p.h0.device)
    if layout is None:
        raise RuntimeError(
            f"fastrnn: the cooperative strategy does not apply here (hidden {p.H}, proj "
            f"{p.P if p.P != p.H else 0}, batch {p.B}, {p.D} direction(s)); choose another "
            "with FASTRNN_STRATEGY or force_strategy")
    return layout


def forward(f):
    block_b, block_h, block_k, per_group, _ = _require_plan(f)
    device = f.y.device
    hbuf = torch.empty(2, f.D, f.B, f.H, device=device, dtype=f.y.dtype)
    nbt = triton.cdiv(f.B, block_b)
    sync = torch.zeros(f.D * nbt, device=device, dtype=torch.int32)
    _recurrence_fwd_coop_kernel[(per_group, nbt, f.D)](
        f.xg, f.xg.stride(0), f.xg.stride(1),
        f.h0, f.c0, f.w_hh, f.b_hn, f.lengths,
        f.y, f.y.stride(0), f.y.stride(1),
        f.hn, f.cn, f.gates, f.cell, hbuf, sync,
        f.T, f.B, f.H,
        CELL=f.mode, G=f.G, NSAVE=f.NSAVE, HAS_BHN=f.has_bhn, HAS_LENGTHS=f.has_lengths,
        SAVE=f.save, ACC=f.acc, PRECISION=f.precision,
        BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
        **_launch_options(block_h, block_k, f.G),
    )
    return 1


def backward(b):
    block_b, block_h, block_k, per_group, _ = _require_plan(b)
    device = b.dy.device
    gbuf = torch.empty(2, b.D, b.B, b.G * b.H, device=device, dtype=b.dgx.dtype)
    nbt = triton.cdiv(b.B, block_b)
    sync = torch.zeros(b.D * nbt, device=device, dtype=torch.int32)
    _recurrence_bwd_coop_kernel[(per_group, nbt, b.D)](
        b.dy, b.dy.stride(0), b.dy.stride(1),
        b.dhn, b.dcn,
        b.y, b.y.stride(0), b.y.stride(1),
        b.h0, b.c0, b.gates, b.cell,
        b.w_hh, b.lengths,
        b.dgx, b.dgh, b.dh0, b.dc0, gbuf, sync,
        b.T, b.B, b.H,
        CELL=b.mode, G=b.G, NSAVE=b.NSAVE, HAS_LENGTHS=b.has_lengths,
        ACC=b.acc, PRECISION=b.precision,
        BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
        **_launch_options(block_h, block_k, b.G),
    )
    return 1
