"""FASTRNN_BACKEND and FASTRNN_STRATEGY: which implementation runs, and no silent fallback."""

import pytest
import torch

import fastrnn
from fastrnn import _modes, backend
from fastrnn.ops import dispatch
from fastrnn.ops.dispatch import select_strategy
from fastrnn.ops.select import GPUS, Problem
from tests.parity import DEVICE, launches, make_pair


def test_torch_backend_runs_torch_nn(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    fast, ref = make_pair("LSTM", 3, 5, num_layers=2)
    x = torch.randn(4, 2, 3, device=DEVICE)
    before = launches()
    got = fast(x)
    assert launches() == before
    want = ref(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_triton_backend_runs_kernels(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    fast, _ = make_pair("GRU", 3, 5)
    before = launches()
    fast(torch.randn(4, 2, 3, device=DEVICE))
    assert launches() > before


def test_auto_on_cpu_without_interpreter_is_torch(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "auto")
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    assert not backend.use_kernels(torch.device("cpu"))
    assert backend.use_kernels(torch.device("cuda"))


def test_triton_backend_without_a_way_to_run_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    fast, _ = make_pair("RNN", 3, 5)
    with pytest.raises(RuntimeError, match="FASTRNN_BACKEND=triton"):
        fast.cpu()(torch.randn(4, 2, 3))


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FASTRNN_BACKEND must be one of"):
        fastrnn.get_backend()


def test_strategy_env_override(monkeypatch):
    args = (_modes.LSTM, 7, 7, 3, torch.float32, torch.device(DEVICE))
    assert select_strategy(*args) == "persistent"
    monkeypatch.setenv("FASTRNN_STRATEGY", "stepwise")
    assert select_strategy(*args) == "stepwise"
    with fastrnn.force_strategy("persistent"):
        assert select_strategy(*args) == "persistent"
    monkeypatch.setenv("FASTRNN_STRATEGY", "magic")
    with pytest.raises(ValueError, match="unknown fastrnn strategy"):
        select_strategy(*args)


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_selection_by_size(gpu):
    spec = GPUS[gpu]
    small = Problem(_modes.LSTM, 8, 32, 32, 1, torch.float16)
    assert dispatch.plan(small, spec).strategy == "persistent"
    large = Problem(_modes.LSTM, 8, 4096, 4096, 1, torch.float16)
    assert dispatch.plan(large, spec).strategy == "stepwise"
    fp64 = Problem(_modes.LSTM, 8, 32, 32, 1, torch.float64)
    assert dispatch.plan(fp64, spec).strategy == "stepwise"  # checking, not speed, on a GPU


def test_forcing_a_strategy_that_cannot_fit_raises_before_launching():
    """A forced strategy is planned like a chosen one: where it cannot fit the device, a clear
    error names the strategy, the problem, the device and the reason."""
    big = Problem(_modes.LSTM, 16, 1024, 1024, 1, torch.float32, "tf32")
    with pytest.raises(RuntimeError, match=r"strategy 'persistent' cannot run LSTM "
                                           r"hidden_size=1024 .* on H100: W_hh is"):
        dispatch.plan(big, GPUS["H100"], "persistent")
    proj = Problem(_modes.LSTM, 16, 8192, 1024, 1, torch.float32, "tf32")
    with pytest.raises(RuntimeError, match=r"cooperative.*proj_size=1024.*> 132 SMs"):
        dispatch.plan(proj, GPUS["H100"], "cooperative")
    # And through a module: nothing launches (W_hh of H=128 is more than one program holds).
    lstm = fastrnn.LSTM(3, 128).to(DEVICE)
    before = launches()
    with fastrnn.force_strategy("persistent"), pytest.raises(RuntimeError, match="W_hh is"):
        lstm(torch.randn(2, 1, 3, device=DEVICE))
    assert launches() == before


# --- which implementation runs is visible ----------------------------------------------------

def test_auto_fallback_to_torch_warns_once_and_logs(monkeypatch, caplog):
    """convert() on a machine without a GPU runs torch.nn: fastrnn says so, once, pointing at the
    user's call; the kernel path and explicit choices are logged (INFO), not warned about."""
    import logging
    import warnings

    monkeypatch.setattr(backend, "_announced", set())
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    monkeypatch.setattr(backend, "check_interpreter_setting", lambda: None)
    monkeypatch.setenv("FASTRNN_BACKEND", "auto")
    lstm = fastrnn.convert(torch.nn.LSTM(3, 4))
    x = torch.randn(2, 1, 3)
    with caplog.at_level(logging.INFO, logger="fastrnn"), warnings.catch_warnings(
            record=True) as caught:
        warnings.simplefilter("always")
        lstm(x)
        lstm(x)
    assert len(caught) == 1
    assert "fastrnn.LSTM on cpu tensors runs torch.nn's implementation" in str(caught[0].message)
    assert caught[0].filename == __file__
    assert sum("runs torch.nn's implementation" in r.message for r in caplog.records) == 1
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastrnn.GRU(3, 4)(x)
    assert caught == []


def test_kernel_path_is_logged_once(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(backend, "_announced", set())
    fast, _ = make_pair("GRU", 3, 5)
    with caplog.at_level(logging.INFO, logger="fastrnn"):
        fast(torch.randn(4, 2, 3, device=DEVICE))
        fast(torch.randn(4, 2, 3, device=DEVICE))
    kernel_lines = [r.message for r in caplog.records if "runs fastrnn's Triton kernels" in r.message]
    assert len(kernel_lines) == 1 and kernel_lines[0].startswith("fastrnn.GRU on ")


@pytest.mark.parametrize("change", ["set", "unset"])
def test_changing_triton_interpret_after_import_is_a_clear_error(change):
    """Triton fixes interpreted-or-compiled when fastrnn's kernels are defined: a later change
    is an error naming the cause and the fix, not Triton's "0 active drivers"."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if change == "unset":
        env["TRITON_INTERPRET"] = "1"
    code = ("import os, torch, fastrnn\n"
            f"os.environ['TRITON_INTERPRET'] = {'1' if change == 'set' else '0'!r}\n"
            "fastrnn.GRU(2, 3)(torch.randn(2, 1, 2))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0
    assert (f"RuntimeError: TRITON_INTERPRET was {change} after fastrnn was imported"
            in proc.stderr), proc.stderr[-2000:]
    assert "Set it before importing fastrnn" in proc.stderr


def test_isinstance_checks_that_work_for_both():
    """fastrnn's layers are not instances of torch.nn.LSTM (torch.compile would graph-break on
    them); the checks the README recommends accept both."""
    for name in ("RNN", "LSTM", "GRU"):
        theirs, ours = getattr(torch.nn, name)(3, 4), getattr(fastrnn, name)(3, 4)
        assert not isinstance(ours, getattr(torch.nn, name))
        for m in (theirs, ours):
            assert isinstance(m, torch.nn.RNNBase)
            assert isinstance(m, (getattr(torch.nn, name), getattr(fastrnn, name)))
            assert m.mode.startswith(name if name != "RNN" else "RNN_")
