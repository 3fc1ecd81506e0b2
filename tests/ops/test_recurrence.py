"""The recurrence op against the plain-PyTorch reference, in float64.

These pin the op's own contract (carried states at padded positions, final states, every input's
gradient) independently of the module layer, for every kernel strategy x cell x directions x
proj_size x lengths x bias, and run torch.autograd.gradcheck through the kernels. The module
tests (tests/test_parity.py) cover layouts and stacking on the automatically chosen strategy.
"""

import itertools

import pytest
import torch

from fastrnn import _modes
from fastrnn.ops.recurrence import recurrence
from fastrnn.ops.dispatch import force_strategy
from fastrnn.reference import recurrence_reference
from tests.parity import DEVICE, launches, strategy_runs

MODES = {"rnn_tanh": _modes.RNN_TANH, "rnn_relu": _modes.RNN_RELU, "lstm": _modes.LSTM,
         "gru": _modes.GRU}


I = 3


def _inputs(mode, T, B, H, D, proj, lengths, bias=True, seed=0):
    """(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths) in float64."""
    g = torch.Generator().manual_seed(seed)
    G = _modes.NUM_GATES[mode]
    P = proj or H

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.7).to(DEVICE)

    x = rnd(T, B, I)
    w_ih = rnd(D * G * H, I)
    b_x = rnd(D * G * H) if bias else None
    h0 = rnd(D, B, P)
    c0 = rnd(D, B, H) if mode == _modes.LSTM else None
    w_hh = rnd(D, G * H, P)
    b_hn = rnd(D, H) if mode == _modes.GRU and bias else None
    w_hr = rnd(D, P, H) if proj else None
    lens = torch.tensor(lengths, dtype=torch.int64) if lengths else None
    return x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lens


def _op(mode, batch_first, strategy=""):
    def f(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths):
        y, hn, cn, _, _ = recurrence(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr,
                                     None if lengths is None else lengths.to(x.device), mode,
                                     batch_first, torch.is_grad_enabled(), strategy)
        return y, hn, (cn if mode == _modes.LSTM else None)
    return f


def _reference(mode, x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths):
    xg = torch.nn.functional.linear(x, w_ih, b_x)
    return recurrence_reference(mode, xg, h0, c0, w_hh, b_hn, w_hr, lengths)


def _assert_op_matches_reference(mode, strategy, args):
    """The op with ``strategy`` against the reference in float64: every output, then every
    input's gradient under random upstream gradients on every output."""
    def leaves():
        return [a.clone().requires_grad_(a.is_floating_point()) if a is not None else None
                for a in args]

    got_leaves, ref_leaves = leaves(), leaves()
    got = _op(mode, False, strategy)(*got_leaves)
    want = _reference(mode, *ref_leaves)
    for g_, w_ in zip(got, want):
        if w_ is not None:
            torch.testing.assert_close(g_, w_, atol=1e-12, rtol=1e-12)
    gen = torch.Generator().manual_seed(5)
    ups = [torch.randn(w_.shape, generator=gen, dtype=w_.dtype).to(DEVICE)
           for w_ in want if w_ is not None]
    torch.autograd.backward([t for t in got if t is not None], ups)
    torch.autograd.backward([t for t in want if t is not None], ups)
    for name, a, b in zip(["x", "w_ih", "b_x", "h0", "c0", "w_hh", "b_hn", "w_hr"], got_leaves,
                          ref_leaves):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12, msg=name)


CASES = [c for c in itertools.product(MODES, (1, 2), (0, 2), ([], [5, 3, 3, 1]), (True, False),
                                     ("persistent", "stepwise", "cooperative"))
         if not (c[2] and c[0] != "lstm")]


@pytest.mark.parametrize("mode,D,proj,lengths,bias,strategy", CASES,
                         ids=lambda v: str(v) if not isinstance(v, list) else (
                             "packed" if v else "padded"))
def test_op_matches_reference_fp64(mode, D, proj, lengths, bias, strategy):
    with strategy_runs(strategy, backward=True):
        m = MODES[mode]
        T, B, H = 5, 4, 3
        args = _inputs(m, T, B, H, D, proj, lengths, bias=bias)
        _assert_op_matches_reference(m, strategy, args)


@pytest.mark.parametrize("strategy", ["persistent", "stepwise", "cooperative"])
def test_op_batch_first_layout(strategy):
    """batch_first: the op reads x and writes y through batch-major strides."""
    with strategy_runs(strategy, backward=False):
        m = _modes.GRU
        x, w_ih, b_x, h0, _, w_hh, b_hn, _, _ = _inputs(m, 4, 3, 5, 2, 0, [])
        x_bf = x.transpose(0, 1).contiguous().transpose(0, 1)
        y, hn, _ = _op(m, True, strategy)(x_bf, w_ih, b_x, h0, None, w_hh, b_hn, None, None)
        assert y.transpose(0, 1).is_contiguous()
        want, want_hn, _ = _reference(m, x, w_ih, b_x, h0, None, w_hh, b_hn, None, None)
        torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(hn, want_hn, atol=1e-12, rtol=1e-12)


GRADCHECK = [
    ("lstm", 2, 2, [3, 2], "persistent"),
    ("lstm", 1, 0, [], "stepwise"),
    ("gru", 2, 0, [3, 1], "stepwise"),
    ("gru", 1, 0, [], "persistent"),
    ("rnn_tanh", 2, 0, [3, 3], "persistent"),
    ("rnn_relu", 1, 0, [], "stepwise"),
    ("lstm", 2, 0, [3, 2], "cooperative"),
    ("gru", 2, 0, [3, 1], "cooperative"),
    ("lstm", 2, 1, [3, 2], "cooperative"),
]


@pytest.mark.parametrize("mode,D,proj,lengths,strategy", GRADCHECK,
                         ids=[f"{c[0]}-D{c[1]}-proj{c[2]}-{'packed' if c[3] else 'padded'}-{c[4]}"
                              for c in GRADCHECK])
def test_gradcheck_through_kernels(mode, D, proj, lengths, strategy):
    with strategy_runs(strategy, backward=True):
        m = MODES[mode]
        T, B, H = 3, 2, 2
        args = _inputs(m, T, B, H, D, proj, lengths, seed=3)
        if m == _modes.RNN_RELU:  # keep pre-activations away from relu's kink
            x, w_ih, b_x, h0, c0, w_hh = args[:6]
            args = (x.abs(), w_ih.abs(), b_x.abs() + 0.2, h0.abs(), c0, w_hh.abs()) + args[6:]
        lens = args[-1]
        floats = [a for a in args[:-1] if a is not None]
        present = [a is not None for a in args[:-1]]

        def f(*xs):
            it = iter(xs)
            full = [next(it) if p else None for p in present]
            return tuple(t for t in _op(m, False, strategy)(*full, lens) if t is not None)

        assert torch.autograd.gradcheck(f, [a.clone().requires_grad_() for a in floats],
                                        eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def _count(strategy, direction):
    return launches(direction, strategy)


@pytest.mark.parametrize("where", ["outside the block", "another thread"])
def test_backward_runs_the_strategy_the_forward_ran(where):
    """The strategy is recorded when the forward runs: a backward run after the
    ``force_strategy`` block, or on another thread (as autograd's device threads do), still runs
    it, and launches as that strategy does (stepwise: twice per step plus one)."""
    import threading

    import fastrnn

    torch.manual_seed(0)
    lstm = fastrnn.LSTM(3, 4).to(DEVICE)   # small: persistent when nothing is forced
    x = torch.randn(6, 2, 3, device=DEVICE, requires_grad=True)
    assert fastrnn.select_strategy(_modes.LSTM, 4, 4, 2, torch.float32, x.device) == "persistent"
    with force_strategy("stepwise"):
        out, _ = lstm(x)
    before = {s: _count(s, "bwd") for s in ("persistent", "stepwise")}
    if where == "another thread":
        worker = threading.Thread(target=lambda: out.sum().backward())
        worker.start()
        worker.join()
    else:
        out.sum().backward()
    assert x.grad is not None
    assert _count("stepwise", "bwd") - before["stepwise"] == 2 * 6 + 1
    assert _count("persistent", "bwd") == before["persistent"]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("D,slice_units,tiles,pads", [(1, 16, 1, True), (2, 16, 4, False),
                                                      (2, 8, 2, False), (2, 64, 4, True)])
def test_cooperative_with_many_programs_per_group(mode, D, slice_units, tiles, pads, monkeypatch,
                                                  request):
    """The cooperative kernels with several programs per group (3 or 4 slices of 16 units, or 5
    of 8 as for fp32 at H=1024 on an H100; the last slice partly past H), two batch chunks and
    packed lengths, in float64. Under the interpreter they run one step per launch, the kernel
    boundary standing in for the grid barrier: the same per-step code as on a GPU. With one
    program per group (64 units) the whole sequence is one launch, with the prefetch across
    steps. The slice is held in 1, 2 or 4 column tiles (the last one partly past H): the
    forward's product accumulates over them, the backward forms its partial products per tile.
    GRU's slice padded to four gates (one product), or not (r and z rows, then n's)."""
    with strategy_runs("cooperative", backward=True):
        from fastrnn.ops import cooperative, dispatch, select

        # Under the interpreter the slice is INTERPRETER_SLICE; on a GPU, the one slice offered.
        monkeypatch.setattr(cooperative, "INTERPRETER_SLICE", slice_units)
        monkeypatch.setattr(cooperative, "_SLICES", (slice_units,))
        monkeypatch.setattr(cooperative, "INTERPRETER_COLUMN_TILES", tiles)
        monkeypatch.setattr(cooperative, "INTERPRETER_PADS_GRU", pads)
        dispatch.plan.cache_clear()  # plans are cached: none made with this slice may outlive it
        request.addfinalizer(dispatch.plan.cache_clear)
        m = MODES[mode]
        T, B, H = 4, 20, (56 if tiles == 4 else 40)
        lengths = [4] + [1 + (7 * b) % 4 for b in range(1, B)]
        lengths.sort(reverse=True)
        args = _inputs(m, T, B, H, D, 0, lengths, seed=7)
        problem = select.Problem(m, B, H, H, D, torch.float64)
        the_plan = dispatch.plan(problem, select.describe(torch.device(DEVICE)), "cooperative")
        assert the_plan.grid[0] == -(-H // slice_units)
        G = _modes.NUM_GATES[m]
        for cfg in the_plan.kernels:
            assert (cfg.gates, cfg.column_tiles) == (4 if G == 3 and pads else G, tiles)
        _assert_op_matches_reference(m, "cooperative", args)


@pytest.mark.parametrize("D,slice_units,tiles,H,P", [(1, 16, 1, 40, 20), (2, 8, 2, 40, 20),
                                                     (2, 16, 4, 56, 40), (1, 64, 1, 40, 20)])
def test_cooperative_projection_with_many_programs(D, slice_units, tiles, H, P, monkeypatch,
                                                   request):
    """LSTM with proj_size in the cooperative kernels (ops/cooperative_proj.py) with 3, 5 or 4
    programs per group (the last slice partly past H, the last owner of state rows partly past
    P, a program that owns no state rows), or one (the whole sequence in one launch); two batch
    chunks and packed lengths, float64. Under the interpreter each of a step's two phases is
    its own launch (the kernel boundary stands in for each barrier): 2 per step forward, 2 per
    step plus 2 backward, counted. The slice in 1, 2 or 4 column tiles; W_hr's rows and
    columns streamed 16 at a time."""
    from fastrnn.ops import cooperative, cooperative_proj, dispatch, select

    monkeypatch.setattr(cooperative, "INTERPRETER_SLICE", slice_units)
    monkeypatch.setattr(cooperative, "INTERPRETER_COLUMN_TILES", tiles)
    # W_hr's products stream 16 columns at a time: several iterations, the last one partial.
    monkeypatch.setattr(cooperative_proj, "DR_K", 16)
    dispatch.plan.cache_clear()
    request.addfinalizer(dispatch.plan.cache_clear)
    m = _modes.LSTM
    T, B = 3, 20
    lengths = sorted([3] + [1 + (7 * b) % 3 for b in range(1, B)], reverse=True)
    x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lens = _inputs(m, T, B, H, D, P, lengths, seed=7)
    # Smaller weights than _inputs' (sums of 40-56 terms): pre-activations out of saturation.
    args = (x, w_ih, b_x, h0, c0, w_hh * 0.4, b_hn, w_hr * 0.3, lens)
    problem = select.Problem(m, B, H, P, D, torch.float64)
    the_plan = dispatch.plan(problem, select.describe(torch.device(DEVICE)), "cooperative")
    nj = -(-H // slice_units)
    assert the_plan.grid[0] == nj
    assert [c.kernel for c in the_plan.kernels] == ["_lstmp_fwd_coop_kernel",
                                                    "_lstmp_bwd_coop_kernel"]
    assert [c.column_tiles for c in the_plan.kernels] == [min(tiles, select.block(P) // 16)] * 2
    fwd, bwd = launches("fwd", "cooperative"), launches("bwd", "cooperative")
    with strategy_runs("cooperative", backward=True):
        _assert_op_matches_reference(m, "cooperative", args)
    want = (2 * T, 2 * T + 2) if nj > 1 else (1, 1)
    assert (launches("fwd", "cooperative") - fwd, launches("bwd", "cooperative") - bwd) == want


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "LSTMP"])
def test_cooperative_half_precision_partials_cost_no_accuracy(cell, monkeypatch, request):
    """The cooperative backward exchanges each program's partial products in the layer's dtype
    (fp16 here: each a sum of 64 products in fp32, rounded once), summed in fp32. Its gradients'
    error against float64, with 4 programs per group, stays within 1.5x of the stepwise
    strategy's, which rounds nothing between the product and the sum."""
    import copy

    import fastrnn
    from fastrnn.ops import cooperative, dispatch

    monkeypatch.setattr(cooperative, "INTERPRETER_SLICE", 16)
    dispatch.plan.cache_clear()
    request.addfinalizer(dispatch.plan.cache_clear)
    torch.manual_seed(0)
    m = fastrnn.LSTM(32, 64, proj_size=24) if cell == "LSTMP" else getattr(fastrnn, cell)(32, 64)
    x = torch.randn(8, 4, 32)
    out = 24 if cell == "LSTMP" else 64
    weights = torch.linspace(-1, 1, 8 * 4 * out).view(8, 4, out)

    def grads(dtype, strategy):
        mm = copy.deepcopy(m).to(dtype)
        xx = x.to(dtype).requires_grad_()
        with force_strategy(strategy):
            y, _ = mm(xx)
            (y.double() * weights).sum().backward()
        return torch.cat([xx.grad.double().flatten(), mm.weight_hh_l0.grad.double().flatten()])

    truth = grads(torch.float64, "stepwise")
    err = {s: ((grads(torch.float16, s) - truth).norm() / truth.norm()).item()
           for s in ("stepwise", "cooperative")}
    assert err["cooperative"] < 1.5 * err["stepwise"], err
