"""The module contract: constructor, parameters, init, repr, state_dict, class hierarchy."""

import warnings

import pytest
import torch
from torch import nn

import fastrnn
from tests.parity import through_kernels

CONFIGS = [
    ("RNN", (5, 7), {}),
    ("RNN", (5, 7, 2, "relu"), {}),
    ("RNN", (5, 7), dict(num_layers=3, nonlinearity="relu", bias=False, batch_first=True,
                         dropout=0.25, bidirectional=True)),
    ("LSTM", (5, 7), {}),
    ("LSTM", (5, 7), dict(num_layers=2, proj_size=3, bidirectional=True, dropout=0.1)),
    ("LSTM", (5, 7, 2, False, True), {}),
    ("GRU", (5, 7), dict(num_layers=2, bias=False, bidirectional=True)),
    ("GRU", (5, 7), dict(dtype=torch.float64)),
]
IDS = [f"{c}-{i}" for i, (c, _, _) in enumerate(CONFIGS)]


def _pair(name, args, kwargs, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref = getattr(nn, name)(*args, **kwargs)
        torch.manual_seed(seed)
        fast = getattr(fastrnn, name)(*args, **kwargs)
    return fast, ref


@pytest.mark.parametrize("name,args,kwargs", CONFIGS, ids=IDS)
def test_same_parameters_init_and_repr(name, args, kwargs):
    fast, ref = _pair(name, args, kwargs)
    assert isinstance(fast, nn.RNNBase)
    assert not isinstance(fast, (nn.RNN, nn.LSTM, nn.GRU))  # so torch.compile traces it
    assert repr(fast) == repr(ref)
    assert fast._flat_weights_names == ref._flat_weights_names
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert a.shape == b.shape and a.dtype == b.dtype, n
        assert torch.equal(a, b), f"{n}: same seed, same init"
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size"):
        assert getattr(fast, attr) == getattr(ref, attr), attr
    if name == "RNN":
        assert fast.nonlinearity == ref.nonlinearity
    assert [[p.shape for p in w] for w in fast.all_weights] == \
        [[p.shape for p in w] for w in ref.all_weights]


@pytest.mark.parametrize("name,args,kwargs", CONFIGS, ids=IDS)
def test_state_dict_loads_both_ways(name, args, kwargs):
    fast, ref = _pair(name, args, kwargs, seed=1)
    other_fast, other_ref = _pair(name, args, kwargs, seed=2)
    assert other_fast.load_state_dict(ref.state_dict(), strict=True).missing_keys == []
    assert other_ref.load_state_dict(fast.state_dict(), strict=True).missing_keys == []
    for a, b in zip(other_fast.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(other_ref.parameters(), fast.parameters()):
        assert torch.equal(a, b)
    assert list(fast.state_dict()) == list(ref.state_dict())


def test_flatten_parameters_is_harmless():
    fast, _ = _pair("LSTM", (5, 7), dict(num_layers=2))
    before = [p.clone() for p in fast.parameters()]
    ptrs = [p.data_ptr() for p in fast.parameters()]
    fast.flatten_parameters()
    assert [p.data_ptr() for p in fast.parameters()] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(before, fast.parameters()))


def test_double_runs_through_kernels():
    fast, ref = _pair("LSTM", (3, 4), dict(num_layers=2, bidirectional=True))
    fast.double()
    ref.double()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    with through_kernels(backward=False):
        got, (h, c) = fast(x)
    want, (hr, cr) = ref(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(c, cr, atol=1e-12, rtol=1e-12)


def test_module_gradcheck_fp64_packed():
    """fp64 gradcheck of a whole module (input and both states) through the kernels."""
    from torch.nn.utils.rnn import pack_padded_sequence

    fast, _ = _pair("LSTM", (2, 2), dict(bidirectional=True, proj_size=1))
    fast.double()

    def f(x, h0, c0):
        packed = pack_padded_sequence(x, torch.tensor([3, 1]), enforce_sorted=False)
        out, (h, c) = fast(packed, (h0, c0))
        return out.data, h, c

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 2, 2, generator=g, dtype=torch.float64),
              torch.randn(2, 2, 1, generator=g, dtype=torch.float64),
              torch.randn(2, 2, 2, generator=g, dtype=torch.float64)]
    with through_kernels(backward=True):
        assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in inputs], eps=1e-6,
                                        atol=1e-7, fast_mode=True)


BAD_CONSTRUCTORS = [
    ("LSTM", (4, 8), dict(dropout=-1)),
    ("LSTM", (4, 8), dict(dropout=1.5)),
    ("LSTM", (4, 8), dict(dropout=True)),
    ("GRU", (0, 8), {}),
    ("GRU", (2.0, 8), {}),
    ("GRU", (2, 0), {}),
    ("GRU", ("2", 8), {}),
    ("GRU", (2, 8, 0), {}),
    ("GRU", (2, 8, 1.5), {}),
    ("LSTM", (2, 8), dict(proj_size=8)),
    ("LSTM", (2, 8), dict(proj_size=-1)),
    ("GRU", (2, 8), dict(proj_size=2)),
    ("RNN", (2, 8), dict(proj_size=2)),
    ("RNN", (2, 8), dict(nonlinearity="gelu")),
    ("RNN", (2, 8, 1, "sigmoid"), {}),
    ("RNN", (2, 8), dict(bias="no")),
    ("RNN", (2, 8), dict(batch_first=1)),
    ("LSTM", (2, 8), dict(foo=1)),
]


@pytest.mark.parametrize("name,args,kwargs", BAD_CONSTRUCTORS,
                         ids=[f"{n}-{a}-{k}" for n, a, k in BAD_CONSTRUCTORS])
def test_bad_constructor_arguments_raise_like_torch(name, args, kwargs):
    with pytest.raises(Exception) as want:
        getattr(nn, name)(*args, **kwargs)
    with pytest.raises(want.type) as got:
        getattr(fastrnn, name)(*args, **kwargs)
    assert str(got.value) == str(want.value)


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning) as want:
        nn.GRU(2, 4, dropout=0.5)
    with pytest.warns(UserWarning) as got:
        fastrnn.GRU(2, 4, dropout=0.5)
    assert [str(w.message) for w in got] == [str(w.message) for w in want]
