"""fastrnn/reference.py, the oracle of the op tests (tests/ops/test_recurrence.py) and a reader's
definition of the maths, against torch.nn in float64: outputs, final states and every gradient,
across cells, directions, stacking, proj_size, packed lengths and bias."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastrnn import _modes
from fastrnn.reference import rnn_reference

CELLS = {  # id -> (torch.nn class, constructor kwargs, mode)
    "rnn_tanh": ("RNN", {}, _modes.RNN_TANH),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}, _modes.RNN_RELU),
    "lstm": ("LSTM", {}, _modes.LSTM),
    "lstm_proj": ("LSTM", {"proj_size": 2}, _modes.LSTM),
    "gru": ("GRU", {}, _modes.GRU),
}
I, H, T, B = 3, 4, 5, 3
LENGTHS = [2, 5, 1]  # unsorted, longest not first


@pytest.mark.parametrize("cell,layers,bidirectional,packed,bias", list(itertools.product(
    CELLS, (1, 2), (False, True), (False, True), (True, False))))
def test_reference_matches_torch_nn_fp64(cell, layers, bidirectional, packed, bias):
    name, kwargs, mode = CELLS[cell]
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(I, H, num_layers=layers, bidirectional=bidirectional,
                                  bias=bias, **kwargs).double()
    D = 2 if bidirectional else 1
    P = kwargs.get("proj_size") or H
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    h0 = torch.randn(layers * D, B, P, generator=g, dtype=torch.float64)
    c0 = torch.randn(layers * D, B, H, generator=g, dtype=torch.float64)
    lengths = torch.tensor(LENGTHS) if packed else None
    is_lstm = name == "LSTM"

    def torch_nn(x, h0, c0):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, hidden = ref(inp, (h0, c0) if is_lstm else h0)
        if packed:
            out, _ = pad_packed_sequence(out, total_length=T)
        return (out,) + (hidden if is_lstm else (hidden,))

    def reference(x, h0, c0):
        params = dict(ref.named_parameters())
        y, hn, cn = rnn_reference(mode, x, params, layers, bidirectional,
                                  (h0, c0) if is_lstm else h0, lengths)
        if packed:  # positions past a sequence's end: zeros, as pad_packed_sequence gives
            valid = torch.arange(T)[:, None] < lengths[None, :]
            y = y * valid[..., None]
        return (y, hn) + ((cn,) if is_lstm else ())

    leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
    got = reference(*leaves)
    ups = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in got]
    grads_got = torch.autograd.grad(got, leaves + list(ref.parameters()), ups,
                                    allow_unused=True)
    leaves_want = [t.clone().requires_grad_() for t in (x, h0, c0)]
    want = torch_nn(*leaves_want)
    grads_want = torch.autograd.grad(want, leaves_want + list(ref.parameters()), ups,
                                     allow_unused=True)
    names = ["output", "h_n", "c_n"]
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=n)
    names = ["input", "h0", "c0"] + [n for n, _ in ref.named_parameters()]
    for n, a, b in zip(names, grads_got, grads_want):
        if b is None:
            assert a is None or not a.any(), n
            continue
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=n)
