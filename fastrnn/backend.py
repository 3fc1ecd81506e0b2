"""Which implementation runs: fastrnn's Triton kernels or torch's own.

``FASTRNN_BACKEND`` (read at every call, so tests and users can change it at run time):

* ``auto`` (default): the Triton kernels for CUDA tensors, and for CPU tensors when the Triton
  interpreter is on (``TRITON_INTERPRET=1``); torch's own implementation otherwise.
* ``triton``: always the kernels; an error where they cannot run (a CPU tensor without the
  interpreter).
* ``torch``: always torch's own implementation (``torch.nn.LSTM.forward`` and friends).

During ``torch.onnx.export`` (either exporter) layers take torch.nn's path whatever the setting,
so the ONNX graph holds the standard RNN / LSTM / GRU operators.

The choice is visible: ``fastrnn.use_kernels(device)`` answers it, ``fastrnn.explain(module,
input)`` details it, the first use of a layer class on a device logs it (logger ``fastrnn``, level
INFO), and the one case where ``auto`` runs torch.nn (CPU tensors without the interpreter, e.g.
after ``fastrnn.convert`` on a machine without a GPU) also warns once.

``TRITON_INTERPRET`` is read once, when fastrnn is imported: Triton decides then whether fastrnn's
kernels are compiled for a GPU or interpreted on the CPU. Changing it afterwards is an error that
says so.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")
logger = logging.getLogger("fastrnn")


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# How fastrnn's kernels were built: fixed when fastrnn (and its kernels) were imported.
_INTERPRET_AT_IMPORT = _interpret_env()


def interpreting() -> bool:
    """True when fastrnn's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` was
    set when fastrnn was imported)."""
    return _INTERPRET_AT_IMPORT


def check_interpreter_setting() -> None:
    """Raise if TRITON_INTERPRET changed since fastrnn was imported (Triton would otherwise fail
    later with "0 active drivers", or interpret kernels meant for the GPU)."""
    if _interpret_env() == _INTERPRET_AT_IMPORT:
        return
    now = "set" if _interpret_env() else "unset"
    raise RuntimeError(
        f"TRITON_INTERPRET was {now} after fastrnn was imported, but Triton decides whether "
        "fastrnn's kernels are interpreted when they are defined, at import. Set it before "
        "importing fastrnn (and triton), e.g. `TRITON_INTERPRET=1 python script.py`, or at the "
        "top of the script before `import fastrnn`; or restore its previous value.")


def get_backend() -> str:
    """The ``FASTRNN_BACKEND`` setting: "auto", "triton" or "torch"."""
    value = os.environ.get("FASTRNN_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"FASTRNN_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}"
        )
    return value


def kernels_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def use_kernels(device: torch.device) -> bool:
    """Whether a layer whose tensors live on ``device`` runs fastrnn's Triton kernels (True) or
    torch.nn's implementation (False)."""
    backend = get_backend()
    if backend == "torch" or torch.onnx.is_in_onnx_export():
        return False
    check_interpreter_setting()
    if kernels_can_run(device):
        return True
    if backend == "triton":
        raise RuntimeError(
            f"FASTRNN_BACKEND=triton, but fastrnn's Triton kernels cannot run on {device.type} "
            "tensors: use CUDA tensors, set TRITON_INTERPRET=1 (CPU interpreter, slow), or set "
            "FASTRNN_BACKEND=auto or torch"
        )
    return False


_announced: set = set()


def announce(layer: str, device: torch.device, kernels: bool) -> None:
    """Log, once per layer class, device type and path, which implementation runs; warn once
    where ``auto`` falls back to torch.nn."""
    if torch.compiler.is_compiling():  # said when the layer runs eagerly; no graph break
        return
    key = (layer, device.type, kernels)
    if key in _announced:
        return
    _announced.add(key)
    if kernels:
        mode = "Triton's CPU interpreter" if device.type == "cpu" else "the GPU"
        logger.info("fastrnn.%s on %s tensors runs fastrnn's Triton kernels (%s)", layer,
                    device.type, mode)
        return
    if get_backend() == "torch" or torch.onnx.is_in_onnx_export():
        logger.info("fastrnn.%s on %s tensors runs torch.nn's implementation (%s)", layer,
                    device.type, "FASTRNN_BACKEND=torch" if get_backend() == "torch"
                    else "ONNX export")
        return
    message = (f"fastrnn.{layer} on {device.type} tensors runs torch.nn's implementation: "
               "fastrnn's Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
               "importing fastrnn, to run them in Triton's CPU interpreter, slowly). Set "
               "FASTRNN_BACKEND=torch to choose this explicitly.")
    logger.info(message)
    warnings.warn(message, stacklevel=_caller_level())


def _caller_level() -> int:
    """The warnings stacklevel of the first frame outside fastrnn and torch.nn (the user's call,
    however many hooks and wrappers sit between)."""
    import sys

    skip = (os.path.dirname(os.path.abspath(__file__)),
            os.path.dirname(os.path.abspath(torch.nn.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level
