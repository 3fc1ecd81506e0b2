"""Beyond torch.nn, part 2 (so far): ``weight_dropout`` (DropConnect on W_hh),
``recurrent_dropout`` (variational dropout on the state entering the recurrent product) and
``zoneout``.

The oracle is ``fastrnn.reference`` with the masks shared: a layer draws them from torch's
generator before its layers run (``fastrnn.reference.dropout_masks``, then
``zoneout_masks``), so the same seed gives the reference the same masks. Every option runs under
every strategy (forced, counted, torch's RNN ops refused), for every cell, stacked and
bidirectional, padded and packed, in float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn import _modes
from fastrnn.ops.recurrence import recurrence
from fastrnn.reference import dropout_masks, rnn_reference, zoneout_masks
from tests.parity import DEVICE, STRATEGIES, launches, make_pair, strategy_runs

DT = torch.float64
CELLS = {"rnn_tanh": ("RNN", {}), "lstm": ("LSTM", {}), "lstm_proj": ("LSTM", {"proj_size": 3}),
         "gru": ("GRU", {})}


def _module(cell, pw=0.3, pr=0.4, bidirectional=True, num_layers=2, H=5, seed=0, zoneout=0.0):
    name, kwargs = CELLS[cell]
    torch.manual_seed(seed)
    return getattr(fastrnn, name)(3, H, num_layers=num_layers, bidirectional=bidirectional,
                                  weight_dropout=pw, recurrent_dropout=pr, zoneout=zoneout,
                                  **kwargs).to(DEVICE, DT)


def _masks(m, T, B, seed):
    """The masks the layer draws under ``seed``: (dropout masks, zoneout) in its order."""
    torch.manual_seed(seed)
    G = _modes.NUM_GATES[_modes.MODE_IDS[m.mode]]
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    masks = dropout_masks(m.weight_dropout, m.recurrent_dropout, m.num_layers, D, G,
                          m.hidden_size, P, B, m.weight_hh_l0) if m.training else None
    z = m.zoneout if isinstance(m.zoneout, tuple) else (
        m.zoneout, m.zoneout if m.mode == "LSTM" else 0.0)
    zone = zoneout_masks(*z, m.num_layers, T, B, D, m.hidden_size, P, m.training,
                         m.weight_hh_l0, m.mode == "LSTM")
    return masks, zone


def _assert_matches_reference(m, packed=False, T=5, B=4, seed=11, training=True):
    """The masks of seed ``seed`` (training; eval: none, zoneout's expectation): output, final
    states and the gradient of the input, initial states and every parameter, against the
    reference."""
    g = torch.Generator().manual_seed(1)
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    x = torch.randn(T, B, 3, generator=g, dtype=DT).to(DEVICE).requires_grad_()
    h0 = torch.randn(m.num_layers * D, B, P, generator=g, dtype=DT).to(DEVICE).requires_grad_()
    leaves = [x, h0]
    hx = h0
    if m.mode == "LSTM":
        c0 = torch.randn(m.num_layers * D, B, m.hidden_size, generator=g,
                         dtype=DT).to(DEVICE).requires_grad_()
        leaves.append(c0)
        hx = (h0, c0)
    lengths = torch.tensor([T, T - 1, 2, 1][:B]) if packed else None
    m.train(training)
    torch.manual_seed(seed)
    inp = pack_padded_sequence(x, lengths) if packed else x
    out, hidden = m(inp, hx)
    if packed:
        out, _ = pad_packed_sequence(out, total_length=T)
    got = [out] + (list(hidden) if m.mode == "LSTM" else [hidden])
    masks, zone = _masks(m, T, B, seed)
    y, hn, cn = rnn_reference(_modes.MODE_IDS[m.mode], x, dict(m.named_parameters()),
                              m.num_layers, m.bidirectional, hx, lengths=lengths, masks=masks,
                              zoneout=zone)
    if packed:  # the packed output has zeros past each length
        valid = (torch.arange(T)[:, None] < lengths[None, :]).to(DEVICE)[:, :, None]
        y = torch.where(valid, y, 0)
    want = [y, hn] + ([cn] if cn is not None else [])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    gen = torch.Generator().manual_seed(3)
    ups = [torch.randn(w.shape, generator=gen, dtype=DT).to(DEVICE) for w in want]
    inputs = leaves + list(m.parameters())
    for a, b in zip(torch.autograd.grad(got, inputs, ups), torch.autograd.grad(want, inputs, ups)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


GRID = list(itertools.product(CELLS, STRATEGIES))


@pytest.mark.parametrize("cell,strategy", GRID)
def test_weight_and_recurrent_dropout_match_the_reference(cell, strategy):
    """Both options at once, a bidirectional two-layer stack."""
    m = _module(cell)
    with strategy_runs(strategy, backward=True):
        _assert_matches_reference(m)


@pytest.mark.parametrize("cell,strategy", GRID)
def test_zoneout_matches_the_reference(cell, strategy):
    """Zoneout (an LSTM's h and c apart), training masks, a bidirectional two-layer stack."""
    m = _module(cell, pw=0.0, pr=0.0, zoneout=(0.3, 0.4) if cell.startswith("lstm") else 0.3)
    with strategy_runs(strategy, backward=True):
        _assert_matches_reference(m)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_zoneout_in_eval_is_its_expectation(strategy):
    """Eval: d = z, no mask; deterministic, and the backward too (backward in eval mode)."""
    m = _module("lstm", pw=0.3, pr=0.3, zoneout=(0.2, 0.5))
    with strategy_runs(strategy, backward=True):
        _assert_matches_reference(m, training=False)


@pytest.mark.parametrize("option", ["weight", "recurrent", "zoneout"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_option_alone_packed(option, strategy):
    """Each option without the others, on packed input (rows that end early keep their state;
    the masks still apply to the rows that run)."""
    m = _module("gru", pw=0.5 if option == "weight" else 0.0,
                pr=0.5 if option == "recurrent" else 0.0,
                zoneout=0.4 if option == "zoneout" else 0.0)
    with strategy_runs(strategy, backward=True):
        _assert_matches_reference(m, packed=True)


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_proj"])
def test_cooperative_recurrent_dropout_with_many_programs(cell, monkeypatch, request):
    """Several programs per group (8-unit slices of H=20) and two batch chunks: each program's
    product reads the mask of every unit, and its backward the mask of its own."""
    from fastrnn.ops import cooperative, dispatch

    monkeypatch.setattr(cooperative, "INTERPRETER_SLICE", 8)
    monkeypatch.setattr(cooperative, "_SLICES", (8,))
    dispatch.plan.cache_clear()
    request.addfinalizer(dispatch.plan.cache_clear)
    m = _module(cell, pw=0.0, pr=0.5, num_layers=1, H=20, zoneout=0.3)
    with strategy_runs("cooperative", backward=True):
        _assert_matches_reference(m, T=3, B=20)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_with_a_recurrent_mask_and_zoneout(strategy):
    """The op with a fixed recurrent mask and fixed zoneout masks, in float64, gradcheck through
    the kernels."""
    mode, D, T, B, H = _modes.LSTM, 2, 3, 2, 2
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=DT) * 0.7).to(DEVICE).requires_grad_()

    x, w_ih, b_x = rnd(T, B, 2), rnd(D * 4 * H, 2).detach(), rnd(D * 4 * H).detach()
    h0, c0, w_hh = rnd(D, B, H), rnd(D, B, H), rnd(D, 4 * H, H)
    rmask = (torch.rand(D, B, H, generator=g) < 0.5).to(DEVICE, DT) * 2
    zh, zc = ((torch.rand(T, B, D, H, generator=g) < 0.4).to(DEVICE) for _ in range(2))

    def f(x, h0, c0, w_hh):
        y, hn, cn, _, _ = recurrence(x, w_ih, b_x, h0, c0, w_hh, None, None, None, mode, False,
                                     True, strategy, None, 0.0, rmask, zh, zc)
        return y, hn, cn

    with strategy_runs(strategy, backward=True):
        assert torch.autograd.gradcheck(f, (x, h0, c0, w_hh), eps=1e-6, atol=1e-7, rtol=1e-5,
                                        fast_mode=True)


def test_eval_is_torch_nn_and_training_is_reproducible():
    """Eval: no mask, the layer is torch.nn's, deterministic. Training: a fresh mask per call
    (two calls differ), the same seed gives the same result bit for bit."""
    fast, ref = make_pair("LSTM", 3, 5, num_layers=2)
    fast = fastrnn.LSTM(3, 5, num_layers=2, weight_dropout=0.5, recurrent_dropout=0.5).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 2, 3, device=DEVICE)
    fast.eval()
    ref.eval()
    torch.testing.assert_close(fast(x)[0], ref(x)[0])
    assert torch.equal(fast(x)[0], fast(x)[0])
    fast.train()
    torch.manual_seed(4)
    a = fast(x)[0]
    b = fast(x)[0]
    torch.manual_seed(4)
    assert torch.equal(fast(x)[0], a) and not torch.equal(a, b)
    assert list(fast.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_launches_per_layer_unchanged_by_dropout(strategy):
    def counts(m):
        x = torch.randn(5, 3, 3, dtype=DT, device=DEVICE, requires_grad=True)
        with strategy_runs(strategy, backward=True):
            before = launches("fwd", strategy), launches("bwd", strategy)
            out = m(x)[0]
            mid = launches("fwd", strategy)
            out.sum().backward()
        return mid - before[0], launches("bwd", strategy) - before[1]

    assert counts(_module("gru", zoneout=0.2)) == counts(_module("gru", pw=0.0, pr=0.0))


class WeightDrop(nn.Module):
    """AWD-LSTM's wrapper (salesforce/awd-lstm-lm, weight_drop.py), as users copy it: the raw
    weight becomes a new parameter and a masked tensor is set as the attribute before each
    call."""

    def __init__(self, module, weights, dropout):
        super().__init__()
        self.module, self.weights, self.dropout = module, weights, dropout
        for name in weights:
            w = getattr(module, name)
            del module._parameters[name]
            module.register_parameter(name + "_raw", nn.Parameter(w.data))

    def forward(self, *args):
        for name in self.weights:
            raw = getattr(self.module, name + "_raw")
            setattr(self.module, name, F.dropout(raw, p=self.dropout, training=self.training))
        return self.module(*args)


def test_awd_lstm_weight_drop_wrapper_still_works():
    """The wrapper AWD-LSTM users already have, around fastrnn.LSTM: the same outputs and
    gradients as around torch.nn.LSTM under the same seed, on fastrnn's kernels."""
    from tests.parity import through_kernels

    fast, ref = make_pair("LSTM", 3, 5)
    wf, wr = WeightDrop(fast, ["weight_hh_l0"], 0.5), WeightDrop(ref, ["weight_hh_l0"], 0.5)
    x = torch.randn(6, 2, 3, device=DEVICE)
    with through_kernels():
        torch.manual_seed(7)
        a = wf(x)[0]
        a.pow(2).sum().backward()
    torch.manual_seed(7)
    b = wr(x)[0]
    b.pow(2).sum().backward()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast.weight_hh_l0_raw.grad, ref.weight_hh_l0_raw.grad,
                               atol=1e-6, rtol=1e-6)


def test_compile_fullgraph_with_dropout_options():
    m = _module("lstm", num_layers=2, zoneout=(0.1, 0.2))
    x = torch.randn(4, 3, 3, dtype=DT, device=DEVICE)
    compiled = torch.compile(lambda t: m(t)[0], fullgraph=True, backend="aot_eager")
    try:
        torch.manual_seed(2)
        got = compiled(x)
    finally:
        torch._dynamo.reset()
    torch.manual_seed(2)
    torch.testing.assert_close(got, m(x)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name,p", [("weight_dropout", -0.1), ("recurrent_dropout", 1.5),
                                    ("weight_dropout", "0.1"), ("recurrent_dropout", True),
                                    ("zoneout", 2.0), ("zoneout", (0.1, -1))])
def test_bad_probability_raises(name, p):
    with pytest.raises(ValueError, match=f"{name} probability has to be between 0 and 1, but "
                                         "got"):
        fastrnn.LSTM(3, 4, **{name: p})


def test_zoneout_pair_is_for_lstm_only():
    with pytest.raises(ValueError, match="zoneout takes a pair \\(z_h, z_c\\) for an LSTM "
                                         "only; give one probability for GRU"):
        fastrnn.GRU(3, 4, zoneout=(0.1, 0.2))
    with pytest.raises(ValueError, match="zoneout=\\(z_h, z_c\\) takes two probabilities"):
        fastrnn.LSTM(3, 4, zoneout=(0.1, 0.2, 0.3))


def test_torch_backend_refuses_dropout_in_training_only(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    m = fastrnn.GRU(3, 4, recurrent_dropout=0.2).to(DEVICE)
    x = torch.randn(5, 2, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match="run in fastrnn's kernels"):
        m(x)
    m.eval()
    m(x)  # eval: no mask, torch.nn's layer
    with pytest.raises(RuntimeError, match="zoneout run in fastrnn's kernels"):
        fastrnn.GRU(3, 4, zoneout=0.2).to(DEVICE).eval()(x)  # eval too: d = z is not torch.nn


def test_to_torch_refuses_dropout_options_and_convert_adds_none():
    with pytest.raises(ValueError, match="has zoneout=0.2"):
        fastrnn.to_torch(fastrnn.GRU(3, 4, zoneout=0.2))
    model = nn.Sequential(fastrnn.LSTM(3, 4, recurrent_dropout=0.1))
    with pytest.raises(ValueError, match=r"LSTM \(0\) has recurrent_dropout=0.1, which torch.nn "
                                         "cannot express; set it to 0.0"):
        fastrnn.to_torch(model)
    assert type(model[0]) is fastrnn.LSTM
    model[0].recurrent_dropout = 0.0
    fastrnn.to_torch(model)
    fastrnn.convert(model)
    assert model[0].weight_dropout == 0.0 == model[0].recurrent_dropout
    assert "weight_dropout" not in repr(model[0]) and "recurrent_dropout" not in repr(model[0])
    fresh = fastrnn.convert(nn.GRU(3, 4))   # converted from torch.nn: none of the options
    assert fresh._dropout_masks(2, fresh.weight_hh_l0) is None and "dropout" not in repr(fresh)
