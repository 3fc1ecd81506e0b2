"""Parity with torch.nn at the module level: forward outputs and every gradient, shared weights.

The module layer decides layouts and stacking; the kernel strategies are checked at the op level,
in float64 (tests/ops/test_recurrence.py: strategy x cell x directions x proj_size x lengths). So
the layout axes here run once, on the strategy fastrnn picks: every input kind x batch_first x hx
for each cell on a two-layer bidirectional stack, then layers x directions x bias. Tolerances come
from torch.nn's own error against a float64 run (tests/parity.py).
"""

import itertools
import math

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from tests.parity import (DEVICE, KINDS, STRATEGIES, assert_close_to_truth,
                          assert_forward_matches_torch, assert_matches_torch, assert_parity,
                          exact_twin, make_inputs, make_pair, refusing_torch_rnn, run,
                          strategy_runs, through_kernels)

I, H, P, T, B = 5, 7, 3, 4, 3

CELLS = {  # id -> (torch.nn class name, extra constructor kwargs)
    "rnn_tanh": ("RNN", {}),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
    "lstm": ("LSTM", {}),
    "lstm_proj": ("LSTM", {"proj_size": P}),
    "gru": ("GRU", {}),
}
# Every strategy with every cell.
STRATEGY_CELLS = [(s, c) for s in STRATEGIES for c in CELLS]


def _module_kwargs(cell, **kwargs):
    name, extra = CELLS[cell]
    return name, {**kwargs, **extra}


@pytest.mark.parametrize("cell,kind,batch_first,hx", list(itertools.product(
    CELLS, KINDS, (False, True), (False, True))),
    ids=lambda v: {True: "T", False: "F"}.get(v, v) if isinstance(v, bool) else v)
def test_layouts(cell, kind, batch_first, hx):
    name, kwargs = _module_kwargs(cell, num_layers=2, bidirectional=True,
                                  batch_first=batch_first)
    fast, ref = make_pair(name, I, H, **kwargs)
    build, leaves = make_inputs(ref, kind, T, B, hx)
    assert_matches_torch(fast, ref, build, leaves)


@pytest.mark.parametrize("cell,layers,bidirectional,bias", list(itertools.product(
    CELLS, (1, 3), (False, True), (True, False))),
    ids=lambda v: {True: "T", False: "F"}.get(v, v) if isinstance(v, bool) else str(v))
def test_structure(cell, layers, bidirectional, bias):
    name, kwargs = _module_kwargs(cell, num_layers=layers, bidirectional=bidirectional, bias=bias)
    fast, ref = make_pair(name, I, H, **kwargs)
    build, leaves = make_inputs(ref, "packed_unsorted", T, B, with_hx=True)
    assert_matches_torch(fast, ref, build, leaves)


# Awkward sizes: hidden 1, 7, 33; a single step; batch tiles and hidden tiles beyond one block
# (stepwise tiles are at most 64 wide, the persistent batch tile is 16 rows).
AWKWARD = [
    # cell, input, hidden, proj, T, B, strategy
    ("lstm", 3, 1, 0, 3, 2, "persistent"),
    ("gru", 3, 1, 0, 3, 2, "stepwise"),
    ("rnn_tanh", 2, 1, 0, 1, 1, "persistent"),
    ("lstm", 4, 33, 0, 1, 3, "persistent"),
    ("gru", 4, 33, 0, 2, 3, "stepwise"),
    ("rnn_relu", 4, 33, 0, 3, 2, "stepwise"),
    ("lstm", 4, 33, 17, 2, 2, "stepwise"),
    ("lstm", 6, 70, 0, 2, 17, "stepwise"),
    ("gru", 6, 70, 0, 2, 3, "stepwise"),
    ("lstm", 5, 70, 66, 2, 3, "stepwise"),
    ("rnn_tanh", 3, 9, 0, 3, 17, "persistent"),
    ("gru", 3, 9, 0, 3, 33, "persistent"),
]


@pytest.mark.parametrize("cell,I_,H_,P_,T_,B_,strategy", AWKWARD,
                         ids=[f"{c}-I{i}-H{h}-P{p}-T{t}-B{b}-{s}" for c, i, h, p, t, b, s in AWKWARD])
@pytest.mark.parametrize("bidir", [False, True], ids=["uni", "bi"])
def test_parity_awkward_sizes(cell, I_, H_, P_, T_, B_, strategy, bidir):
    name, kwargs = _module_kwargs(cell, bidirectional=bidir)
    if P_:
        kwargs["proj_size"] = P_
    fast, ref = make_pair(name, I_, H_, **kwargs)
    kind = "packed_unsorted" if B_ > 1 else "padded"
    build, leaves = make_inputs(ref, kind, T_, B_, with_hx=True)
    assert_matches_torch(fast, ref, build, leaves, strategy=strategy)


@pytest.mark.parametrize("cell", list(CELLS))
def test_pack_sequence_input(cell):
    name, kwargs = _module_kwargs(cell, num_layers=2, bidirectional=True)
    fast, ref = make_pair(name, I, H, **kwargs)
    seqs = [torch.randn(n, I, generator=torch.Generator().manual_seed(n)) for n in (2, 5, 1, 5)]

    def build(leaves):
        return pack_sequence(leaves, enforce_sorted=False), None

    assert_matches_torch(fast, ref, build, seqs)


@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_matches_torch_under_same_seed(cell):
    # On CPU torch.nn draws its inter-layer dropout masks with the same generator calls for
    # padded input (for packed input it draws them over the packed rows only).
    if DEVICE != "cpu":
        pytest.skip("cuDNN draws dropout masks with its own generator")
    name, kwargs = _module_kwargs(cell, num_layers=3, dropout=0.5, bidirectional=True)
    fast, ref = make_pair(name, I, H, **kwargs)
    build, leaves = make_inputs(ref, "padded", T, B, with_hx=True)
    torch.manual_seed(7)
    with through_kernels(backward=True):
        got = run(fast, build, leaves)
    torch.manual_seed(7)
    assert_parity(got, run(ref, build, leaves))


@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_reproducible_and_off_in_eval(cell):
    name, kwargs = _module_kwargs(cell, num_layers=2, dropout=0.5)
    fast, _ = make_pair(name, I, H, **kwargs)
    x = torch.randn(T, B, I, device=DEVICE)
    torch.manual_seed(3)
    a = fast(x)[0]
    torch.manual_seed(3)
    b = fast(x)[0]
    c = fast(x)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    fast.eval()
    assert torch.equal(fast(x)[0], fast(x)[0])


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_batch_zero(cell, batch_first):
    name, kwargs = _module_kwargs(cell, num_layers=2, bidirectional=True, batch_first=batch_first)
    fast, ref = make_pair(name, I, H, **kwargs)
    build, leaves = make_inputs(ref, "padded", T, 0, with_hx=True)
    assert_parity(run(fast, build, leaves), run(ref, build, leaves))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("strategy,cell", STRATEGY_CELLS)
def test_nan_propagates_like_torch(cell, strategy):
    name, kwargs = _module_kwargs(cell, num_layers=2)
    fast, ref = make_pair(name, I, H, **kwargs)
    x = torch.randn(T, B, I)
    x[1, 0, 2] = math.nan
    x[2, 2, 0] = math.inf
    assert_forward_matches_torch(fast, ref, x, strategy=strategy)


@pytest.mark.parametrize("cell", list(CELLS))
def test_eval_mode_and_no_grad(cell):
    name, kwargs = _module_kwargs(cell, num_layers=2, bidirectional=True, dropout=0.3)
    fast, ref = make_pair(name, I, H, **kwargs)
    fast.eval()
    ref.eval()
    assert_forward_matches_torch(fast, ref, torch.randn(T, B, I))


@pytest.mark.parametrize("strategy,cell", STRATEGY_CELLS)
def test_fp16_error_within_2x_of_torch(cell, strategy):
    """fp16 through the kernels: error against an fp64 reference within 2x of torch.nn's own
    fp16 error (plus a small floor for outputs torch happens to get nearly exact)."""
    name, kwargs = _module_kwargs(cell, num_layers=2, bidirectional=True)
    fast, ref = make_pair(name, I, 16, **kwargs)
    fast.half()
    ref.half()
    truth_module = exact_twin(ref)  # float64 with the same (fp16-rounded) weights
    build, leaves = make_inputs(ref, "packed_unsorted", 6, B, with_hx=True, dtype=torch.float16)
    with strategy_runs(strategy, backward=True):
        got = run(fast, build, leaves)
    assert_close_to_truth(got, run(ref, build, leaves), run(truth_module, build, leaves), ulps=2)


def test_kernels_ran_not_torch():
    """The Triton path launches fastrnn's kernels, forward and backward, and never calls torch's
    fused RNN ops."""
    for cell in CELLS:
        name, kwargs = _module_kwargs(cell, num_layers=2, bidirectional=True)
        fast = getattr(fastrnn, name)(I, H, **kwargs).to(DEVICE)
        with through_kernels(backward=True):
            out, _ = fast(torch.randn(T, B, I, device=DEVICE, requires_grad=True))
            out.sum().backward()
        assert all(p.grad is not None for p in fast.parameters())


def test_torch_rnn_ops_are_refused_inside_the_checks():
    """The checks above can fail: torch.nn's own layer inside them raises, and no launch fails
    the launch check."""
    ref = torch.nn.LSTM(I, H)
    with pytest.raises(AssertionError, match="torch's RNN op 'lstm'"):
        with refusing_torch_rnn():
            ref(torch.randn(T, B, I))
    ref(torch.randn(T, B, I))  # restored afterwards
    with pytest.raises(AssertionError, match="no fastrnn forward kernel launched"):
        with through_kernels(backward=False):
            pass
