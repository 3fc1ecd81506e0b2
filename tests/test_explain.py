"""fastrnn.explain and python -m fastrnn explain: what a layer runs, checked against what runs."""

import collections
import json
import os
import subprocess
import sys

import pytest
import torch

import fastrnn
from tests.parity import DEVICE, strategy_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin")
needs_cuda_tools = pytest.mark.skipif(
    not os.path.exists(os.path.join(TOOLS, "ptxas")), reason="this triton build ships no ptxas")
KEYS = {"strategy", "launches_forward", "launches_backward", "shared_memory_bytes", "registers",
        "precision"}


EXPLAINED = [  # name, kwargs, T, strategy, (forward, backward) launches per layer
    ("LSTM", dict(num_layers=2, bidirectional=True), 5, "persistent", (1, 1)),
    ("GRU", dict(), 4, "persistent", (1, 1)),
    ("LSTM", dict(num_layers=2, bidirectional=True), 5, "stepwise", (5, 11)),
    ("RNN", dict(), 4, "stepwise", (4, 9)),
    ("LSTM", dict(proj_size=2), 3, "stepwise", (6, 7)),
    ("LSTM", dict(num_layers=2), 5, "cooperative", (1, 1)),
    ("GRU", dict(bidirectional=True), 4, "cooperative", (1, 1)),
    ("GRU", dict(bidirectional=True), 4, "cooperative-sliced", (4, 5)),  # stepped: 3 slices
]


@pytest.mark.parametrize("name,kwargs,T,strategy,per_layer", EXPLAINED,
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(EXPLAINED)])
def test_explain_matches_what_the_layer_launches(name, kwargs, T, strategy, per_layer,
                                                 monkeypatch, request):
    """explain's strategy, kernels and launch figures against the launches counted where they
    happen, for every strategy (forced: the interpreter runs all three)."""
    from fastrnn.ops import cooperative, dispatch, select

    if strategy == "cooperative-sliced":  # several programs per group: one launch per step here
        if DEVICE != "cpu":
            pytest.skip("one launch per layer on a GPU (tests/ops/test_recurrence.py)")
        monkeypatch.setattr(cooperative, "INTERPRETER_SLICE", 2)
        dispatch.plan.cache_clear()
        request.addfinalizer(dispatch.plan.cache_clear)
        strategy = "cooperative"
    layer = getattr(fastrnn, name)(3, 6, **kwargs).to(DEVICE)
    x = torch.randn(T, 2, 3, device=DEVICE, requires_grad=True)
    with fastrnn.force_strategy(strategy):
        rows = fastrnn.explain(layer, x)
    assert [r["layer"] for r in rows] == list(range(layer.num_layers))
    assert all(KEYS <= set(r) for r in rows)
    assert {r["strategy"] for r in rows} == {strategy}
    assert {r["precision"] for r in rows} == {"ieee" if DEVICE == "cpu" else "tf32"}
    if DEVICE == "cpu":
        assert [(r["launches_forward"], r["launches_backward"]) for r in rows] == \
            [per_layer] * layer.num_layers
    before = collections.Counter(select.LAUNCHES)
    with strategy_runs(strategy, backward=True):
        out, _ = layer(x)
        mid = collections.Counter(select.LAUNCHES)
        out.sum().backward()
    fwd = {k: n - before[k] for k, n in mid.items() if n != before[k]}
    bwd = {k: n - mid[k] for k, n in select.LAUNCHES.items() if n != mid[k]}
    assert sum(fwd.values()) == sum(r["launches_forward"] for r in rows)
    assert sum(bwd.values()) == sum(r["launches_backward"] for r in rows)
    # The kernels explain names are the kernels that ran.
    named = {k["kernel"] for r in rows for k in r["kernels"]}
    assert named == set(fwd) | set(bwd)


def test_explain_says_when_torch_runs(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    rows = fastrnn.explain(fastrnn.GRU(3, 4, num_layers=2), torch.randn(2, 1, 3))
    assert [r["strategy"] for r in rows] == ["torch.nn", "torch.nn"]
    assert "FASTRNN_BACKEND=torch" in rows[0]["reason"]


def test_explain_shows_the_recurrent_gradient_clip(monkeypatch):
    """A layer with ``recurrent_grad_clip`` says, per layer, that its backward clamps the
    gradient on purpose (and a layer without says nothing of it), on either backend."""
    from fastrnn.explain import format_explanation

    x = torch.randn(4, 2, 3, device=DEVICE)
    rows = fastrnn.explain(fastrnn.LSTM(3, 4, num_layers=2, recurrent_grad_clip=0.5).to(DEVICE),
                           x)
    assert [r["recurrent_grad_clip"] for r in rows] == [0.5, 0.5]
    text = format_explanation(rows)
    assert text.count("recurrent_grad_clip=0.5: the backward kernel clamps") == 2
    assert "changes the gradient on purpose" in text
    plain = fastrnn.explain(fastrnn.LSTM(3, 4).to(DEVICE), x)
    assert plain[0]["recurrent_grad_clip"] is None
    assert "recurrent_grad_clip" not in format_explanation(plain)
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    rows = fastrnn.explain(fastrnn.GRU(3, 4, recurrent_grad_clip=2.0).to(DEVICE), x)
    assert rows[0]["strategy"] == "torch.nn" and rows[0]["recurrent_grad_clip"] == 2.0


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


def test_static_cost_per_step_for_every_strategy():
    """explain's static per-step figures (fastrnn/ops/costs.py), for a described H100, against
    the model worked by hand for a cooperative LSTM (bf16, H=1024, B=64: 16-unit slices, 32 rows
    per group, two 16-row chunks), and present with a model line for every strategy's kernels."""
    import torch

    from fastrnn import _modes
    from fastrnn.explain import explain_problem
    from fastrnn.ops import select

    h100 = select.GPUS["H100"]
    rows = explain_problem(select.Problem(_modes.LSTM, 64, 1024, 1024, 1, torch.bfloat16),
                           h100, 100, compiled=False)
    assert rows[0]["strategy"] == "cooperative" and rows[0]["grid"][:2] == [64, 2]
    fwd, bwd = (k["per_step"] for k in rows[0]["kernels"])
    # W slice (4 gates x 16 units) x 1024 and a 1024 x 16 state chunk, bf16, per chunk (2).
    assert fwd["smem_read_bytes"] == (64 * 1024 + 1024 * 16) * 2 * 2
    # the group's h (32 x 1024), the slice's input projections (32 x 4 x 16), its c (fp32).
    assert fwd["l2_read_bytes"] == 32 * 1024 * 2 + 32 * 64 * 2 + 32 * 16 * 4
    assert (fwd["barriers"], fwd["launches"], bwd["barriers"], bwd["launches"]) == (1, 0, 1, 0)
    # the 64 programs' partial products for its 16 units (bf16) dominate what the backward
    # reads, and its own partial product for all 1024 units what it writes.
    assert 64 * 32 * 16 * 2 < bwd["l2_read_bytes"] < 2 * 64 * 32 * 16 * 2
    assert 32 * 1024 * 2 < bwd["l2_write_bytes"] < 2 * 32 * 1024 * 2
    # the W slice (64 x 1024) and the slice's gate gradients (64 x 16), per chunk.
    assert bwd["smem_read_bytes"] == (64 * 1024 + 64 * 16) * 2 * 2
    # With proj_size (ops/cooperative_proj.py): two barriers per step. The forward of a program
    # owning state rows: the slice [64 x 256] and h chunk [256 x 16], W_hr's rows [16 x 1024]
    # and the r chunk [1024 x 16] per chunk (2); it reads the group's h (32 x 256), input
    # projections (32 x 64), c (fp32), every unit's r (32 x 1024), W_hr's rows and its h rows.
    (row,) = explain_problem(select.Problem(_modes.LSTM, 64, 1024, 256, 1, torch.bfloat16), h100,
                             100, compiled=False)
    assert row["strategy"] == "cooperative" and row["grid"][:2] == [64, 2]
    fwd, bwd = (k["per_step"] for k in row["kernels"])
    assert [k["kernel"] for k in row["kernels"]] == ["_lstmp_fwd_coop_kernel",
                                                     "_lstmp_bwd_coop_kernel"]
    assert fwd["smem_read_bytes"] == (64 * 256 + 256 * 16 + 16 * 1024 + 1024 * 16) * 2 * 2
    assert fwd["l2_read_bytes"] == (32 * 256 * 2 + 32 * 64 * 2 + 32 * 16 * 4 + 32 * 1024 * 2
                                    + 16 * 1024 * 2 + 32 * 16 * 2)
    assert (fwd["barriers"], fwd["launches"], bwd["barriers"], bwd["launches"]) == (2, 0, 2, 0)
    # the 64 programs' partial products for its 16 state rows, and its own for all 256.
    assert 64 * 32 * 16 * 2 < bwd["l2_read_bytes"] < 2 * 64 * 32 * 16 * 2
    assert 32 * 256 * 2 < bwd["l2_write_bytes"] < 4 * 32 * 256 * 2
    for problem, strategy, launches in [
            (select.Problem(_modes.GRU, 16, 64, 64, 2, torch.float16), "persistent", 0),
            (select.Problem(_modes.LSTM, 16, 4096, 1024, 1, torch.float16), "stepwise", 1)]:
        (row,) = explain_problem(problem, h100, 10, compiled=False)
        assert row["strategy"] == strategy
        for k in row["kernels"]:
            s = k["per_step"]
            assert s["launches"] == launches and s["model"]
            assert s["barriers"] == (1 if strategy == "stepwise" else 0)
            assert s["l2_read_bytes"] > 0 and s["l2_write_bytes"] > 0
