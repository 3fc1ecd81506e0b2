"""``fastrnn.RNN``, ``fastrnn.LSTM`` and ``fastrnn.GRU``: drop-in replacements for torch.nn's.

They subclass ``torch.nn.RNNBase`` exactly as torch.nn's own classes do (not ``torch.nn.LSTM``
itself: torch.compile refuses any instance of torch.nn.RNN/GRU/LSTM with a graph break), and
inherit its constructor, parameters, initialisation, repr and state_dict. Only ``forward`` is
fastrnn's: it normalises the input exactly as torch.nn does (same checks, same messages), runs
the layer stack of ``fastrnn.functional`` on the Triton kernels, and returns the outputs in the
caller's layout. Under ``FASTRNN_BACKEND=torch`` (or on CPU without the Triton interpreter) it
runs torch.nn's own forward instead; see ``fastrnn.backend``.

Beyond torch.nn, opt-in (the defaults leave a layer exactly torch.nn's): ``forward(input, hx,
*, resets=None, return_states=False)`` and the constructor's ``recurrent_grad_clip=None``; the
cells take ``recurrent_grad_clip`` too. Their maths is stated in ``fastrnn.reference``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _modes, functional
from .backend import announce, get_backend, use_kernels
from .reference import clip_grad, dropout_masks, zoneout_masks

_TORCH_FORWARD = {
    "RNN_TANH": nn.RNN.forward,
    "RNN_RELU": nn.RNN.forward,
    "LSTM": nn.LSTM.forward,
    "GRU": nn.GRU.forward,
}

_DTYPE_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
                torch.float64: "Double", torch.int64: "Long", torch.int32: "Int",
                torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
                torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _scalar_type(dtype: torch.dtype) -> str:
    """A dtype as ATen's messages print it (Float, Double, Half, ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check_clip(clip):
    """``recurrent_grad_clip``: None (off) or a positive finite number."""
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < float("inf"):
        raise ValueError(f"recurrent_grad_clip should be a positive number or None, but got "
                         f"{clip!r}")
    return float(clip)


def _check_resets(resets, input: torch.Tensor, batch_first: bool, is_batched: bool,
                  packed: bool) -> torch.Tensor:
    """``resets`` as the layer reads it, [T, B] (or [B, T] with ``batch_first``; [T] for an
    unbatched input), checked with torch.nn's phrasing for hidden states."""
    if packed:
        raise ValueError("resets cannot be combined with a PackedSequence input (its rows are "
                         "sorted by length and end there): pass the padded batch and its resets")
    if not isinstance(resets, torch.Tensor):
        raise TypeError(f"resets must be a Tensor, not {type(resets).__name__}")
    if resets.dtype != torch.bool:
        raise RuntimeError(f"Expected resets to be a Bool tensor, but got resets with dtype "
                           f"{_scalar_type(resets.dtype)}")
    if is_batched:
        expected = tuple(input.shape[:2])
    else:
        expected = (input.size(0),)
    if tuple(resets.shape) != expected:
        raise RuntimeError(f"Expected resets size {expected}, got {list(resets.shape)}")
    if resets.device != input.device:
        raise RuntimeError(f"Input and resets tensors are not at the same device, found input "
                           f"tensor at {input.device} and resets tensor at {resets.device}")
    if not is_batched:
        resets = resets.unsqueeze(0 if batch_first else 1)
    return resets


def _check_packed(data: torch.Tensor, batch_sizes: torch.Tensor) -> None:
    """A hand-built PackedSequence that the packing functions could not have produced: torch.nn
    fails on these inside ATen, with accidental messages; fastrnn names the problem (same
    exception class; ATen's own message where it is deterministic)."""
    if batch_sizes.dtype != torch.int64:
        raise RuntimeError(f"expected scalar type Long but found {_scalar_type(batch_sizes.dtype)}")
    if batch_sizes.dim() != 1:
        raise RuntimeError(f"batch_sizes must be 1-D, got {batch_sizes.dim()}-D")
    sizes = batch_sizes.tolist()
    if sizes and (sizes[0] < 0 or any(b > a for a, b in zip(sizes, sizes[1:]))
                  or sizes[-1] < 0):
        raise RuntimeError(f"batch_sizes must be non-negative and non-increasing, got {sizes}")
    offset = 0
    for size in sizes:  # torch.nn slices data step by step and fails where it runs out
        if data.dim() >= 1 and offset + size > data.size(0):
            raise RuntimeError(f"start ({offset}) + length ({size}) exceeds dimension size "
                               f"({data.size(0)}).")
        offset += size


class _ClipOption:
    """The constructor argument ``recurrent_grad_clip`` (layers and cells): checked, kept as an
    attribute (not in the state_dict), shown in the repr. A module converted from torch.nn has
    no such attribute: readers use ``getattr(m, "recurrent_grad_clip", None)``."""

    def __init__(self, *args, recurrent_grad_clip=None, **kwargs):
        clip = _check_clip(recurrent_grad_clip)
        super().__init__(*args, **kwargs)
        self.recurrent_grad_clip = clip

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if getattr(self, "recurrent_grad_clip", None) is not None:
            s += f", recurrent_grad_clip={self.recurrent_grad_clip}"
        return s


def _check_probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"{name} probability has to be between 0 and 1, but got {p!r}")
    return float(p)


class _RNNBase(_ClipOption, nn.RNNBase):
    """What fastrnn's RNN, LSTM and GRU share: the forward pass, and the options beyond
    torch.nn."""

    def __init__(self, mode, *args, weight_dropout=0.0, recurrent_dropout=0.0, zoneout=0.0,
                 **kwargs):
        weight_dropout = _check_probability("weight_dropout", weight_dropout)
        recurrent_dropout = _check_probability("recurrent_dropout", recurrent_dropout)
        if isinstance(zoneout, (tuple, list)):
            if mode != "LSTM" or len(zoneout) != 2:
                raise ValueError("zoneout takes a pair (z_h, z_c) for an LSTM only; give one "
                                 f"probability for {mode.split('_')[0]}" if mode != "LSTM" else
                                 f"zoneout=(z_h, z_c) takes two probabilities, got {zoneout!r}")
            zoneout = tuple(_check_probability("zoneout", z) for z in zoneout)
        else:
            zoneout = _check_probability("zoneout", zoneout)
        super().__init__(mode, *args, **kwargs)
        self.weight_dropout = weight_dropout
        self.recurrent_dropout = recurrent_dropout
        self.zoneout = zoneout

    def extra_repr(self) -> str:
        s = super().extra_repr()
        for name in ("weight_dropout", "recurrent_dropout", "zoneout"):
            if getattr(self, name, 0.0):
                s += f", {name}={getattr(self, name)}"
        return s

    def _layer_norm_params(self):
        """Per layer and direction the LayerNorm parameters (LayerNormLSTM / LayerNormGRU), or
        None."""
        return None

    def _zoneout(self, T: int, B: int, like: torch.Tensor):
        """Per layer (zh, zc) for the kernels: masks in training, probabilities in eval."""
        z = getattr(self, "zoneout", 0.0)
        z_h, z_c = z if isinstance(z, tuple) else (z, z if self.mode == "LSTM" else 0.0)
        D = 2 if self.bidirectional else 1
        return zoneout_masks(z_h, z_c, self.num_layers, T, B, D, self.hidden_size,
                             self.proj_size or self.hidden_size, self.training, like,
                             self.mode == "LSTM")

    def _dropout_masks(self, B: int, like: torch.Tensor):
        """This call's weight and recurrent dropout masks (training mode), or None."""
        pw, pr = getattr(self, "weight_dropout", 0.0), getattr(self, "recurrent_dropout", 0.0)
        if not self.training or not (pw or pr):
            return None
        D = 2 if self.bidirectional else 1
        return dropout_masks(pw, pr, self.num_layers, D, _modes.NUM_GATES[_modes.MODE_IDS[
            self.mode]], self.hidden_size, self.proj_size or self.hidden_size, B, like)

    def __setstate__(self, state):
        super().__setstate__(state)
        for name, default in (("recurrent_grad_clip", None), ("weight_dropout", 0.0),
                              ("recurrent_dropout", 0.0), ("zoneout", 0.0)):
            self.__dict__.setdefault(name, default)

    def flatten_parameters(self) -> None:
        """A no-op for the Triton kernels, which read the weights where they are. Under
        ``FASTRNN_BACKEND=torch`` it is torch.nn's (it packs the weights for cuDNN)."""
        if get_backend() == "torch":
            super().flatten_parameters()

    def _check_attributes(self, input, hiddens, weights) -> None:
        # What ATen's RNN ops check (RNN.h, check_attributes), with ATen's messages.
        autocast = torch.is_autocast_enabled(input.device.type)
        for name, tensors in (("hidden", hiddens), ("parameter", weights)):
            for t in tensors:
                if t.device != input.device:
                    raise RuntimeError(
                        f"Input and {name} tensors are not at the same device, found input "
                        f"tensor at {input.device} and {name} tensor at {t.device}")
                if t.dtype != input.dtype and not autocast:
                    raise RuntimeError(
                        f"Input and {name} tensors are not the same dtype, found input tensor "
                        f"with {_scalar_type(input.dtype)} and {name} tensor with "
                        f"{_scalar_type(t.dtype)}")

    def forward(self, input, hx=None, *, resets=None,  # noqa: C901 - torch.nn's three forwards
                return_states=False):
        """torch.nn's forward, plus (keyword-only, off by default):

        * ``resets``: bool ``(T, B)`` (``(B, T)`` with ``batch_first``; ``(T,)`` unbatched).
          Where ``resets[t, b]``, the state entering step t of sequence b is the initial state
          (``hx`` or zeros), in every layer: an episode starts there. The reverse direction of a
          bidirectional layer is cut at the same boundary. Gradients do not cross a reset.
        * ``return_states``: also return every step's state, ``(output, h_n, states)``:
          ``states`` is ``h_all`` (RNN, GRU) or ``(h_all, c_all)`` (LSTM), each
          ``(T, num_layers * D, B, ·)`` (``(B, T, ...)`` with ``batch_first``; no batch dim
          unbatched; with a PackedSequence input, padded with zeros past each length, in the
          input's batch order). Differentiable.

        The constructor's ``recurrent_grad_clip`` clamps the gradient flowing into each step's
        previous state during backward. See ``fastrnn.reference`` for the maths.
        """
        data = input.data if isinstance(input, PackedSequence) else input
        kernels = use_kernels(data.device)
        announce(type(self).__name__, data.device, kernels)
        clip = getattr(self, "recurrent_grad_clip", None)
        dropping = (self.training and (getattr(self, "weight_dropout", 0.0)
                                       or getattr(self, "recurrent_dropout", 0.0))
                    or getattr(self, "zoneout", 0.0))
        layer_norm = self._layer_norm_params()
        if not kernels:
            if (resets is not None or return_states or clip is not None or dropping
                    or layer_norm is not None):
                raise RuntimeError(
                    f"fastrnn: LayerNorm cells, resets, return_states, recurrent_grad_clip, "
                    f"weight_dropout, recurrent_dropout and zoneout run in fastrnn's kernels, "
                    f"which do not run "
                    f"here (backend {get_backend()!r} for {data.device.type} tensors; torch.nn "
                    "has no such "
                    "options). Use CUDA tensors, or set TRITON_INTERPRET=1 before importing "
                    "fastrnn to run the kernels on the CPU.")
            return _TORCH_FORWARD[self.mode](self, input, hx)
        self._update_flat_weights()
        is_lstm = self.mode == "LSTM"
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        orig_input = input

        def zeros(size):
            return torch.zeros(self.num_layers * num_directions, max_batch_size, size,
                               dtype=input.dtype, device=input.device)

        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            _check_packed(input, batch_sizes)
            max_batch_size = int(batch_sizes[0])
            if hx is None:
                hx = (zeros(real_hidden_size), zeros(self.hidden_size)) if is_lstm else zeros(
                    self.hidden_size)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            is_batched = True
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                name = "RNN" if self.mode.startswith("RNN") else self.mode
                tensor = " tensor" if name == "RNN" else ""
                raise ValueError(
                    f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            if hx is None:
                hx = (zeros(real_hidden_size), zeros(self.hidden_size)) if is_lstm else zeros(
                    self.hidden_size)
            elif is_lstm:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        raise RuntimeError(
                            "For batched 3-D input, hx and cx should also be 3-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should also be 2-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            else:
                if is_batched and hx.dim() != 3:
                    raise RuntimeError(
                        f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D "
                        "tensor")
                if not is_batched:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got "
                            f"{hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)

        self.check_forward_args(input, hx, batch_sizes)
        seq_len = len(batch_sizes) if batch_sizes is not None else input.size(
            1 if self.batch_first else 0)
        if seq_len == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if resets is not None:
            resets = _check_resets(resets, input if is_batched else orig_input, self.batch_first,
                                   is_batched, batch_sizes is not None)
        weights = [getattr(self, name) for name in self._flat_weights_names]
        h0, c0 = hx if is_lstm else (hx, None)
        self._check_attributes(input, [h0] if c0 is None else [h0, c0], weights)

        lengths = None
        x = input
        batch_first = self.batch_first
        if batch_sizes is not None:
            # Packed: run on the padded time-major batch (sorted by length); each row stops
            # at its own length inside the kernels.
            x, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
            batch_first = False
        out = functional.rnn(
            _modes.MODE_IDS[self.mode], x, h0, c0, weights, hidden_size=self.hidden_size,
            num_layers=self.num_layers, bias=self.bias, batch_first=batch_first,
            dropout=self.dropout, training=self.training, bidirectional=self.bidirectional,
            proj_size=self.proj_size, lengths=lengths, resets=resets, clip=clip or 0.0,
            states=return_states, masks=self._dropout_masks(h0.shape[1], weights[1]),
            zoneout=self._zoneout(x.shape[1 if batch_first else 0], h0.shape[1], weights[1]),
            layer_norm=layer_norm)
        output, h_n, c_n = out[:3]
        hidden = (h_n, c_n) if is_lstm else h_n
        states = self._states(out[3], out[4], lengths, unsorted_indices,
                              is_batched) if return_states else None

        if batch_sizes is not None:
            packed = pack_padded_sequence(output, lengths)
            output_packed = PackedSequence(packed.data, batch_sizes, sorted_indices,
                                           unsorted_indices)
            result = (output_packed, self.permute_hidden(hidden, unsorted_indices))
        else:
            if not is_batched:
                output = output.squeeze(batch_dim)
                hidden = ((hidden[0].squeeze(1), hidden[1].squeeze(1)) if is_lstm
                          else hidden.squeeze(1))
            result = (output, self.permute_hidden(hidden, unsorted_indices))
        return result + (states,) if return_states else result

    def _states(self, h_all, c_all, lengths, unsorted_indices, is_batched):
        """``return_states``: the time-major [T, L*D, B, ·] states in the caller's layout."""
        out = []
        for t in (h_all, c_all):
            if t is None:
                continue
            if lengths is not None:  # packed: zeros past each length, the input's batch order
                steps = torch.arange(t.shape[0], device=t.device)
                valid = steps[:, None] < lengths.to(t.device)[None, :]
                t = torch.where(valid[:, None, :, None], t, 0)
                if unsorted_indices is not None:
                    t = t.index_select(2, unsorted_indices)
            if not is_batched:
                t = t.squeeze(2)
            elif self.batch_first:
                t = t.permute(2, 0, 1, 3)
            out.append(t)
        return tuple(out) if self.mode == "LSTM" else out[0]


class RNN(_RNNBase):
    r"""Drop-in for :class:`torch.nn.RNN` (Elman RNN, tanh or relu) on fastrnn's kernels.

    Same arguments: ``input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None``.
    Beyond torch.nn: ``recurrent_grad_clip=None`` (keyword), and ``forward``'s ``resets`` and
    ``return_states``.
    """

    def __init__(self, *args, **kwargs):
        # torch.nn.RNN.__init__, which cannot be called for a non-nn.RNN instance.
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)


class LSTM(_RNNBase):
    r"""Drop-in for :class:`torch.nn.LSTM` on fastrnn's kernels (``proj_size`` included).

    Same arguments: ``input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None``.
    Beyond torch.nn: ``recurrent_grad_clip=None`` (keyword), and ``forward``'s ``resets`` and
    ``return_states``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class GRU(_RNNBase):
    r"""Drop-in for :class:`torch.nn.GRU` on fastrnn's kernels.

    Same arguments: ``input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None``.
    Beyond torch.nn: ``recurrent_grad_clip=None`` (keyword), and ``forward``'s ``resets`` and
    ``return_states``.
    """

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


class _LayerNormParams:
    """The LayerNorm gains and biases of a layer or cell: ``ln_{norm}_{weight|bias}{suffix}``
    for each norm of ``_norms`` ("ih", "hh": [G*H]; "cell": [H]) and each of ``_suffixes()``,
    initialised to 1 and 0 like ``torch.nn.LayerNorm`` (eps 1e-5), also by
    ``reset_parameters``."""

    _norms = ("ih", "hh")

    def _register_layer_norm(self, w: torch.Tensor) -> None:
        for sfx in self._suffixes():
            for norm in self._norms:
                n = self.hidden_size if norm == "cell" else w.shape[0]
                for kind in ("weight", "bias"):
                    self.register_parameter(f"ln_{norm}_{kind}{sfx}", nn.Parameter(
                        torch.empty(n, device=w.device, dtype=w.dtype)))
        self._reset_layer_norm()

    def _reset_layer_norm(self) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("ln_"):
                    p.fill_(1.0 if "_weight" in name else 0.0)

    def reset_parameters(self) -> None:
        super().reset_parameters()   # torch.nn's uniform init of every parameter
        self._reset_layer_norm()

    def _layer_norm_of(self, sfx: str) -> tuple:
        """``(g_ih, b_ih, g_hh, b_hh, g_cell, b_cell)`` of one suffix (the cell pair None for a
        GRU)."""
        return tuple(getattr(self, f"ln_{norm}_{kind}{sfx}", None)
                     for norm in ("ih", "hh", "cell") for kind in ("weight", "bias"))


class _LayerNorm(_LayerNormParams):
    """LayerNorm layers (Ba et al.; ``fastrnn.reference.layer_norm_rnn_reference``): torch.nn's
    arguments and parameters, plus per layer and direction ``ln_ih_weight_l{k}``,
    ``ln_ih_bias_l{k}``, ``ln_hh_weight_l{k}``, ``ln_hh_bias_l{k}`` ([G*H]) and, for an LSTM,
    ``ln_cell_weight_l{k}``, ``ln_cell_bias_l{k}`` ([H]) (``_reverse`` for the second
    direction), initialised to 1 and 0 like ``torch.nn.LayerNorm`` (eps 1e-5)."""

    def __init__(self, *args, **kwargs):
        name = type(self).__name__
        if kwargs.get("proj_size"):
            raise ValueError(f"{name} does not take proj_size")
        for option in ("recurrent_dropout", "zoneout", "recurrent_grad_clip"):
            if kwargs.get(option):
                raise ValueError(f"{name} does not take {option} (LayerNorm cells run without "
                                 "it); weight_dropout and dropout between layers it takes")
        super().__init__(*args, **kwargs)
        self._register_layer_norm(self.weight_hh_l0)

    def _suffixes(self) -> list:
        return [f"_l{layer}" + ("_reverse" if d else "") for layer in range(self.num_layers)
                for d in range(2 if self.bidirectional else 1)]

    def _layer_norm_params(self):
        D = 2 if self.bidirectional else 1
        per = [self._layer_norm_of(sfx) for sfx in self._suffixes()]
        return [per[layer * D:(layer + 1) * D] for layer in range(self.num_layers)]

    def forward(self, input, hx=None, *, resets=None, return_states=False):
        """torch.nn's forward (input, hx, outputs as the layer's torch.nn twin)."""
        if resets is not None or return_states:
            raise ValueError(f"{type(self).__name__} does not take resets or return_states")
        return super().forward(input, hx)


class LayerNormLSTM(_LayerNorm, LSTM):
    r"""An LSTM with layer normalisation (Ba et al.) on fastrnn's kernels.

    ``torch.nn.LSTM``'s arguments (``proj_size`` excepted) and parameters, plus the LayerNorm
    gains and biases (``_LayerNorm``). Per step and direction: gates = ``LN_ih(W_ih x) +
    LN_hh(W_hh h) + b_ih + b_hh``; ``c' = f*c + i*g``; ``h' = o * tanh(LN_cell(c'))``.
    Beyond torch.nn it takes ``weight_dropout``.
    """

    _norms = ("ih", "hh", "cell")


class LayerNormGRU(_LayerNorm, GRU):
    r"""A GRU with layer normalisation (Ba et al.) on fastrnn's kernels.

    ``torch.nn.GRU``'s arguments and parameters, plus the LayerNorm gains and biases
    (``_LayerNorm``). Per step and direction: r, z from ``LN_ih(W_ih x) + LN_hh(W_hh h) + b_ih +
    b_hh``; ``n = tanh([LN_ih(W_ih x)]_n + b_in + r * ([LN_hh(W_hh h)]_n + b_hn))``;
    ``h' = (1 - z) * n + z * h``. Beyond torch.nn it takes ``weight_dropout``.
    """


class _CellBase(_ClipOption):
    """What fastrnn's cells share: the forward pass, with torch.nn's checks and messages (the
    shape checks ATen's cells make, ``check_rnn_cell_forward_*``, included)."""

    _torch_cell: type

    def forward(self, input, hx=None):
        kernels = use_kernels(input.device)
        announce(type(self).__name__, input.device, kernels)
        clip = getattr(self, "recurrent_grad_clip", None)
        layer_norm = self._layer_norm_params()
        if not kernels and layer_norm is not None:
            raise RuntimeError(
                f"fastrnn: LayerNorm cells run in fastrnn's kernels, which do not run here "
                f"(backend {get_backend()!r} for {input.device.type} tensors). Use CUDA tensors, "
                "or set TRITON_INTERPRET=1 before importing fastrnn to run the kernels on the "
                "CPU.")
        if not kernels:
            if clip is not None and hx is not None:
                # torch.nn's cell, with the gradient into hx clamped on its way back: the same
                # maths the kernels fuse (one step: the clip applies to the state entering it).
                hx = tuple(clip_grad(h, clip) for h in hx) if isinstance(hx, (tuple, list)) \
                    else clip_grad(hx, clip)
            return self._torch_cell.forward(self, input, hx)
        name = self._torch_cell.__name__
        is_lstm = name == "LSTMCell"
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if is_lstm and hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got "
                                     f"{value.dim()}D instead")
        elif hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype,
                                device=input.device)
            hx = (zeros, zeros) if is_lstm else zeros
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if is_lstm else hx.unsqueeze(0)
        if name == "RNNCell":
            if self.nonlinearity not in ("tanh", "relu"):
                raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
            mode = _modes.RNN_TANH if self.nonlinearity == "tanh" else _modes.RNN_RELU
        else:
            mode = _modes.LSTM if is_lstm else _modes.GRU
        hiddens = list(hx) if is_lstm else [hx]
        self._check(input, hiddens)
        if layer_norm is not None:
            h, c = functional.layer_norm_cell(mode, input, hiddens[0],
                                              hiddens[1] if is_lstm else None, self.weight_ih,
                                              self.weight_hh, self.bias_ih, self.bias_hh,
                                              layer_norm)
        else:
            h, c = functional.cell(mode, input, hiddens[0], hiddens[1] if is_lstm else None,
                                   self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                   clip or 0.0)
        if not is_batched:
            h = h.squeeze(0)
            c = c.squeeze(0) if is_lstm else None
        return (h, c) if is_lstm else h

    def _layer_norm_params(self):
        """The LayerNorm parameters (LayerNormLSTMCell / LayerNormGRUCell), or None."""
        return None

    def _check(self, input, hiddens) -> None:
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected "
                               f"{self.input_size}")
        for idx, h in enumerate(hiddens):
            if input.size(0) != h.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{idx} "
                                   f"batch size {h.size(0)}")
            if h.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{idx} has inconsistent hidden_size: got {h.size(1)}, "
                                   f"expected {self.hidden_size}")
            if h.dim() != 2:  # a 2-D hx for 1-D input with hidden_size 1
                raise RuntimeError(f"hidden{idx} must be 1-D for 1-D input and 2-D for 2-D "
                                   f"input, got {h.dim() - 1}-D")
        autocast = torch.is_autocast_enabled(input.device.type)
        weight = self.weight_ih
        for name, tensors in (("hidden", hiddens), ("parameter", list(self.parameters()))):
            for t in tensors:
                if t.device != input.device:
                    raise RuntimeError(
                        f"Input and {name} tensors are not at the same device, found input "
                        f"tensor at {input.device} and {name} tensor at {t.device}")
        if autocast:
            return
        for t in [input] + hiddens:  # the matrix products torch.nn's cells run first
            if t.dtype != weight.dtype:
                raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got "
                                   f"{_scalar_type(t.dtype)} and {_scalar_type(weight.dtype)}")


class RNNCell(_CellBase, nn.RNNCell):
    """Drop-in for :class:`torch.nn.RNNCell` on fastrnn's kernels. Beyond torch.nn:
    ``recurrent_grad_clip=None`` (keyword) clamps the gradient flowing into ``hx``."""

    _torch_cell = nn.RNNCell


class LSTMCell(_CellBase, nn.LSTMCell):
    """Drop-in for :class:`torch.nn.LSTMCell` on fastrnn's kernels. Beyond torch.nn:
    ``recurrent_grad_clip=None`` (keyword) clamps the gradient flowing into ``hx``."""

    _torch_cell = nn.LSTMCell


class GRUCell(_CellBase, nn.GRUCell):
    """Drop-in for :class:`torch.nn.GRUCell` on fastrnn's kernels. Beyond torch.nn:
    ``recurrent_grad_clip=None`` (keyword) clamps the gradient flowing into ``hx``."""

    _torch_cell = nn.GRUCell


class _LayerNormCell(_LayerNormParams):
    """LayerNorm cells: one step of ``LayerNormLSTM`` / ``LayerNormGRU`` (one layer, one
    direction), with torch.nn's cell arguments and parameters plus ``ln_ih_weight``,
    ``ln_ih_bias``, ``ln_hh_weight``, ``ln_hh_bias`` ([G*H]) and, for the LSTM,
    ``ln_cell_weight``, ``ln_cell_bias`` ([H]), set to 1 and 0."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("recurrent_grad_clip"):
            raise ValueError(f"{type(self).__name__} does not take recurrent_grad_clip")
        super().__init__(*args, **kwargs)
        self._register_layer_norm(self.weight_hh)

    def _suffixes(self) -> list:
        return [""]

    def _layer_norm_params(self):
        return self._layer_norm_of("")


class LayerNormLSTMCell(_LayerNormCell, LSTMCell):
    """One step of :class:`LayerNormLSTM`: ``torch.nn.LSTMCell``'s arguments, inputs and outputs,
    plus the LayerNorm parameters (``_LayerNormCell``)."""

    _norms = ("ih", "hh", "cell")


class LayerNormGRUCell(_LayerNormCell, GRUCell):
    """One step of :class:`LayerNormGRU`: ``torch.nn.GRUCell``'s arguments, inputs and outputs,
    plus the LayerNorm parameters (``_LayerNormCell``)."""
