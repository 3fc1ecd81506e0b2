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
