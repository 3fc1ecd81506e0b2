"""fastrnn.explain and python -m fastrnn explain: what a layer runs, checked against what runs."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastrnn
from tests.parity import DEVICE, launches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin")
needs_cuda_tools = pytest.mark.skipif(
    not os.path.exists(os.path.join(TOOLS, "ptxas")), reason="this triton build ships no ptxas")
KEYS = {"strategy", "launches_forward", "launches_backward", "shared_memory_bytes", "registers",
        "precision"}


@pytest.mark.parametrize("name,kwargs,T", [
    ("LSTM", dict(num_layers=2, bidirectional=True), 5),
    ("GRU", dict(), 4),
    ("LSTM", dict(proj_size=2), 3),
])
def test_explain_matches_what_the_layer_launches(name, kwargs, T):
    layer = getattr(fastrnn, name)(3, 6, **kwargs).to(DEVICE)
    x = torch.randn(T, 2, 3, device=DEVICE, requires_grad=True)
    rows = fastrnn.explain(layer, x)
    assert [r["layer"] for r in rows] == list(range(layer.num_layers))
    assert all(KEYS <= set(r) for r in rows)
    before_fwd = launches("fwd")
    out, _ = layer(x)
    mid = launches("fwd"), launches("bwd")
    out.sum().backward()
    assert mid[0] - before_fwd == sum(r["launches_forward"] for r in rows)
    assert launches("bwd") - mid[1] == sum(r["launches_backward"] for r in rows)


def test_explain_says_when_torch_runs(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    rows = fastrnn.explain(fastrnn.GRU(3, 4, num_layers=2), torch.randn(2, 1, 3))
    assert [r["strategy"] for r in rows] == ["torch.nn", "torch.nn"]
    assert "FASTRNN_BACKEND=torch" in rows[0]["reason"]


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastrnn", "explain", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


@needs_cuda_tools
def test_cli_json_for_a_named_gpu():
    """Compiled for the H100 on this machine: the compiled kernels' own figures, per layer."""
    proc = _cli("--mode", "GRU", "--input-size", "32", "--hidden-size", "48", "--batch", "16",
                "--seq-len", "100", "--dtype", "fp16", "--layers", "2", "--bidirectional",
                "--gpu", "H100", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert len(rows) == 2 and all(KEYS <= set(r) for r in rows)
    r = rows[0]
    assert r["strategy"] == "persistent" and r["launches_forward"] == 1
    assert r["launches_backward"] == 1 and r["precision"] == "float16"
    assert 0 < r["shared_memory_bytes"] <= 232448 and 0 < r["registers"] <= 255
    assert all(k["mma"] + k["wgmma"] > 0 for k in r["kernels"])  # tensor cores


@needs_cuda_tools
def test_cli_text_and_errors():
    proc = _cli("--mode", "LSTM", "--input-size", "8", "--hidden-size", "4096", "--batch", "4",
                "--seq-len", "10", "--dtype", "fp32", "--gpu", "L4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layer 0: stepwise: 10 kernel launch(es) per forward, 21 per backward" in proc.stdout
    assert "registers/thread" in proc.stdout and "TF32" in proc.stdout
    bad = _cli("--mode", "GRU", "--input-size", "8", "--hidden-size", "16", "--batch", "4",
               "--seq-len", "10", "--proj-size", "4", "--gpu", "H100")
    assert bad.returncode == 2 and "--proj-size is for LSTM only" in bad.stderr
