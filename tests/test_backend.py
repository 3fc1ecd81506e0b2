"""FASTRNN_BACKEND and FASTRNN_STRATEGY: which implementation runs, and no silent fallback."""

import pytest
import torch

import fastrnn
from fastrnn import backend
from fastrnn.ops.recurrence import select_strategy
from tests.parity import launches, make_pair


def test_torch_backend_runs_torch_nn(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    fast, ref = make_pair("LSTM", 3, 5, num_layers=2)
    x = torch.randn(4, 2, 3)
    before = launches()
    got = fast(x)
    assert launches() == before
    want = ref(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_triton_backend_runs_kernels(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    fast, _ = make_pair("GRU", 3, 5)
    before = launches()
    fast(torch.randn(4, 2, 3))
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
        fast(torch.randn(4, 2, 3))


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FASTRNN_BACKEND must be one of"):
        fastrnn.get_backend()


def test_strategy_env_override(monkeypatch):
    args = (2, 7, 7, 3, torch.float32, torch.device("cpu"), False)
    assert select_strategy(*args) == "persistent"
    monkeypatch.setenv("FASTRNN_STRATEGY", "stepwise")
    assert select_strategy(*args) == "stepwise"
    with fastrnn.force_strategy("persistent"):
        assert select_strategy(*args) == "persistent"
    monkeypatch.setenv("FASTRNN_STRATEGY", "magic")
    with pytest.raises(ValueError, match="unknown fastrnn strategy"):
        select_strategy(*args)


def test_selection_by_size():
    cpu = torch.device("cpu")
    assert select_strategy(2, 32, 32, 8, torch.float32, cpu, False) == "persistent"
    assert select_strategy(2, 512, 512, 8, torch.float32, cpu, False) == "stepwise"
