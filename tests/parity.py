"""Helpers for parity tests: fastrnn against torch.nn with shared weights.

A test builds a torch.nn module and its fastrnn twin (same state_dict), runs both on the same
inputs with the same random upstream gradients, and compares the forward outputs and every
gradient (input, h0, c0, each parameter).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from fastrnn.ops.recurrence import LAUNCHES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = ("padded", "packed_sorted", "packed_unsorted", "unbatched")


def launches(direction: str | None = None) -> int:
    """fastrnn kernel launches so far, of one direction of the pass ("fwd", "bwd") or both."""
    return sum(n for (_, d), n in LAUNCHES.items() if direction in (None, d))


def make_pair(cls_name: str, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    ref = getattr(torch.nn, cls_name)(*args, **kwargs).to(DEVICE)
    fast = getattr(fastrnn, cls_name)(*args, **kwargs).to(DEVICE)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return fast, ref


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
    both modules get identical leaves), plus the leaf tensors whose gradients are compared."""
    g = torch.Generator().manual_seed(seed)
    D = 2 if module.bidirectional else 1
    P = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    is_lstm = module.mode == "LSTM"
    unbatched = kind == "unbatched"
    if unbatched:
        x = torch.randn(T, module.input_size, generator=g, dtype=dtype)
    elif module.batch_first:
        x = torch.randn(B, T, module.input_size, generator=g, dtype=dtype)
    else:
        x = torch.randn(T, B, module.input_size, generator=g, dtype=dtype)
    hshape = (module.num_layers * D,) + (() if unbatched else (B,))
    hx = None
    if with_hx:
        h0 = torch.randn(*hshape, P, generator=g, dtype=dtype)
        hx = (h0, torch.randn(*hshape, module.hidden_size, generator=g, dtype=dtype)) \
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
    """Forward + backward with random upstream gradients; returns every tensor to compare."""
    leaves = [t.detach().clone().to(DEVICE).requires_grad_(True) for t in leaves]
    inp, hx = build(leaves)
    out, hidden = module(inp, hx)
    outs = {"output": out.data if isinstance(out, PackedSequence) else out}
    if isinstance(hidden, tuple):
        outs["h_n"], outs["c_n"] = hidden
    else:
        outs["h_n"] = hidden
    g = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(DEVICE) for t in outs.values()]
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
    assert got.keys() == want.keys()
    for key in want:
        w, g = want[key], got[key]
        assert g is not None and w is not None, key
        assert g.shape == w.shape, f"{key}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{key}: dtype {g.dtype} != {w.dtype}"
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")
