"""Precision: which switch governs fp32, mixed precision and autocast, and the GPU checks of every
strategy in fp16/bf16/fp32 and over long sequences.

Accuracy is measured against a float64 run of torch.nn with the same weights (on the CPU): fastrnn's
fp32 error must be no worse than torch.nn's, and its fp16/bf16 error within 2x of torch.nn's own in
the same precision.
"""

import copy

import pytest
import torch

from fastrnn.ops import recurrence as rec
from fastrnn.ops import dispatch, select
from tests.parity import (DEVICE, assert_close_to_truth, exact_twin, full_fp32, make_inputs,
                          make_pair, run, strategy_runs, through_kernels)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CELLS = [("LSTM", {}), ("GRU", {}), ("RNN", {})]


def test_fp32_follows_cudnns_rnn_tf32_switch(monkeypatch):
    """On CUDA fp32 recurrences follow the switch torch.nn's cuDNN RNNs follow: TF32 tensor cores
    when it is on (torch's default), three-pass TF32 (about fp32 accuracy, still tensor cores) when
    it is off; never Triton's scalar-FMA "ieee" dot. The matmul switch does not matter."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(select, "interpreting", lambda: False)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for cudnn_tf32, matmul_tf32 in [(True, False), (True, True), (False, False),
                                        (False, True)]:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
            want = "tf32" if cudnn_tf32 else "tf32x3"
            assert select.precision(torch.float32, cuda) == want
        assert select.precision(torch.float16, cuda) == "ieee"   # no fp32 operands
        assert select.precision(torch.float64, cuda) == "ieee"
        assert select.precision(torch.float32, torch.device("cpu")) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision"),
                    reason="this torch has no per-operator TF32 switches")
def test_fp32_follows_the_per_operator_switch(monkeypatch):
    """torch >= 2.9: cuDNN's RNNs read ``torch.backends.cudnn.rnn.fp32_precision``."""
    monkeypatch.setattr(select, "interpreting", lambda: False)
    rnn = torch.backends.cudnn.rnn
    saved = rnn.fp32_precision
    try:
        rnn.fp32_precision = "ieee"
        assert select.precision(torch.float32, torch.device("cuda")) == "tf32x3"
        rnn.fp32_precision = "tf32"
        assert select.precision(torch.float32, torch.device("cuda")) == "tf32"
    finally:
        rnn.fp32_precision = saved


def test_op_gemms_follow_the_same_switch(monkeypatch):
    """The op's own GEMMs (input projection, weight gradients) follow cuDNN's switch too, for
    the duration of the op only: the user's matmul setting is left as it was."""
    matmul = torch.backends.cuda.matmul
    saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
    seen = []
    try:
        torch.backends.cudnn.allow_tf32 = True
        matmul.allow_tf32 = False
        with rec.gemm_precision(torch.float32, torch.device("cuda")):
            seen.append(matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        matmul.allow_tf32 = True
        with rec.gemm_precision(torch.float32, torch.device("cuda")):
            seen.append(matmul.allow_tf32)
        with rec.gemm_precision(torch.float16, torch.device("cuda")):
            seen.append(matmul.allow_tf32)  # not fp32: untouched
        assert seen == [True, False, True]
        assert matmul.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_autocast_runs_the_layer_in_the_autocast_dtype():
    """Under autocast the whole layer runs in the autocast dtype (as torch.nn does), with
    fp32 states and weights cast on the way in."""
    fast, ref = make_pair("GRU", 5, 7, num_layers=2)
    x = torch.randn(4, 3, 5, device=DEVICE)
    h0 = torch.randn(2, 3, 7, device=DEVICE)
    with through_kernels(backward=False), torch.autocast(DEVICE, dtype=torch.float16):
        out, h = fast(x, h0)
    assert out.dtype == torch.float16 and h.dtype == torch.float16
    want, _ = ref(x, h0)
    torch.testing.assert_close(out.float(), want, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("gpu_name", ["H100", "A100", "L4"])
def test_cooperative_plans_many_programs_per_group(gpu_name):
    """Where it applies, the cooperative strategy spreads a recurrence over several programs per
    group (so its barrier really synchronises programs) and never more programs than SMs."""
    from fastrnn import _modes

    spec = select.GPUS[gpu_name]
    for mode, H, B, D in [(_modes.LSTM, 256, 16, 1), (_modes.GRU, 128, 64, 2),
                          (_modes.RNN_TANH, 512, 8, 1)]:
        problem = select.Problem(mode, B, H, H, D, torch.float16)
        the_plan = dispatch.plan(problem, spec, "cooperative")
        per_group, batch_tiles, directions = the_plan.grid
        assert per_group > 1 and per_group * batch_tiles * directions <= spec.sm_count
        assert dispatch.plan(problem, spec).strategy == "cooperative"


def _errors(name, kwargs, dtype, strategy, I=32, H=64, T=20, B=8, kind="padded"):
    fast, ref = make_pair(name, I, H, **kwargs)
    fast.to(dtype)
    ref.to(dtype)
    truth = exact_twin(ref)
    build, leaves = make_inputs(ref, kind, T, B, with_hx=True, dtype=dtype)
    with strategy_runs(strategy, backward=True):
        got = run(fast, build, leaves)
    return got, run(ref, build, leaves), run(truth, build, leaves)


@gpu
@pytest.mark.gpu
def test_autocast_bf16_error_within_2x_of_torch_in_bf16():
    """Under bf16 autocast the layer runs in bf16 through the kernels, and its error against
    float64 is within 2x of torch.nn's own run in bf16 (same rounded weights and input)."""
    fast, ref = make_pair("LSTM", 32, 64, num_layers=2)
    x = torch.randn(50, 8, 32, device="cuda")
    with through_kernels(backward=False), torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, (h, c) = fast(x)
    assert out.dtype == torch.bfloat16
    ref_bf16 = copy.deepcopy(ref).bfloat16()
    xb = x.bfloat16()
    with torch.no_grad():
        try:
            want = ref_bf16(xb)
        except RuntimeError:  # a cuDNN without bf16 RNNs: torch.nn's CPU kernels in bf16
            want = ref_bf16.cpu()(xb.cpu())
        truth = exact_twin(ref_bf16)(xb.cpu().double())

    def flat(r):
        return {"output": r[0], "h_n": r[1][0], "c_n": r[1][1]}

    got, want, truth = flat((out, (h, c))), flat(want), flat(truth)
    assert_close_to_truth(got, want, truth, ulps=2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["persistent", "stepwise", "cooperative"])
@pytest.mark.parametrize("name,kwargs", CELLS, ids=[c[0] for c in CELLS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_error_within_2x_of_torch(name, kwargs, dtype, strategy):
    H = 32 if strategy == "persistent" else 256
    assert_close_to_truth(*_errors(name, kwargs, dtype, strategy, H=H), ulps=2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["tf32-off", "tf32-on"])
@pytest.mark.parametrize("strategy", ["persistent", "stepwise", "cooperative"])
@pytest.mark.parametrize("name,kwargs", CELLS, ids=[c[0] for c in CELLS])
def test_fp32_error_within_2x_of_torch(name, kwargs, strategy, tf32):
    """Both sides under the same switch: TF32 on (the default) or off (then fastrnn's three-pass
    TF32 against cuDNN's fp32)."""
    H = 32 if strategy == "persistent" else 256
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        got, want, truth = _errors(name, kwargs, torch.float32, strategy, H=H,
                                   kind="packed_unsorted")
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert_close_to_truth(got, want, truth)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["persistent", "stepwise", "cooperative"])
@pytest.mark.parametrize("name,kwargs", CELLS, ids=[c[0] for c in CELLS])
def test_long_sequence_every_strategy(name, kwargs, strategy):
    """T = 10,000 in full fp32 on both sides, gradients included."""
    H = 32 if strategy == "persistent" else 256
    fast, ref = make_pair(name, 16, H, bidirectional=True, **kwargs)
    build, leaves = make_inputs(ref, "padded", 10_000, 4, with_hx=True)
    with full_fp32():
        with strategy_runs(strategy, backward=True):
            got = run(fast, build, leaves)
        want = run(ref, build, leaves)
    truth = run(exact_twin(ref), build, leaves)
    assert_close_to_truth(got, want, truth)
