"""LayerNorm cells (``fastrnn.LayerNormLSTM``, ``fastrnn.LayerNormGRU``; Ba et al.).

The oracle is ``fastrnn.reference.layer_norm_rnn_reference``, the maths as the issue states it
(LN over all G*H gate pre-activations of a step and direction, LN_c on an LSTM's new cell state,
eps 1e-5), in float64. Every case runs under a forced strategy with torch's RNN ops refused and
the LayerNorm kernels' launches counted exactly: one per layer and pass (``persistent``) or one
per layer, pass and step (``stepwise``).
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn import _modes
from fastrnn.ops import cooperative, layernorm_coop
from fastrnn.ops.select import LAUNCHES
from fastrnn.reference import dropout_masks, layer_norm_rnn_reference
from tests.parity import DEVICE, refusing_torch_rnn

DT = torch.float64
CLASSES = {"lstm": fastrnn.LayerNormLSTM, "gru": fastrnn.LayerNormGRU}
LN_STRATEGIES = ("persistent", "cooperative", "stepwise")


def expected_launches(strategy: str, cell: str, T: int, programs: int = 1) -> dict:
    """The LayerNorm kernels' launches of one layer over T steps, (forward, backward) by name:
    persistent one each; stepwise one per step; cooperative one each, or under the interpreter
    with several programs per group one per phase (forward 2 per step and an LSTM's last h;
    backward an LSTM's 2 per step, a GRU's 1, and dh0)."""
    if strategy == "cooperative":
        if programs == 1:
            return {"_ln_fwd_coop_kernel": 1, "_ln_bwd_coop_kernel": 1}
        lstm = cell == "lstm"
        return {"_ln_fwd_coop_kernel": 2 * T + lstm, "_ln_bwd_coop_kernel": (1 + lstm) * T + 1}
    per = T if strategy == "stepwise" else 1
    return {"_ln_fwd_kernel": per, "_ln_bwd_kernel": per}


@contextlib.contextmanager
def ln_launches(strategy: str, layers: int, T: int, backward: bool = True, cell: str = "lstm",
                programs: int = 1):
    """Force ``strategy``; torch's RNN ops refused; exactly the LayerNorm kernels' launches of
    ``layers`` layers over ``T`` steps (and no other fastrnn kernel)."""
    before = collections.Counter(LAUNCHES)
    with fastrnn.force_strategy(strategy), refusing_torch_rnn():
        yield
    grown = {k: n - before[k] for k, n in LAUNCHES.items() if n != before[k]}
    fwd, bwd = expected_launches(strategy, cell, T, programs).items()
    want = {fwd[0]: layers * fwd[1]}
    if backward:
        want[bwd[0]] = layers * bwd[1]
    assert grown == want, f"{strategy}: launched {grown}, expected {want}"


def _module(cell, H=5, num_layers=2, bidirectional=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    m = CLASSES[cell](3, H, num_layers=num_layers, bidirectional=bidirectional, **kwargs)
    m = m.to(DEVICE, DT)
    with torch.no_grad():  # gains and biases away from 1 and 0, so that each one matters
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def _check(m, kind="padded", T=5, B=4, seed=1, training=True, masks_seed=None):
    """Output, final states and the gradient of the input, the initial states and every
    parameter against the reference (``kind``: padded, batch_first, packed, unbatched)."""
    g = torch.Generator().manual_seed(seed)
    D = 2 if m.bidirectional else 1
    H = m.hidden_size
    x = torch.randn(T, B, 3, generator=g, dtype=DT).to(DEVICE).requires_grad_()
    h0 = torch.randn(m.num_layers * D, B, H, generator=g, dtype=DT).to(DEVICE).requires_grad_()
    leaves = [x, h0]
    hx = h0
    if m.mode == "LSTM":
        c0 = torch.randn(m.num_layers * D, B, H, generator=g, dtype=DT).to(DEVICE)
        c0.requires_grad_()
        leaves.append(c0)
        hx = (h0, c0)
    lengths = None
    m.train(training)
    if masks_seed is not None:
        torch.manual_seed(masks_seed)
    if kind == "packed":  # unsorted lengths: the layer sorts and unsorts
        lengths = torch.tensor([T - 1, T, 1, 2][:B])
        out, hidden = m(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        out, _ = pad_packed_sequence(out, total_length=T)
    elif kind == "batch_first":
        m.batch_first = True
        out, hidden = m(x.transpose(0, 1), hx)
        out = out.transpose(0, 1)
        m.batch_first = False
    elif kind == "unbatched":
        x1 = x[:, 0]
        hx1 = tuple(h[:, 0] for h in hx) if isinstance(hx, tuple) else hx[:, 0]
        out, hidden = m(x1, hx1)
        out = out[:, None]
        hidden = tuple(h[:, None] for h in hidden) if isinstance(hidden, tuple) else \
            hidden[:, None]
        x, hx = x[:, :1], (tuple(h[:, :1] for h in hx) if isinstance(hx, tuple) else hx[:, :1])
    else:
        out, hidden = m(x, hx)
    got = [out] + (list(hidden) if m.mode == "LSTM" else [hidden])
    masks = None
    if masks_seed is not None:
        torch.manual_seed(masks_seed)
        G = _modes.NUM_GATES[_modes.MODE_IDS[m.mode]]
        masks = dropout_masks(m.weight_dropout, 0.0, m.num_layers, D, G, H, H, x.shape[1],
                              m.weight_hh_l0)
    y, hn, cn = layer_norm_rnn_reference(_modes.MODE_IDS[m.mode], x, dict(m.named_parameters()),
                                         m.num_layers, m.bidirectional, hx, lengths=lengths,
                                         masks=masks)
    if lengths is not None:
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


@pytest.mark.parametrize("kind", ["padded", "batch_first", "packed", "unbatched"])
@pytest.mark.parametrize("strategy", LN_STRATEGIES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_matches_the_reference(cell, strategy, kind):
    """A bidirectional two-layer stack, forward and every gradient."""
    m = _module(cell)
    with ln_launches(strategy, layers=2, T=5, cell=cell):
        _check(m, kind)


@pytest.mark.parametrize("programs", [3, 5])
@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cooperative_reduces_across_programs(cell, kind, programs, monkeypatch):
    """H=5 in slices of 2 and 1 units: 3 and 5 programs per group, each with a part of every
    step's statistics (LN_h's, LN_c's and the backward's row sums), exchanged and combined
    across programs; under the interpreter one launch per phase (the launch boundary is the
    grid barrier). Padded with 3 programs: B=18 in two batch chunks."""
    monkeypatch.setattr(cooperative, "INTERPRETER_SLICE", {3: 2, 5: 1}[programs])
    m = _module(cell)
    with ln_launches("cooperative", layers=2, T=5, cell=cell, programs=programs):
        _check(m, kind, B=18 if kind == "padded" and programs == 3 else 4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cooperative_batch_groups(cell, monkeypatch):
    """Batch tiles as groups of their own (as on a GPU at large batch): B=40 in groups of 16
    rows (the last one short), 3 programs each; every group reduces its own rows."""
    monkeypatch.setattr(cooperative, "INTERPRETER_SLICE", 2)
    monkeypatch.setattr(layernorm_coop, "INTERPRETER_GROUP_ROWS", 16)
    m = _module(cell, num_layers=1)
    with ln_launches("cooperative", layers=1, T=3, cell=cell, programs=3):
        _check(m, T=3, B=40)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_unit_chunks_and_batch_tiles(cell):
    """H=70 takes two unit chunks (and feature chunks) of 64, B=18 two batch tiles of 16: the
    statistics sum across chunks, and each program owns its rows."""
    m = _module(cell, H=70, num_layers=1, bidirectional=False)
    with ln_launches("persistent", layers=1, T=3):
        _check(m, T=3, B=18)


@pytest.mark.parametrize("strategy", ["persistent", "cooperative"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_through_the_kernels(cell, strategy, monkeypatch):
    """Finite differences of the kernels themselves (float64; the inputs the recurrent LN
    acts on: x, the initial states, W_hh and LN_h's and LN_c's gains and biases); cooperative
    with 2 programs per group."""
    monkeypatch.setattr(cooperative, "INTERPRETER_SLICE", 2)
    m = _module(cell, H=3, num_layers=1, bidirectional=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 3, generator=g, dtype=DT).to(DEVICE).requires_grad_()
    h0 = torch.randn(2, 2, 3, generator=g, dtype=DT).to(DEVICE).requires_grad_()
    c0 = torch.randn(2, 2, 3, generator=g, dtype=DT).to(DEVICE).requires_grad_()
    names = [n for n, _ in m.named_parameters() if n.startswith(("weight_hh", "ln_hh", "ln_cell"))]
    params = [getattr(m, n).detach().clone().requires_grad_() for n in names]

    def f(x, h0, c0, *ps):
        out, hidden = torch.func.functional_call(m, dict(zip(names, ps)),
                                                 (x, (h0, c0) if cell == "lstm" else h0))
        return (out,) + (tuple(hidden) if cell == "lstm" else (hidden,))

    bwd = "_ln_bwd_coop_kernel" if strategy == "cooperative" else "_ln_bwd_kernel"
    before = LAUNCHES[bwd]
    with refusing_torch_rnn(), fastrnn.force_strategy(strategy):
        assert torch.autograd.gradcheck(f, (x, h0, c0, *params), atol=1e-8, rtol=1e-6,
                                        fast_mode=True)
    assert LAUNCHES[bwd] > before


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_weight_dropout_matches_the_reference(cell):
    """DropConnect on W_hh with the same mask as the reference draws (training); eval: none."""
    m = _module(cell, weight_dropout=0.4)
    with ln_launches("persistent", layers=2, T=5):
        _check(m, masks_seed=7)
    with ln_launches("persistent", layers=2, T=5):
        _check(m, training=False)


def test_eval_is_deterministic_and_no_grad_saves_nothing():
    m = _module("lstm").eval()
    x = torch.randn(4, 2, 3, dtype=DT, device=DEVICE)
    with ln_launches("persistent", layers=4, T=4, backward=False), torch.no_grad():
        a = m(x)[0]
        b = m(x)[0]
    assert torch.equal(a, b)


def test_parameters_and_state_dict():
    """torch.nn's parameters first (a LayerNormLSTM's load into an LSTM with strict=False), then
    per layer and direction the LayerNorm gains (1) and biases (0); reset_parameters keeps
    that."""
    m = fastrnn.LayerNormLSTM(3, 4, num_layers=2, bidirectional=True)
    torch_names = list(nn.LSTM(3, 4, num_layers=2, bidirectional=True).state_dict())
    names = list(m.state_dict())
    assert names[:len(torch_names)] == torch_names
    ln = names[len(torch_names):]
    assert ln[:6] == ["ln_ih_weight_l0", "ln_ih_bias_l0", "ln_hh_weight_l0", "ln_hh_bias_l0",
                      "ln_cell_weight_l0", "ln_cell_bias_l0"]
    assert len(ln) == 2 * 2 * 6 and "ln_cell_bias_l1_reverse" in ln
    m.reset_parameters()
    sd = m.state_dict()
    assert sd["ln_hh_weight_l1_reverse"].shape == (16,) and sd["ln_cell_weight_l0"].shape == (4,)
    for k in ln:
        assert torch.equal(sd[k], torch.ones_like(sd[k]) if "_weight_" in k
                           else torch.zeros_like(sd[k])), k
    assert not torch.equal(sd["weight_hh_l0"], torch.zeros_like(sd["weight_hh_l0"]))
    gru = fastrnn.LayerNormGRU(3, 4)
    assert [k for k in gru.state_dict() if k.startswith("ln_")] == [
        "ln_ih_weight_l0", "ln_ih_bias_l0", "ln_hh_weight_l0", "ln_hh_bias_l0"]


@pytest.mark.parametrize("kwargs,match", [
    ({"proj_size": 2}, "LayerNormLSTM does not take proj_size"),
    ({"recurrent_dropout": 0.1}, "LayerNormLSTM does not take recurrent_dropout"),
    ({"zoneout": 0.1}, "LayerNormLSTM does not take zoneout"),
    ({"recurrent_grad_clip": 1.0}, "LayerNormLSTM does not take recurrent_grad_clip"),
])
def test_options_it_does_not_take_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastrnn.LayerNormLSTM(3, 4, **kwargs)


def test_forward_options_raise():
    m = _module("gru")
    x = torch.randn(4, 2, 3, dtype=DT, device=DEVICE)
    with pytest.raises(ValueError, match="LayerNormGRU does not take resets or return_states"):
        m(x, resets=torch.zeros(4, 2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="does not take resets or return_states"):
        m(x, return_states=True)


def test_bad_input_raises_as_torch_nn():
    """The checks are torch.nn's (inherited): the same class and message."""
    m = _module("lstm", bidirectional=False, num_layers=1)
    ref = nn.LSTM(3, 5).to(DEVICE, DT)
    x = torch.randn(4, 2, 6, dtype=DT, device=DEVICE)
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        m(x)
    assert str(got.value) == str(want.value)


def test_to_torch_refuses():
    model = nn.Sequential(fastrnn.LayerNormLSTM(3, 4))
    with pytest.raises(ValueError, match=r"fastrnn.to_torch: LayerNormLSTM \(0\) has LayerNorm "
                                         "parameters, which torch.nn cannot express"):
        fastrnn.to_torch(model)
    assert type(model[0]) is fastrnn.LayerNormLSTM


def test_convert_leaves_torch_layers_as_they_are():
    model = nn.Sequential(nn.LSTM(3, 4))
    fastrnn.convert(model)
    assert type(model[0]) is fastrnn.LSTM


def test_double_backward_is_refused():
    m = _module("lstm", num_layers=1, bidirectional=False)
    x = torch.randn(3, 2, 3, dtype=DT, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*LayerNormLSTM / LayerNormGRU are "
                                           "not supported"):
        g.sum().backward()


def test_compile_fullgraph():
    """torch.compile(fullgraph=True): no graph break, forward and backward through the op."""
    m = _module("gru", num_layers=2)
    x = torch.randn(4, 3, 3, dtype=DT, device=DEVICE, requires_grad=True)
    compiled = torch.compile(lambda t: m(t)[0], fullgraph=True, backend="aot_eager")
    try:
        got = compiled(x)
        (gx,) = torch.autograd.grad(got.sum(), x)
    finally:
        torch._dynamo.reset()
    want = m(x)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx, torch.autograd.grad(want.sum(), x)[0], atol=1e-12,
                               rtol=1e-12)


@pytest.mark.parametrize("strategy", LN_STRATEGIES)
def test_explain_states_the_launches_the_layer_makes(strategy):
    """``fastrnn.explain`` of a LayerNorm layer: its strategy and launches per forward and
    backward, as counted when the layer runs."""
    m = _module("lstm", num_layers=2)
    x = torch.randn(5, 2, 3, dtype=DT, device=DEVICE, requires_grad=True)
    with fastrnn.force_strategy(strategy):
        rows = fastrnn.explain(m, x)
    assert [r["strategy"] for r in rows] == [strategy, strategy]
    assert all(r["layer_norm"] for r in rows)
    want = expected_launches(strategy, "lstm", T=5)
    assert {k["kernel"] for k in rows[0]["kernels"]} == set(want)
    fwd, bwd = rows[0]["launches_forward"], rows[0]["launches_backward"]
    assert (fwd, bwd) == tuple(want.values())
    with ln_launches(strategy, layers=2, T=5):
        m(x)[0].sum().backward()
    from fastrnn.explain import format_explanation
    assert "LayerNorm cell" in format_explanation(rows)


def test_torch_func_grad_and_vmap():
    """torch.func.grad through the kernels equals autograd's; vmap runs (torch's per-sample
    fallback: no batching rule of the LayerNorm op)."""
    m = _module("gru", num_layers=1)
    x = torch.randn(3, 2, 3, dtype=DT, device=DEVICE)
    params = dict(m.named_parameters())
    before = LAUNCHES["_ln_bwd_kernel"]
    got = torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,))[0].sum())(params)
    assert LAUNCHES["_ln_bwd_kernel"] > before
    want = torch.autograd.grad(m(x)[0].sum(), list(params.values()))
    for name, w in zip(params, want):
        torch.testing.assert_close(got[name], w, atol=1e-12, rtol=1e-12)
    with pytest.warns(UserWarning, match="batching rule for fastrnn::ln_recurrence"):
        y = torch.func.vmap(lambda t: m(t)[0])(torch.stack([x, 2 * x]))
    torch.testing.assert_close(y[1], m(2 * x)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padded_training_step_reads_nothing_on_the_host(cell, monkeypatch):
    """As torch.nn twins' (tests/test_ecosystem.py): the padded forward and backward never read
    a tensor's values on the host nor copy one across devices (what CUDA graph capture needs)."""
    from tests.test_ecosystem import _record_host_reads

    m = _module(cell)
    x = torch.randn(4, 3, 3, dtype=DT, device=DEVICE, requires_grad=True)
    calls = _record_host_reads(monkeypatch)
    out, hidden = m(x)
    out.sum().backward()
    assert calls == []
    assert x.grad is not None


def test_training_only_the_layer_norm_parameters():
    """The LayerNorm gains and biases alone require grad (everything else frozen): the forward
    still saves what the backward needs, and their gradients match the reference's."""
    m = _module("lstm", num_layers=1)
    for name, p in m.named_parameters():
        p.requires_grad_(name.startswith("ln_"))
    x = torch.randn(4, 2, 3, dtype=DT, device=DEVICE)
    ln = [p for n, p in m.named_parameters() if n.startswith("ln_")]
    got = torch.autograd.grad(m(x)[0].sum(), ln)
    y, _, _ = layer_norm_rnn_reference(_modes.LSTM, x, dict(m.named_parameters()), 1, True)
    for a, b in zip(got, torch.autograd.grad(y.sum(), ln)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


CELL_CLASSES = {"lstm": fastrnn.LayerNormLSTMCell, "gru": fastrnn.LayerNormGRUCell}


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cells_are_one_step_of_the_layer(cell, unbatched):
    """LayerNormLSTMCell / LayerNormGRUCell: one step of the layer's maths (the reference with
    the cell's parameters as layer 0's), forward and every gradient, through the kernels (one
    launch each way); torch.nn's cell inputs, including unbatched."""
    torch.manual_seed(0)
    m = CELL_CLASSES[cell](3, 5).to(DEVICE, DT)
    assert torch.equal(m.ln_hh_weight, torch.ones_like(m.ln_hh_weight))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    B = 1 if unbatched else 4
    x = torch.randn(B, 3, dtype=DT, device=DEVICE, requires_grad=True)
    h = torch.randn(B, 5, dtype=DT, device=DEVICE, requires_grad=True)
    c = torch.randn(B, 5, dtype=DT, device=DEVICE, requires_grad=True)
    hx = (h, c) if cell == "lstm" else h
    with ln_launches("persistent", layers=1, T=1):
        if unbatched:
            out = m(x[0], tuple(t[0] for t in hx) if cell == "lstm" else hx[0])
            got = [t[None] for t in out] if cell == "lstm" else [out[None]]
        else:
            out = m(x, hx)
            got = list(out) if cell == "lstm" else [out]
        ref = {f"{n}_l0": p for n, p in m.named_parameters()}
        y, hn, cn = layer_norm_rnn_reference(
            _modes.MODE_IDS[cell.upper()], x[None], ref, 1, False,
            (h[None], c[None]) if cell == "lstm" else h[None])
        want = [hn[0], cn[0]] if cell == "lstm" else [hn[0]]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        leaves = [x, h] + ([c] if cell == "lstm" else []) + list(m.parameters())
        ups = [torch.randn_like(w) for w in want]
        for a, b in zip(torch.autograd.grad(got, leaves, ups),
                        torch.autograd.grad(want, leaves, ups)):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
    with pytest.raises(ValueError, match="LayerNormGRUCell does not take recurrent_grad_clip"):
        fastrnn.LayerNormGRUCell(3, 4, recurrent_grad_clip=1.0)
    with pytest.raises(ValueError, match="has LayerNorm parameters"):
        fastrnn.to_torch(m)
