"""Property-based parity with torch.nn (hypothesis): random cell types, awkward sizes (1 and
primes), layers, directions, layouts, bias, proj_size, packed lengths with ties and length-1 rows,
hx present or absent, and inputs and states that are transposed, sliced or expanded views.

Deterministic in CI (``derandomize``); a failure prints the drawn configuration and its data
seed (``note``) together with hypothesis's own reproduction line.
"""

import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

from tests.parity import DEVICE, assert_close_to_truth, exact_twin, make_pair, strategy_runs

CELLS = {"rnn_tanh": ("RNN", {}), "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
         "lstm": ("LSTM", {}), "gru": ("GRU", {})}
SIZES = [1, 2, 3, 5, 7, 11, 13]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


@st.composite
def problems(draw):
    cell = draw(st.sampled_from(sorted(CELLS)))
    H = draw(st.sampled_from(SIZES))
    cfg = dict(
        cell=cell, I=draw(st.sampled_from(SIZES)), H=H, layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        proj=draw(st.integers(1, H - 1)) if cell == "lstm" and H > 1 and draw(st.booleans()) else 0,
        T=draw(st.integers(1, 5)), B=draw(st.integers(1, 4)),
        kind=draw(st.sampled_from(["padded", "packed", "unbatched"])),
        with_hx=draw(st.booleans()), x_layout=draw(st.sampled_from(LAYOUTS)),
        hx_layout=draw(st.sampled_from(LAYOUTS)),
        strategy=draw(st.sampled_from(["persistent", "stepwise"])),
        seed=draw(st.integers(0, 2**16)))
    if cfg["kind"] == "unbatched":
        cfg["B"] = 1
    if cfg["kind"] == "packed":
        lengths = draw(st.lists(st.integers(1, cfg["T"]), min_size=cfg["B"], max_size=cfg["B"]))
        cfg["lengths"] = lengths
        cfg["enforce_sorted"] = draw(st.booleans())
        if cfg["enforce_sorted"]:
            cfg["lengths"] = sorted(lengths, reverse=True)
    return cfg


def _view(t: torch.Tensor, layout: str, batch_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, view): a leaf to take gradients on, and a view of it with the given layout."""
    if layout == "transposed":  # same values, memory with the first two dims swapped
        leaf = t.transpose(0, 1).contiguous().requires_grad_()
        return leaf, leaf.transpose(0, 1)
    if layout == "sliced":  # every other element of a twice-as-wide last dim
        leaf = torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2).requires_grad_()
        return leaf, leaf[..., ::2]
    if layout == "expanded" and t.dim() > batch_dim:  # one row broadcast over the batch
        leaf = t.narrow(batch_dim, 0, 1).clone().requires_grad_()
        return leaf, leaf.expand_as(t)
    leaf = t.clone().requires_grad_()
    return leaf, leaf


def _run(module, cfg, x, hx):
    batch_dim = 0 if cfg["batch_first"] else 1
    x_leaf, x_view = _view(x, cfg["x_layout"], batch_dim if cfg["kind"] != "unbatched" else 9)
    leaves, views = [x_leaf], []
    for h in hx:
        leaf, view = _view(h, cfg["hx_layout"], 1 if cfg["kind"] != "unbatched" else 9)
        leaves.append(leaf)
        views.append(view)
    inp = x_view
    if cfg["kind"] == "packed":
        inp = pack_padded_sequence(x_view, torch.tensor(cfg["lengths"]),
                                   batch_first=cfg["batch_first"],
                                   enforce_sorted=cfg["enforce_sorted"])
    state = None if not views else (tuple(views) if len(views) == 2 else views[0])
    out, hidden = module(inp, state)
    outs = [out.data if hasattr(out, "batch_sizes") else out]
    outs += list(hidden) if isinstance(hidden, tuple) else [hidden]
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).to(o) for o in outs])
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    result.update({f"grad_leaf{i}": leaf.grad for i, leaf in enumerate(leaves)})
    result.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
    return result


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_fuzzed_parity_with_torch_nn(cfg):
    note(f"configuration: {cfg}")
    name, extra = CELLS[cfg["cell"]]
    kwargs = dict(num_layers=cfg["layers"], bidirectional=cfg["bidirectional"],
                  batch_first=cfg["batch_first"], bias=cfg["bias"], **extra)
    if cfg["proj"]:
        kwargs["proj_size"] = cfg["proj"]
    fast, ref = make_pair(name, cfg["I"], cfg["H"], seed=cfg["seed"], **kwargs)
    g = torch.Generator().manual_seed(cfg["seed"])
    T, B, I, H = cfg["T"], cfg["B"], cfg["I"], cfg["H"]
    if cfg["kind"] == "unbatched":
        x = torch.randn(T, I, generator=g)
    else:
        x = torch.randn(*((B, T) if cfg["batch_first"] else (T, B)), I, generator=g)
    D = 2 if cfg["bidirectional"] else 1
    batch = () if cfg["kind"] == "unbatched" else (B,)
    hx = []
    if cfg["with_hx"]:
        hx.append(torch.randn(cfg["layers"] * D, *batch, cfg["proj"] or H, generator=g))
        if name == "LSTM":
            hx.append(torch.randn(cfg["layers"] * D, *batch, H, generator=g))
    x, hx = x.to(DEVICE), [h.to(DEVICE) for h in hx]
    with strategy_runs(cfg["strategy"], backward=True):
        got = _run(fast, cfg, x, hx)
    want = _run(ref, cfg, x, hx)
    truth = _run(exact_twin(ref), cfg, x.cpu().double(), [h.cpu().double() for h in hx])
    assert_close_to_truth(got, want, truth)
