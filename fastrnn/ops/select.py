"""What every strategy and the dispatch above them share: descriptions of the device and the
problem, plans and kernel tiles, and the one place kernels launch.

Selection is a pure function of the problem (:class:`Problem`: cell, sizes, dtype, precision) and
a description of the device (:class:`DeviceSpec`: SM count, shared memory per block, registers per
SM, compute capability), so it can be tested on a CPU for any GPU and explained to users. Each
strategy module (persistent, cooperative, stepwise) imports this module and sizes its tiles from a
byte budget of the device (``plan(problem, spec)``), raising :class:`DoesNotFit` where it cannot;
``dispatch`` imports the strategies, chooses among them and launches. Data flows one way:
select <- strategies <- dispatch <- recurrence.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import os
from typing import Optional

import torch
import triton

from .. import _modes
from ..backend import interpreting

# ---------------------------------------------------------------------------------------------
# The device.

@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What selection needs to know of a device."""

    name: str
    capability: tuple            # (major, minor)
    sm_count: int
    smem_per_block: int          # bytes of shared memory one program may use (opt-in maximum)
    regs_per_sm: int = 65536     # 32-bit registers per multiprocessor
    interpreter: bool = False    # Triton's CPU interpreter: no resource limits, no co-residency

    @property
    def arch(self) -> int:
        return 10 * self.capability[0] + self.capability[1]


GPUS = {
    # Data-sheet figures (CUDA occupancy tables); ``describe`` reads the same from a live device.
    "H100": DeviceSpec("H100", (9, 0), 132, 232448),
    "H200": DeviceSpec("H200", (9, 0), 132, 232448),
    "A100": DeviceSpec("A100", (8, 0), 108, 166912),
    "L4": DeviceSpec("L4", (8, 9), 58, 101376),
}
INTERPRETER = DeviceSpec("Triton interpreter (CPU)", (0, 0), 1, 1 << 40, 1 << 40,
                         interpreter=True)


@functools.lru_cache(maxsize=None)
def _cuda_spec(index: int) -> DeviceSpec:
    props = torch.cuda.get_device_properties(index)
    # torch's properties lack the opt-in shared-memory maximum; Triton's driver reads it.
    info = triton.runtime.driver.active.utils.get_device_properties(index)
    return DeviceSpec(props.name, (props.major, props.minor), int(info["multiprocessor_count"]),
                      int(info["max_shared_mem"]), int(info.get("max_num_regs", 65536)))


# (spec, fp32 precision) while planning and compiling for a described GPU (``targeting``).
_target: contextvars.ContextVar = contextvars.ContextVar("fastrnn_target", default=None)


@contextlib.contextmanager
def targeting(spec: DeviceSpec, fp32_precision: str = "tf32"):
    """Within the block (this thread or task), selection plans for ``spec`` whatever device the
    tensors are on, and fp32 dots use ``fp32_precision``: how ``explain`` and the resource
    check see a GPU from any machine."""
    token = _target.set((spec, fp32_precision))
    try:
        yield
    finally:
        _target.reset(token)


def describe(device: torch.device) -> DeviceSpec:
    """The :class:`DeviceSpec` of a live device (the interpreter's for CPU tensors)."""
    target = _target.get()
    if target is not None:
        return target[0]
    device = torch.device(device)
    if device.type == "cuda" and not interpreting():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_spec(index)
    return INTERPRETER


# ---------------------------------------------------------------------------------------------
# The problem and its plan.

def precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` of the fp32 dots (and whether the op's GEMMs may use TF32).

    torch.nn's recurrences on CUDA run in cuDNN, whose fp32 maths follows cuDNN's RNN TF32 switch
    (``torch.backends.cudnn.rnn.fp32_precision``; ``torch.backends.cudnn.allow_tf32`` on torch
    builds without it), True by default. fastrnn follows the same switch: TF32 tensor cores when
    it is on; three TF32 products (``tf32x3``, about fp32 accuracy, still on tensor cores) when it
    is off, rather than Triton's ``ieee`` dot, which is scalar FMA on GPUs. The interpreter and
    CPU tensors compute in full precision.
    """
    target = _target.get()
    if target is not None:
        return target[1] if dtype == torch.float32 else "ieee"
    if dtype != torch.float32 or torch.device(device).type != "cuda" or interpreting():
        return "ieee"
    return "tf32" if cudnn_rnn_tf32() else "tf32x3"


def cudnn_rnn_tf32() -> bool:
    """Whether torch.nn's cuDNN RNNs run fp32 in TF32 under the current settings."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    value = getattr(rnn, "fp32_precision", None) if rnn is not None else None
    if value is not None:
        return value == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One layer's recurrence, as selection sees it (the sequence length does not matter)."""

    mode: int
    B: int
    H: int
    P: int
    D: int
    dtype: torch.dtype
    precision: str = "ieee"

    @property
    def G(self) -> int:
        return _modes.NUM_GATES[self.mode]

    @property
    def has_proj(self) -> bool:
        return self.P != self.H

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def describe(self) -> str:
        proj = f" proj_size={self.P}" if self.has_proj else ""
        return (f"{_modes.MODE_NAMES[self.mode]} hidden_size={self.H}{proj} batch={self.B} "
                f"directions={self.D} {str(self.dtype).replace('torch.', '')}")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Compile-time tiling of one kernel, and the resources it is estimated to need."""

    kernel: str                  # the @triton.jit function's name
    block_b: int
    block_h: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    shared_bytes: int = 0        # estimate of the dynamic shared memory (the compiled figure rules)
    maxnreg: Optional[int] = None  # registers per thread ptxas may use (None: its own choice)
    gates: int = 0               # cooperative: gates of W_hh's slice on chip (GRU 3, or 4 padded)
    column_tiles: int = 1        # cooperative: column tiles W_hh's slice is held in

    def launch_options(self) -> dict:
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one layer's recurrence runs: a strategy, its kernels' tiles, its grid and launches."""

    strategy: str
    kernels: tuple               # KernelConfig, forward kernels first
    grid: tuple = ()             # forward grid (programs per dimension)
    launches_per_step: tuple = (0, 0)   # (forward, backward) launches per time step
    launches_fixed: tuple = (1, 1)      # (forward, backward) launches per sequence besides

    def config(self, kernel: str) -> KernelConfig:
        for k in self.kernels:
            if k.kernel == kernel:
                return k
        raise KeyError(kernel)

    def launches(self, T: int) -> tuple:
        """(forward, backward) kernel launches for a sequence of T steps."""
        return tuple(f + s * T for f, s in zip(self.launches_fixed, self.launches_per_step))


def operand_copies(problem: Problem) -> int:
    """Shared-memory copies Triton keeps of each dot operand: tf32x3 splits an fp32 operand into
    a high and a low TF32 part."""
    return 2 if problem.precision == "tf32x3" else 1


class DoesNotFit(Exception):
    """A strategy cannot run a problem on a device; the message says why."""


# ---------------------------------------------------------------------------------------------
# Launch bookkeeping.

# A stand-in for launching (``launching_with``): compile instead, or do nothing (host timing).
_launcher: contextvars.ContextVar = contextvars.ContextVar("fastrnn_launcher", default=None)


def kernel_name(kernel) -> str:
    """The @triton.jit function's name, through any @triton.heuristics wrapper."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


def launch_kernel(kernel, grid, **kwargs):
    """Every fastrnn kernel launch goes through here (or through a launcher bound from one made
    here: ``stepwise.StepLauncher``). Returns what Triton's launch returns (the compiled kernel on
    a GPU), or what a stand-in set by ``launching_with`` returns. Real launches are counted in
    ``LAUNCHES`` once Triton's launch returns; a stand-in's are not."""
    hook = _launcher.get()
    if hook is not None:
        return hook(kernel, grid, kwargs)
    compiled = kernel[grid](**kwargs)
    LAUNCHES[kernel_name(kernel)] += 1
    return compiled


@contextlib.contextmanager
def launching_with(hook):
    """Within the block (this thread or task), ``hook(kernel, grid, kwargs)`` stands in for every
    kernel launch."""
    token = _launcher.set(hook)
    try:
        yield
    finally:
        _launcher.reset(token)


_FAST_ACTIVATIONS = os.environ.get("FASTRNN_FAST_ACTIVATIONS", "1") != "0"


def fast_activations(dtype) -> bool:
    """Whether kernels use the hardware tanh approximation (``tanh.approx.f32``, relative error
    about 2^-11; sigmoid as 0.5 tanh(x/2) + 0.5, absolute error about 2^-12): for bf16 layers,
    whose own rounding (2^-8) is larger. Not for fp16 (rounding 2^-11, the same size) until
    measured on a GPU; never in the interpreter (no inline PTX); FASTRNN_FAST_ACTIVATIONS=0
    turns it off."""
    return _FAST_ACTIVATIONS and dtype == torch.bfloat16 and not interpreting()


def resolve_heuristics(kernel, kwargs: dict):
    """(the @triton.jit function, every argument including the heuristics' values)."""
    values = dict(kwargs)
    while hasattr(kernel, "values") and hasattr(kernel, "fn"):  # @triton.heuristics
        for name, fn in kernel.values.items():
            values[name] = fn(values)
        kernel = kernel.fn
    return kernel, values


# Kernel launches as they happen, per @triton.jit function name (``launch_kernel`` and the
# stepwise fast launcher count them; nothing counts on a strategy's behalf). Tests read them
# through ``launch_counts``.
LAUNCHES: collections.Counter = collections.Counter()


def block(n: int) -> int:
    """A tile covering ``n``: tl.dot needs every dimension >= 16 on a GPU (padding is masked)."""
    return max(16, triton.next_power_of_2(n))
