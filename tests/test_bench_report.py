"""The benchmark report (the main job): runs, never dies, writes as it goes, reads cleanly."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import fastrnn

from fastrnn import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_TOP = {"device", "torch", "triton", "cudnn", "commit", "date", "records"}
SCHEMA_RECORD = {"mode", "dtype", "tf32", "T", "B", "I", "H", "layers", "bidirectional", "packed",
                 "phase", "provider", "median_ms", "peak_mem_mb"}


def test_named_grids_cover_the_issue():
    assert set(bench.DEFAULT_GRIDS) == {"fastrnns", "cudnn-sample", "haste", "flashrnn",
                                        "small-batch", "variants"}
    fastrnns = bench.GRIDS["fastrnns"]()
    assert bench.Config("fastrnns", "LSTM", 100, 64, 512, 512) in fastrnns
    flash = [c for c in bench.GRIDS["flashrnn"]() if c.mode == "LSTM"][0]
    assert (flash.T, flash.B, flash.I, flash.H, flash.dtype) == (1024, 16, 768, 768, "float16")
    haste = bench.GRIDS["haste"]()
    assert min(c.B for c in haste) == 1 and max(c.B for c in haste) == 128
    assert min(c.H for c in haste) == 128 and max(c.H for c in haste) == 4096
    assert {c.T for c in haste} == {50}
    assert all(c.B <= 8 and c.phases == ("fwd",) for c in bench.GRIDS["small-batch"]())
    variants = bench.GRIDS["variants"]()
    assert {c.dtype for c in variants} == {"float32", "bfloat16", "float16"}
    assert any(c.packed for c in variants) and any(c.proj for c in variants)
    assert any(c.bidirectional for c in variants) and max(c.layers for c in variants) == 4


def test_report_writes_as_it_goes_and_survives_a_failure(tmp_path, monkeypatch):
    """A configuration that fails is a row with its error, the run goes on; the JSON and CSV on
    disk hold every configuration measured so far after each one; one progress line each."""
    real = bench.build_case

    def flaky(config, provider, device, seed=0):
        if config.mode == "GRU" and provider == "fastrnn":
            raise RuntimeError("out of resource: shared memory, Required: 262144")
        return real(config, provider, device, seed)

    monkeypatch.setattr(bench, "build_case", flaky)
    seen, lines = [], []

    def progress(line):
        seen.append(line)
        (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
        with open(tmp_path / path) as f:
            data = json.load(f)
        configs = {r["config"] for r in data["records"]}
        assert len(configs) == len(seen)  # written before the line is printed

    env, records, paths = bench.run(["smoke"], out_dir=str(tmp_path), budget_s=0.0,
                                    echo=lines.append, progress=progress, suite="7 passed")
    assert len(seen) == len(bench.GRIDS["smoke"]())
    assert all("ETA" in line and " s " in line for line in seen)
    with open(paths[0]) as f:
        data = json.load(f)
    assert SCHEMA_TOP <= set(data) and data["suite"] == "7 passed"
    assert data["records"] and all(SCHEMA_RECORD <= set(r) for r in data["records"])
    failed = [r for r in data["records"] if r["error"]]
    assert failed and {r["mode"] for r in failed} == {"GRU"}
    assert all("shared memory" in r["error"] for r in failed)
    assert any(r["provider"] == "torch.nn" and r["mode"] == "GRU" and r["median_ms"]
               for r in data["records"])  # the other provider still ran
    with open(paths[1]) as f:
        rows = list(csv.DictReader(f))
    assert rows and "speedup" in rows[0] and "status" in rows[0]
    text = "\n".join(lines)
    assert "error (fastrnn): RuntimeError: out of resource" in text


def test_report_on_the_cpu_reads_cleanly(tmp_path):
    """Interpreter runs time nothing of fastrnn's: no speedups (no 0.00x), no TF32 line where
    there is no cuDNN, a legend for every column, torch's warnings after the tables."""
    lines = []
    env, records, paths = bench.run(["smoke"], out_dir=str(tmp_path), budget_s=0.0,
                                    echo=lines.append, progress=lambda line: None)
    text = "\n".join(lines)
    assert all(r["median_ms"] is None and r["note"] == "interpreter: no timing"
               for r in records if r["provider"].startswith("fastrnn"))
    assert all(r["median_ms"] > 0 for r in records if r["provider"] == "torch.nn")
    assert "0.00x" not in text and "interp." in text and "TF32" not in text
    for column in ("fastrnn, torch.nn", "speedup", "us/step", "max|diff|"):
        assert f"  {column}" in text
    for gpu_only in ("tf32off", "graph", "mem f/t"):  # measured on CUDA only
        assert gpu_only not in text
    tables = text.split("Notes")[0]
    assert "Warning" not in tables
    assert all(r["max_abs_diff"] < 1e-4 for r in records)


@pytest.mark.host_only  # on a GPU, bench/gpu_run.sh runs the main job as its own stages
def test_main_job_command_runs(tmp_path):
    """``python -m fastrnn bench`` (parity, then the speed report) as the README runs it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it sets it itself
    proc = subprocess.run([sys.executable, "-m", "fastrnn", "bench", "--grid", "smoke",
                           "--budget", "0", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "configurations match torch.nn" in proc.stdout and "MISMATCH" not in proc.stdout
    assert "Columns:" in proc.stdout and "0.00x" not in proc.stdout
    assert "[5/5] smoke:" in proc.stderr and "ETA" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert any(name.endswith(".json") for name in os.listdir(tmp_path))


@pytest.mark.parametrize("args", [["--help"], ["bench", "--help"], ["explain", "--help"]])
def test_help_is_clean(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastrnn", *args], capture_output=True,
                          text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m fastrnn")
    if args == ["--help"]:
        for command in ("parity", "bench", "explain"):
            assert f"\n  {command}" in proc.stdout


@pytest.mark.parametrize("feature", bench.FEATURES)
def test_feature_rows_compare_with_the_users_workaround(feature):
    """A ``variants`` feature row runs the layer with the feature, the same layer without it,
    and the users' torch.nn workaround (which launches no fastrnn kernel), and the workaround
    computes what the feature does (forward outputs, every state where asked)."""
    import dataclasses

    from tests.parity import DEVICE, launches

    random = feature in bench.RANDOM  # dropout: compared in eval mode, where no mask applies
    variants = [c for c in bench.GRIDS["variants"]() if c.feature == feature]
    assert {c.mode for c in variants} == {"LSTM", "GRU"}
    point = (256, 64, 512, "bfloat16") if feature == "layernorm" else (128, 64, 512, "float32")
    assert all((c.T, c.B, c.H, c.dtype) == point for c in variants)
    config = dataclasses.replace(variants[0], grid="test", T=6, B=3, I=3, H=4, layers=2,
                                 dtype="float32")
    device = torch.device(DEVICE)
    for provider in ("fastrnn", "fastrnn-plain", "torch.nn"):
        assert provider in bench.providers_for(config, device)
    case = bench.build_case(config, "torch.nn", device)
    if feature == "resets":  # episodes short enough that this small case has some
        case.call.done = torch.rand(6, 3, generator=torch.Generator().manual_seed(0)) < 0.3
        case.call.done = case.call.done.to(device)
    before = launches()
    want = case.forward()
    assert launches() == before
    fast = bench.build_case(config, "fastrnn", device)
    if feature == "resets":
        fast.call = lambda m, x, hx: bench._flat(m(x, hx, resets=case.call.done))
    if feature == "layernorm":
        assert type(fast.module) is fastrnn.LayerNormLSTM
    got = fast.forward()
    assert launches() > before  # the feature ran in fastrnn's kernels
    if random:  # training draws masks: outputs differ from eval's, which match the workaround's
        fast.module.eval()
        case.module.eval()
        assert getattr(fast.module, feature) == bench.DROPOUT
        assert not torch.allclose(got[0], fast.forward()[0])
        got, want = fast.forward(), case.forward()
    assert len(got) == len(want) == (5 if feature == "states" else 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if feature == "clip":  # the workaround's hooks clamp as the kernel does
        outs = [fast.forward_for_backward(), case.forward_for_backward()]
        grads = [torch.autograd.grad(o, [c.module.weight_hh_l0] if c is fast else
                                     [c.call.cells[0].weight_hh], c.grads)[0]
                 for o, c in zip(outs, (fast, case))]
        torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
