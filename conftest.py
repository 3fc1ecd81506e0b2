"""Root conftest: without a GPU, run the real Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET must be set before anything imports triton (fastrnn's math helpers are chosen at
import), hence here and not in a test. torch does not import triton on ``import torch``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice
