"""Strategy choice and launch bookkeeping: which kernels run a recurrence, with which tiles.

Selection is a pure function of the problem (:class:`Problem`: cell, sizes, dtype, precision) and
a description of the device (:class:`DeviceSpec`: SM count, shared memory per block, registers per
SM, compute capability), so it can be tested on a CPU for any GPU and explained to users
(``fastrnn.explain``, ``python -m fastrnn explain``). Each strategy module sizes its tiles from a
byte budget of that device (``plan(problem, spec)``) and raises DoesNotFit where it cannot; this
module picks among them:

1. ``persistent``: one program per (batch tile, direction), the whole W_hh on one SM: best for
   small hidden sizes (measured on an H100, fp16 LSTM B=16: 2.5 us per step at H=64 against
   3.3 us cooperative; 5.4 against 3.7 at H=128).
2. ``cooperative``: programs share each recurrence, one grid barrier per step, W_hh sliced over
   the SMs (its first version ran at 3.3-5.3 us per step on an H100; this one is unmeasured).
3. ``stepwise``: one launch per step; any size (its launches bypass Triton's Python launch path
   after the first step, which cost 25-65 us per step on the H100's host). fp64
   layers on a GPU always run it: they are for checking, not speed, and one configuration keeps
   the compiled variants few.

``force_strategy`` / ``FASTRNN_STRATEGY`` override the choice; a forced strategy that cannot run a
problem on the device raises before anything is launched.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import os
import threading
from typing import Optional

import torch
import triton

from .. import _modes
from ..backend import interpreting

STRATEGY_NAMES = ("persistent", "cooperative", "stepwise")


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


def _strategies():
    from . import cooperative, persistent, stepwise  # strategies import this module

    return {"persistent": persistent, "cooperative": cooperative, "stepwise": stepwise}


@functools.lru_cache(maxsize=4096)
def plan(problem: Problem, spec: DeviceSpec, strategy: Optional[str] = None) -> Plan:
    """The plan for ``problem`` on ``spec``: the forced ``strategy``, or the choice described in
    this module's docstring. Raises ValueError (unknown strategy) or RuntimeError (the strategy
    cannot run the problem on this device) before anything runs."""
    modules = _strategies()
    if strategy:
        module = modules[check_strategy(strategy)]
        try:
            return module.plan(problem, spec)
        except DoesNotFit as e:
            raise RuntimeError(
                f"fastrnn: strategy {strategy!r} cannot run {problem.describe()} on {spec.name}: "
                f"{e}. Choose another with fastrnn.force_strategy or FASTRNN_STRATEGY, or leave "
                "the choice to fastrnn") from None
    reasons = []
    for name in STRATEGY_NAMES:
        if name == "cooperative" and spec.interpreter:
            continue  # the interpreter runs it only when asked for (one program per group)
        if problem.dtype == torch.float64 and not spec.interpreter and name != "stepwise":
            continue  # fp64 on a GPU is for checking, not speed: one strategy, one configuration
        try:
            return modules[name].plan(problem, spec)
        except DoesNotFit as e:
            reasons.append(f"{name}: {e}")
    raise RuntimeError(f"fastrnn: no strategy fits {problem.describe()} on {spec.name} "
                       f"({'; '.join(reasons)})")


def why_not(problem: Problem, spec: DeviceSpec) -> dict:
    """For each strategy, None if it can run the problem, else the reason it cannot."""
    out = {}
    for name, module in _strategies().items():
        try:
            module.plan(problem, spec)
            out[name] = None
        except DoesNotFit as e:
            out[name] = str(e)
    return out


# ---------------------------------------------------------------------------------------------
# Forcing a strategy.

# Per thread / task, so one thread's override never leaks into another's.
_forced: contextvars.ContextVar = contextvars.ContextVar("fastrnn_strategy", default=None)


def check_strategy(name: str) -> str:
    if name not in STRATEGY_NAMES:
        raise ValueError(f"unknown fastrnn strategy {name!r}; choose from {sorted(STRATEGY_NAMES)}")
    return name


@contextlib.contextmanager
def force_strategy(name: Optional[str]):
    """Run every recurrence started inside the block with strategy ``name`` (None: automatic).
    The backward of such a recurrence runs the same strategy, wherever it runs."""
    token = _forced.set(None if name is None else check_strategy(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_strategy() -> str:
    """The strategy forced here and now ("" for automatic)."""
    name = _forced.get() or os.environ.get("FASTRNN_STRATEGY", "").strip()
    return check_strategy(name) if name else ""


@torch.compiler.assume_constant_result
def resolve(mode: int, B: int, H: int, P: int, D: int, dtype: torch.dtype,
            device: torch.device) -> str:
    """The strategy a layer runs, decided where the layer is called (so a forced strategy is
    read on the caller's thread and recorded for the backward). torch.compile bakes it into
    the graph."""
    problem = Problem(mode, B, H, P, D, dtype, precision(dtype, device))
    return plan(problem, describe(device), forced_strategy() or None).strategy


def select_strategy(mode: int, H: int, P: int, B: int, dtype: torch.dtype, device: torch.device,
                    has_proj: bool = False, directions: int = 1) -> str:
    """The strategy a recurrence of these sizes runs on ``device`` (forced or chosen)."""
    del has_proj  # implied by P != H
    problem = Problem(mode, B, H, P, directions, dtype, precision(dtype, device))
    return plan(problem, describe(device), forced_strategy() or None).strategy


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


def strategy_kernels(strategy: str, direction: Optional[str] = None) -> tuple:
    """The kernels a strategy launches in one pass ("fwd", "bwd") or both (``KERNELS`` in its
    module)."""
    table = _strategies()[check_strategy(strategy)].KERNELS
    return tuple(k for d in ("fwd", "bwd") if direction in (None, d) for k in table[d])


def launch_counts(strategy: Optional[str] = None, direction: Optional[str] = None) -> int:
    """Kernel launches counted so far, of one strategy (or all) and one pass (or both)."""
    names = [k for s in ([strategy] if strategy else STRATEGY_NAMES)
             for k in strategy_kernels(s, direction)]
    return sum(LAUNCHES[k] for k in names)


# The Triton interpreter patches triton.language globally while a kernel runs, so two threads
# must not interpret kernels at once. On a GPU, launches need no lock.
_INTERPRETER_LOCK = threading.Lock()


def launch(strategy: str, direction: str, args, the_plan: Plan) -> None:
    """Run one pass ("fwd" or "bwd") of ``strategy``."""
    module = _strategies()[strategy]
    run = module.forward if direction == "fwd" else module.backward
    if interpreting():
        with _INTERPRETER_LOCK:
            run(args, the_plan)
    else:
        run(args, the_plan)


def block(n: int) -> int:
    """A tile covering ``n``: tl.dot needs every dimension >= 16 on a GPU (padding is masked)."""
    return max(16, triton.next_power_of_2(n))
