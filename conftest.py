"""Root conftest: without a GPU, run the real Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET must be set before anything imports triton (fastrnn's math helpers are chosen at
import), hence here and not in a test. torch does not import triton on ``import torch``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _cooperative_barriers_completed():
    """On a GPU, after each test: wait for its kernels and raise if a cooperative launch gave
    up at a barrier, so a timeout is reported against the test that had it."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        from fastrnn.ops.cooperative import check_errors

        check_errors()
