"""Which implementation runs: fastrnn's Triton kernels or torch's own.

``FASTRNN_BACKEND`` (read at every call, so tests and users can change it at run time):

* ``auto`` (default): the Triton kernels for CUDA tensors, and for CPU tensors when the Triton
  interpreter is on (``TRITON_INTERPRET=1``); torch's own implementation otherwise.
* ``triton``: always the kernels; an error where they cannot run (a CPU tensor without the
  interpreter).
* ``torch``: always torch's own implementation (``torch.nn.LSTM.forward`` and friends).

During ``torch.onnx.export`` (either exporter) layers take torch.nn's path whatever the setting,
so the ONNX graph holds the standard RNN / LSTM / GRU operators.

The choice is visible: nothing falls back silently from the kernels to torch.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def get_backend() -> str:
    value = os.environ.get("FASTRNN_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"FASTRNN_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}"
        )
    return value


def kernels_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def use_kernels(device: torch.device) -> bool:
    """Whether a layer whose tensors live on ``device`` runs fastrnn's Triton kernels."""
    backend = get_backend()
    if backend == "torch" or torch.onnx.is_in_onnx_export():
        return False
    if kernels_can_run(device):
        return True
    if backend == "triton":
        raise RuntimeError(
            f"FASTRNN_BACKEND=triton, but fastrnn's Triton kernels cannot run on {device.type} "
            "tensors: use CUDA tensors, set TRITON_INTERPRET=1 (CPU interpreter, slow), or set "
            "FASTRNN_BACKEND=auto or torch"
        )
    return False
