"""Mixed precision and autocast, and the GPU checks of every strategy, bf16 and long sequences.

Accuracy is measured against a float64 run of torch.nn with the same weights: fastrnn's fp32
error must be no worse than torch.nn's (TF32 off), and its fp16/bf16 error within 2x of torch.nn's
own in the same precision.
"""

import pytest
import torch

import fastrnn
from tests.parity import DEVICE, make_inputs, make_pair, run

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CELLS = [("LSTM", {}), ("GRU", {}), ("RNN", {})]


def _errors(name, kwargs, dtype, strategy, I=32, H=64, T=20, B=8, kind="padded"):
    fast, ref = make_pair(name, I, H, **kwargs)
    exact = getattr(torch.nn, name)(I, H, **kwargs).to(DEVICE).double()
    exact.load_state_dict(ref.state_dict())
    fast.to(dtype)
    ref.to(dtype)
    build, leaves = make_inputs(ref, kind, T, B, with_hx=True, dtype=dtype)
    with fastrnn.force_strategy(strategy):
        got = run(fast, build, leaves)
    want = run(ref, build, leaves)
    truth = run(exact, build, [t.double() for t in leaves])
    out = {}
    for key, t in truth.items():
        if t.is_floating_point():
            scale = t.abs().max().item() or 1.0
            out[key] = ((got[key].double() - t).abs().max().item() / scale,
                        (want[key].double() - t).abs().max().item() / scale)
    return out


def test_autocast_runs_the_layer_in_the_autocast_dtype():
    """Under autocast the whole layer runs in the autocast dtype (as torch.nn does), with
    fp32 states and weights cast on the way in."""
    fast, ref = make_pair("GRU", 5, 7, num_layers=2)
    x = torch.randn(4, 3, 5, device=DEVICE)
    h0 = torch.randn(2, 3, 7, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out, h = fast(x, h0)
    assert out.dtype == torch.float16 and h.dtype == torch.float16
    want, _ = ref(x, h0)
    torch.testing.assert_close(out.float(), want, atol=5e-3, rtol=5e-3)


@gpu
@pytest.mark.gpu
def test_autocast_bf16_runs_in_bf16_on_gpu():
    fast, ref = make_pair("LSTM", 32, 64, num_layers=2)
    x = torch.randn(50, 8, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, (h, c) = fast(x)
        ref_out, _ = ref(x)
    assert out.dtype == torch.bfloat16  # torch.nn runs fp16 under bf16 autocast
    torch.testing.assert_close(out.float(), ref_out.float(), atol=3e-2, rtol=3e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["persistent", "stepwise", "cooperative"])
@pytest.mark.parametrize("name,kwargs", CELLS, ids=[c[0] for c in CELLS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_error_within_2x_of_torch(name, kwargs, dtype, strategy):
    H = 32 if strategy == "persistent" else 256
    for key, (err_fast, err_torch) in _errors(name, kwargs, dtype, strategy, H=H).items():
        assert err_fast <= 2 * err_torch + 1e-3, (key, err_fast, err_torch)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["persistent", "stepwise", "cooperative"])
@pytest.mark.parametrize("name,kwargs", CELLS, ids=[c[0] for c in CELLS])
def test_fp32_error_no_worse_than_torch_tf32_off(name, kwargs, strategy, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    H = 32 if strategy == "persistent" else 256
    kind = "packed_unsorted"
    for key, (err_fast, err_torch) in _errors(name, kwargs, torch.float32, strategy, H=H,
                                              kind=kind).items():
        assert err_fast <= 2 * err_torch + 1e-6, (key, err_fast, err_torch)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["persistent", "stepwise", "cooperative"])
@pytest.mark.parametrize("name,kwargs", CELLS, ids=[c[0] for c in CELLS])
def test_long_sequence_every_strategy(name, kwargs, strategy, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    H = 32 if strategy == "persistent" else 256
    fast, ref = make_pair(name, 16, H, bidirectional=True, **kwargs)
    build, leaves = make_inputs(ref, "padded", 10_000, 4, with_hx=True)
    with fastrnn.force_strategy(strategy):
        got = run(fast, build, leaves)
    want = run(ref, build, leaves)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-3, rtol=1e-3, msg=key)


@gpu
@pytest.mark.gpu
def test_cooperative_grid_uses_many_programs_per_group():
    from fastrnn import _modes
    from fastrnn.ops import cooperative

    layout = cooperative.plan(_modes.LSTM, 512, 512, 64, 1, torch.device("cuda"))
    assert layout is not None and layout[3] > 1  # the barrier really synchronises programs
