"""The benchmark report runs (smoke grid) and writes JSON in the documented schema, CSV and PNG."""

import csv
import json
import os
import subprocess
import sys

import pytest

from fastrnn import bench

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
    assert {c.B for c in haste} == {1, 16, 32, 64, 128} and min(c.H for c in haste) == 128 \
        and max(c.H for c in haste) == 4096 and {c.T for c in haste} == {50}
    assert all(c.B <= 8 and c.phases == ("fwd",) for c in bench.GRIDS["small-batch"]())
    variants = bench.GRIDS["variants"]()
    assert {c.dtype for c in variants} == {"float32", "bfloat16", "float16"}
    assert any(c.packed for c in variants) and any(c.proj for c in variants)
    assert any(c.bidirectional for c in variants) and max(c.layers for c in variants) == 4


def test_report_writes_schema_csv_and_plot(tmp_path):
    lines = []
    env, records, paths = bench.run(["smoke"], out_dir=str(tmp_path), budget_s=0.0,
                                    echo=lines.append, progress=lambda *a: None)
    with open(paths[0]) as f:
        data = json.load(f)
    assert SCHEMA_TOP <= set(data)
    assert data["records"] and all(SCHEMA_RECORD <= set(r) for r in data["records"])
    providers = {r["provider"] for r in data["records"]}
    assert {"fastrnn", "torch.nn"} <= providers
    assert {r["phase"] for r in data["records"]} == {"fwd", "fwd+bwd"}
    assert all(r["median_ms"] > 0 for r in data["records"])
    assert all(r["max_abs_diff"] < 1e-4 for r in data["records"])
    with open(paths[1]) as f:
        rows = list(csv.DictReader(f))
    assert rows and "speedup" in rows[0]
    text = "\n".join(lines)
    assert "fastrnn bench on" in text and "TF32" in text and "geometric-mean speedup" in text
    pytest.importorskip("matplotlib")
    assert paths[2].endswith(".png") and os.path.getsize(paths[2]) > 1000


def test_main_job_command_runs(tmp_path):
    """``python -m fastrnn bench`` (parity, then the speed report) as the README runs it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it sets it itself
    proc = subprocess.run([sys.executable, "-m", "fastrnn", "bench", "--grid", "smoke",
                           "--budget", "0", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "configurations match torch.nn" in proc.stdout
    assert "geometric-mean speedup" in proc.stdout
    assert any(name.endswith(".json") for name in os.listdir(tmp_path))
