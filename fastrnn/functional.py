"""The layer stack: input projections, the recurrence op, dropout between layers.

Knows nothing of nn.Module. Per layer, the recurrence op (``fastrnn::recurrence``) projects the
input of every step and both directions in one GEMM and runs the sequential part in a Triton
kernel; dropout applies to every layer's output but the last, in training mode. This layer
prepares the weights: both directions' W_ih side by side, b_ih plus the pre-summable part of
b_hh, and the recurrent weights stacked per direction.

Tensors stay in the caller's memory layout: with ``batch_first`` the projection and the outputs
are batch-major in memory, and the recurrence op reads and writes them through strides.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _modes
from .ops import dispatch
from .ops.recurrence import recurrence
from .ops.recurrence_ln import ln_recurrence, ln_resolve


class LayerParams(NamedTuple):
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    w_hr: Tensor | None


def layer_params(weights: list[Tensor], layer: int, num_directions: int, has_bias: bool,
                 has_proj: bool) -> list[LayerParams]:
    """Split torch.nn's flat weight list (``_flat_weights_names`` order) for one layer."""
    per = 2 + 2 * has_bias + has_proj
    out = []
    for d in range(num_directions):
        w = weights[(layer * num_directions + d) * per:(layer * num_directions + d + 1) * per]
        out.append(LayerParams(w[0], w[1], w[2] if has_bias else None,
                               w[3] if has_bias else None, w[-1] if has_proj else None))
    return out


def _stack(tensors: list[Tensor]) -> Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _input_bias(mode: int, p: LayerParams, hidden_size: int) -> Tensor:
    """The bias that can be added to the input projection: all of b_hh except GRU's b_hn, which
    sits inside r * (W_hn h + b_hn)."""
    if mode == _modes.GRU:
        two_h = 2 * hidden_size
        return torch.cat([p.b_ih[:two_h] + p.b_hh[:two_h], p.b_ih[two_h:]])
    return p.b_ih + p.b_hh


def _compute_dtype(input: Tensor) -> torch.dtype:
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        # torch.nn runs the whole layer in the autocast dtype; so does fastrnn (bf16 included).
        return torch.get_autocast_dtype(device_type)
    return input.dtype


def _needs_grad(tensors: list[Tensor | None]) -> bool:
    """Whether backward may run, so the forward must save activations."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _strategy(mode: int, h0: Tensor, w_hh: Tensor) -> str:
    """The kernel strategy of a layer, decided here on the caller's thread (where
    ``fastrnn.force_strategy`` is visible) and handed to the op, which records it for backward."""
    D, B, P = h0.shape
    if B == 0 or w_hh.numel() == 0:
        return ""  # an empty problem: no kernel runs (ops/recurrence.py)
    G = _modes.NUM_GATES[mode]
    return dispatch.resolve(mode, B, w_hh.shape[1] // G, P, D, w_hh.dtype, h0.device)


def _zone_args(spec) -> tuple:
    """``(zh, zc, z_h, z_c)`` of the recurrence op from one layer's ``(zh, zc)``."""
    if spec is None:
        return None, None, 0.0, 0.0
    out_masks, out_p = [], []
    for z in spec:
        out_masks.append(z if isinstance(z, Tensor) else None)
        out_p.append(0.0 if isinstance(z, Tensor) or z is None else float(z))
    return out_masks[0], out_masks[1], out_p[0], out_p[1]


def rnn(mode: int, input: Tensor, hx: Tensor, cx: Tensor | None, weights: list[Tensor], *,
        hidden_size: int, num_layers: int, bias: bool, batch_first: bool, dropout: float,
        training: bool, bidirectional: bool, proj_size: int = 0,
        lengths: Tensor | None = None, resets: Tensor | None = None, clip: float = 0.0,
        states: bool = False, masks: list | None = None, zoneout: list | None = None,
        layer_norm: list | None = None):
    """Run a multi-layer RNN/LSTM/GRU on a padded 3-D input.

    ``input`` is ``[B, T, I]`` if ``batch_first`` else ``[T, B, I]``; ``hx`` is
    ``[num_layers * D, B, P]``, ``cx`` ``[num_layers * D, B, H]`` (LSTM); ``weights`` in torch.nn's
    ``_flat_weights`` order; ``lengths`` (packed input only, time-major) gives each row's length.
    Returns ``(output, h_n, c_n)`` with output in the input's layout and ``c_n`` None but for LSTM.

    Beyond torch.nn: ``resets`` (bool, ``[B, T]`` if ``batch_first`` else ``[T, B]``) starts an
    episode where true, in every layer; ``clip`` > 0 clamps the recurrent gradient; ``states``
    adds every step's states, time-major: ``(output, h_n, c_n, h_all [T, L*D, B, P],
    c_all [T, L*D, B, H] | None)``; ``masks`` per layer ``(wmask, rmask)`` (weight and recurrent
    dropout, ``fastrnn.reference.dropout_masks``) or None; ``zoneout`` per layer ``(zh, zc)``
    (``fastrnn.reference.zoneout_masks``: masks in training, probabilities in eval) or None.
    ``layer_norm`` (LayerNormLSTM / LayerNormGRU) per layer and direction the LayerNorm
    parameters ``(g_ih, b_ih, g_hh, b_hh, g_cell, b_cell)`` (the cell pair None for a GRU), or
    None. See ``fastrnn.reference``.
    """
    num_directions = 2 if bidirectional else 1
    dtype = _compute_dtype(input)
    is_lstm = mode == _modes.LSTM
    # An LSTM's cell states of every step are what its forward saves for the backward.
    save = _needs_grad([input, hx, cx, *weights, *(
        t for layer in layer_norm or () for per in layer for t in per)]) or (states and is_lstm)
    if resets is not None and batch_first:
        resets = resets.transpose(0, 1)     # the op's time-major view

    x = input.to(dtype)
    h_n, c_n, h_all, c_all = [], [], [], []
    for layer in range(num_layers):
        params = layer_params(weights, layer, num_directions, bias, proj_size > 0)
        w_ih = _cat([p.w_ih for p in params]).to(dtype)
        w_hh = _stack([p.w_hh for p in params]).to(dtype)
        wmask, rmask = masks[layer] if masks is not None else (None, None)
        if wmask is not None:  # DropConnect: this call's mask on W_hh, the same for every step
            w_hh = w_hh * wmask.to(dtype)
        rows = slice(layer * num_directions, (layer + 1) * num_directions)
        h0 = hx[rows].to(dtype)
        c0 = cx[rows].to(dtype) if is_lstm else None
        if layer_norm is not None:
            y, hn, cn = _ln_layer(mode, x, w_ih, params, layer_norm[layer], h0, c0, w_hh,
                                  hidden_size, bias, dtype, lengths, batch_first, save)
        else:
            b_x = _cat([_input_bias(mode, p, hidden_size) for p in params]).to(dtype) \
                if bias else None
            b_hn = None
            if bias and mode == _modes.GRU:
                b_hn = _stack([p.b_hh[2 * hidden_size:] for p in params]).to(dtype)
            w_hr = _stack([p.w_hr for p in params]).to(dtype) if proj_size > 0 else None
            strategy = _strategy(mode, h0, w_hh)
            y, hn, cn, _, cell = recurrence(x.transpose(0, 1) if batch_first else x, w_ih, b_x,
                                            h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first,
                                            save, strategy, resets, clip, rmask,
                                            *_zone_args(zoneout[layer] if zoneout else None))
            if states:
                h_all.append(y.unflatten(-1, (num_directions, -1)).transpose(1, 2))
                if is_lstm:
                    c_all.append(cell.to(dtype).transpose(1, 2))
        x = y.transpose(0, 1) if batch_first else y
        if training and dropout > 0 and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
        h_n.append(hn)
        c_n.append(cn)
    out = (x, torch.cat(h_n), (torch.cat(c_n) if is_lstm else None))
    if states:
        out += (torch.cat(h_all, dim=1), torch.cat(c_all, dim=1) if is_lstm else None)
    return out


def _ln_layer(mode, x, w_ih, params, ln, h0, c0, w_hh, H, bias, dtype, lengths, batch_first,
              save):
    """One LayerNorm layer (``fastrnn.reference.layer_norm_rnn_reference``): the input side
    ``LN_x(x W_ih^T)`` for every step and direction here, parallel over time, with every bias
    that adds to it folded in (b_ih, LN_h's bias, b_hh; a GRU keeps the n parts of the last two,
    which sit inside r *, as ``b_hn``); the recurrence in the LayerNorm op."""
    from .reference import LN_EPS

    D, GH = len(params), w_ih.shape[0] // len(params)
    g_x, b_x, g_h, b_h = (_stack([p[k] for p in ln]).to(dtype) for k in range(4))
    inner = b_h        # what adds to LN_h's output: its bias and b_hh
    outer = b_x        # what adds to LN_x's output: its bias and b_ih
    if bias:
        inner = inner + _stack([p.b_hh for p in params]).to(dtype)
        outer = outer + _stack([p.b_ih for p in params]).to(dtype)
    b_hn = None
    if mode == _modes.GRU:  # the n part of ``inner`` sits inside r * (.)
        shift = torch.cat([outer[:, :2 * H] + inner[:, :2 * H], outer[:, 2 * H:]], dim=-1)
        b_hn = inner[:, 2 * H:]
    else:
        shift = outer + inner
    proj = F.linear(x, w_ih).unflatten(-1, (D, GH))   # the caller's layout, batch-major or not
    xg = (F.layer_norm(proj, (GH,), eps=LN_EPS) * g_x + shift).flatten(-2)
    if batch_first:
        xg = xg.transpose(0, 1)                        # the op's time-major view
    g_c = b_c = None
    if mode == _modes.LSTM:
        g_c, b_c = (_stack([p[k] for p in ln]).to(dtype) for k in (4, 5))
    strategy = ln_resolve(mode, h0.shape[1], H, D, dtype, h0.device)
    y, hn, cn, *_ = ln_recurrence(xg, h0, c0, w_hh, b_hn, g_h, g_c, b_c, lengths, mode,
                                  batch_first, save, strategy)
    return y, hn, cn


def cell(mode: int, input: Tensor, hx: Tensor, cx: Tensor | None, w_ih: Tensor, w_hh: Tensor,
         b_ih: Tensor | None, b_hh: Tensor | None, clip: float = 0.0
         ) -> tuple[Tensor, Tensor | None]:
    """One step of an RNN/LSTM/GRU cell: ``input`` [B, I], ``hx`` [B, H], ``cx`` [B, H] (LSTM).

    The same recurrence op as a layer, run for a single step of a single direction.
    Returns ``(h', c')`` with ``c'`` None but for LSTM. ``clip`` > 0 clamps the gradient flowing
    into ``hx`` (and ``cx``) to [-clip, clip].
    """
    dtype = _compute_dtype(input)
    hidden_size = w_hh.shape[1]
    params = LayerParams(w_ih, w_hh, b_ih, b_hh, None)
    b_x = _input_bias(mode, params, hidden_size).to(dtype) if b_ih is not None else None
    b_hn = None
    if b_hh is not None and mode == _modes.GRU:
        b_hn = b_hh[2 * hidden_size:].unsqueeze(0).to(dtype)
    save = _needs_grad([input, hx, cx, w_ih, w_hh, b_ih, b_hh])
    is_lstm = mode == _modes.LSTM
    h0 = hx.to(dtype).unsqueeze(0)
    w_hh = w_hh.to(dtype).unsqueeze(0)
    _, h, c, _, _ = recurrence(
        input.to(dtype).unsqueeze(0), w_ih.to(dtype), b_x, h0,
        cx.to(dtype).unsqueeze(0) if is_lstm else None, w_hh, b_hn, None,
        None, mode, False, save, _strategy(mode, h0, w_hh), None, clip)
    return h[0], (c[0] if is_lstm else None)


def layer_norm_cell(mode: int, input: Tensor, hx: Tensor, cx: Tensor | None, w_ih: Tensor,
                    w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, ln: tuple
                    ) -> tuple[Tensor, Tensor | None]:
    """One step of a LayerNorm cell (``LayerNormLSTMCell``, ``LayerNormGRUCell``): the LayerNorm
    op for a single step of a single direction. ``ln`` is ``(g_ih, b_ih, g_hh, b_hh, g_cell,
    b_cell)``. Returns ``(h', c')`` with ``c'`` None but for LSTM."""
    dtype = _compute_dtype(input)
    H = w_hh.shape[1]
    params = [LayerParams(w_ih, w_hh, b_ih, b_hh, None)]
    is_lstm = mode == _modes.LSTM
    save = _needs_grad([input, hx, cx, w_ih, w_hh, b_ih, b_hh, *ln])
    _, h, c = _ln_layer(mode, input.to(dtype).unsqueeze(0), w_ih.to(dtype), params, [ln],
                        hx.to(dtype).unsqueeze(0), cx.to(dtype).unsqueeze(0) if is_lstm else None,
                        w_hh.to(dtype).unsqueeze(0), H, b_ih is not None, dtype, None, False,
                        save)
    return h[0], (c[0] if is_lstm else None)
