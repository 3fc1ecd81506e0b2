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

import itertools

import torch
import triton
import triton.language as tl

from ._jit import (GRU, LSTM, cell_backward, cell_forward, load_gate_tiles, load_gates, next_time,
                   positive, prev_time, recurrent_products, step_time, store_gates)
from .args import BackwardArgs, ForwardArgs
from .select import (DeviceSpec, DoesNotFit, KernelConfig, Plan, Problem, block,
                     launch_kernel, operand_copies)

_LENGTHS = {"HAS_LENGTHS": lambda a: a["len_ptr"] is not None}
_OPTIONAL = {**_LENGTHS, "HAS_BHN": lambda a: a["b_hn_ptr"] is not None}


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


@triton.heuristics(_OPTIONAL)
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
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr, SAVE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BHN: tl.constexpr, HAS_LENGTHS: tl.constexpr,
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


@triton.heuristics(_LENGTHS)
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
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
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
    dc_c = dh_c
    b_c0 = dh_c
    b_h0 = dh_c
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
        s0, s1, s2, s3 = dh, dh, dh, dh
        if CELL == LSTM or CELL == GRU:
            s0, s1, s2, s3 = load_gates(gates_ptr + p_row * (NSAVE * H) + o_h[None, :], m_bh, H,
                                        ACC)
        c_t = dh
        c_prev = dh
        h_prev = dh
        h_t = dh
        if CELL == LSTM:
            c_t = tl.load(cell_ptr + p_row * H + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
            c_prev = tl.where(has_prev, tl.load(cell_ptr + p_row_prev * H + o_h[None, :],
                                                mask=m_bh & has_prev, other=0.0).to(ACC), b_c0)
        elif CELL == GRU:
            h_prev = tl.where(has_prev, tl.load(
                y_ptr + t_prev * stride_yt + ob64[:, None] * stride_yb + i_d * H + o_h[None, :],
                mask=m_bh & has_prev, other=0.0).to(ACC), b_h0)
        else:
            h_t = tl.load(y_ptr + t64 * stride_yt + ob64[:, None] * stride_yb + i_d * H
                          + o_h[None, :], mask=m_bh, other=0.0).to(ACC)
        g0, g1, g2, g3, gh2, dh_keep, dc_c = cell_backward(dh, dc_c, s0, s1, s2, s3, c_t, c_prev,
                                                           h_prev, h_t, act, CELL)
        if G == 1:
            tl.store(p_dg, g0.to(G_DTYPE), mask=m_bh)
            tl.store(p_buf + o_h[None, :], g0.to(gbuf_ptr.dtype.element_ty), mask=m_bh)
        else:
            store_gates(p_dg, g0, g1, g2, g3, m_bh, H, G)
            # What W_hh multiplies: for GRU the n gate's hidden part (r * dn), not its input part.
            store_gates(p_buf + o_h[None, :], g0, g1, gh2, g3, m_bh, H, G)
        if CELL == GRU:
            store_gates(dgh_ptr + p_row * (G * H) + o_h[None, :], g0, g1, gh2, gh2, m_bh, H, 3)
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
        dh_c = rec + dh_keep

    tl.store(dh0_ptr + p_state * H + o_h[None, :], dh_c.to(dh0_ptr.dtype.element_ty), mask=m_bh)
    if CELL == LSTM:
        tl.store(dc0_ptr + p_state * H + o_h[None, :], dc_c.to(dc0_ptr.dtype.element_ty),
                 mask=m_bh)


# ---------------------------------------------------------------------------------------------
# Planning and launchers.

# W_hh elements one program holds (its slice, all gates). Triton keeps the slice in registers as
# well as in shared memory: at 16384 elements (e.g. LSTM H=256, 16 units) the compiled forward
# kernel already runs at 255 registers per thread (bench/kernel_resources.py); beyond it spills.
MAX_SLICE_WEIGHTS = 16384
_SLICES = (16, 32, 64)


def _cooperative_launch_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


def plan(problem: Problem, spec: DeviceSpec) -> Plan:
    """One group of programs per (batch tile, direction); each program owns ``block_h`` hidden
    units, holds their rows of W_hh (all gates) and reads the whole state every step."""
    if problem.has_proj:
        raise DoesNotFit("no proj_size (h and the cell state would need two barriers per step)")
    G, H = problem.G, problem.H
    block_k = block(H)
    isz = problem.itemsize * operand_copies(problem)
    if spec.interpreter:
        # Programs run one after another there: one program per group passes every barrier.
        block_b = 16
        groups = triton.cdiv(problem.B, block_b) * problem.D
        shared = (G * block_k * block_k + block_b * block_k) * isz
        cfg = dict(block_b=block_b, block_h=block_k, block_k=block_k, num_warps=4,
                   shared_bytes=shared)
        return Plan("cooperative", (KernelConfig("_recurrence_fwd_coop_kernel", **cfg),
                                    KernelConfig("_recurrence_bwd_coop_kernel", **cfg)),
                    grid=(1, groups // problem.D, problem.D))
    reasons = {}  # the first reason of each kind
    # Batch tiles of 64 rows (a Hopper warpgroup MMA's M) where they fit, else 16.
    for block_b, block_h in itertools.product((64, 16), _SLICES):
        groups = triton.cdiv(problem.B, block_b) * problem.D
        per_group = triton.cdiv(H, block_h)
        weights = G * block_h * block_k
        # Shared memory: the weight slice and the state tile, dot operands.
        shared = (weights + block_b * block_k) * isz
        if per_group * groups > spec.sm_count:
            reasons.setdefault("sms", f"{per_group * groups} programs ({block_h} units each) "
                                      f"> {spec.sm_count} SMs")
        elif weights > MAX_SLICE_WEIGHTS:
            reasons.setdefault("regs", f"a slice of {weights} weights > {MAX_SLICE_WEIGHTS} "
                                       "(registers)")
        elif shared > spec.smem_per_block:
            reasons.setdefault("smem", f"{shared} B of shared memory > {spec.smem_per_block}")
        else:
            cfg = dict(block_b=block_b, block_h=block_h, block_k=block_k, num_warps=8,
                       shared_bytes=shared)
            return Plan("cooperative", (KernelConfig("_recurrence_fwd_coop_kernel", **cfg),
                                        KernelConfig("_recurrence_bwd_coop_kernel", **cfg)),
                        grid=(per_group, groups // problem.D, problem.D))
    raise DoesNotFit(", or ".join(reasons.values()))


def _launch_options(cfg: KernelConfig) -> dict:
    opts = cfg.launch_options()
    if not torch.cuda.is_available() or not _cooperative_launch_supported():
        return opts
    from ..backend import interpreting

    if not interpreting():
        # A grid that cannot be co-resident fails to launch instead of hanging at a barrier.
        opts["launch_cooperative_grid"] = True
    return opts


def forward(a: ForwardArgs, the_plan: Plan) -> int:
    cfg = the_plan.config("_recurrence_fwd_coop_kernel")
    device = a.y.device
    hbuf = torch.empty(2, a.D, a.B, a.H, device=device, dtype=a.y.dtype)
    per_group, nbt, _ = the_plan.grid
    sync = torch.zeros(a.D * nbt, device=device, dtype=torch.int32)
    launch_kernel(
        _recurrence_fwd_coop_kernel, (per_group, nbt, a.D),
        xg_ptr=a.xg, stride_xt=a.xg.stride(0), stride_xb=a.xg.stride(1),
        h0_ptr=a.h0, c0_ptr=a.c0, w_hh_ptr=a.w_hh, b_hn_ptr=a.b_hn, len_ptr=a.lengths,
        y_ptr=a.y, stride_yt=a.y.stride(0), stride_yb=a.y.stride(1),
        hn_ptr=a.hn, cn_ptr=a.cn, gates_ptr=a.gates, cell_ptr=a.cell, hbuf_ptr=hbuf,
        sync_ptr=sync, T=a.T, B=a.B, H=a.H,
        CELL=a.mode, G=a.G, NSAVE=a.NSAVE, SAVE=a.save, ACC=a.ACC, PRECISION=a.precision,
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
        **_launch_options(cfg),
    )
    return 1


def backward(b: BackwardArgs, the_plan: Plan) -> int:
    cfg = the_plan.config("_recurrence_bwd_coop_kernel")
    device = b.dy.device
    gbuf = torch.empty(2, b.D, b.B, b.G * b.H, device=device, dtype=b.dgx.dtype)
    per_group, nbt, _ = the_plan.grid
    sync = torch.zeros(b.D * nbt, device=device, dtype=torch.int32)
    launch_kernel(
        _recurrence_bwd_coop_kernel, (per_group, nbt, b.D),
        dy_ptr=b.dy, stride_dyt=b.dy.stride(0), stride_dyb=b.dy.stride(1),
        dhn_ptr=b.dhn, dcn_ptr=b.dcn, y_ptr=b.y, stride_yt=b.y.stride(0),
        stride_yb=b.y.stride(1), h0_ptr=b.h0, c0_ptr=b.c0, gates_ptr=b.gates, cell_ptr=b.cell,
        w_hh_ptr=b.w_hh, len_ptr=b.lengths, dgx_ptr=b.dgx, dgh_ptr=b.dgh,
        dh0_ptr=b.dh0, dc0_ptr=b.dc0, gbuf_ptr=gbuf, sync_ptr=sync, T=b.T, B=b.B, H=b.H,
        CELL=b.mode, G=b.G, NSAVE=b.NSAVE, ACC=b.ACC, PRECISION=b.precision,
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
        **_launch_options(cfg),
    )
    return 1
