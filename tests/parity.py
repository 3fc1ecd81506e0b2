"""Helpers for parity tests: fastrnn against torch.nn with shared weights.

A test builds a torch.nn module and its fastrnn twin (same state_dict), runs both on the same
inputs with the same random upstream gradients, and compares the forward outputs and every
gradient (input, h0, c0, each parameter).

How close is close enough comes from torch.nn itself (``assert_matches_torch``): a third run, of
torch.nn in float64 on the CPU, is the truth; fastrnn's error against it may be at most twice
torch.nn's own error in the same precision, plus a floor of a few units in the last place of the
tensor's scale (for results torch.nn happens to get exactly). On a CPU both errors are rounding
noise; on a GPU they include cuDNN's and fastrnn's different summation orders and TF32.
"""

from __future__ import annotations

import collections
import contextlib
import copy

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from fastrnn.ops import dispatch
from fastrnn.ops.dispatch import force_strategy
from fastrnn.ops.select import LAUNCHES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = ("padded", "packed_sorted", "packed_unsorted", "unbatched")
ULPS = 64  # the floor, in units of the dtype's epsilon times the tensor's largest magnitude
STRATEGIES = ("persistent", "stepwise", "cooperative")
TORCH_RNN_OPS = ("lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell",
                 "rnn_relu_cell")


def launches(direction: str | None = None, strategy: str | None = None) -> int:
    """fastrnn kernel launches counted where they happen (``select.launch_kernel`` and the
    stepwise fast launcher), of one pass ("fwd", "bwd") or both, one strategy or all."""
    return dispatch.launch_counts(strategy, direction)


def _grown(before: collections.Counter) -> dict:
    """Kernels launched since ``before``, by name; every name must belong to a strategy."""
    grown = {k: n - before.get(k, 0) for k, n in LAUNCHES.items() if n != before.get(k, 0)}
    known = {k for s in dispatch.STRATEGY_NAMES for k in dispatch.strategy_kernels(s)}
    assert set(grown) <= known, f"kernels no strategy declares launched: {set(grown) - known}"
    return grown


@contextlib.contextmanager
def strategy_runs(strategy: str, backward: bool | None = None):
    """Force ``strategy`` inside the block and check that it ran: torch's RNN ops refused, its
    forward kernels launched (and its backward kernels, with ``backward=True``; none with
    ``backward=False``), and no other strategy's kernel did."""
    before = collections.Counter(LAUNCHES)
    with force_strategy(strategy), refusing_torch_rnn():
        yield
    grown = _grown(before)
    others = {k: n for k, n in grown.items() if k not in dispatch.strategy_kernels(strategy)}
    assert not others, f"forced {strategy!r}, but other strategies' kernels ran: {others}"
    fwd = sum(grown.get(k, 0) for k in dispatch.strategy_kernels(strategy, "fwd"))
    bwd = sum(grown.get(k, 0) for k in dispatch.strategy_kernels(strategy, "bwd"))
    assert fwd > 0, f"forced {strategy!r}, but none of its forward kernels launched"
    if backward is not None:
        assert (bwd > 0) == backward, f"{strategy!r} backward kernels launched: {bwd}"


@contextlib.contextmanager
def refusing_torch_rnn():
    """torch's fused RNN ops (cuDNN's and ATen's: what torch.nn's RNN modules and cells call)
    raise inside the block."""
    from torch import _VF

    saved = []

    def refuse(name):
        def op(*args, **kwargs):
            raise AssertionError(f"torch's RNN op {name!r} ran where fastrnn's kernels should")
        return op

    for namespace in (_VF, torch):
        for name in TORCH_RNN_OPS:
            saved.append((namespace, name, namespace.__dict__.get(name, _MISSING)))
            setattr(namespace, name, refuse(name))
    try:
        yield
    finally:
        for namespace, name, value in reversed(saved):
            if value is _MISSING:
                delattr(namespace, name)
            else:
                setattr(namespace, name, value)


_MISSING = object()


@contextlib.contextmanager
def through_kernels(backward: bool = True):
    """The block runs fastrnn's kernels, not torch.nn's: torch's RNN ops refused, and kernel
    launches grew, forward (and backward, with ``backward=True``)."""
    before = collections.Counter(LAUNCHES)
    with refusing_torch_rnn():
        yield
    grown = _grown(before)
    fwd = sum(n for k, n in grown.items() if k in dispatch.strategy_kernels_of("fwd"))
    bwd = sum(n for k, n in grown.items() if k in dispatch.strategy_kernels_of("bwd"))
    assert fwd > 0, "no fastrnn forward kernel launched"
    if backward:
        assert bwd > 0, "no fastrnn backward kernel launched"


def make_pair(cls_name: str, *args, seed: int = 0, ref_device: str | None = None, **kwargs):
    """(fastrnn module on DEVICE, torch.nn module with the same weights on ``ref_device``
    (default DEVICE; "cpu" where cuDNN refuses what a test needs))."""
    torch.manual_seed(seed)
    ref = getattr(torch.nn, cls_name)(*args, **kwargs).to(ref_device or DEVICE)
    fast = getattr(fastrnn, cls_name)(*args, **kwargs).to(DEVICE)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return fast, ref


def device_of(module) -> torch.device:
    return next(module.parameters()).device


def _lengths(kind: str, B: int, T: int) -> list[int]:
    if kind == "packed_sorted":  # decreasing, with a tie and a length-1 row when B allows
        base = [T, T, max(T - 2, 1), 1, max(T - 1, 1)]
        return sorted(base[:B], reverse=True) if B <= 5 else sorted(
            [max(1, T - (b % T)) for b in range(B)], reverse=True)
    base = [max(T - 2, 1), T, 1, T, max(T - 1, 1)]  # unsorted, longest not first
    return base[:B] if B <= 5 else [max(1, T - ((7 * b) % T)) for b in range(B)]


def make_inputs(module, kind: str, T: int, B: int, with_hx: bool, seed: int = 1,
                dtype=torch.float32):
    """Return (input_factory, hx_leaves): a function building the module input from leaves (so
    every module gets identical leaves), plus the leaf tensors whose gradients are compared.
    The leaves are made on the CPU; ``run`` moves them to each module's device."""
    g = torch.Generator().manual_seed(seed)
    D = 2 if module.bidirectional else 1
    P = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    is_lstm = module.mode == "LSTM"
    unbatched = kind == "unbatched"
    if unbatched:
        x = torch.randn(T, module.input_size, generator=g).to(dtype)
    elif module.batch_first:
        x = torch.randn(B, T, module.input_size, generator=g).to(dtype)
    else:
        x = torch.randn(T, B, module.input_size, generator=g).to(dtype)
    hshape = (module.num_layers * D,) + (() if unbatched else (B,))
    hx = None
    if with_hx:
        h0 = torch.randn(*hshape, P, generator=g).to(dtype)
        hx = (h0, torch.randn(*hshape, module.hidden_size, generator=g).to(dtype)) \
            if is_lstm else h0
    lengths = _lengths(kind, B, T) if kind.startswith("packed") else None

    def build(leaves):
        x_leaf = leaves[0]
        if lengths is None:
            inp = x_leaf
        else:
            inp = pack_padded_sequence(x_leaf, torch.tensor(lengths), batch_first=module.batch_first,
                                       enforce_sorted=kind == "packed_sorted")
        if hx is None:
            return inp, None
        return inp, (tuple(leaves[1:3]) if is_lstm else leaves[1])

    leaves = [x] + ([] if hx is None else (list(hx) if is_lstm else [hx]))
    return build, leaves


def run(module, build, leaves, grad_seed: int = 2):
    """Forward + backward with random upstream gradients; returns every tensor to compare.
    The leaves go to the module's device and dtype; the upstream gradients are drawn in fp32 on
    the CPU, so every module gets the same ones."""
    device = device_of(module)
    dtype = next(module.parameters()).dtype
    leaves = [t.detach().clone().to(device, dtype if t.is_floating_point() else t.dtype)
              .requires_grad_(True) for t in leaves]
    inp, hx = build(leaves)
    out, hidden = module(inp, hx)
    outs = {"output": out.data if isinstance(out, PackedSequence) else out}
    if isinstance(hidden, tuple):
        outs["h_n"], outs["c_n"] = hidden
    else:
        outs["h_n"] = hidden
    g = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(t.shape, generator=g).to(t) for t in outs.values()]
    torch.autograd.backward(list(outs.values()), grads)
    result = {k: v.detach() for k, v in outs.items()}
    names = ["input", "h0", "c0"]
    for name, leaf in zip(names, leaves):
        result[f"grad_{name}"] = leaf.grad
    for name, p in module.named_parameters():
        result[f"grad_{name.removeprefix('_orig_mod.')}"] = p.grad  # torch.compile's wrapper
    if isinstance(out, PackedSequence):
        result["batch_sizes"] = out.batch_sizes
        for attr in ("sorted_indices", "unsorted_indices"):
            value = getattr(out, attr)
            result[attr] = value if value is not None else torch.tensor([])
    return result


def assert_parity(got: dict, want: dict, atol: float = 1e-5, rtol: float = 1e-5):
    """Same keys, shapes and dtypes, values within fixed tolerances (for runs that should agree
    to rounding: fastrnn against itself, or float64)."""
    assert got.keys() == want.keys()
    for key in want:
        w, g = want[key], got[key]
        assert g is not None and w is not None, key
        assert g.shape == w.shape, f"{key}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{key}: dtype {g.dtype} != {w.dtype}"
        torch.testing.assert_close(g.cpu(), w.cpu(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{key}: {m}")


def exact_twin(ref):
    """torch.nn's module in float64 on the CPU: the truth both sides are measured against."""
    return copy.deepcopy(ref).cpu().double()


def assert_close_to_truth(got: dict, want: dict, truth: dict, factor: float = 2.0,
                          ulps: float = ULPS, dtype: torch.dtype | None = None):
    """fastrnn's error against the float64 truth at most ``factor`` times torch.nn's, or a few
    ulps of the tensor's scale; shapes, dtypes and integer results exactly as torch.nn's."""
    assert got.keys() == want.keys() == truth.keys()
    for key in want:
        g, w, t = got[key], want[key], truth[key]
        assert g is not None and w is not None, key
        assert g.shape == w.shape, f"{key}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{key}: dtype {g.dtype} != {w.dtype}"
        if not w.is_floating_point():
            assert torch.equal(g.cpu(), w.cpu()), key
            continue
        if not t.numel():
            continue
        t = t.double()
        scale = t.abs().nan_to_num(posinf=0, neginf=0).max().item() or 1.0
        err_fast = (g.cpu().double() - t).abs().max().item()
        err_torch = (w.cpu().double() - t).abs().max().item()
        floor = ulps * torch.finfo(dtype or w.dtype).eps * scale
        assert err_fast <= max(factor * err_torch, floor), (
            f"{key}: fastrnn's error {err_fast:.3g} against float64 is more than {factor}x "
            f"torch.nn's ({err_torch:.3g}) and the floor {floor:.3g}")


def _kernels_ran(strategy: str | None, backward: bool):
    if strategy:
        return strategy_runs(strategy, backward=backward)
    return through_kernels(backward=backward)


def assert_matches_torch(fast, ref, build, leaves, strategy: str | None = None,
                         **kwargs) -> dict:
    """Run fastrnn (with ``strategy`` forced, if given), torch.nn and the float64 truth on the
    same inputs and upstream gradients; check fastrnn against torch.nn's own error, and that
    fastrnn's run went through its kernels. Returns fastrnn's results."""
    truth_module = exact_twin(ref)  # before any forward: parametrized weights deepcopy then
    with _kernels_ran(strategy, True):
        got = run(fast, build, leaves)
    want = run(ref, build, leaves)
    truth = run(truth_module, build, leaves)
    assert_close_to_truth(got, want, truth, **kwargs)
    return got


def assert_forward_matches_torch(fast, ref, *inputs, ulps: float = ULPS,
                                 strategy: str | None = None):
    """No-grad forward of fastrnn and torch.nn against float64 truth (outputs and states, NaN and
    infinities where torch.nn has them)."""
    def flat(module, args):
        device = device_of(module)
        dtype = next(module.parameters()).dtype
        moved = []
        for a in args:
            if isinstance(a, tuple):
                moved.append(tuple(t.to(device, dtype) for t in a))
            else:
                moved.append(a if a is None else a.to(device, dtype))
        with torch.no_grad():
            out, hidden = module(*moved)
        return {"output": out, **({"h_n": hidden[0], "c_n": hidden[1]} if isinstance(hidden, tuple)
                                  else {"h_n": hidden})}

    with _kernels_ran(strategy, False):
        got = flat(fast, inputs)
    want, truth = flat(ref, inputs), flat(exact_twin(ref), inputs)
    for key in want:
        nan = truth[key].isnan()
        assert torch.equal(got[key].isnan().cpu(), want[key].isnan().cpu()), key
        for d in (got, want, truth):
            d[key] = d[key].cpu().double().masked_fill(nan.cpu(), 0.0)
        inf = truth[key].isinf()
        assert torch.equal(got[key][inf], truth[key][inf]), key
        for d in (got, want, truth):
            d[key] = d[key].masked_fill(inf, 0.0)
    assert_close_to_truth(got, want, truth, ulps=ulps, dtype=next(ref.parameters()).dtype)


@contextlib.contextmanager
def full_fp32():
    """fp32 without TF32 on both sides (cuDNN's RNNs, so fastrnn's too, and cuBLAS), for tests
    that compare whole training trajectories. No effect on a CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
