"""Bad input: the same exception class and message as torch.nn, and nothing changes.

Where torch.nn's message comes from its own Python checks, fastrnn's is identical. Three cases
come from deep inside ATen on torch.nn's side and differ between its CPU and CUDA backends; there
fastrnn raises the class torch.nn raises with the message of ATen's own input check (the one
torch.nn's CUDA path uses), and the expectation is written out below:

* hx of another dtype than the input: ATen's ``check_attributes`` message.
* packed input to an LSTM: torch.nn skips its Python checks for it (an upstream inconsistency)
  and fails later with messages from matrix multiplies or broadcasting; fastrnn checks it like
  packed input to RNN and GRU.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

from tests.parity import DEVICE, make_pair

I, H = 4, 8
CELLS = ["RNN", "LSTM", "GRU"]


def _hx(name, *shape, h=H, dtype=torch.float32, device=DEVICE):
    h0 = torch.randn(*shape, h, dtype=dtype, device=device)
    return (h0, torch.randn(*shape, H, dtype=dtype, device=device)) if name == "LSTM" else h0


def _packed(feature=I, dtype=torch.float32):
    return pack_sequence([torch.randn(3, feature, dtype=dtype, device=DEVICE),
                          torch.randn(2, feature, dtype=dtype, device=DEVICE)])


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


CASES = {  # all tensors on the modules' device: each case fails for its own reason only
    "wrong-input-size": lambda n: (_x(5, 3, I + 1), None),
    "wrong-input-size-unbatched": lambda n: (_x(5, I + 1), None),
    "4d-input": lambda n: (_x(5, 3, I, 1), None),
    "1d-input": lambda n: (_x(I), None),
    "input-dtype": lambda n: (_x(5, 3, I, dtype=torch.float64), None),
    "int-input": lambda n: (torch.randint(0, 3, (5, 3, I), device=DEVICE), None),
    "seq-len-0": lambda n: (_x(0, 3, I), None),
    "seq-len-0-unbatched": lambda n: (_x(0, I), None),
    "hx-batch": lambda n: (_x(5, 3, I), _hx(n, 1, 2)),
    "hx-layers": lambda n: (_x(5, 3, I), _hx(n, 2, 3)),
    "hx-size": lambda n: (_x(5, 3, I), _hx(n, 1, 3, h=H + 1)),
    "hx-2d-for-batched": lambda n: (_x(5, 3, I), _hx(n, 3)),
    "hx-3d-for-unbatched": lambda n: (_x(5, I), _hx(n, 1, 1)),
    "hx-dtype": lambda n: (_x(5, 3, I), _hx(n, 1, 3, dtype=torch.float64)),
    "hx-device": lambda n: (_x(5, 3, I), _hx(n, 1, 3, device="meta")),
    "packed-wrong-input-size": lambda n: (_packed(I + 1), None),
    "packed-input-dtype": lambda n: (_packed(dtype=torch.float64), None),
    "packed-hx-batch": lambda n: (_packed(), _hx(n, 1, 3)),
}
CASES["lstm-cx-size"] = lambda n: (_x(5, 3, I), (_x(1, 3, H), _x(1, 3, H - 1)))
CASES["lstm-hx-not-tuple"] = lambda n: (_x(5, 3, I), _x(1, 3, H))
LSTM_ONLY = {"lstm-cx-size", "lstm-hx-not-tuple"}

# (case, cell) -> (exception class, message) where torch.nn's message is backend-specific.
DIVERGENT = {
    ("hx-dtype", "RNN"): (RuntimeError, "Input and hidden tensors are not the same dtype, found "
                                        "input tensor with Float and hidden tensor with Double"),
    ("hx-dtype", "GRU"): (RuntimeError, "Input and hidden tensors are not the same dtype, found "
                                        "input tensor with Float and hidden tensor with Double"),
    ("hx-dtype", "LSTM"): (RuntimeError, "Input and hidden tensors are not the same dtype, found "
                                         "input tensor with Float and hidden tensor with Double"),
    ("packed-wrong-input-size", "LSTM"): (
        RuntimeError, "input.size(-1) must be equal to input_size. Expected 4, got 5"),
    ("packed-input-dtype", "LSTM"): (
        ValueError, "RNN input dtype (torch.float64) does not match weight dtype (torch.float32). "
                    "Convert input: input.to(torch.float32), or convert model: "
                    "model.to(torch.float64)"),
    ("packed-hx-batch", "LSTM"): (RuntimeError, "Expected hidden[0] size (1, 2, 8), got [1, 3, 8]"),
}


def _snapshot(module, tensors):
    return ([p.detach().clone() for p in module.parameters()],
            [t.detach().clone() for t in tensors if t is not None and t.device.type != "meta"])


def _flatten(inp, hx):
    out = [inp.data if hasattr(inp, "batch_sizes") else inp]
    if isinstance(hx, tuple):
        out += list(hx)
    elif hx is not None:
        out.append(hx)
    return out


@pytest.mark.parametrize("case,cell", [(case, cell) for case in CASES for cell in CELLS
                                       if case not in LSTM_ONLY or cell == "LSTM"])
def test_bad_input_raises_like_torch_and_changes_nothing(case, cell):
    fast, ref = make_pair(cell, I, H)
    inp, hx = CASES[case](cell)
    with pytest.raises(Exception) as want:
        ref(inp, hx)
    params, tensors = _snapshot(fast, _flatten(inp, hx))
    expected_type, expected_msg = DIVERGENT.get((case, cell), (want.type, str(want.value)))
    with pytest.raises(Exception) as got:
        fast(inp, hx)
    assert got.type is expected_type, (got.type, got.value)
    assert str(got.value) == expected_msg
    after_params, after_tensors = _snapshot(fast, _flatten(inp, hx))
    assert all(torch.equal(a, b) for a, b in zip(params, after_params))
    assert all(torch.equal(a, b) for a, b in zip(tensors, after_tensors))
    assert all(p.grad is None for p in fast.parameters())
    assert fast.training


@pytest.mark.parametrize("cell", CELLS)
def test_weights_on_other_device_raise_like_torch(cell):
    fast, ref = make_pair(cell, I, H)
    with torch.no_grad():
        for m in (fast, ref):
            m.weight_hh_l0 = torch.nn.Parameter(m.weight_hh_l0.to("meta"))
    x = _x(5, 3, I)
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        fast(x)
    assert str(got.value) == str(want.value)
