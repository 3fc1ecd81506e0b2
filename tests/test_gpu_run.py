"""bench/gpu_run.sh, checked on the CPU with stand-in commands: what it runs, in which order, and
that a failed stage makes it exit non-zero, named, after every stage has run."""

import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_run.sh")


def _stub_python(bin_dir, fail_on: str = ""):
    """A ``python`` that logs its arguments and fails (exit 3) when they contain ``fail_on``."""
    path = os.path.join(bin_dir, "python")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                f'echo "$*" >> "{bin_dir}/calls.log"\n'
                + (f'case "$*" in *"{fail_on}"*) echo failing; exit 3;; esac\n' if fail_on else "")
                + "exit 0\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def _run(tmp_path, fail_on=""):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub_python(str(bin_dir), fail_on)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True, env=env,
                          timeout=120)
    calls = (bin_dir / "calls.log").read_text().splitlines()
    return proc, out, calls


def test_all_stages_pass_exit_zero(tmp_path):
    proc, out, calls = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "environment.txt").exists() and (out / "gpu_run.tar.gz").exists()
    assert not (out / "failed.txt").exists()


def test_a_failed_stage_exits_nonzero_and_names_it_after_the_rest_ran(tmp_path):
    proc, out, calls = _run(tmp_path, fail_on="fastrnn parity")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED stage: parity (exit 3)" in proc.stdout
    assert (out / "failed.txt").read_text().strip() == "FAILED stage: parity (exit 3)"
    # the stages after it still ran, and everything was packed
    assert any("fastrnn bench" in c for c in calls)
    assert any("tune_strategies" in c for c in calls)
    assert (out / "gpu_run.tar.gz").exists()


def test_plan_fits_seven_minutes_and_the_suite_selection_leaves_out_cpu_checks(tmp_path):
    """The planned stages, kill-after margins included, fit in 7 minutes; the suite stage's
    selection collects no slow test, no CPU-side check (resource compiles, planted bugs, the
    whole main job) and no benchmark suite."""
    import re
    import sys

    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], capture_output=True,
                          text=True, env={**os.environ, "GPU_RUN_DRY": "1"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    total = int(re.search(r"= (\d+) s at most", proc.stdout).group(1))
    assert total <= 7 * 60, proc.stdout
    stages = re.search(r"plan: (.*) \(\+", proc.stdout).group(1).split()
    assert [s.split(":")[0] for s in stages] == ["environment", "smoke", "parity", "bench",
                                                 "suite", "strategies"]
    selection = re.search(r"suite selection: (.*)", proc.stdout).group(1)
    assert selection == "tests -m not slow and not host_only"
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests", "-m", "not slow and not host_only"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert len(ids) > 500, collected.stdout[-2000:]
    banned = ("test_resources.py", "test_mutations.py", "test_main_job_command_runs", "bench/",
              "test_very_long_sequence", "test_large_batch_and_64bit_offsets")
    assert not [i for i in ids if any(b in i for b in banned)]


def test_smoke_stage_runs_under_the_interpreter_and_writes_rows_as_it_goes(tmp_path):
    """bench/smoke.py --dry-run: the stage's cases at toy sizes in Triton's interpreter, every
    row in smoke.jsonl with its strategy's launches and no other's."""
    import json
    import sys

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "smoke.py"),
                           str(tmp_path), "--dry-run"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert len(rows) == 21 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert {r["cell"] for r in rows if r["strategy"] == "cooperative"} == {"LSTM", "GRU", "RNN"}
    assert {r["strategy"] for r in rows} == {"cooperative", "persistent", "stepwise"}
    assert any(r["packed"] for r in rows)
    for r in rows:
        assert r["launches"] and all(r["strategy"] in _owner(k) for k in r["launches"])
    assert proc.stdout.count("smoke: {") == 21  # printed as each completed
    options = [r for r in rows if r["precision"] == "options"]
    assert {r["strategy"] for r in options} == {"cooperative", "persistent", "stepwise"}
    layer_norm = [r for r in rows if r["precision"] == "layernorm"]
    assert {(r["strategy"], r["cell"]) for r in layer_norm} == {
        ("cooperative", "LSTM"), ("cooperative", "GRU"), ("persistent", "LSTM"),
        ("stepwise", "LSTM"), ("persistent", "GRU")}
    assert all(set(r["launches"]) == ({"_ln_fwd_coop_kernel", "_ln_bwd_coop_kernel"}
                                      if r["strategy"] == "cooperative"
                                      else {"_ln_fwd_kernel", "_ln_bwd_kernel"})
               for r in layer_norm)


def _owner(kernel):
    from fastrnn.ops import dispatch

    return [s for s in ("persistent", "stepwise", "cooperative")
            if kernel in dispatch.strategy_kernels(s)]
