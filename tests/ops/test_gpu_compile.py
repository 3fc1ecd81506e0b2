"""Every kernel variant compiles for sm_90 (Hopper), on a machine without a GPU.

The interpreter accepts code a GPU compiler rejects (tl.dot shapes, types on paths it never
compiles); this runs bench/kernel_resources.py, which drives the real launchers and compiles each
launch ahead of time with Triton's bundled ptxas.
"""

import os
import subprocess
import sys

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")),
                    reason="this triton build ships no ptxas")
@pytest.mark.parametrize("dtypes", ["fp32,fp16", "bf16,fp64"])
def test_all_kernels_compile_for_sm90(dtypes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_resources.py"),
                           "--quick", "--dtypes", dtypes], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert ", 0 failed" in proc.stdout
