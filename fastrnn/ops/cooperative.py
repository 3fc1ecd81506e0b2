"""Strategy "cooperative": a persistent grid that shares each recurrence (Persistent-RNN design).

One launch per layer for the forward and one for the backward, both directions in the same launch
(separate program groups). A group (one direction, one tile of the batch) has NJ programs, at most
one per SM across the grid; program j owns ``BLOCK_H`` hidden units and keeps their rows of W_hh
(every gate) resident in shared memory for the whole sequence, in both passes (loaded once; the
compiler hoists them out of the time loop):

* the slice: the gates stacked into one [GP*BLOCK_H, H] tile (GRU's three padded to four, GP,
  so the rows are a power of two: one 64-row product, wgmma on sm_90), or for a GRU whose padded
  slice does not fit (fp16/bf16 beyond H = 1024) its r and z rows [2*BLOCK_H, H] and its n rows
  [BLOCK_H, H]; held in NKC column tiles where the whole does not fit with a state chunk (the
  forward then reads the state a tile at a time) or where the backward's product would be large.
* forward: per step ``W_j @ h_{t-1}^T``: the weights are the dot's M dimension and the batch its
  N dimension, walked in chunks of BLOCK_N rows.
* backward: per step, its units' gate gradients dG_j and its partial product for every unit,
  ``P_j = W_j^T dG_j`` [H, N] (the hidden size is the dot's M dimension: wgmma on sm_90, the
  slice read from shared memory); after the barrier each program sums the NJ partial products
  of its own units, ``dh_{t-1}[own] = sum_j P_j[own]`` (a reduce-scatter through L2). The gate
  gradients never leave their program.

Each step the programs exchange the new state (forward: h; backward: the partial products)
through double-buffered global buffers (L2), then meet at a grid barrier made of one flag per
program: a program publishes its step with a release store to its own flag and waits until every
flag of its group shows the step (acquire), so no address is contended. The next step's input
projections (of the first batch chunk) are loaded between publishing and waiting; the cell state
and the carried gradients of a program's own units live in small global buffers that only that
program touches. A wait is bounded: past the bound the program stops waiting, flags the error,
and fastrnn raises at its next cooperative call (the grid must be co-resident, which the
cooperative launch guarantees where Triton supports it; other work holding SMs could otherwise
break it).

The Triton interpreter runs programs one after another, so a grid barrier cannot be passed there;
the kernels take a range of steps, and under the interpreter the launcher runs them one step per
launch with the barrier left out (the kernel boundary orders the steps). That executes the very
per-step code, with several programs per group, on the CPU. A group of one program needs no
barrier and runs the whole sequence in one launch there too.

LSTMs with proj_size run in ``ops/cooperative_proj.py`` (h and the cell state live in different
spaces: two barriers per step), which shares this module's slices, barrier and launch.
"""

import os

import torch
import triton
import triton.language as tl

from ._jit import (LSTM, GRU, cell_backward, cell_forward, clamp_grad, collect_at_reset,
                   entering_reset, load_gate_tiles, load_gates, lstm_new_cell, next_time,
                   positive, prev_time, save_gates, split_gates, stack_gates, step_time,
                   store_gates, zone_mix, zone_split)
from .args import BackwardArgs, ForwardArgs, acc_dtype
from .select import (DeviceSpec, DoesNotFit, KernelConfig, Plan, Problem, block, describe,
                     fast_activations, launch_kernel, operand_copies)

FLAG_STRIDE = tl.constexpr(8)  # ints between two programs' flags: one 32-byte sector each
POLL_NS = tl.constexpr(1000)   # what one poll counts for where there is no timer (interpreter)


def wait_ns() -> int:
    """How long one barrier wait may take before the kernel gives up, in nanoseconds:
    FASTRNN_WAIT_S seconds (default 1). Short enough that a stall costs about a second, long
    enough that time-slicing between processes sharing the GPU does not trip it."""
    seconds = float(os.environ.get("FASTRNN_WAIT_S", "1") or 1)
    if not seconds > 0:
        raise ValueError(f"FASTRNN_WAIT_S must be a positive number of seconds, got {seconds}")
    return int(seconds * 1e9)

_LENGTHS = {"HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
            "HAS_RESETS": lambda a: a["rs_ptr"] is not None,
            "HAS_RMASK": lambda a: a["rm_ptr"] is not None,
            "FAST": lambda a: fast_activations(a["w_hh_ptr"].dtype)}
_OPTIONAL = {**_LENGTHS, "HAS_BHN": lambda a: a["b_hn_ptr"] is not None}
_BWD_OPTIONAL = {**_LENGTHS, "HAS_DCELL": lambda a: a["dcell_ptr"] is not None,
                 "CLIP": lambda a: a["clip"] > 0}


@triton.jit
def _program():
    """Where a cooperative program stands in its grid: (i_j, i_bt, i_d, NJ, NBT, D): axis 0 the
    hidden slice it owns, axis 1 its group's batch tile, axis 2 the direction."""
    return (tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0),
            tl.num_programs(1), tl.num_programs(2))


@triton.jit
def _group(flags_ptr, i_bt, i_d, NJ, NBT, B, BT):
    """A group's NJ barrier flags and its batch rows [b_lo, b_hi)."""
    b_lo = i_bt * BT
    return (flags_ptr + (i_d * NBT + i_bt) * (NJ * FLAG_STRIDE), b_lo,
            tl.minimum(B, b_lo + BT))


@triton.jit
def _gate_rows(w_hh_ptr, i_d, i_j, o_k, m_k, H, K, G: tl.constexpr, FIRST: tl.constexpr,
               NG: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program i_j's rows of gates FIRST .. FIRST+NG-1 of a stacked weight [D, G*H, K] (W_hh;
    W_hr as G = 1 with P for H), stacked, [NG*BLOCK_H, columns o_k]: row r is gate
    FIRST + r // BLOCK_H of unit i_j * BLOCK_H + r % BLOCK_H (rows of a padding gate, G and up,
    and of units past H are zero)."""
    o_m = tl.arange(0, NG * BLOCK_H)
    r_gate = FIRST + o_m // BLOCK_H
    r_unit = i_j * BLOCK_H + o_m % BLOCK_H
    m_r = (r_gate < G) & (r_unit < H)
    return tl.load(w_hh_ptr + i_d * (G * H * K) + (r_gate * H + r_unit)[:, None] * K
                   + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)


@triton.jit
def _own_rows(w_hh_ptr, i_d, i_j, o_k, m_k, H, G: tl.constexpr, GP: tl.constexpr,
              BLOCK_H: tl.constexpr):
    """The forward's slice: program i_j's rows of W_hh[d], all gates stacked, [GP*BLOCK_H, K]."""
    return _gate_rows(w_hh_ptr, i_d, i_j, o_k, m_k, H, H, G, 0, GP, BLOCK_H)


@triton.jit
def _slice_tile(w_hh_ptr, i_d, i_j, o_c, H, K, G: tl.constexpr, GP: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """Columns o_c (of K) of program i_j's row slice, as (a, b): GP gates stacked in ``a``
    (``b`` aliases it), or for GP == 3 (a GRU without the padding gate: 3 x 16 rows are no power
    of two) the r and z rows in ``a`` [2*BLOCK_H, KC] and the n rows in ``b`` [BLOCK_H, KC]."""
    m_c = o_c < K
    if GP == 3:
        a = _gate_rows(w_hh_ptr, i_d, i_j, o_c, m_c, H, K, G, 0, 2, BLOCK_H)
        b = _gate_rows(w_hh_ptr, i_d, i_j, o_c, m_c, H, K, G, 2, 1, BLOCK_H)
    else:
        a = _gate_rows(w_hh_ptr, i_d, i_j, o_c, m_c, H, K, G, 0, GP, BLOCK_H)
        b = a
    return a, b


@triton.jit
def _slice_tiles(w_hh_ptr, i_d, i_j, H, K, G: tl.constexpr, GP: tl.constexpr,
                 BLOCK_H: tl.constexpr, KC: tl.constexpr, NKC: tl.constexpr):
    """The row slice of a weight [D, G*H, K] in NKC (1, 2 or 4) column tiles of KC columns each,
    resident for the whole sequence: (a0, b0, a1, b1, a2, b2, a3, b3) as ``_slice_tile`` (unused
    tiles alias the first)."""
    o_c = tl.arange(0, KC)
    a0, b0 = _slice_tile(w_hh_ptr, i_d, i_j, o_c, H, K, G, GP, BLOCK_H)
    a1 = a0
    b1 = b0
    a2 = a0
    b2 = b0
    a3 = a0
    b3 = b0
    if NKC >= 2:
        a1, b1 = _slice_tile(w_hh_ptr, i_d, i_j, o_c + KC, H, K, G, GP, BLOCK_H)
    if NKC == 4:
        a2, b2 = _slice_tile(w_hh_ptr, i_d, i_j, o_c + 2 * KC, H, K, G, GP, BLOCK_H)
        a3, b3 = _slice_tile(w_hh_ptr, i_d, i_j, o_c + 3 * KC, H, K, G, GP, BLOCK_H)
    return a0, b0, a1, b1, a2, b2, a3, b3


@triton.jit
def _state_tile(hbuf_ptr, rows, rm_ptr, rm_rows, o_c, m_n, H, HAS_RMASK: tl.constexpr,
                W_DTYPE: tl.constexpr):
    """Columns o_c of the previous state of a batch chunk, [KC, N] (the dot's K by its N),
    read from L2 (every program's h), masked by the recurrent dropout mask."""
    m = (o_c < H)[:, None] & m_n[None, :]
    h = tl.load(hbuf_ptr + rows + o_c[:, None], mask=m, other=0.0, cache_modifier=".cg")
    if HAS_RMASK:  # recurrent dropout: the product sees mask * h
        h = h * tl.load(rm_ptr + rm_rows + o_c[:, None], mask=m, other=0.0)
    return h.to(W_DTYPE)


@triton.jit
def _tile_product(a, b, h, acc_a, acc_b, GP: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate one column tile's share of the slice's product W_j h (acc None: the first)."""
    acc_a = tl.dot(a, h, acc_a, input_precision=PRECISION)
    if GP == 3:
        acc_b = tl.dot(b, h, acc_b, input_precision=PRECISION)
    return acc_a, acc_b


@triton.jit
def _tile_partial(a, b, dga, dgb, GP: tl.constexpr, PRECISION: tl.constexpr):
    """One column tile of the program's partial product W_j^T dG_j, [KC, N]."""
    p = tl.dot(tl.trans(a), dga, input_precision=PRECISION)
    if GP == 3:
        p = tl.dot(tl.trans(b), dgb, p, input_precision=PRECISION)
    return p


@triton.jit
def _taking_step(len_ptr, t, o_n, m_n, HAS_LENGTHS: tl.constexpr):
    """[1, N]: the batch chunk's rows that take the step at time ``t`` (within their length,
    packed input; every real row otherwise)."""
    act = m_n[None, :]
    if HAS_LENGTHS:
        act = (t < tl.load(len_ptr + o_n, mask=m_n, other=0))[None, :]
    return act


@triton.jit
def _cell_states(cell_ptr, c0_ptr, dcell_ptr, zc_ptr, zf_ptr, p_row, p_row_prev, state, o_u, m_un,
                 has_prev, dc, s0, s1, s2, H, ACC: tl.constexpr, HAS_DCELL: tl.constexpr,
                 ZC: tl.constexpr):
    """An LSTM backward step's cell states for the own units: (c_t as the cell formed it,
    c_prev (the initial one where the step began from it), dc plus the step's own cell-state
    gradient (``return_states``), the part of dc that zoneout sends straight to c_prev)."""
    if HAS_DCELL:
        dc += tl.load(dcell_ptr + p_row * H + o_u[:, None], mask=m_un, other=0.0).to(ACC)
    c_t = tl.load(cell_ptr + p_row * H + o_u[:, None], mask=m_un, other=0.0).to(ACC)
    c_prev = tl.where(has_prev, tl.load(cell_ptr + p_row_prev * H + o_u[:, None],
                                        mask=m_un & has_prev, other=0.0).to(ACC),
                      tl.load(c0_ptr + state, mask=m_un, other=0.0).to(ACC))
    dc_zone = dc * 0.0
    if ZC != 0:  # the saved c_t is zoned: the cell's own c~ = f c_prev + i g
        dc, dc_zone = zone_split(dc, zc_ptr, p_row * H + o_u[:, None], m_un, zf_ptr, 1, ZC)
        c_t = lstm_new_cell(s0, s1, s2, c_prev)
    return c_t, c_prev, dc, dc_zone


@triton.jit
def _own_columns(w_hh_ptr, i_d, o_u, m_u, o_k, m_k, H, G: tl.constexpr):
    """The backward's slice: the columns of W_hh[d] of the own units o_u, one [own, K] tile
    per gate (as ``load_gate_tiles``)."""
    p_w = w_hh_ptr + i_d * (G * H * H) + o_k[None, :] * H + o_u[:, None]
    return load_gate_tiles(p_w, m_u[:, None] & m_k[None, :], H * H, G)


@triton.jit
def _publish(flag_ptr, value):
    """This program has finished step ``value - 1``: its stores before it become visible."""
    tl.debug_barrier()  # every thread of the program has issued its stores
    tl.atomic_xchg(flag_ptr, value, sem="release", scope="gpu")


@triton.jit
def _now():
    """The GPU's global nanosecond timer (``%globaltimer``)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _await(flags_ptr, NJ, target, err_ptr, alive, wait_ns, BLOCK_J: tl.constexpr,
           STRIDE: tl.constexpr, GLOBALTIMER: tl.constexpr = True):
    """Wait until every flag of the group (NJ of them, STRIDE apart) reaches ``target``, for at
    most ``wait_ns`` nanoseconds of this wait (read from the GPU's timer; without
    ``GLOBALTIMER``, as in the interpreter, each poll counts POLL_NS); what the others stored
    before publishing is visible after. ``alive`` is 1, or 0 once a wait of this launch timed
    out (the program then stops waiting: its results are wrong and flagged already). Returns
    ``alive``; a timeout sets ``err_ptr``."""
    o_j = tl.arange(0, BLOCK_J)
    m_j = o_j < NJ
    p = flags_ptr + o_j * STRIDE
    seen = tl.min(tl.where(m_j, tl.atomic_add(p, 0, mask=m_j, sem="acquire", scope="gpu"),
                           target), axis=0)
    if (seen < target) & (alive > 0):
        waited = tl.full((), 0, tl.int64)
        if GLOBALTIMER:
            start = _now()
        while (seen < target) & (alive > 0):
            seen = tl.min(tl.where(m_j, tl.atomic_add(p, 0, mask=m_j, sem="acquire",
                                                      scope="gpu"), target), axis=0)
            if GLOBALTIMER:
                waited = _now() - start
            else:
                waited += POLL_NS
            if (seen < target) & (waited > wait_ns):
                alive = alive * 0
        if seen < target:
            tl.atomic_max(err_ptr, 1)
    tl.debug_barrier()
    return alive


@triton.heuristics(_OPTIONAL)
@triton.jit(do_not_specialize=["s_begin", "s_end", "T", "wait_ns"])
def _recurrence_fwd_coop_kernel(
    xg_ptr, stride_xt, stride_xb,      # [T, B, D*G*H] input projections
    w_hh_ptr, b_hn_ptr, len_ptr,       # [D, G*H, H], [D, H], [B]
    rs_ptr, stride_rt, stride_rb,      # [T, B] uint8 episode starts (resets)
    rm_ptr,                            # [D, B, H] recurrent dropout mask
    zh_ptr, zc_ptr, zf_ptr,            # zoneout: [T, B, D, H] uint8 masks; [2] factors
    h0_ptr, c0_ptr,                    # [D, B, H] initial states (what a reset brings back)
    y_ptr, stride_yt, stride_yb,       # [T, B, D*H]
    gates_ptr, cell_ptr,               # saved for backward: [T, B, D, NSAVE*H], [T, B, D, H]
    hbuf_ptr,                          # [2, D, B, H] the state, double-buffered (slot 0: h0)
    cbuf_ptr,                          # [D, B, H] the cell state (LSTM, accumulation dtype)
    flags_ptr, err_ptr, wait_ns,       # [D * NBT, NJ * 8] int32 zeroed; [1] int32; bound
    s_begin, s_end, T, B, H, BT,       # steps to run; batch rows per group
    CELL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NSAVE: tl.constexpr,
    SAVE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    NKC: tl.constexpr, SYNC: tl.constexpr,
    HAS_BHN: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
    HAS_RMASK: tl.constexpr, ZH: tl.constexpr, ZC: tl.constexpr, FAST: tl.constexpr,
):
    i_j, i_bt, i_d, NJ, NBT, D = _program()
    W_DTYPE = w_hh_ptr.dtype.element_ty
    Y_DTYPE = y_ptr.dtype.element_ty
    H_DTYPE = hbuf_ptr.dtype.element_ty
    o_u = i_j * BLOCK_H + tl.arange(0, BLOCK_H)   # own units
    m_u = o_u < H
    # The slice, resident: NKC column tiles of KC units each (the product's inner dimension).
    KC: tl.constexpr = BLOCK_K // NKC
    o_c = tl.arange(0, KC)
    a0, b0, a1, b1, a2, b2, a3, b3 = _slice_tiles(w_hh_ptr, i_d, i_j, H, H, G, GP, BLOCK_H, KC,
                                                  NKC)
    GA: tl.constexpr = 2 if GP == 3 else GP       # gates stacked in the a tiles
    b_bhn = 0.0
    if HAS_BHN:
        b_bhn = tl.load(b_hn_ptr + i_d * H + o_u, mask=m_u, other=0.0).to(ACC)[:, None]
    p_flags, b_lo, b_hi = _group(flags_ptr, i_bt, i_d, NJ, NBT, B, BT)
    alive = 1
    # The input projections of the first batch chunk, one step ahead: the next step's are loaded
    # between publishing and waiting, so the load overlaps the barrier.
    o_n = b_lo + tl.arange(0, BLOCK_N)
    p_x = xg_ptr + step_time(s_begin, i_d, T).to(tl.int64) * stride_xt \
        + o_n.to(tl.int64)[None, :] * stride_xb + i_d * (G * H) + o_u[:, None]
    n0, n1, n2, n3 = load_gate_tiles(p_x, m_u[:, None] & (o_n < b_hi)[None, :], H, G)

    for s in range(s_begin, s_end):
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        slot = s % 2
        for c in range(b_lo, b_hi, BLOCK_N):
            o_n = c + tl.arange(0, BLOCK_N)
            m_n = o_n < b_hi
            on64 = o_n.to(tl.int64)
            m_un = m_u[:, None] & m_n[None, :]
            rows = ((slot * D + i_d) * B + on64)[None, :] * H        # this chunk's state rows
            rm_rows = (i_d * B + on64)[None, :] * H
            # W_j h for the chunk, a column tile at a time: every unit's previous state, [KC, N]
            # per tile (the dot's N is the batch).
            h = _state_tile(hbuf_ptr, rows, rm_ptr, rm_rows, o_c, m_n, H, HAS_RMASK, W_DTYPE)
            acc_a, acc_b = _tile_product(a0, b0, h, None, None, GP, PRECISION)
            if NKC >= 2:
                h = _state_tile(hbuf_ptr, rows, rm_ptr, rm_rows, o_c + KC, m_n, H, HAS_RMASK,
                                W_DTYPE)
                acc_a, acc_b = _tile_product(a1, b1, h, acc_a, acc_b, GP, PRECISION)
            if NKC == 4:
                h = _state_tile(hbuf_ptr, rows, rm_ptr, rm_rows, o_c + 2 * KC, m_n, H,
                                HAS_RMASK, W_DTYPE)
                acc_a, acc_b = _tile_product(a2, b2, h, acc_a, acc_b, GP, PRECISION)
                h = _state_tile(hbuf_ptr, rows, rm_ptr, rm_rows, o_c + 3 * KC, m_n, H,
                                HAS_RMASK, W_DTYPE)
                acc_a, acc_b = _tile_product(a3, b3, h, acc_a, acc_b, GP, PRECISION)
            q0, q1, q2, q3 = split_gates(acc_a.to(ACC), GA, BLOCK_H, BLOCK_N)
            if GP == 3:  # the n gate's rows, a product of their own
                q2 = acc_b.to(ACC)
            h_prev = tl.load(hbuf_ptr + rows + o_u[:, None], mask=m_un, other=0.0,
                             cache_modifier=".cg").to(ACC)
            state = (i_d * B + on64)[None, :] * H + o_u[:, None]   # own units' rows
            c_prev = h_prev
            if CELL == LSTM:
                c_prev = tl.load(cbuf_ptr + state, mask=m_un, other=0.0).to(ACC)
            if c == b_lo:
                x0, x1, x2, x3 = n0, n1, n2, n3
            else:
                p_x = xg_ptr + t64 * stride_xt + on64[None, :] * stride_xb + i_d * (G * H) \
                    + o_u[:, None]
                x0, x1, x2, x3 = load_gate_tiles(p_x, m_un, H, G)
            h_new, c_new, s0, s1, s2, s3 = cell_forward(x0, x1, x2, x3, q0, q1, q2, q3, h_prev,
                                                        c_prev, b_bhn, CELL, HAS_BHN, ACC, FAST)
            act = _taking_step(len_ptr, t, o_n, m_n, HAS_LENGTHS)
            p_row = (t64 * B + on64)[None, :] * D + i_d  # row of the saved-activation tensors
            if ZH != 0:  # zoneout: keep the previous state with factor d_h
                if SAVE and CELL != LSTM and CELL != GRU:  # an RNN's backward needs the new h
                    tl.store(cell_ptr + p_row * H + o_u[:, None],
                             h_new.to(cell_ptr.dtype.element_ty), mask=m_un,
                             eviction_policy="evict_first")
                h_new = zone_mix(h_new, h_prev, zh_ptr, p_row * H + o_u[:, None], m_un, zf_ptr,
                                 0, ZH)
            if CELL == LSTM and ZC != 0:
                c_new = zone_mix(c_new, c_prev, zc_ptr, p_row * H + o_u[:, None], m_un, zf_ptr,
                                 1, ZC)
            # The state is stored, and carried, at the precision of the layer's dtype.
            h_new = tl.where(act, h_new.to(Y_DTYPE).to(ACC), h_prev)
            if SAVE and NSAVE > 0:
                save_gates(gates_ptr + p_row * (NSAVE * H) + o_u[:, None], s0, s1, s2, s3, m_un, H)
            h_next = h_new
            if HAS_RESETS:  # an episode starts at the next step: it enters the initial state
                start = entering_reset(rs_ptr, stride_rt, stride_rb, s + 1, i_d, T, o_n,
                                       m_n)[None, :] > 0
                h_next = tl.where(start, tl.load(h0_ptr + state, mask=m_un, other=0.0).to(ACC),
                                  h_new)
            if CELL == LSTM:
                c_new = tl.where(act, c_new, c_prev)
                c_next = c_new
                if HAS_RESETS:
                    c_next = tl.where(start, tl.load(c0_ptr + state, mask=m_un,
                                                     other=0.0).to(ACC), c_new)
                tl.store(cbuf_ptr + state, c_next.to(cbuf_ptr.dtype.element_ty), mask=m_un)
                if SAVE:
                    tl.store(cell_ptr + p_row * H + o_u[:, None],
                             c_new.to(cell_ptr.dtype.element_ty), mask=m_un,
                             eviction_policy="evict_first")
            tl.store(y_ptr + t64 * stride_yt + on64[None, :] * stride_yb + i_d * H
                     + o_u[:, None], h_new.to(Y_DTYPE), mask=m_un, eviction_policy="evict_first")
            next_rows = (((1 - slot) * D + i_d) * B + on64)[None, :] * H
            tl.store(hbuf_ptr + next_rows + o_u[:, None], h_next.to(H_DTYPE), mask=m_un)
        if SYNC and s + 1 < s_end:  # between steps only
            _publish(p_flags + i_j * FLAG_STRIDE, s + 1)
        o_n = b_lo + tl.arange(0, BLOCK_N)
        p_x = xg_ptr + next_time(s, i_d, T) * stride_xt + o_n.to(tl.int64)[None, :] * stride_xb \
            + i_d * (G * H) + o_u[:, None]
        n0, n1, n2, n3 = load_gate_tiles(p_x, m_u[:, None] & (o_n < b_hi)[None, :], H, G)
        if SYNC and s + 1 < s_end:
            alive = _await(p_flags, NJ, s + 1, err_ptr, alive, wait_ns, BLOCK_J, FLAG_STRIDE)


@triton.heuristics(_BWD_OPTIONAL)
@triton.jit(do_not_specialize=["k_begin", "k_end", "T", "wait_ns"])
def _recurrence_bwd_coop_kernel(
    dy_ptr, stride_dyt, stride_dyb,    # [T, B, D*H] gradient of the outputs
    y_ptr, stride_yt, stride_yb,       # [T, B, D*H] forward states
    h0_ptr, c0_ptr,                    # [D, B, H]
    gates_ptr, cell_ptr,               # saved activations
    w_hh_ptr, len_ptr,
    rs_ptr, stride_rt, stride_rb,      # [T, B] uint8 episode starts (resets)
    rm_ptr,                            # [D, B, H] recurrent dropout mask
    zh_ptr, zc_ptr, zf_ptr,            # zoneout: [T, B, D, H] uint8 masks; [2] factors
    dcell_ptr,                         # [T, B, D, H] gradient of every step's cell state
    dgx_ptr, dgh_ptr,                  # [T, B, D, G*H]
    dh0_ptr, dc0_ptr,                  # [D, B, H]
    pbuf_ptr,                          # [2, D, NJ, B, H] each program's partial products
    dhbuf_ptr, dcbuf_ptr,              # [D, B, H] carried dh (what bypasses W_hh), dc: ACC
    d0buf_ptr,                         # [2, D, B, H] ACC: dh0, dc0 collected at resets
    flags_ptr, err_ptr, wait_ns, clip,
    k_begin, k_end, T, B, H, BT,
    CELL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NSAVE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    NKC: tl.constexpr, JSUM: tl.constexpr, SYNC: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_RMASK: tl.constexpr,
    HAS_DCELL: tl.constexpr, CLIP: tl.constexpr, ZH: tl.constexpr, ZC: tl.constexpr,
    FAST: tl.constexpr,
):
    """Backward step k undoes forward step s = T-1-k. Each step first completes dh of the state
    it produced, ``dh_t = dy_t + keep_t + sum_j P_j[own]`` (every program's partial product of
    the previous step, read after the barrier), then its own units' gate gradients dG_j and its
    partial product ``P_j = W_j^T dG_j`` for every unit (a reduce-scatter of dG W_hh: the
    program's rows of W_hh are the forward's resident slice, the product's M dimension is the
    hidden size, walked in NKC column tiles). k_end == T finishes with dh0 (and dc0)."""
    i_j, i_bt, i_d, NJ, NBT, D = _program()
    GH = G * H
    W_DTYPE = w_hh_ptr.dtype.element_ty
    G_DTYPE = dgx_ptr.dtype.element_ty
    P_DTYPE = pbuf_ptr.dtype.element_ty
    o_u = i_j * BLOCK_H + tl.arange(0, BLOCK_H)
    m_u = o_u < H
    KC: tl.constexpr = BLOCK_K // NKC
    o_c = tl.arange(0, KC)
    a0, b0, a1, b1, a2, b2, a3, b3 = _slice_tiles(w_hh_ptr, i_d, i_j, H, H, G, GP, BLOCK_H, KC,
                                                  NKC)
    GA: tl.constexpr = 2 if GP == 3 else GP       # gates stacked in the a tiles
    p_flags, b_lo, b_hi = _group(flags_ptr, i_bt, i_d, NJ, NBT, B, BT)
    o_js = tl.arange(0, JSUM)
    alive = 1

    for k in range(k_begin, k_end + 1):
        last = k == T                  # past the last step: only dh0 remains
        s = tl.maximum(T - 1 - k, 0)
        t = step_time(s, i_d, T)
        t64 = t.to(tl.int64)
        t_prev = prev_time(t, i_d, T)
        slot = k % 2
        for c in range(b_lo, b_hi, BLOCK_N):
            o_n = c + tl.arange(0, BLOCK_N)
            m_n = o_n < b_hi
            on64 = o_n.to(tl.int64)
            m_un = m_u[:, None] & m_n[None, :]
            p_dh = dhbuf_ptr + (i_d * B + on64)[None, :] * H + o_u[:, None]
            dh = tl.load(p_dh, mask=m_un, other=0.0)
            # The recurrent part: every program's partial product of the previous backward step
            # (none at k = 0), summed over the programs in a fixed order, JSUM at a time.
            has_q = positive(k, o_n)[None, :] & m_n[None, :]
            rec = tl.zeros([BLOCK_H, BLOCK_N], dtype=ACC)
            p_in = pbuf_ptr + ((((1 - slot) * D + i_d) * NJ).to(tl.int64) * B
                               + on64[None, None, :]) * H + o_u[None, :, None]
            for j in range(0, NJ, JSUM):
                m_p = ((j + o_js) < NJ)[:, None, None] & m_un[None, :, :] & has_q[None, :, :]
                rec += tl.sum(tl.load(p_in + ((j + o_js).to(tl.int64) * B * H)[:, None, None],
                                      mask=m_p, other=0.0, cache_modifier=".cg").to(ACC), axis=0)
            state = (i_d * B + on64)[None, :] * H + o_u[:, None]
            if HAS_RMASK:  # the product saw mask * h
                rec = rec * tl.load(rm_ptr + state, mask=m_un, other=0.0).to(ACC)
            dh = dh + rec
            dc = dh
            if CELL == LSTM:
                dc = tl.load(dcbuf_ptr + state, mask=m_un, other=0.0)
            # Past k = 0, dh and dc belong to the state that entered forward step q = s + 1
            # (q = 0 at k == T): clipped there; at an episode start, the initial state's.
            if CLIP:
                dh = tl.where(has_q, clamp_grad(dh, clip, CLIP), dh)
                if CELL == LSTM:
                    dc = tl.where(has_q, clamp_grad(dc, clip, CLIP), dc)
            if HAS_RESETS:
                start = entering_reset(rs_ptr, stride_rt, stride_rb, T - k, i_d, T, o_n,
                                       m_n)[None, :] > 0
                dh = collect_at_reset(d0buf_ptr + state, dh, m_un, start, last)
                if CELL == LSTM:
                    dc = collect_at_reset(d0buf_ptr + D * B * H + state, dc, m_un, start, last)
            if last:
                tl.store(dh0_ptr + state, dh.to(dh0_ptr.dtype.element_ty), mask=m_un)
                if CELL == LSTM:
                    tl.store(dc0_ptr + state, dc.to(dc0_ptr.dtype.element_ty), mask=m_un)
            else:
                dh += tl.load(dy_ptr + t64 * stride_dyt + on64[None, :] * stride_dyb + i_d * H
                              + o_u[:, None], mask=m_un, other=0.0).to(ACC)
                has_prev = positive(s, o_n)[None, :]
                if HAS_RESETS:
                    has_prev = has_prev & (entering_reset(rs_ptr, stride_rt, stride_rb, s, i_d,
                                                          T, o_n, m_n)[None, :] == 0)
                p_row = (t64 * B + on64)[None, :] * D + i_d
                p_row_prev = (t_prev * B + on64)[None, :] * D + i_d
                dh_zone = dh * 0.0
                if ZH != 0:  # zoneout: d_h * dh to the state before, the rest to the new one
                    dh, dh_zone = zone_split(dh, zh_ptr, p_row * H + o_u[:, None], m_un, zf_ptr,
                                             0, ZH)
                s0, s1, s2, s3 = dh, dh, dh, dh
                if CELL == LSTM or CELL == GRU:
                    s0, s1, s2, s3 = load_gates(gates_ptr + p_row * (NSAVE * H) + o_u[:, None],
                                                m_un, H, ACC)
                c_t = dh
                c_prev = dh
                h_prev = dh
                h_t = dh
                if CELL == LSTM:
                    c_t, c_prev, dc, dc_zone = _cell_states(
                        cell_ptr, c0_ptr, dcell_ptr, zc_ptr, zf_ptr, p_row, p_row_prev, state,
                        o_u, m_un, has_prev, dc, s0, s1, s2, H, ACC, HAS_DCELL, ZC)
                elif CELL == GRU:
                    h_prev = tl.where(has_prev, tl.load(
                        y_ptr + t_prev * stride_yt + on64[None, :] * stride_yb + i_d * H
                        + o_u[:, None], mask=m_un & has_prev, other=0.0).to(ACC),
                        tl.load(h0_ptr + state, mask=m_un, other=0.0).to(ACC))
                elif ZH != 0:  # an RNN's new state before zoneout, saved by the forward
                    h_t = tl.load(cell_ptr + p_row * H + o_u[:, None], mask=m_un,
                                  other=0.0).to(ACC)
                else:
                    h_t = tl.load(y_ptr + t64 * stride_yt + on64[None, :] * stride_yb + i_d * H
                                  + o_u[:, None], mask=m_un, other=0.0).to(ACC)
                act = _taking_step(len_ptr, t, o_n, m_n, HAS_LENGTHS) & m_un
                g0, g1, g2, g3, gh2, dh_keep, dc_prev = cell_backward(
                    dh, dc, s0, s1, s2, s3, c_t, c_prev, h_prev, h_t, act, CELL, FAST)
                if ZH != 0:
                    dh_keep += dh_zone
                if CELL == LSTM and ZC != 0:
                    dc_prev += dc_zone
                p_dg = dgx_ptr + p_row * GH + o_u[:, None]
                if G == 1:
                    tl.store(p_dg, g0.to(G_DTYPE), mask=m_un)
                else:
                    store_gates(p_dg, g0, g1, g2, g3, m_un, H, G)
                if CELL == GRU:
                    store_gates(dgh_ptr + p_row * GH + o_u[:, None], g0, g1, gh2, gh2, m_un, H, 3)
                    # What W_hh multiplies: the n gate's hidden part (r * dn); no padding gate.
                    g2 = gh2
                    g3 = tl.zeros_like(g0)
                # This program's partial product for every unit, P_j = W_j^T dG_j, column tile
                # by column tile: the other programs sum it after the barrier.
                dga = stack_gates(g0, g1, g2, g3, GA, BLOCK_H, BLOCK_N).to(W_DTYPE)
                dgb = g2.to(W_DTYPE)
                p_p = pbuf_ptr + ((((slot * D + i_d) * NJ + i_j).to(tl.int64) * B
                                   + on64[None, :]) * H + o_c[:, None])
                tl.store(p_p, _tile_partial(a0, b0, dga, dgb, GP, PRECISION).to(P_DTYPE),
                         mask=m_n[None, :] & (o_c < H)[:, None])
                if NKC >= 2:
                    tl.store(p_p + KC, _tile_partial(a1, b1, dga, dgb, GP, PRECISION)
                             .to(P_DTYPE),
                             mask=m_n[None, :] & (o_c + KC < H)[:, None])
                if NKC == 4:
                    tl.store(p_p + 2 * KC, _tile_partial(a2, b2, dga, dgb, GP, PRECISION)
                             .to(P_DTYPE), mask=m_n[None, :] & (o_c + 2 * KC < H)[:, None])
                    tl.store(p_p + 3 * KC, _tile_partial(a3, b3, dga, dgb, GP, PRECISION)
                             .to(P_DTYPE), mask=m_n[None, :] & (o_c + 3 * KC < H)[:, None])
                if CELL == LSTM:
                    tl.store(dcbuf_ptr + state, dc_prev, mask=m_un)
                tl.store(p_dh, dh_keep, mask=m_un)
        if SYNC:
            if k < k_end:
                _publish(p_flags + i_j * FLAG_STRIDE, k + 1)
                alive = _await(p_flags, NJ, k + 1, err_ptr, alive, wait_ns,
                               BLOCK_J, FLAG_STRIDE)


# ---------------------------------------------------------------------------------------------
# Planning.

BLOCK_N = 16             # batch rows per chunk: the dots' N dimension
# Units per program, in order of preference; 8-unit slices (products of fewer than 16 rows, which
# Triton pads for the tensor cores) only where no wider slice fits: LSTM and GRU in fp32 at
# H = 1024 (a 16-unit slice of the stacked gates is 256 KiB there).
_SLICES = (16, 32, 8)
INTERPRETER_SLICE = 16   # units per program under the interpreter (tests vary it)
COLUMN_TILE = 256        # columns of W_hh's slice per column tile, where the slice is tiled
INTERPRETER_COLUMN_TILES = 1  # column tiles under the interpreter (tests vary it: 1, 2 or 4)
INTERPRETER_PADS_GRU = True   # under the interpreter, GRU's slice padded to 4 gates (tests vary)
JSUM = 8                 # programs' partial products the backward sums at once
STAGE_REGS = 64          # registers per thread a chunk of the state may take on its way in
                         # (with 8 warps; half that with 4)


def column_tiles(block_k: int) -> int:
    """Column tiles (1, 2 or 4) of W_hh's row slice: the backward forms its partial product
    [block_k, BLOCK_N] a tile at a time (the accumulator stays small), and a forward whose state
    chunk does not fit beside the slice reads the state a tile at a time."""
    return min(4, max(1, block_k // COLUMN_TILE))


def _gates_padded(G: int) -> int:
    return 4 if G == 3 else G


def _configs(gp: int, nkc_f: int, nkc_b: int, bwd: dict | None = None, **cfg) -> tuple:
    """The two kernels' configurations (``bwd``: the backward's own warps and register bound)."""
    return (KernelConfig("_recurrence_fwd_coop_kernel", gates=gp, column_tiles=nkc_f, **cfg),
            KernelConfig("_recurrence_bwd_coop_kernel", gates=gp, column_tiles=nkc_b,
                         **{**cfg, **(bwd or {})}))


def takes(problem: Problem) -> bool:
    """This module runs the cooperative strategy's layers without a projection (``dispatch``;
    ``cooperative_proj`` runs those with one)."""
    return not problem.has_proj


def plan(problem: Problem, spec: DeviceSpec) -> Plan:
    """Slices of BLOCK_H units, one program each, every direction and batch tile its own group;
    W_hh's slice resident in shared memory in both passes. GRU's slice is padded to four gates
    (one 64-row product: wgmma on sm_90) where that fits, else holds its three gates (two
    products of 32 and 16 rows: mma.sync), so GRU runs here wherever its real weights fit."""
    if problem.has_proj:
        raise DoesNotFit("proj_size runs in ops/cooperative_proj.py")
    G, H, D, B = problem.G, problem.H, problem.D, problem.B
    K = block(H)
    isz = problem.itemsize * operand_copies(problem)
    if spec.interpreter:
        # Stepped (one launch per step): several programs per group, as on a GPU.
        # A group of one program needs no barrier: one launch, as on a GPU.
        bh = INTERPRETER_SLICE
        gp = _gates_padded(G) if INTERPRETER_PADS_GRU else G
        nkc = min(INTERPRETER_COLUMN_TILES, max(1, K // 16))
        nj = triton.cdiv(H, bh)
        cfg = dict(block_b=triton.cdiv(B, BLOCK_N) * BLOCK_N, block_h=bh, block_k=K,
                   num_warps=4, shared_bytes=(gp * bh * K + K * BLOCK_N) * isz)
        per_step, fixed = ((1, 1), (0, 1)) if nj > 1 else ((0, 0), (1, 1))
        return Plan("cooperative", _configs(gp, nkc, nkc, **cfg), grid=(nj, 1, D),
                    launches_per_step=per_step, launches_fixed=fixed)
    reasons = {}
    # GRU padded (wgmma on sm_90) at any slice width first; its three gates only where no padded
    # slice fits (H = 2048 in fp16/bf16 on an H100).
    # Unpadded: fp16/bf16 only (in fp32 its mma.sync forward spills inside the time loop: 85
    # spill instructions for GRU TF32 H=1000 on sm_90; the padded 8-unit slice does not), and
    # the n gate's own product has bh rows: at least 16 for a tensor-core dot.
    unpadded = problem.itemsize == 2
    for gp, bh in [(gp, bh) for gp in dict.fromkeys((_gates_padded(G), G)) for bh in _SLICES
                   if gp != 3 or (unpadded and bh >= 16)]:
        nj = triton.cdiv(H, bh)
        if nj * D > spec.sm_count:
            reasons.setdefault("sms", f"{nj * D} programs of {bh} units > {spec.sm_count} SMs")
            continue
        # The weight slice and a chunk of the state (dot operands, in shared memory); where the
        # chunk does not fit beside the slice, the forward reads it a column tile at a time.
        # The backward's operands: the slice and its own gate gradients.
        weights = gp * bh * K * isz
        nkc_b = column_tiles(K)
        # Column tiles in the forward only for GRU's three gates: its products of 32 and 16 rows
        # are mma.sync, whose operands Triton holds in registers, spilling either way (a padded
        # slice, or a state chunk that fits whole, keeps the 64-row product and wgmma).
        tiled = gp == 3 and weights + K * BLOCK_N * isz > spec.smem_per_block
        nkc_f = nkc_b if tiled else 1
        shared = max(weights + K // nkc_f * BLOCK_N * isz, weights + gp * bh * BLOCK_N * isz)
        if shared > spec.smem_per_block:
            reasons.setdefault("smem", f"{bh}-unit slices need {shared} B of shared memory > "
                                       f"{spec.smem_per_block}")
            continue
        # A chunk of the state passes through registers on its way to shared memory: 4 warps
        # while it takes at most 32 registers a thread, else 8 warps and at most 64 (the forward
        # spilled at sm_90 with 4 warps and 64: LSTM H=1000 bf16).
        stage = K // nkc_f * BLOCK_N * isz
        warps = 4 if stage <= STAGE_REGS // 2 * 4 * 32 * 4 else 8
        if stage > STAGE_REGS * 4 * 32 * warps:
            reasons.setdefault("regs", f"a [{K}, {BLOCK_N}] state chunk needs more registers "
                                       "than 8 warps have to spare")
            continue
        # Batch tiles as groups while SMs remain: more parallelism at large batch.
        nbt = max(1, min(triton.cdiv(B, BLOCK_N), spec.sm_count // (nj * D)))
        bt = triton.cdiv(triton.cdiv(B, nbt), BLOCK_N) * BLOCK_N
        nbt = triton.cdiv(B, bt)
        # One program per SM: its registers are all the program's. Said explicitly, because
        # without a bound ptxas falls back to 32 registers and kilobytes of spills where it
        # expects to need more than 255 (seen at sm_90 for the H=1000 fp16 backward).
        maxnreg = min(255, spec.regs_per_sm // (32 * warps))
        cfg = dict(block_b=bt, block_h=bh, block_k=K, num_warps=warps, shared_bytes=shared,
                   maxnreg=maxnreg)
        # The backward stages no state chunk; its warps: on sm_90 8 from K = 1024 (GRU H=2048
        # bf16, whose forward takes 4: 2 spill instructions outside the time loop against 58 in
        # it); before sm_90, where mma.sync holds the slice as register operands (Triton hoists
        # their load out of the loop), 8 once they pass 64 registers a thread with 4 warps (LSTM
        # bf16 H=511 and fp32 H=255 on sm_89 spilled 7 and 1 instructions in the loop with 4,
        # none with 8).
        slice_regs = gp * bh * K * isz // 4 // 128
        wide = K >= 1024 if spec.arch >= 90 else slice_regs > 64
        bwd = dict(num_warps=8, maxnreg=min(255, spec.regs_per_sm // 256)) if wide else {}
        return Plan("cooperative", _configs(gp, nkc_f, nkc_b, bwd, **cfg), grid=(nj, nbt, D))
    raise DoesNotFit(", or ".join(reasons.values()) or "no slice fits")


# ---------------------------------------------------------------------------------------------
# Launching, and the errors of waits that timed out.

def _cooperative_launch_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _launch_options(cfg: KernelConfig, on_gpu: bool) -> dict:
    opts = cfg.launch_options()
    if on_gpu and _cooperative_launch_supported():
        # A grid that cannot be co-resident fails to launch instead of hanging at a barrier.
        opts["launch_cooperative_grid"] = True
    return opts


_pending: list = []   # (event, pinned host flag, what) of launches whose errors are unread


def _watch(err: torch.Tensor, what: str) -> None:
    """Read a launch's error flag back without waiting for it (pinned copy, event)."""
    if err.device.type != "cuda":
        if int(err.item()):
            raise RuntimeError(_timeout_message(what))
        return
    if torch.cuda.is_current_stream_capturing():
        return  # inside a CUDA graph capture: no host copies
    host = torch.empty(1, dtype=torch.int32, pin_memory=True)
    host.copy_(err, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pending.append((event, host, what))


def _timeout_message(what: str) -> str:
    return (f"fastrnn: the cooperative {what} kernel gave up waiting at a grid barrier: its "
            "programs were not all running at once (other work holding SMs, or a launch without "
            "cooperative-grid support); its results are wrong. Run this layer with "
            "FASTRNN_STRATEGY=stepwise (or fastrnn.force_strategy('stepwise')).")


def check_errors() -> None:
    """Raise if a finished cooperative launch timed out at a barrier (called at every
    cooperative launch; call it to check sooner)."""
    still = []
    for event, host, what in _pending:
        if event.query():
            if int(host.item()):
                _pending.clear()
                raise RuntimeError(_timeout_message(what))
        else:
            still.append((event, host, what))
    _pending[:] = still


def _steps(T: int, stepped: bool, finish: bool = False):
    """(first, last) step ranges, inclusive: one launch for every step, or one per step under the
    interpreter; the backward's last "step", T, forms dh0 (its own launch when stepped: it needs
    every program's gradients of step T-1)."""
    last = T if finish else T - 1
    if not stepped:
        return [(0, last)]
    return [(k, k) for k in range(last + 1)]


def block_j(nj: int) -> int:
    """BLOCK_J, the barrier's flag tile: NJ flags, a power of two, at least 2."""
    return max(2, triton.next_power_of_2(nj))


def phases(total: int, stepped: bool):
    """[begin, end) ranges of a kernel's phases (several per step: barriers between them): all
    in one launch, or one per launch (stepped, under the interpreter)."""
    return [(u, u + 1) for u in range(total)] if stepped else [(0, total)]


def _launch_state(the_plan: Plan, D: int, device: torch.device):
    """What both passes set up alike: the grid's slices and batch tiles, whether the launch runs
    on a GPU (barrier, cooperative launch) or one step per launch (interpreter, several programs
    per group), and the zeroed barrier flags and error flag."""
    nj, nbt, _ = the_plan.grid
    # As a GPU launches it (barrier compiled in, cooperative launch) on a GPU, and when compiling
    # for a described GPU (select.targeting: the resource check and explain), whatever the
    # tensors' device.
    on_gpu = not describe(device).interpreter
    stepped = not on_gpu and nj > 1
    flags = torch.zeros(D * nbt, nj * FLAG_STRIDE, device=device, dtype=torch.int32)
    err = torch.zeros(1, device=device, dtype=torch.int32)
    return nj, nbt, on_gpu, stepped, flags, err, wait_ns()


KERNELS = {"fwd": ("_recurrence_fwd_coop_kernel",), "bwd": ("_recurrence_bwd_coop_kernel",)}


def forward(a: ForwardArgs, the_plan: Plan) -> None:
    check_errors()
    cfg = the_plan.config("_recurrence_fwd_coop_kernel")
    device = a.y.device
    nj, nbt, on_gpu, stepped, flags, err, wait = _launch_state(the_plan, a.D, device)
    hbuf = torch.empty(2, a.D, a.B, a.H, device=device, dtype=a.y.dtype)
    hbuf[0].copy_(a.h0)
    cbuf = a.c0.to(acc_dtype(a.y.dtype)).contiguous().clone() if a.is_lstm else None
    for first, last in _steps(a.T, stepped):
        launch_kernel(
            _recurrence_fwd_coop_kernel, (nj, nbt, a.D),
            xg_ptr=a.xg, stride_xt=a.xg.stride(0), stride_xb=a.xg.stride(1),
            w_hh_ptr=a.w_hh, b_hn_ptr=a.b_hn, len_ptr=a.lengths, **a.reset_args(), rm_ptr=a.rmask,
            **a.zone_args(),
            h0_ptr=a.h0, c0_ptr=a.c0, y_ptr=a.y, stride_yt=a.y.stride(0), stride_yb=a.y.stride(1),
            gates_ptr=a.gates, cell_ptr=a.cell, hbuf_ptr=hbuf, cbuf_ptr=cbuf,
            flags_ptr=flags, err_ptr=err, wait_ns=wait, s_begin=first, s_end=last + 1, T=a.T,
            B=a.B, H=a.H,
            BT=cfg.block_b, CELL=a.mode, G=a.G, GP=cfg.gates, NSAVE=a.NSAVE,
            SAVE=a.save, ACC=a.ACC, PRECISION=a.precision,
            BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, BLOCK_N=BLOCK_N,
            BLOCK_J=block_j(nj), NKC=cfg.column_tiles, SYNC=on_gpu,
            **_launch_options(cfg, on_gpu))
    # The final states: the last slot written (rows past their length carried theirs).
    a.hn.copy_(hbuf[a.T % 2])
    if a.is_lstm:
        a.cn.copy_(cbuf)
    _watch(err, "forward")


def backward(b: BackwardArgs, the_plan: Plan) -> None:
    check_errors()
    cfg = the_plan.config("_recurrence_bwd_coop_kernel")
    device = b.dy.device
    nj, nbt, on_gpu, stepped, flags, err, wait = _launch_state(the_plan, b.D, device)
    acc = acc_dtype(b.dy.dtype)
    # Each program's partial products for every unit, double-buffered: [2, D, NJ, B, H], in the
    # layer's dtype (each a sum of GP*BLOCK_H products in fp32, rounded once, as the gate
    # gradients were when they were exchanged instead; summed in fp32): half the bytes in
    # fp16/bf16.
    pbuf = torch.empty(2, b.D, nj, b.B, b.H, device=device, dtype=b.dgx.dtype)
    dhbuf = b.dhn.to(acc).contiguous().clone()
    dcbuf = b.dcn.to(acc).contiguous().clone() if b.is_lstm else None
    d0buf = torch.zeros(2, b.D, b.B, b.H, device=device, dtype=acc) if b.resets is not None \
        else None
    nj_tile = block_j(nj)
    for k_begin, k_end in _steps(b.T, stepped, finish=True):
        launch_kernel(
            _recurrence_bwd_coop_kernel, (nj, nbt, b.D),
            dy_ptr=b.dy, stride_dyt=b.dy.stride(0), stride_dyb=b.dy.stride(1),
            y_ptr=b.y, stride_yt=b.y.stride(0), stride_yb=b.y.stride(1),
            h0_ptr=b.h0, c0_ptr=b.c0, gates_ptr=b.gates, cell_ptr=b.cell,
            w_hh_ptr=b.w_hh, len_ptr=b.lengths, **b.reset_args(), rm_ptr=b.rmask,
            **b.zone_args(),
            dcell_ptr=b.dcell,
            dgx_ptr=b.dgx, dgh_ptr=b.dgh,
            dh0_ptr=b.dh0, dc0_ptr=b.dc0, pbuf_ptr=pbuf, dhbuf_ptr=dhbuf, dcbuf_ptr=dcbuf,
            d0buf_ptr=d0buf, flags_ptr=flags, err_ptr=err, wait_ns=wait, clip=b.clip,
            k_begin=k_begin, k_end=k_end, T=b.T, B=b.B, H=b.H,
            BT=cfg.block_b, CELL=b.mode, G=b.G, GP=cfg.gates, NSAVE=b.NSAVE, ACC=b.ACC,
            PRECISION=b.precision, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, BLOCK_N=BLOCK_N,
            BLOCK_J=nj_tile, NKC=cfg.column_tiles, JSUM=min(JSUM, nj_tile),
            SYNC=on_gpu,
            **_launch_options(cfg, on_gpu))
    _watch(err, "backward")
