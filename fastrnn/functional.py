"""The layer stack: input projections, the recurrence op, dropout between layers.

Knows nothing of nn.Module. Per layer: one GEMM (``F.linear``) projects the input for every step
and both directions at once, the recurrence op (``fastrnn::recurrence``) runs the sequential part,
and dropout applies to every layer's output but the last, in training mode. Autograd handles the
projection's gradients; the recurrence op has its own backward kernel.

Tensors stay in the caller's memory layout: with ``batch_first`` the projection and the outputs
are batch-major in memory, and the recurrence op reads and writes them through strides.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _modes
from .ops.recurrence import recurrence


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


def rnn(mode: int, input: Tensor, hx: Tensor, cx: Tensor | None, weights: list[Tensor], *,
        hidden_size: int, num_layers: int, bias: bool, batch_first: bool, dropout: float,
        training: bool, bidirectional: bool, proj_size: int = 0,
        lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run a multi-layer RNN/LSTM/GRU on a padded 3-D input.

    ``input`` is ``[B, T, I]`` if ``batch_first`` else ``[T, B, I]``; ``hx`` is
    ``[num_layers * D, B, P]``, ``cx`` ``[num_layers * D, B, H]`` (LSTM); ``weights`` in torch.nn's
    ``_flat_weights`` order; ``lengths`` (packed input only, time-major) gives each row's length.
    Returns ``(output, h_n, c_n)`` with output in the input's layout and ``c_n`` None but for LSTM.
    """
    num_directions = 2 if bidirectional else 1
    device_type = input.device.type
    dtype = input.dtype
    if torch.is_autocast_enabled(device_type):
        # torch.nn runs the whole layer in the autocast dtype; so does fastrnn (bf16 included).
        dtype = torch.get_autocast_dtype(device_type)
    is_lstm = mode == _modes.LSTM
    save = torch.is_grad_enabled() and (
        input.requires_grad or hx.requires_grad or (cx is not None and cx.requires_grad)
        or any(w.requires_grad for w in weights))

    x = input.to(dtype)
    h_n, c_n = [], []
    for layer in range(num_layers):
        params = layer_params(weights, layer, num_directions, bias, proj_size > 0)
        w_ih = _cat([p.w_ih for p in params]).to(dtype)
        b = _cat([_input_bias(mode, p, hidden_size) for p in params]).to(dtype) if bias else None
        xg = F.linear(x, w_ih, b).to(dtype)
        w_hh = _stack([p.w_hh for p in params]).to(dtype)
        b_hn = None
        if bias and mode == _modes.GRU:
            b_hn = _stack([p.b_hh[2 * hidden_size:] for p in params]).to(dtype)
        w_hr = _stack([p.w_hr for p in params]).to(dtype) if proj_size > 0 else None
        rows = slice(layer * num_directions, (layer + 1) * num_directions)
        h0 = hx[rows].to(dtype)
        c0 = cx[rows].to(dtype) if is_lstm else None
        y, hn, cn, _, _ = recurrence(xg.transpose(0, 1) if batch_first else xg, h0, c0, w_hh,
                                     b_hn, w_hr, lengths, mode, batch_first, save)
        x = y.transpose(0, 1) if batch_first else y
        if training and dropout > 0 and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
        h_n.append(hn)
        c_n.append(cn)
    return x, torch.cat(h_n), (torch.cat(c_n) if is_lstm else None)
