"""fastrnn.RNNCell / LSTMCell / GRUCell against torch.nn's cells."""

import itertools

import pytest
import torch
from torch import nn

import fastrnn
from tests.parity import DEVICE, assert_close_to_truth, assert_parity, exact_twin, launches

I, H, B = 5, 7, 3
CELLS = {"rnn_tanh": ("RNNCell", {}), "rnn_relu": ("RNNCell", {"nonlinearity": "relu"}),
         "lstm": ("LSTMCell", {}), "gru": ("GRUCell", {})}


def _pair(cell, **kwargs):
    name, extra = CELLS[cell]
    torch.manual_seed(0)
    ref = getattr(nn, name)(I, H, **extra, **kwargs).to(DEVICE)
    torch.manual_seed(0)
    fast = getattr(fastrnn, name)(I, H, **extra, **kwargs).to(DEVICE)
    for a, b in zip(fast.parameters(), ref.parameters()):
        assert torch.equal(a, b)  # same init under the same seed
    return fast, ref


def _run(module, x, hx, steps=3):
    """A few steps of a cell loop (so gradients flow through h across steps), on the module's
    device and dtype."""
    p = next(module.parameters())
    leaves = [t.detach().to(p.device, p.dtype).requires_grad_() for t in [x, *hx]]
    xs, state = leaves[0], leaves[1:]
    is_lstm = isinstance(module, nn.LSTMCell)
    state = (tuple(state) if is_lstm else state[0]) if state else None
    outs = []
    for _ in range(steps):
        state = module(xs, state)
        outs.extend(state if is_lstm else [state])
    g = torch.Generator().manual_seed(9)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).to(o) for o in outs])
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    result.update({f"grad_leaf{i}": t.grad for i, t in enumerate(leaves)})
    result.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
    return result


@pytest.mark.parametrize("cell,bias,batched,with_hx", list(itertools.product(
    CELLS, (True, False), (True, False), (True, False))))
def test_cell_parity(cell, bias, batched, with_hx):
    fast, ref = _pair(cell, bias=bias)
    g = torch.Generator().manual_seed(1)
    shape = (B,) if batched else ()
    x = torch.randn(*shape, I, generator=g).to(DEVICE)
    n_states = (2 if cell == "lstm" else 1) if with_hx else 0
    hx = [torch.randn(*shape, H, generator=g).to(DEVICE) for _ in range(n_states)]
    assert_close_to_truth(_run(fast, x, hx), _run(ref, x, hx), _run(exact_twin(ref), x, hx))


@pytest.mark.parametrize("cell", list(CELLS))
def test_cell_batch_zero_and_fp64(cell):
    fast, ref = _pair(cell)
    x = torch.randn(0, I, device=DEVICE)
    assert_parity(_run(fast, x, []), _run(ref, x, []))
    fast.double()
    ref.double()
    x = torch.randn(B, I, dtype=torch.float64, device=DEVICE)
    got, want = _run(fast, x, []), _run(ref, x, [])
    assert_parity(got, want, atol=1e-12, rtol=1e-12)


def test_cells_run_kernels():
    for cell in CELLS:
        fast, _ = _pair(cell)
        before = launches()
        out = fast(torch.randn(B, I, device=DEVICE, requires_grad=True))
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        assert launches() >= before + 2


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _hx(cell, *shape, h=H, dtype=torch.float32):
    t = [_x(*shape, h, dtype=dtype) for _ in range(2 if cell == "lstm" else 1)]
    return tuple(t) if cell == "lstm" else t[0]


BAD = {  # on the cells' device, so each case fails for its own reason only
    "3d-input": lambda c: (_x(2, B, I), None),
    "wrong-input-size": lambda c: (_x(B, I + 1), None),
    "wrong-input-size-1d": lambda c: (_x(I + 1), None),
    "hx-batch": lambda c: (_x(B, I), _hx(c, B - 1)),
    "hx-size": lambda c: (_x(B, I), _hx(c, B, h=H - 1)),
    "hx-3d": lambda c: (_x(B, I), _hx(c, 1, B)),
    "hx-1d-for-2d-input": lambda c: (_x(B, I), _hx(c)),
    "hx-2d-for-1d-input": lambda c: (_x(I), _hx(c, 1)),
    "input-dtype": lambda c: (_x(B, I, dtype=torch.float64), None),
    "int-input": lambda c: (torch.randint(0, 2, (B, I), device=DEVICE), None),
    "hx-dtype": lambda c: (_x(B, I), _hx(c, B, dtype=torch.float64)),
}


@pytest.mark.parametrize("cell,case", list(itertools.product(CELLS, BAD)))
def test_cell_bad_input_raises_like_torch(cell, case):
    fast, ref = _pair(cell)
    inp, hx = BAD[case](cell)
    with pytest.raises(Exception) as want:
        ref(inp, hx)
    before = [p.detach().clone() for p in fast.parameters()]
    with pytest.raises(want.type) as got:
        fast(inp, hx)
    assert str(got.value) == str(want.value)
    assert all(torch.equal(a, b) for a, b in zip(before, fast.parameters()))


def test_rnn_cell_unknown_nonlinearity_raises_at_forward_like_torch():
    ref = nn.RNNCell(I, H, nonlinearity="gelu").to(DEVICE)
    fast = fastrnn.RNNCell(I, H, nonlinearity="gelu").to(DEVICE)
    x = _x(B, I)
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        fast(x)
    assert str(got.value) == str(want.value)
    assert repr(fast) == repr(ref)


EMPTY = [  # (input_size, hidden_size, batch): each zero-sized dimension a cell accepts
    (I, 0, B), (0, H, B), (I, H, 0), (0, 0, 0),
]


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("I_,H_,B_", EMPTY, ids=[f"I{i}-H{h}-B{b}" for i, h, b in EMPTY])
def test_empty_cells_match_torch_and_launch_nothing(cell, I_, H_, B_):
    """Zero-sized hidden size, input size or batch (PyTorch's own
    test_RNN_cell_forward_zero_hidden_size): torch.nn's outputs and gradients, with hx given or
    not, and no kernel launched where there is nothing to compute."""
    name, extra = CELLS[cell]
    torch.manual_seed(0)
    ref = getattr(nn, name)(I_, H_, **extra).to(DEVICE)
    fast = getattr(fastrnn, name)(I_, H_, **extra).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    for with_hx in (False, True):
        results = []
        x0, h0, c0 = (torch.randn(B_, n, device=DEVICE) for n in (I_, H_, H_))
        for m in (fast, ref):
            x = x0.clone().requires_grad_()
            hx = None
            if with_hx:
                h = h0.clone().requires_grad_()
                hx = (h, c0) if name == "LSTMCell" else h
            before = launches()
            out = m(x, hx)
            outs = out if isinstance(out, tuple) else (out,)
            (sum(o.sum() for o in outs) + x.sum()).backward()
            if m is fast and (H_ == 0 or B_ == 0):
                assert launches() == before, "an empty problem reached a kernel"
            results.append([o.detach() for o in outs] + [x.grad] +
                           [p.grad for p in m.parameters()])
        for got, want in zip(*results):
            assert (got is None) == (want is None)
            if want is not None:
                assert got.shape == want.shape and got.dtype == want.dtype
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_empty_layers_raise_or_match_like_torch(name):
    """Layers: a zero hidden or input size and an empty sequence raise torch.nn's errors; an
    empty batch gives torch.nn's empty results (tests/test_parity.py::test_batch_zero)."""
    for args, err in [((4, 0), (ValueError, "hidden_size must be greater than zero")),
                      ((0, 4), (ValueError, "input_size must be greater than zero"))]:
        for module in (nn, fastrnn):
            with pytest.raises(err[0], match=err[1]):
                getattr(module, name)(*args)
    fast, ref = getattr(fastrnn, name)(4, 4), getattr(nn, name)(4, 4)
    for x in (torch.randn(0, 3, 4), torch.randn(0, 4)):
        for m in (ref, fast):
            with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
                m(x.to(DEVICE) if m is fast else x)
