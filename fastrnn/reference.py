"""Plain-PyTorch recurrences: the readable statement of the maths and the test oracle.

``recurrence_reference`` has the same contract as the Triton recurrence op
(``fastrnn.ops.recurrence``): it takes the input projections of one layer for all directions and
runs the sequential part. Everything is differentiable by autograd, in any dtype (tests run it in
float64).

Conventions shared with the kernels:

* ``xg`` is ``[T, B, D * G * H]``: ``x_t W_ih^T + b_ih`` plus the parts of ``b_hh`` that may be
  pre-summed (all of it for RNN and LSTM; the r and z parts for GRU). Direction ``d`` owns columns
  ``d*G*H : (d+1)*G*H``.
* Direction 0 runs ``t = 0 .. T-1``, direction 1 runs ``t = T-1 .. 0``.
* ``lengths`` (packed input, batch sorted by decreasing length): row ``b`` is active at step ``t``
  iff ``t < lengths[b]``. An inactive row keeps its state. So the forward direction's final state
  is the state at its last step, and the reverse direction starts from ``h0`` at ``lengths[b]-1``.
* ``y`` holds the state after every step, also at inactive positions (the carried state): the
  caller drops those positions when it packs the output again.

Beyond torch.nn (opt-in; the defaults are torch.nn's maths):

* ``resets`` [T, B] bool: where ``resets[t, b]``, an episode starts at step t of row b. The state
  entering step t of direction 0 is the initial state instead of the carried one; direction 1
  (which runs backwards in time) is cut at the same boundary: the state it carries from step t
  into step t-1 is replaced by its initial state. Gradients do not cross a reset; the initial
  state's gradient collects from every step it entered.
* ``clip`` > 0 (``recurrent_grad_clip``): the gradient flowing into the state entering each step
  (dh, and dc for an LSTM) is clamped to [-clip, clip], after the gradients of everything that
  step feeds are summed, before the output gradient of the step before is added. The forward is
  unchanged.
* ``states=True``: also return the cell state after every step (LSTM), ``[T, B, D, H]``; ``y``
  already holds every step's h.
* ``rmask`` [D, B, P] (``recurrent_dropout``, variational dropout, Gal & Ghahramani): the state
  entering the recurrent product is ``rmask * h``, the same mask at every step of a sequence
  (entries 0 or 1 / (1 - p): inverted dropout); GRU's update ``z * h`` and the outputs take h
  itself.
* ``zoneout`` ``(zh, zc)`` (Krueger et al.): per step and unit, keep the previous state with
  factor d: ``c_t = d_c * c_{t-1} + (1 - d_c) * c~`` and ``h_t = d_h * h_{t-1} + (1 - d_h) * h~``,
  where ``c~ = f * c_{t-1} + i * g`` and ``h~`` is the cell's new state (an LSTM's
  ``o * tanh(c~)``, projected with proj_size). Training: d is a 0/1 mask ``[T, B, D, ·]``; eval:
  d is the probability z (a number). The layer's output at t is the zoned h_t.
* ``weight_dropout`` (DropConnect on W_hh, AWD-LSTM's WeightDrop) is no recurrence of its own:
  the layer runs with ``W_hh * wmask`` (``dropout_masks``), one mask per call.
* LayerNorm cells (``LayerNormLSTM``, ``LayerNormGRU``; Ba et al.): ``layer_norm_rnn_reference``.
  The gates are ``LN_x(W_ih x) + LN_h(W_hh h) + b_ih + b_hh``, each LN over all G*H gate
  pre-activations of a step and direction with its own gain and bias (``torch.nn.LayerNorm``,
  eps 1e-5). LSTM: ``c' = f*c + i*g``, ``h' = o * tanh(LN_c(c'))`` (the carried c' is not
  normalised). GRU: ``n = tanh([LN_x(W_ih x)]_n + b_in + r * ([LN_h(W_hh h)]_n + b_hn))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._modes import GRU, LSTM, RNN_RELU, RNN_TANH


class ClipGrad(torch.autograd.Function):
    """Identity forward; the backward clamps the incoming gradient to [-clip, clip] (NaN stays
    NaN, as torch.clamp). vmap-able. First-order only: autograd would also clamp the
    second-order adjoints that flow along the forward's identity edge, so derivatives of the
    clipped gradients differentiated through it are not the clipped backward's (the layers
    refuse double backward with a clip)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, clip):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.clip = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-ctx.clip, ctx.clip), None


def clip_grad(x: Tensor, clip: float | None) -> Tensor:
    """``x``, with the gradient flowing back into it clamped to [-clip, clip] (no-op if falsy)."""
    return ClipGrad.apply(x, clip) if clip else x


def entering_resets(resets: Tensor, direction: int) -> Tensor:
    """[T, B] bool: where the state entering step t of ``direction`` is its initial state because
    of a reset (direction 0: ``resets[t]``; direction 1: ``resets[t + 1]``, none at T-1). The first
    step of either direction starts from the initial state anyway."""
    if direction == 0:
        return resets
    return torch.cat([resets[1:], torch.zeros_like(resets[:1])])


def cell_step(mode: int, xg: Tensor, h: Tensor, c: Tensor | None, w_hh: Tensor,
              b_hn: Tensor | None, w_hr: Tensor | None,
              rmask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One step of one direction: ``xg`` [B, G*H], ``h`` [B, P], ``c`` [B, H] -> (h', c');
    ``rmask`` [B, P] multiplies h where it enters the recurrent product."""
    hg = (h if rmask is None else h * rmask) @ w_hh.t()
    if mode == RNN_TANH:
        return torch.tanh(xg + hg), None
    if mode == RNN_RELU:
        return torch.relu(xg + hg), None
    if mode == LSTM:
        i, f, g, o = (xg + hg).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = h @ w_hr.t()
        return h, c
    if mode == GRU:
        xr, xz, xn = xg.chunk(3, dim=-1)
        hr, hz, hn = hg.chunk(3, dim=-1)
        if b_hn is not None:
            hn = hn + b_hn
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    raise ValueError(f"unknown mode {mode}")


def _zone(z, t: int, d: int, old: Tensor, new: Tensor) -> Tensor:
    """Zoneout of one step and direction: ``z`` a mask [T, B, D, ·] or a probability."""
    if z is None:
        return new
    keep = z[t, :, d].to(new.dtype) if isinstance(z, Tensor) else z
    return keep * old + (1 - keep) * new


def recurrence_reference(mode: int, xg: Tensor, h0: Tensor, c0: Tensor | None, w_hh: Tensor,
                         b_hn: Tensor | None = None, w_hr: Tensor | None = None,
                         lengths: Tensor | None = None, resets: Tensor | None = None,
                         clip: float | None = None, states: bool = False,
                         rmask: Tensor | None = None, zoneout=None):
    """Reference for the recurrence op. Returns ``(y [T, B, D*P], h_n [D, B, P], c_n [D, B, H] |
    None)``, and with ``states`` also every step's cell state ``[T, B, D, H] | None``."""
    T, B, _ = xg.shape
    D = w_hh.shape[0]
    GH = w_hh.shape[1]
    outputs, h_n, c_n, cells = [], [], [], []
    for d in range(D):
        h = h0[d]
        c = c0[d] if c0 is not None else None
        starts = None if resets is None else entering_resets(resets.to(h.device), d)[:, :, None]
        ys = [None] * T
        cs = [None] * T
        for s in range(T):
            t = s if d == 0 else T - 1 - s
            if starts is not None and s > 0:
                h = torch.where(starts[t], h0[d], h)
                if c is not None:
                    c = torch.where(starts[t], c0[d], c)
            h, c = clip_grad(h, clip), (clip_grad(c, clip) if c is not None else None)
            h_new, c_new = cell_step(mode, xg[t, :, d * GH:(d + 1) * GH], h,
                                     c, w_hh[d], None if b_hn is None else b_hn[d],
                                     None if w_hr is None else w_hr[d],
                                     None if rmask is None else rmask[d])
            if zoneout is not None:
                h_new = _zone(zoneout[0], t, d, h, h_new)
                if c is not None:
                    c_new = _zone(zoneout[1], t, d, c, c_new)
            if lengths is not None:
                active = (t < lengths.to(h.device))[:, None]
                h_new = torch.where(active, h_new, h)
                if c is not None:
                    c_new = torch.where(active, c_new, c)
            h, c = h_new, c_new
            ys[t] = h
            cs[t] = c
        outputs.append(torch.stack(ys))
        h_n.append(h)
        c_n.append(c)
        if c is not None:
            cells.append(torch.stack(cs))
    y = torch.cat(outputs, dim=-1)
    out = (y, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None))
    if states:
        out += (torch.stack(cells, dim=2) if cells else None,)
    return out


def rnn_reference(mode: int, x: Tensor, params: dict, num_layers: int, bidirectional: bool,
                  hx=None, lengths: Tensor | None = None, resets: Tensor | None = None,
                  clip: float | None = None, states: bool = False, masks=None,
                  zoneout=None):
    """A torch.nn RNN/LSTM/GRU stack in plain PyTorch (no dropout): what the layers compute.

    ``x`` is ``[T, B, I]`` (time-major), ``params`` the module's parameters by torch.nn's names
    (``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight_hr_l0``...; biases may be absent),
    ``hx`` torch.nn's ``h0`` (or ``(h0, c0)`` for an LSTM) or None for zeros, ``lengths`` [B]
    the valid steps per sequence (any order) or None. Returns ``(y [T, B, D*P], h_n [L*D, B, P],
    c_n [L*D, B, H] | None)``; ``y`` past a sequence's length holds carried states, which a packed
    output leaves out. ``resets`` [T, B] and ``clip`` apply to every layer (see the module
    docstring); with ``states`` the result also holds every step's states of every layer,
    ``h_all [T, L*D, B, P]`` and ``c_all [T, L*D, B, H] | None`` (what ``return_states=True``
    returns, time-major). ``masks``: per layer ``(wmask [D, G*H, P] | None, rmask [D, B, P] |
    None)`` (``dropout_masks``; weight and recurrent dropout), or None. ``zoneout`` per layer
    ``(zh, zc)`` (masks ``[T, B, D, ·]`` or probabilities), or None.

    Each layer feeds the next; direction d's input projection is ``x W_ih^T + b_ih`` plus the
    parts of ``b_hh`` that sit outside the reset gate (all of it but ``b_hn`` for a GRU).
    """
    D = 2 if bidirectional else 1
    G = {RNN_TANH: 1, RNN_RELU: 1, LSTM: 4, GRU: 3}[mode]
    T, B, _ = x.shape
    H = params["weight_hh_l0"].shape[0] // G
    P = params["weight_hh_l0"].shape[1]     # H, or proj_size
    h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
    if h0 is None:
        h0 = x.new_zeros(num_layers * D, B, P)
    if mode == LSTM and c0 is None:
        c0 = x.new_zeros(num_layers * D, B, H)
    h_n, c_n, h_all, c_all = [], [], [], []
    inp = x
    for layer in range(num_layers):
        xgs, w_hh, b_hn, w_hr = [], [], [], []
        for d in range(D):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            b_ih = params.get(f"bias_ih_{sfx}")
            b_hh = params.get(f"bias_hh_{sfx}")
            xg = inp @ params[f"weight_ih_{sfx}"].t()
            if b_ih is not None:
                xg = xg + b_ih
            if b_hh is not None:
                if mode == GRU:
                    xg = xg + torch.cat([b_hh[:2 * H], b_hh.new_zeros(H)])
                    b_hn.append(b_hh[2 * H:])
                else:
                    xg = xg + b_hh
            xgs.append(xg)
            w_hh.append(params[f"weight_hh_{sfx}"])
            if f"weight_hr_{sfx}" in params:
                w_hr.append(params[f"weight_hr_{sfx}"])
        assert all(t.shape[-1] == G * H for t in xgs)
        rows = slice(layer * D, (layer + 1) * D)
        wmask, rmask = masks[layer] if masks is not None else (None, None)
        w_hh = torch.stack(w_hh)
        if wmask is not None:
            w_hh = w_hh * wmask
        y, hn, cn, cells = recurrence_reference(
            mode, torch.cat(xgs, dim=-1), h0[rows], None if c0 is None else c0[rows],
            w_hh, torch.stack(b_hn) if b_hn else None,
            torch.stack(w_hr) if w_hr else None, lengths, resets, clip, states=True,
            rmask=rmask, zoneout=None if zoneout is None else zoneout[layer])
        h_n.append(hn)
        h_all.append(y.unflatten(-1, (D, P)).transpose(1, 2))
        if cn is not None:
            c_n.append(cn)
            c_all.append(cells.transpose(1, 2))
        inp = y
    out = (inp, torch.cat(h_n), (torch.cat(c_n) if c_n else None))
    if states:
        out += (torch.cat(h_all, dim=1), torch.cat(c_all, dim=1) if c_all else None)
    return out


LN_EPS = 1e-5  # torch.nn.LayerNorm's default


def layer_norm_rnn_reference(mode: int, x: Tensor, params: dict, num_layers: int,
                             bidirectional: bool, hx=None, lengths: Tensor | None = None,
                             masks=None):
    """A LayerNormLSTM / LayerNormGRU stack in plain PyTorch (no dropout between layers), as Ba
    et al. state it. ``params`` by name: torch.nn's (``weight_ih_l0``, ``bias_hh_l0_reverse``...;
    biases may be absent) plus ``ln_ih_weight_l0``, ``ln_ih_bias_l0``, ``ln_hh_weight_l0``,
    ``ln_hh_bias_l0`` ([G*H] each) and for an LSTM ``ln_cell_weight_l0``, ``ln_cell_bias_l0``
    ([H]). ``x`` [T, B, I] time-major, ``hx``, ``lengths`` and ``masks`` (weight dropout only)
    as ``rnn_reference``; returns ``(y [T, B, D*H], h_n [L*D, B, H], c_n [L*D, B, H] | None)``.
    """
    D = 2 if bidirectional else 1
    G = {LSTM: 4, GRU: 3}[mode]
    T, B, _ = x.shape
    H = params["weight_hh_l0"].shape[1]
    h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
    if h0 is None:
        h0 = x.new_zeros(num_layers * D, B, H)
    if mode == LSTM and c0 is None:
        c0 = x.new_zeros(num_layers * D, B, H)
    active = None if lengths is None else torch.arange(T, device=x.device)[:, None] < \
        lengths.to(x.device)[None, :]
    h_n, c_n, inp = [], [], x
    for layer in range(num_layers):
        ys = []
        for d in range(D):
            sfx = f"l{layer}" + ("_reverse" if d else "")

            def ln(v, name, n):
                return F.layer_norm(v, (n,), params[f"ln_{name}_weight_{sfx}"],
                                    params[f"ln_{name}_bias_{sfx}"], LN_EPS)

            b_ih = params.get(f"bias_ih_{sfx}")
            b_hh = params.get(f"bias_hh_{sfx}")
            w_hh = params[f"weight_hh_{sfx}"]
            if masks is not None and masks[layer][0] is not None:
                w_hh = w_hh * masks[layer][0][d]
            gx = ln(inp @ params[f"weight_ih_{sfx}"].t(), "ih", G * H)
            if b_ih is not None:
                gx = gx + b_ih
            k = layer * D + d
            h = h0[k]
            c = c0[k] if mode == LSTM else None
            out = [None] * T
            for s in range(T):
                t = s if d == 0 else T - 1 - s
                gh = ln(h @ w_hh.t(), "hh", G * H)
                if b_hh is not None:
                    gh = gh + b_hh
                if mode == LSTM:
                    i, f, g, o = (gx[t] + gh).chunk(4, dim=-1)
                    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h_new = torch.sigmoid(o) * torch.tanh(ln(c_new, "cell", H))
                else:
                    xr, xz, xn = gx[t].chunk(3, dim=-1)
                    hr, hz, hn = gh.chunk(3, dim=-1)
                    r = torch.sigmoid(xr + hr)
                    z = torch.sigmoid(xz + hz)
                    n = torch.tanh(xn + r * hn)
                    h_new, c_new = (1 - z) * n + z * h, None
                if active is not None:
                    h_new = torch.where(active[t][:, None], h_new, h)
                    if c is not None:
                        c_new = torch.where(active[t][:, None], c_new, c)
                h, c = h_new, c_new
                out[t] = h
            ys.append(torch.stack(out))
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        inp = torch.cat(ys, dim=-1)
    return inp, torch.stack(h_n), (torch.stack(c_n) if c_n else None)


def dropout_masks(weight_dropout: float, recurrent_dropout: float, num_layers: int, D: int,
                  G: int, H: int, P: int, B: int, like: Tensor) -> list:
    """The masks of one call of a layer in training mode, per layer ``(wmask, rmask)``:
    ``wmask`` [D, G*H, P] multiplies W_hh (``weight_dropout``), ``rmask`` [D, B, P] the state
    entering the recurrent product (``recurrent_dropout``); None where the probability is 0.
    Entries are 0 with probability p, else 1 / (1 - p) (0 everywhere for p = 1). Drawn from
    torch's generator for ``like``'s device, in this order, all before the layers run: the same
    seed gives the same masks."""
    def mask(p, shape):
        if not p:
            return None
        if p >= 1:
            return like.new_zeros(shape)
        return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)

    return [(mask(weight_dropout, (D, G * H, P)), mask(recurrent_dropout, (D, B, P)))
            for _ in range(num_layers)]


def zoneout_masks(z_h: float, z_c: float, num_layers: int, T: int, B: int, D: int, H: int,
                  P: int, training: bool, like: Tensor, lstm: bool) -> list | None:
    """Per layer ``(zh, zc)`` for ``zoneout``: in training, 0/1 masks ``[T, B, D, P]`` and
    ``[T, B, D, H]`` (1 with probability z: keep the previous state), bool, drawn from torch's
    generator in layer order; in eval, the probabilities themselves. None where both are 0."""
    if not (z_h or z_c):
        return None
    if not training:
        return [(z_h or None, (z_c or None) if lstm else None)] * num_layers

    def mask(z, width):
        if not z:
            return None
        return like.new_empty(T, B, D, width).bernoulli_(z).to(torch.bool)

    return [(mask(z_h, P), mask(z_c, H) if lstm else None) for _ in range(num_layers)]
