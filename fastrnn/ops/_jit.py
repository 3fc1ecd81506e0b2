"""Shared @triton.jit helpers: activations and each cell's pointwise maths, forward and backward.

This is the one place that knows the interpreter from the GPU: libdevice's tanh does not run in
the Triton interpreter, so there tanh is written through the sigmoid. Kernels stay identical.

All helpers take and return values in the accumulation dtype (fp32, or fp64 for fp64 layers).
The formulas follow ATen's fused cells (aten/src/ATen/native/RNN.cpp) so results match torch.nn:
LSTM ``c' = f*c + i*g``, ``h' = o*tanh(c')``; GRU (reset-after) ``n = tanh(x_n + r*(W_hn h + b_hn))``,
``h' = n + z*(h - n)``.
"""

import triton
import triton.language as tl

from ..backend import interpreting

# Cell ids as compile-time constants (same values as fastrnn._modes).
RNN_TANH = tl.constexpr(0)
RNN_RELU = tl.constexpr(1)
LSTM = tl.constexpr(2)
GRU = tl.constexpr(3)

if interpreting():

    @triton.jit
    def tanh(x):
        # libdevice is not available in the interpreter; exact in real arithmetic.
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _tanh_approx(x):
        return tanh(x)  # no inline PTX in the interpreter (kernels never ask for it there)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def tanh(x):
        return libdevice.tanh(x)

    @triton.jit
    def _tanh_approx(x):
        # The SFU's tanh (sm_75+): one instruction, maximum relative error about 2^-11 (PTX ISA).
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def act_tanh(x, FAST: tl.constexpr):
    """tanh; the hardware approximation where the layer's precision cannot see its error."""
    if FAST:
        y = _tanh_approx(x)
    else:
        y = tanh(x)
    return y


@triton.jit
def act_sigmoid(x, FAST: tl.constexpr):
    if FAST:
        y = 0.5 * _tanh_approx(0.5 * x) + 0.5
    else:
        y = sigmoid(x)
    return y


@triton.jit
def relu(x):
    # NaN stays NaN (as torch.relu), which tl.maximum does not promise.
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def lstm_fwd_pointwise(ai, af, ag, ao, c, FAST: tl.constexpr):
    """Gate pre-activations and the previous cell state -> (i, f, g, o, c', o*tanh(c'))."""
    i = act_sigmoid(ai, FAST)
    f = act_sigmoid(af, FAST)
    g = act_tanh(ag, FAST)
    o = act_sigmoid(ao, FAST)
    c_new = lstm_new_cell(i, f, g, c)
    return i, f, g, o, c_new, o * act_tanh(c_new, FAST)


@triton.jit
def lstm_bwd_pointwise(dr, dc, i, f, g, o, c_new, c_prev, FAST: tl.constexpr):
    """d(o*tanh(c')) and dc' -> gradients of the four gate pre-activations and of c."""
    tc = act_tanh(c_new, FAST)
    dc = dc + dr * o * (1.0 - tc * tc)
    di = dc * g * i * (1.0 - i)
    df = dc * c_prev * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)
    do = dr * tc * o * (1.0 - o)
    return di, df, dg, do, dc * f


@triton.jit
def gru_fwd_pointwise(ar, az, xn, hn, h, FAST: tl.constexpr):
    """``hn`` is W_hn h + b_hn. Returns (r, z, n, h')."""
    r = act_sigmoid(ar, FAST)
    z = act_sigmoid(az, FAST)
    n = act_tanh(xn + r * hn, FAST)
    return r, z, n, n + z * (h - n)


@triton.jit
def gru_bwd_pointwise(dh, r, z, n, hn, h_prev):
    """Returns the gradients of the r, z, n pre-activations, of W_hn h + b_hn, and dh' * z."""
    dnx = dh * (1.0 - z) * (1.0 - n * n)
    dr = dnx * hn * r * (1.0 - r)
    dz = dh * (h_prev - n) * z * (1.0 - z)
    return dr, dz, dnx, dnx * r, dh * z


@triton.jit
def rnn_act(a, CELL: tl.constexpr, FAST: tl.constexpr):
    if CELL == RNN_TANH:
        h = act_tanh(a, FAST)
    else:
        h = relu(a)
    return h


@triton.jit
def rnn_act_bwd(dh, h, CELL: tl.constexpr):
    """Gradient of the pre-activation from the output ``h`` of tanh or relu."""
    if CELL == RNN_TANH:
        da = dh * (1.0 - h * h)
    else:
        da = tl.where(h > 0.0, dh, 0.0)
    return da


@triton.jit
def positive(x, o):
    """``x > 0`` for a scalar ``x``, as a block shaped like ``o``: the interpreter cannot combine
    a scalar condition with a block mask."""
    return (o * 0 + x) > 0


@triton.jit
def step_time(s, i_d, T):
    """Time of forward step ``s``: direction 0 walks forward, direction 1 backward."""
    return s + i_d * (T - 1 - 2 * s)


@triton.jit
def next_time(s, i_d, T):
    """Time of forward step ``s + 1``, as int64 (the last step's own time after the last step)."""
    return step_time(tl.minimum(s + 1, T - 1), i_d, T).to(tl.int64)


@triton.jit
def prev_time(t, i_d, T):
    """Time of the step before the one at ``t`` (clamped; read only when there is one)."""
    return tl.minimum(tl.maximum(t - 1 + 2 * i_d, 0), T - 1).to(tl.int64)


@triton.jit
def entering_reset(rs_ptr, stride_rt, stride_rb, s, i_d, T, o_b, m_b):
    """Per row of ``o_b``, 1 where the state entering forward step ``s`` of direction ``i_d`` is
    the initial state because an episode starts there (``resets`` [T, B]: direction 0 reads
    ``resets[t]``, direction 1 ``resets[t + 1]``), else 0; 0 at s == 0 (which starts from the
    initial state anyway) and past the last step."""
    t_in = (step_time(s, i_d, T) + i_d).to(tl.int64)
    m = m_b & positive(s, o_b) & positive(T - s, o_b)
    r = tl.load(rs_ptr + t_in * stride_rt + o_b.to(tl.int64) * stride_rb, mask=m, other=0)
    return r.to(tl.int32)


@triton.jit
def collect_at_reset(p, g, m, start, last):
    """The gradient ``g`` of the state entering a step, where an episode starts (``start``):
    the initial state's, added to what collects at ``p`` (a buffer the program alone touches),
    and zero onwards; at ``last`` (the backward's final step, the initial state itself) ``g``
    plus all that collected."""
    collected = tl.load(p, mask=m, other=0.0)
    if last:
        g = g + collected
    else:
        tl.store(p, collected + tl.where(start, g, 0.0), mask=m)
        g = tl.where(start, 0.0, g)
    return g


@triton.jit
def zone_factor(p, offsets, m, zf_ptr, k, Z: tl.constexpr):
    """Zoneout's keep factor d for a tile (``zoneout``): the step's 0/1 mask at ``p + offsets``
    (Z == 1, training) or the probability itself, ``zf_ptr[k]`` in the accumulation dtype
    (Z == 2, eval; exact in fp64, which a float argument would not be). Z == 0 never calls it."""
    if Z == 1:
        d = tl.load(p + offsets, mask=m, other=0).to(zf_ptr.dtype.element_ty)
    else:
        d = tl.load(zf_ptr + k)
    return d


@triton.jit
def zone_mix(new, old, p, offsets, m, zf_ptr, k, Z: tl.constexpr):
    """Zoneout of a state: ``d * old + (1 - d) * new`` (d from ``zone_factor``)."""
    return new + zone_factor(p, offsets, m, zf_ptr, k, Z) * (old - new)


@triton.jit
def zone_split(g, p, offsets, m, zf_ptr, k, Z: tl.constexpr):
    """The gradient ``g`` of a zoned state, split as the forward mixed it: ``((1 - d) * g`` to
    the cell's new state, ``d * g`` straight to the previous state)."""
    to_prev = zone_factor(p, offsets, m, zf_ptr, k, Z) * g
    return g - to_prev, to_prev


@triton.jit
def lstm_new_cell(i, f, g, c):
    """An LSTM's new cell state ``f * c + i * g`` (before any zoneout)."""
    return f * c + i * g


@triton.jit
def clamp_grad(g, clip, CLIP: tl.constexpr):
    """The recurrent gradient clamped to [-clip, clip] (``recurrent_grad_clip``); NaN stays NaN,
    as torch.clamp."""
    if CLIP:
        g = tl.where(g > clip, clip, tl.where(g < -clip, -clip, g))
    return g


@triton.jit
def load_gate_tiles(p, m, gate_stride, G: tl.constexpr):
    """The G gate tiles of a stacked weight, ``gate_stride`` elements apart (unused ones alias
    the first and cost nothing)."""
    w0 = tl.load(p, mask=m, other=0.0)
    w1 = w0
    w2 = w0
    w3 = w0
    if G >= 3:
        w1 = tl.load(p + gate_stride, mask=m, other=0.0)
        w2 = tl.load(p + 2 * gate_stride, mask=m, other=0.0)
    if G == 4:
        w3 = tl.load(p + 3 * gate_stride, mask=m, other=0.0)
    return w0, w1, w2, w3


@triton.jit
def store_gates(p, a, b, c, d, m, H, N: tl.constexpr):
    """Store N (3 or 4) per-unit blocks H elements apart, cast to the pointer's type."""
    ty = p.dtype.element_ty
    tl.store(p, a.to(ty), mask=m)
    tl.store(p + H, b.to(ty), mask=m)
    tl.store(p + 2 * H, c.to(ty), mask=m)
    if N == 4:
        tl.store(p + 3 * H, d.to(ty), mask=m)


@triton.jit
def save_gates(p, a, b, c, d, m, H):
    """Store a step's four saved activations (read again only by the backward): first out of the
    L2 cache, which the weights and the exchanged state need more."""
    ty = p.dtype.element_ty
    tl.store(p, a.to(ty), mask=m, eviction_policy="evict_first")
    tl.store(p + H, b.to(ty), mask=m, eviction_policy="evict_first")
    tl.store(p + 2 * H, c.to(ty), mask=m, eviction_policy="evict_first")
    tl.store(p + 3 * H, d.to(ty), mask=m, eviction_policy="evict_first")


@triton.jit
def load_gates(p, m, H, ACC: tl.constexpr):
    """The four saved per-unit activations of a step (LSTM i, f, g, o; GRU r, z, n, W_hn h+b)."""
    a = tl.load(p, mask=m, other=0.0).to(ACC)
    b = tl.load(p + H, mask=m, other=0.0).to(ACC)
    c = tl.load(p + 2 * H, mask=m, other=0.0).to(ACC)
    d = tl.load(p + 3 * H, mask=m, other=0.0).to(ACC)
    return a, b, c, d


@triton.jit
def recurrent_products(b_h, w0, w1, w2, w3, G: tl.constexpr, ACC: tl.constexpr,
                       PRECISION: tl.constexpr):
    """h @ W_k^T for each of the G gates (unused ones alias the first)."""
    q0 = tl.dot(b_h, w0, input_precision=PRECISION).to(ACC)
    q1 = q0
    q2 = q0
    q3 = q0
    if G >= 3:
        q1 = tl.dot(b_h, w1, input_precision=PRECISION).to(ACC)
        q2 = tl.dot(b_h, w2, input_precision=PRECISION).to(ACC)
    if G == 4:
        q3 = tl.dot(b_h, w3, input_precision=PRECISION).to(ACC)
    return q0, q1, q2, q3


@triton.jit
def split_gates(acc, GP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gates of a stacked product: ``acc`` is [GP * BLOCK_H, BLOCK_N], row r gate
    r // BLOCK_H; returns GP tiles [BLOCK_H, BLOCK_N] (unused ones alias the first)."""
    if GP == 2:
        q0, q1 = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_H, BLOCK_N)), (1, 2, 0)))
        q2 = q0
        q3 = q0
    elif GP == 4:
        # [a, b, unit, n] with gate 2a + b, to [unit, n, a, b]; each split halves the last dim.
        t = tl.permute(tl.reshape(acc, (2, 2, BLOCK_H, BLOCK_N)), (2, 3, 0, 1))
        even, odd = tl.split(t)
        q0, q2 = tl.split(even)
        q1, q3 = tl.split(odd)
    else:
        q0 = acc
        q1 = acc
        q2 = acc
        q3 = acc
    return q0, q1, q2, q3


@triton.jit
def stack_gates(q0, q1, q2, q3, GP: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The inverse of ``split_gates``: GP tiles [BLOCK_H, BLOCK_N] stacked into one
    [GP * BLOCK_H, BLOCK_N], row r gate r // BLOCK_H (GP 1, 2 or 4)."""
    if GP == 2:
        return tl.reshape(tl.permute(tl.join(q0, q1), (2, 0, 1)), (GP * BLOCK_H, BLOCK_N))
    elif GP == 4:
        t = tl.join(tl.join(q0, q2), tl.join(q1, q3))   # [unit, n, a, b], gate 2a + b
        return tl.reshape(tl.permute(t, (2, 3, 0, 1)), (GP * BLOCK_H, BLOCK_N))
    else:
        return q0


@triton.jit
def cell_forward(x0, x1, x2, x3, q0, q1, q2, q3, h, c, b_hn, CELL: tl.constexpr,
                 HAS_BHN: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr):
    """One step of a cell for a tile of hidden units.

    ``x0..x3`` are the gates' input projections (``load_gate_tiles`` of the step's xg, in the
    layer's dtype), ``q0..q3`` the recurrent products h @ W_k^T per gate, ``h`` and ``c`` the
    tile's previous state (``c`` for LSTM; ``h`` for GRU's update), ``b_hn`` GRU's hidden bias of
    the n gate. Returns ``(h', c', a, b, c, d)`` where a..d are what backward needs (LSTM i, f,
    g, o; GRU r, z, n, W_hn h + b_hn). For an LSTM h' is o * tanh(c'), before any projection.
    """
    a0 = x0.to(ACC) + q0
    if CELL == LSTM:
        s0, s1, s2, s3, c_new, h_new = lstm_fwd_pointwise(a0, x1.to(ACC) + q1, x2.to(ACC) + q2,
                                                          x3.to(ACC) + q3, c, FAST)
    elif CELL == GRU:
        s3 = q2
        if HAS_BHN:
            s3 = s3 + b_hn
        s0, s1, s2, h_new = gru_fwd_pointwise(a0, x1.to(ACC) + q1, x2.to(ACC), s3, h, FAST)
        c_new = c
    else:
        h_new = rnn_act(a0, CELL, FAST)
        c_new = c
        s0 = h_new
        s1 = h_new
        s2 = h_new
        s3 = h_new
    return h_new, c_new, s0, s1, s2, s3


@triton.jit
def cell_backward(dh, dc, s0, s1, s2, s3, c_new, c_prev, h_prev, h_new, act, CELL: tl.constexpr,
                  FAST: tl.constexpr):
    """Backward of ``cell_forward`` for a tile of hidden units; mirrors it.

    ``FAST`` as in the forward (LSTM's tanh(c') is recomputed with the same function).
    ``dh`` is the gradient of the cell's output h' (for an LSTM with a projection, of o*tanh(c'),
    already taken through W_hr), ``dc`` of the cell state c' (LSTM). ``s0..s3`` are the saved
    activations (LSTM i, f, g, o; GRU r, z, n, W_hn h + b_hn), ``c_new`` / ``c_prev`` the cell
    state after / before the step (LSTM), ``h_prev`` the state before the step (GRU), ``h_new``
    the state after it (RNN). ``act`` masks the rows that took the step (and real lanes); the others
    get zero gate gradients and pass ``dh`` and ``dc`` through unchanged.

    Returns ``(g0, g1, g2, g3, gh2, dh_prev, dc_prev)``: the gradients of the gates' input
    projections (LSTM i, f, g, o; GRU r, z, n; RNN the pre-activation), GRU's gradient of
    W_hn h + b_hn (``gh2``; the recurrent product's n-gate part differs from the input's), the part
    of ``dh_prev`` that does not pass through W_hh (GRU's ``dh * z``; ``dh`` itself for inactive
    rows), and ``dc_prev`` (LSTM).
    """
    zero = dh * 0.0
    dc_prev = dc
    if CELL == LSTM:
        g0, g1, g2, g3, dc_prev = lstm_bwd_pointwise(dh, dc, s0, s1, s2, s3, c_new, c_prev, FAST)
        gh2 = g2
        keep = zero
    elif CELL == GRU:
        g0, g1, g2, gh2, keep = gru_bwd_pointwise(dh, s0, s1, s2, s3, h_prev)
        g3 = g2
    else:
        g0 = rnn_act_bwd(dh, h_new, CELL)
        g1 = g0
        g2 = g0
        g3 = g0
        gh2 = g0
        keep = zero
    g0 = tl.where(act, g0, 0.0)
    g1 = tl.where(act, g1, 0.0)
    g2 = tl.where(act, g2, 0.0)
    g3 = tl.where(act, g3, 0.0)
    gh2 = tl.where(act, gh2, 0.0)
    dh_prev = tl.where(act, keep, dh)
    if CELL == LSTM:
        dc_prev = tl.where(act, dc_prev, dc)
    return g0, g1, g2, g3, gh2, dh_prev, dc_prev
