"""torch.func through fastrnn: vmap, batched gradients, per-sample gradients, ensembles, Jacobians.

A vmapped call folds the vmapped dimension into the batch where the weights are shared (one kernel
launch for all samples, checked by counting launches); where the weights are batched (ensembles)
each model runs in turn. Forward-mode AD (jvp, jacfwd) runs the plain-PyTorch reference.
"""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, stack_module_state, vmap

import fastrnn
from fastrnn.ops.dispatch import force_strategy
from tests.parity import DEVICE, launches, strategy_runs, through_kernels

MODULES = {  # id -> (class name, constructor kwargs)
    "rnn_tanh": ("RNN", dict(num_layers=2, bidirectional=True)),
    "rnn_relu": ("RNN", dict(nonlinearity="relu")),
    "lstm": ("LSTM", dict(num_layers=2, bidirectional=True)),
    "lstm_proj": ("LSTM", dict(proj_size=2, bidirectional=True)),
    "gru": ("GRU", dict(num_layers=2)),
}
CELLS = {"rnn_cell": ("RNNCell", {}), "lstm_cell": ("LSTMCell", {}), "gru_cell": ("GRUCell", {})}


def _module(name, kwargs, I=3, H=4):
    torch.manual_seed(0)
    return getattr(fastrnn, name)(I, H, **kwargs).to(DEVICE).double()


def _torch_twin(name, kwargs, fast, I=3, H=4):
    """torch.nn's module with fastrnn's weights, on the CPU in float64: the oracle."""
    ref = getattr(nn, name)(I, H, **kwargs).double()
    ref.load_state_dict({k: v.cpu() for k, v in fast.state_dict().items()})
    return ref


@pytest.mark.parametrize("which", list(MODULES))
def test_gradcheck_with_batched_grad_modules(which):
    """gradcheck with batched gradients (it vmaps the backward with torch's legacy vmap)."""
    name, kwargs = MODULES[which]
    m = _module(name, kwargs)
    params = {k: v.detach() for k, v in m.named_parameters()}
    keys = list(params)

    def f(x, *ps):
        out, hidden = functional_call(m, dict(zip(keys, ps)), (x,))
        hs = hidden if isinstance(hidden, tuple) else (hidden,)
        return (out,) + hs

    x = torch.randn(3, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ps = [p.clone().requires_grad_() for p in params.values()]
    assert torch.autograd.gradcheck(f, [x, *ps], eps=1e-6, atol=1e-6, rtol=1e-5,
                                    check_batched_grad=True, fast_mode=True)


@pytest.mark.parametrize("which", list(CELLS))
def test_gradcheck_with_batched_grad_cells(which):
    name, kwargs = CELLS[which]
    m = _module(name, kwargs)
    params = {k: v.detach() for k, v in m.named_parameters()}
    keys = list(params)

    def f(x, h, *ps):
        state = (h, h * 0.5) if name == "LSTMCell" else h
        out = functional_call(m, dict(zip(keys, ps)), (x, state))
        return out if isinstance(out, tuple) else (out,)

    x = torch.randn(2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ps = [p.clone().requires_grad_() for p in params.values()]
    assert torch.autograd.gradcheck(f, [x, h, *ps], eps=1e-6, atol=1e-6, rtol=1e-5,
                                    check_batched_grad=True, fast_mode=True)


@pytest.mark.parametrize("which", list(MODULES) + list(CELLS))
def test_batched_gradients_through_torch_func_are_one_launch(which):
    """torch.func.vmap of a vjp over a batch of upstream gradients: fastrnn's backward folds them
    into its batch (one backward launch per layer for all of them) and gives each its own
    gradients of the input, the states and every parameter, as a loop of vjps does."""
    name, kwargs = {**MODULES, **CELLS}[which]
    m = _module(name, kwargs)
    params = {k: v.detach() for k, v in m.named_parameters()}
    cell = name.endswith("Cell")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*((2, 3) if cell else (3, 2, 3)), generator=g, dtype=torch.float64).to(DEVICE)

    def f(p, xx):
        out = functional_call(m, p, (xx,))
        return out if cell else out[0]

    out, vjp_fn = torch.func.vjp(f, params, x)
    outs = out if isinstance(out, tuple) else (out,)
    cotangents = [torch.randn(4, *o.shape, generator=g, dtype=torch.float64).to(DEVICE)
                  for o in outs]
    cot = tuple(cotangents) if isinstance(out, tuple) else cotangents[0]
    before = launches("bwd", "persistent"), launches()
    got_p, got_x = vmap(vjp_fn)(cot)
    # Small sizes run the persistent strategy: one backward launch per layer, all four included.
    layers = getattr(m, "num_layers", 1)
    assert (launches("bwd", "persistent") - before[0], launches() - before[1]) == (layers, layers)
    # The oracle: torch.nn's module, one vjp per upstream gradient.
    ref = _torch_twin(name, kwargs, m)
    ref_params = dict(ref.named_parameters())
    for i in range(4):
        xi = x.cpu().clone().requires_grad_()
        ref_out = ref(xi)
        ref_outs = ref_out if cell and isinstance(ref_out, tuple) else (
            ref_out if cell else ref_out[0],)
        wants = torch.autograd.grad(ref_outs, [xi, *ref_params.values()],
                                    [c[i].cpu() for c in cotangents])
        torch.testing.assert_close(got_x[i].cpu(), wants[0], atol=1e-12, rtol=1e-12)
        for k, want in zip(ref_params, wants[1:]):
            torch.testing.assert_close(got_p[k][i].cpu(), want, atol=1e-12, rtol=1e-12, msg=k)


class Classifier(nn.Module):
    """A small sequence classifier: LSTM over the sequence, a linear layer on the last state."""

    def __init__(self, lstm_cls):
        super().__init__()
        self.lstm = lstm_cls(3, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_per_sample_gradients_equal_a_loop_of_single_samples():
    """vmap(grad(loss)) over a batch (Opacus-style DP training) gives each sample's own gradient:
    the same as a backward pass per sample, and one launch for the whole batch."""
    torch.manual_seed(0)
    model = Classifier(fastrnn.LSTM).to(DEVICE).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    # Six "samples", each a pair of sequences (so the fold's grouping of rows matters).
    x = torch.randn(6, 2, 5, 3, dtype=torch.float64, device=DEVICE)
    target = torch.randint(0, 4, (6, 2), device=DEVICE)

    def loss(p, xi, ti):
        return nn.functional.cross_entropy(functional_call(model, p, (xi,)), ti)

    before = launches("fwd", "persistent"), launches("bwd", "persistent"), launches()
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    # Two layers: one forward and one backward launch each (persistent), for all six samples.
    assert (launches("fwd", "persistent") - before[0],
            launches("bwd", "persistent") - before[1], launches() - before[2]) == (2, 2, 4)
    # The oracle: the same classifier on torch.nn's LSTM, one backward per sample.
    ref = Classifier(nn.LSTM).double()
    ref.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    for i in range(6):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i].cpu()), target[i].cpu()).backward()
        for k, p in ref.named_parameters():
            torch.testing.assert_close(per_sample[k][i].cpu(), p.grad, atol=1e-10, rtol=1e-10,
                                       msg=k)


def test_ensemble_through_stack_module_state_equals_a_loop():
    """Models with different weights (stacked parameters): vmap runs each model in turn."""
    torch.manual_seed(0)
    models = [fastrnn.GRU(3, 4, bidirectional=True).to(DEVICE).double() for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE)

    def run(p, b, xi):
        return functional_call(base, (p, b), (xi,))[0]

    with through_kernels(backward=False):
        got = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    # The oracle: each model's torch.nn twin.
    refs = [_torch_twin("GRU", dict(bidirectional=True), m) for m in models]
    for i, ref in enumerate(refs):
        torch.testing.assert_close(got[i].cpu(), ref(x.cpu())[0], atol=1e-12, rtol=1e-12)

    def loss(p, b, xi):
        return run(p, b, xi).pow(2).sum()

    with through_kernels(backward=True):
        grads = vmap(grad(loss), in_dims=(0, 0, None))(params, buffers, x)
    for i, ref in enumerate(refs):
        ref(x.cpu())[0].pow(2).sum().backward()
        for k, p in ref.named_parameters():
            torch.testing.assert_close(grads[k][i].cpu(), p.grad, atol=1e-10, rtol=1e-10, msg=k)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_vmap_of_a_layer_is_one_launch(name):
    """vmap over extra leading inputs folds them into the batch: one forward launch, and the
    same outputs as calling the layer on each."""
    torch.manual_seed(0)
    layer = getattr(fastrnn, name)(3, 4).to(DEVICE).double()
    xs = torch.randn(4, 5, 2, 3, dtype=torch.float64, device=DEVICE)  # 4 calls of [T=5, B=2]
    before = launches("fwd", "persistent"), launches()
    out = vmap(lambda x: layer(x)[0])(xs)
    assert (launches("fwd", "persistent") - before[0], launches() - before[1]) == (1, 1)
    ref = _torch_twin(name, {}, layer)
    for i in range(4):
        torch.testing.assert_close(out[i].cpu(), ref(xs[i].cpu())[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("strategy", ["persistent", "stepwise", "cooperative"])
@pytest.mark.parametrize("name,kwargs", [("LSTM", {}), ("GRU", dict(bidirectional=True))])
def test_jacobians_match_torch(name, kwargs, strategy):
    """jacrev (vmap over the backward) and jacfwd (forward mode, through the reference) against
    the Jacobian of torch.nn, in float64."""
    torch.manual_seed(0)
    ref = getattr(nn, name)(2, 3, **kwargs).double()
    fast = getattr(fastrnn, name)(2, 3, **kwargs).to(DEVICE).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    want = torch.autograd.functional.jacobian(lambda xx: ref(xx)[0], x)
    with strategy_runs(strategy, backward=True):
        got_rev = jacrev(lambda xx: fast(xx)[0])(x.to(DEVICE))
    with force_strategy(strategy):
        got_fwd = jacfwd(lambda xx: fast(xx)[0])(x.to(DEVICE))
    torch.testing.assert_close(got_rev.cpu(), want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got_fwd.cpu(), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_grad_of_grad_matches_torch(name):
    """Second derivatives through torch.func (grad of grad): the first-order gradient runs on the
    kernels, its derivative differentiates the reference; both against torch.nn on the CPU."""
    torch.manual_seed(0)
    ref = getattr(nn, name)(2, 3).double()
    fast = getattr(fastrnn, name)(2, 3).to(DEVICE).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 2, dtype=torch.float64)

    def penalty(module, device):
        params = {k: v.detach().to(device) for k, v in module.named_parameters()}

        def loss(p, xx):
            return functional_call(module, p, (xx,))[0].pow(2).sum()

        def grad_norm(p, xx):
            g = grad(loss, argnums=1)(p, xx)
            return g.pow(2).sum()

        return grad(grad_norm, argnums=(0, 1))(params, x.to(device))

    got_p, got_x = penalty(fast, DEVICE)
    want_p, want_x = penalty(ref, "cpu")
    torch.testing.assert_close(got_x.cpu(), want_x, atol=1e-10, rtol=1e-10)
    for k in want_p:
        torch.testing.assert_close(got_p[k].cpu(), want_p[k], atol=1e-10, rtol=1e-10)
