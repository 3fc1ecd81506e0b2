"""Beyond torch.nn, part 1: ``resets``, ``return_states`` and ``recurrent_grad_clip``.

The oracle is ``fastrnn.reference`` (plain PyTorch, float64), which states each feature's maths;
two tests also check it against what users write by hand today (an ``LSTMCell`` loop with a
``(1 - done)`` mask; ``torch.nn.LSTM`` stepped one step at a time). Every feature runs under
every strategy (forced, counted, torch's RNN ops refused), for every cell, uni- and bidirectional
stacks, ``batch_first``; gradients are checked in float64 (gradcheck through the kernels for the
true gradients; against the reference for the clipped one, which is not a true gradient on
purpose).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import _modes
from fastrnn.reference import rnn_reference
from tests.parity import DEVICE, STRATEGIES, launches, make_pair, strategy_runs

DT = torch.float64
MODES = {"RNN_TANH": _modes.RNN_TANH, "RNN_RELU": _modes.RNN_RELU, "LSTM": _modes.LSTM,
         "GRU": _modes.GRU}
CELLS = {  # name: (class, constructor arguments)
    "rnn_tanh": ("RNN", {}),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
    "lstm": ("LSTM", {}),
    "lstm_proj": ("LSTM", {"proj_size": 3}),
    "gru": ("GRU", {}),
}


def _module(cell, bidirectional, batch_first, clip=None, num_layers=2, I=3, H=5, seed=0):
    name, kwargs = CELLS[cell]
    torch.manual_seed(seed)
    return getattr(fastrnn, name)(I, H, num_layers=num_layers, bidirectional=bidirectional,
                                  batch_first=batch_first, recurrent_grad_clip=clip,
                                  **kwargs).to(DEVICE, DT)


def _resets(T, B, seed=3, p=0.35):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(T, B, generator=g) < p
    r[1, 0] = True    # at least one reset inside the sequence
    return r.to(DEVICE)


def _leaves(m, T, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    x = torch.randn(T, B, m.input_size, generator=g, dtype=DT)
    if m.batch_first:
        x = x.transpose(0, 1).contiguous()
    h0 = torch.randn(m.num_layers * D, B, P, generator=g, dtype=DT)
    leaves = [x, h0]
    if m.mode == "LSTM":
        leaves.append(torch.randn(m.num_layers * D, B, m.hidden_size, generator=g, dtype=DT))
    return [t.to(DEVICE).requires_grad_() for t in leaves]


def _reference(m, leaves, resets, clip):
    """The layer's results by ``fastrnn.reference``, in the module's layout."""
    x = leaves[0].transpose(0, 1) if m.batch_first else leaves[0]
    hx = tuple(leaves[1:]) if m.mode == "LSTM" else leaves[1]
    r = None if resets is None else (resets.transpose(0, 1) if m.batch_first else resets)
    y, hn, cn, h_all, c_all = rnn_reference(MODES[m.mode], x, dict(m.named_parameters()),
                                            m.num_layers, m.bidirectional, hx, resets=r,
                                            clip=clip, states=True)
    if m.batch_first:
        y = y.transpose(0, 1)
        h_all = h_all.permute(2, 0, 1, 3)
        c_all = c_all.permute(2, 0, 1, 3) if c_all is not None else None
    return [y, hn] + ([cn, h_all, c_all] if m.mode == "LSTM" else [h_all])


def _fastrnn(m, leaves, resets):
    hx = tuple(leaves[1:]) if m.mode == "LSTM" else leaves[1]
    y, hidden, states = m(leaves[0], hx, resets=resets, return_states=True)
    if m.mode == "LSTM":
        return [y, *hidden, *states]
    return [y, hidden, states]


def _assert_features_match_reference(m, T, B, resets, clip):
    """Every output (y, h_n, c_n, every state) and the gradient of every input and parameter
    under random upstream gradients on every output, against the reference in float64."""
    leaves = _leaves(m, T, B)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    got = _fastrnn(m, leaves, resets)
    params = list(m.parameters())
    got_grads_in = leaves + params
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()}
    ref_m = _Params(m, ref_params)
    want = _reference(ref_m, ref_leaves, resets, clip)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda s: f"output {i}: {s}")
    g = torch.Generator().manual_seed(7)
    ups = [torch.randn(w.shape, generator=g, dtype=DT).to(DEVICE) for w in want]
    got_g = torch.autograd.grad(got, got_grads_in, ups)
    want_g = torch.autograd.grad(want, ref_leaves + list(ref_params.values()), ups)
    names = ["input", "h0", "c0"][:len(leaves)] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11, msg=lambda s: f"grad {n}: {s}")


class _Params:
    """The module's configuration with other parameter tensors (for the reference's graph)."""

    def __init__(self, m, params):
        self._m, self._params = m, params

    def __getattr__(self, name):
        return getattr(self._m, name)

    def named_parameters(self):
        return self._params.items()


GRID = list(itertools.product(CELLS, STRATEGIES, (False, True)))


@pytest.mark.parametrize("cell,strategy,bidirectional", GRID)
def test_resets_states_and_clip_match_the_reference(cell, strategy, bidirectional):
    """All three features at once, two layers, every cell and strategy; batch_first alternates
    with the direction count so that both layouts meet both stacks."""
    m = _module(cell, bidirectional, batch_first=bidirectional, clip=0.05)
    with strategy_runs(strategy, backward=True):
        _assert_features_match_reference(m, T=6, B=3, resets=_resets(6, 3).transpose(0, 1)
                                         if m.batch_first else _resets(6, 3), clip=0.05)


@pytest.mark.parametrize("feature", ["resets", "clip"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_feature_alone(feature, strategy):
    """Each feature without the others (so one cannot hide another's mistake), on a
    bidirectional LSTM."""
    clip = 0.05 if feature == "clip" else None
    m = _module("lstm", True, False, clip=clip)
    with strategy_runs(strategy, backward=True):
        _assert_features_match_reference(m, T=5, B=3, resets=_resets(5, 3) if feature == "resets"
                                          else None, clip=clip)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru", "lstm_proj"])
def test_cooperative_resets_with_many_programs_per_group(cell, monkeypatch, request):
    """The cooperative kernels with several programs per group (8-unit slices of H=20) and two
    batch chunks: a reset's initial state reaches every program's product through the exchanged
    state, and the initial state's gradient collects in each program's own rows."""
    from fastrnn.ops import cooperative, dispatch

    monkeypatch.setattr(cooperative, "INTERPRETER_SLICE", 8)
    monkeypatch.setattr(cooperative, "_SLICES", (8,))
    dispatch.plan.cache_clear()
    request.addfinalizer(dispatch.plan.cache_clear)
    m = _module(cell, True, False, clip=0.05, num_layers=1, H=20)
    with strategy_runs("cooperative", backward=True):
        _assert_features_match_reference(m, T=4, B=20, resets=_resets(4, 20), clip=0.05)


GRADCHECK = [("lstm", "persistent", True), ("gru", "stepwise", False),
             ("rnn_tanh", "cooperative", True), ("lstm", "cooperative", False),
             ("lstm_proj", "stepwise", False), ("gru", "persistent", False)]


@pytest.mark.parametrize("cell,strategy,bidirectional", GRADCHECK)
def test_gradcheck_with_resets_and_states(cell, strategy, bidirectional):
    """Resets and every step's states are true gradients: gradcheck through the kernels, in
    float64, of every output (states included) with respect to the input and initial states."""
    m = _module(cell, bidirectional, False, num_layers=1, H=4 if cell == "lstm_proj" else 2,
                I=2)
    resets = _resets(3, 2, p=0.5)
    with strategy_runs(strategy, backward=True):
        def f(*leaves):
            return tuple(_fastrnn(m, list(leaves), resets))

        assert torch.autograd.gradcheck(f, _leaves(m, 3, 2), eps=1e-6, atol=1e-7, rtol=1e-5,
                                        fast_mode=True)


def test_resets_match_the_lstmcell_loop_users_write():
    """The users' workaround (a Python loop over ``torch.nn.LSTMCell``, the state multiplied by
    ``(1 - done)``, layer after layer) gives what one fused call with ``resets`` gives: outputs,
    final states and every parameter's gradient."""
    T, B, I, H, L = 7, 4, 3, 5, 2
    fast, ref = make_pair("LSTM", I, H, num_layers=L)
    fast, ref = fast.to(DT), ref.to(DT)
    cells = [nn.LSTMCell(I if k == 0 else H, H).to(DEVICE, DT) for k in range(L)]
    for k, c in enumerate(cells):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(c, name).data.copy_(getattr(ref, f"{name}_l{k}"))
    x = torch.randn(T, B, I, dtype=DT, device=DEVICE)
    done = _resets(T, B)

    inp = x
    h_n, c_n = [], []
    for c in cells:
        h = x.new_zeros(B, H)
        cs = x.new_zeros(B, H)
        ys = []
        for t in range(T):
            keep = (~done[t]).to(DT)[:, None]
            h, cs = c(inp[t], (h * keep, cs * keep))
            ys.append(h)
        inp = torch.stack(ys)
        h_n.append(h)
        c_n.append(cs)
    want = [inp, torch.stack(h_n), torch.stack(c_n)]
    y, (hn, cn) = fast(x, resets=done)
    for a, b in zip([y, hn, cn], want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    (y.pow(2).sum() + hn.sum()).backward()
    (want[0].pow(2).sum() + want[1].sum()).backward()
    for k, c in enumerate(cells):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            torch.testing.assert_close(getattr(fast, f"{name}_l{k}").grad, getattr(c, name).grad,
                                       atol=1e-11, rtol=1e-11)


def test_states_match_torch_nn_lstm_stepped():
    """``return_states``: every step's (h, c) of every layer and direction, as torch.nn.LSTM run
    one step at a time (feeding its (h_n, c_n) back) reports them; with proj_size, h is the
    projected state."""
    T, B = 5, 3
    fast, ref = make_pair("LSTM", 3, 6, num_layers=2, proj_size=4, batch_first=True)
    fast, ref = fast.to(DT), ref.to(DT)
    x = torch.randn(B, T, 3, dtype=DT, device=DEVICE)
    hx = None
    hs, cs = [], []
    for t in range(T):
        _, hx = ref(x[:, t:t + 1], hx)
        hs.append(hx[0])
        cs.append(hx[1])
    out, _, (h_all, c_all) = fast(x, return_states=True)
    assert h_all.shape == (B, T, 2, 4) and c_all.shape == (B, T, 2, 6)
    torch.testing.assert_close(h_all, torch.stack(hs).permute(2, 0, 1, 3), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(c_all, torch.stack(cs).permute(2, 0, 1, 3), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, h_all[:, :, -1], atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["packed_unsorted", "unbatched"])
def test_states_of_packed_and_unbatched_inputs(kind):
    """A PackedSequence's states come padded (zeros past each length) in the input's batch
    order, as ``pad_packed_sequence`` lays out its output; an unbatched input's have no batch
    dimension. Both against the same sequences run one by one."""
    m = _module("lstm", True, False, num_layers=1)
    T, lengths = 5, [3, 5, 2]
    x = torch.randn(T, 3, 3, dtype=DT, device=DEVICE)
    if kind == "unbatched":
        _, _, (h_all, c_all) = m(x[:, 0], return_states=True)
        _, _, (h1, c1) = m(x[:, :1], return_states=True)
        assert h_all.shape == (T, 2, 5)
        torch.testing.assert_close(h_all, h1[:, :, 0], atol=0, rtol=0)
        torch.testing.assert_close(c_all, c1[:, :, 0], atol=0, rtol=0)
        return
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    _, _, (h_all, c_all) = m(packed, return_states=True)
    assert h_all.shape == (T, 2, 3, 5)
    for b, n in enumerate(lengths):
        _, _, (hb, cb) = m(x[:n, b:b + 1], return_states=True)
        torch.testing.assert_close(h_all[:n, :, b], hb[:, :, 0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(c_all[:n, :, b], cb[:, :, 0], atol=1e-12, rtol=1e-12)
        assert not h_all[n:, :, b].any() and not c_all[n:, :, b].any()


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cells_clip_the_gradient_into_hx(name, backend, monkeypatch):
    """A cell's ``recurrent_grad_clip`` clamps the gradient flowing into ``hx`` (and ``cx``);
    the rest of the gradient is torch.nn's. On the torch backend it wraps torch.nn's cell."""
    monkeypatch.setenv("FASTRNN_BACKEND", backend)
    torch.manual_seed(0)
    ref = getattr(nn, name)(3, 4).to(DEVICE, DT)
    fast = getattr(fastrnn, name)(3, 4, recurrent_grad_clip=0.1).to(DEVICE, DT)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, dtype=DT, device=DEVICE, requires_grad=True)
    hs = [torch.randn(5, 4, dtype=DT, device=DEVICE, requires_grad=True)
          for _ in range(2 if name == "LSTMCell" else 1)]
    hx = tuple(hs) if name == "LSTMCell" else hs[0]
    got = fast(x, hx)
    want = ref(x, hx)
    got, want = (got, want) if name == "LSTMCell" else ((got,), (want,))
    ups = [torch.randn_like(t) * 10 for t in want]
    g_got = torch.autograd.grad(got, [x, *hs, fast.weight_hh], ups)
    g_want = torch.autograd.grad(want, [x, *hs, ref.weight_hh], ups)
    torch.testing.assert_close(g_got[0], g_want[0])
    for a, b in zip(g_got[1:-1], g_want[1:-1]):
        assert b.abs().max() > 0.1    # the clip is active
        torch.testing.assert_close(a, b.clamp(-0.1, 0.1))
    torch.testing.assert_close(g_got[-1], g_want[-1])


def test_defaults_and_state_dict_are_torch_nn():
    """The options leave the parameters torch.nn's: the state_dict of a layer with
    ``recurrent_grad_clip`` loads into torch.nn and back, with the same keys; ``resets=None``
    and ``return_states=False`` give the plain call's results, bit for bit."""
    fast = fastrnn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2,
                        recurrent_grad_clip=1.0)
    ref = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    assert list(fast.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    assert "recurrent_grad_clip=1.0" in repr(fast)
    x = torch.randn(4, 2, 3)
    a = fast.to(DEVICE)(x.to(DEVICE))
    b = fast(x.to(DEVICE), resets=None, return_states=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_launches_per_layer_unchanged_by_the_features(strategy):
    """Resets, return_states and clipping run inside the same kernels: the same launches per
    layer, forward and backward, as the plain call (counted where they happen)."""
    m = _module("gru", True, False, clip=None)
    clipped = _module("gru", True, False, clip=0.1)

    def counts(module, **kwargs):
        x = torch.randn(5, 3, 3, dtype=DT, device=DEVICE, requires_grad=True)
        with strategy_runs(strategy, backward=True):
            before = launches("fwd", strategy), launches("bwd", strategy)
            out = module(x, **kwargs)
            mid = launches("fwd", strategy)
            (out[0].sum() + out[-1].sum()).backward()
        return mid - before[0], launches("bwd", strategy) - before[1]

    plain = counts(m)
    assert counts(clipped, resets=_resets(5, 3), return_states=True) == plain


def test_compile_fullgraph_with_the_features():
    """torch.compile(fullgraph=True) traces resets, return_states and clipping without a graph
    break, and matches the eager call (forward and gradients)."""
    m = _module("lstm", True, True, clip=0.05, num_layers=2)
    resets = _resets(5, 3).transpose(0, 1)

    def f(x, h0, c0):
        y, (hn, cn), (h_all, c_all) = m(x, (h0, c0), resets=resets, return_states=True)
        return y.sum() + hn.pow(2).sum() + h_all.pow(2).sum() + c_all.sum()

    leaves = _leaves(m, 5, 3)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    try:
        got = compiled(*leaves)
        got_g = torch.autograd.grad(got, leaves + list(m.parameters()))
    finally:
        torch._dynamo.reset()
    leaves2 = [t.detach().clone().requires_grad_() for t in leaves]
    want = f(*leaves2)
    want_g = torch.autograd.grad(want, leaves2 + list(m.parameters()))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_vmap_with_resets_is_one_launch():
    """torch.func.vmap over sequences with their own resets: the vmapped dimension folds into
    the batch (one forward launch, one backward) and matches a loop over the samples."""
    m = _module("gru", False, False, clip=0.05, num_layers=1)
    params = {k: v.detach() for k, v in m.named_parameters()}
    N, T, B = 3, 5, 2
    xs = torch.randn(N, T, B, 3, dtype=DT, device=DEVICE)
    rs = torch.stack([_resets(T, B, seed=s) for s in range(N)])

    def loss(p, x, r):
        y, hn, h_all = torch.func.functional_call(m, p, (x,), {"resets": r,
                                                               "return_states": True})
        return y.pow(2).sum() + h_all.sum()

    with strategy_runs("persistent", backward=True):
        before = launches("fwd"), launches("bwd")
        got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, rs)
        assert (launches("fwd") - before[0], launches("bwd") - before[1]) == (1, 1)
    for i in range(N):
        want = torch.func.grad(loss)(params, xs[i], rs[i])
        for k in params:
            torch.testing.assert_close(got[k][i], want[k], atol=1e-12, rtol=1e-12)


# --- errors: torch.nn's phrasing, and nothing changed ------------------------------------------

def test_bad_resets_raise_and_change_nothing():
    m = _module("lstm", False, True, num_layers=1)
    x = torch.randn(2, 4, 3, dtype=DT, device=DEVICE)  # batch_first: (B, T) resets
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ok = torch.zeros(2, 4, dtype=torch.bool, device=DEVICE)
    m(x, resets=ok)
    with pytest.raises(RuntimeError, match=r"Expected resets size \(2, 4\), got \[4, 2\]"):
        m(x, resets=ok.t())
    with pytest.raises(RuntimeError, match="Expected resets to be a Bool tensor, but got resets "
                                           "with dtype Float"):
        m(x, resets=ok.float())
    with pytest.raises(TypeError, match="resets must be a Tensor, not list"):
        m(x, resets=[[False] * 4] * 2)
    with pytest.raises(RuntimeError, match="Input and resets tensors are not at the same device, "
                                           "found input tensor at .* and resets tensor at meta"):
        m(x, resets=ok.to("meta"))
    with pytest.raises(RuntimeError, match=r"Expected resets size \(4,\), got \[2, 4\]"):
        m(x[0], resets=ok)                  # unbatched input: (T,)
    packed = pack_padded_sequence(x, torch.tensor([4, 2]), batch_first=True)
    with pytest.raises(ValueError, match="resets cannot be combined with a PackedSequence"):
        m(packed, resets=ok)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("clip", [0, -1.0, float("inf"), float("nan"), "1", True])
@pytest.mark.parametrize("cls", ["LSTM", "GRUCell"])
def test_bad_clip_raises(clip, cls):
    with pytest.raises(ValueError, match="recurrent_grad_clip should be a positive number or "
                                         "None, but got"):
        getattr(fastrnn, cls)(3, 4, recurrent_grad_clip=clip)


def test_torch_backend_refuses_the_features(monkeypatch):
    """torch.nn has none of these: on the torch backend a layer asked for them says so, rather
    than silently dropping them."""
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    m = fastrnn.GRU(3, 4).to(DEVICE)
    x = torch.randn(5, 2, 3, device=DEVICE)
    m(x)
    for kwargs in ({"resets": torch.zeros(5, 2, dtype=torch.bool, device=DEVICE)},
                   {"return_states": True}):
        with pytest.raises(RuntimeError, match="run in fastrnn's kernels"):
            m(x, **kwargs)
    with pytest.raises(RuntimeError, match="run in fastrnn's kernels"):
        fastrnn.GRU(3, 4, recurrent_grad_clip=1.0).to(DEVICE)(x)


def test_to_torch_refuses_what_torch_nn_cannot_express():
    """``to_torch`` would silently drop the clip: it refuses, naming the layer, and swaps
    nothing; with the clip unset the layer converts, and ``convert`` keeps working."""
    model = nn.Sequential(fastrnn.GRU(3, 4), fastrnn.LSTMCell(4, 4, recurrent_grad_clip=0.5))
    with pytest.raises(ValueError, match=r"LSTMCell \(1\) has recurrent_grad_clip=0.5, which "
                                         "torch.nn cannot express"):
        fastrnn.to_torch(model)
    assert type(model[0]) is fastrnn.GRU and type(model[1]) is fastrnn.LSTMCell
    model[1].recurrent_grad_clip = None
    fastrnn.to_torch(model)
    assert type(model[0]) is nn.GRU and type(model[1]) is nn.LSTMCell
    fastrnn.convert(model)
    assert type(model[1]) is fastrnn.LSTMCell and model[1].recurrent_grad_clip is None


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_double_backward_with_the_features(cell):
    """Gradients of gradients (a gradient penalty) through resets and every state: the
    reference's, where the first-order gradients ran on the kernels. With the clip they are
    refused: autograd cannot differentiate a clipped backward again (it would clamp the
    second-order adjoints on the forward's edges too; finite differences disagree with it)."""
    m = _module(cell, True, False, num_layers=1, H=3)
    resets = _resets(4, 2)
    leaves = _leaves(m, 4, 2)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()}

    def penalty(outs, xs):
        loss = sum((o * (k + 1)).sin().sum() for k, o in enumerate(outs))
        grads = torch.autograd.grad(loss, xs, create_graph=True)
        return sum(g.pow(2).sum() for g in grads)

    params = list(m.parameters())
    got = penalty(_fastrnn(m, leaves, resets), leaves + params)
    want = penalty(_reference(_Params(m, ref_params), ref_leaves, resets, None),
                   ref_leaves + list(ref_params.values()))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    g_got = torch.autograd.grad(got, leaves + params)
    g_want = torch.autograd.grad(want, ref_leaves + list(ref_params.values()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    m.recurrent_grad_clip = 0.05
    clipped = penalty(_fastrnn(m, leaves, resets), leaves + params)
    with pytest.raises(RuntimeError, match="double backward, create_graph=True.*through a "
                                           "layer with recurrent_grad_clip are not supported"):
        torch.autograd.grad(clipped, leaves[0])


def test_forward_mode_with_resets_and_states():
    """torch.func.jvp (forward-mode AD) through a layer with resets and every state: the
    reference's tangents, states included."""
    m = _module("lstm", True, False, num_layers=2, H=3)
    resets = _resets(4, 2)
    leaves = [t.detach() for t in _leaves(m, 4, 2)]
    tangents = [torch.randn_like(t) for t in leaves]

    def fast(*xs):
        return tuple(_fastrnn(m, list(xs), resets))

    def ref(*xs):
        return tuple(_reference(m, list(xs), resets, None))

    _, got = torch.func.jvp(fast, tuple(leaves), tuple(tangents))
    _, want = torch.func.jvp(ref, tuple(leaves), tuple(tangents))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
