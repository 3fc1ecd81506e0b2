"""Which strategy runs a recurrence, and running it: the layer above the strategy modules.

Each strategy module sizes its tiles from a byte budget of the device (``plan(problem, spec)``)
and raises DoesNotFit where it cannot; this module picks among them, in this order:

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
problem on the device raises before anything is launched. Adding a strategy is one module
(``plan``, ``forward``, ``backward``, ``KERNELS``) and one line of ``STRATEGIES``; a strategy
may run some problems in a module of their own (``takes(problem)`` says which: the cooperative
strategy's LSTMs with proj_size run in ``cooperative_proj``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from typing import Optional

import torch

from ..backend import interpreting
from . import cooperative, cooperative_proj, layernorm, persistent, stepwise
from .select import LAUNCHES, DeviceSpec, DoesNotFit, Plan, Problem, describe, precision

STRATEGIES = {  # name -> its modules, in the order selection tries the strategies
    "persistent": (persistent,),
    "cooperative": (cooperative, cooperative_proj),
    "stepwise": (stepwise,),
}
STRATEGY_NAMES = tuple(STRATEGIES)
# The module that launches each kernel (``launch`` finds a plan's module by its kernels).
_MODULE_OF = {k: m for ms in STRATEGIES.values() for m in ms for ks in m.KERNELS.values()
              for k in ks}


def module(name: str, problem: Problem):
    """The module of strategy ``name`` that runs ``problem``: the first that ``takes`` it."""
    return next(m for m in STRATEGIES[name] if getattr(m, "takes", lambda p: True)(problem))


@functools.lru_cache(maxsize=4096)
def plan(problem: Problem, spec: DeviceSpec, strategy: Optional[str] = None) -> Plan:
    """The plan for ``problem`` on ``spec``: the forced ``strategy``, or the choice described in
    this module's docstring. Raises ValueError (unknown strategy) or RuntimeError (the strategy
    cannot run the problem on this device) before anything runs."""
    if strategy:
        try:
            return module(check_strategy(strategy), problem).plan(problem, spec)
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
            return module(name, problem).plan(problem, spec)
        except DoesNotFit as e:
            reasons.append(f"{name}: {e}")
    raise RuntimeError(f"fastrnn: no strategy fits {problem.describe()} on {spec.name} "
                       f"({'; '.join(reasons)})")


def why_not(problem: Problem, spec: DeviceSpec) -> dict:
    """For each strategy, None if it can run the problem, else the reason it cannot."""
    out = {}
    for name in STRATEGY_NAMES:
        try:
            module(name, problem).plan(problem, spec)
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
# Running a pass, and counting what ran.

def strategy_kernels(strategy: str, direction: Optional[str] = None) -> tuple:
    """The kernels a strategy launches in one pass ("fwd", "bwd") or both (``KERNELS`` in its
    module)."""
    out = tuple(k for d in ("fwd", "bwd") if direction in (None, d)
                for m in STRATEGIES[check_strategy(strategy)] for k in m.KERNELS[d])
    if strategy in layernorm.STRATEGIES:  # LayerNorm layers' kernels (ops/layernorm.py)
        out += tuple(k for d, k in zip(("fwd", "bwd"), layernorm.kernels(strategy))
                     if direction in (None, d))
    return out


def strategy_kernels_of(direction: Optional[str] = None) -> tuple:
    """Every strategy's kernels of one pass ("fwd", "bwd") or both (each once)."""
    return tuple(dict.fromkeys(k for s in STRATEGY_NAMES for k in strategy_kernels(s, direction)))


def launch_counts(strategy: Optional[str] = None, direction: Optional[str] = None) -> int:
    """Kernel launches counted so far, of one strategy (or all) and one pass (or both)."""
    names = strategy_kernels(strategy, direction) if strategy else strategy_kernels_of(direction)
    return sum(LAUNCHES[k] for k in names)


# The Triton interpreter patches triton.language globally while a kernel runs, so two threads
# must not interpret kernels at once. On a GPU, launches need no lock.
_INTERPRETER_LOCK = threading.Lock()


def run_pass(run, args, the_plan: Plan) -> None:
    """``run(args, the_plan)``: a strategy's launcher, one interpreted pass at a time."""
    if interpreting():
        with _INTERPRETER_LOCK:
            run(args, the_plan)
    else:
        run(args, the_plan)


def launch(strategy: str, direction: str, args, the_plan: Plan) -> None:
    """Run one pass ("fwd" or "bwd") of ``strategy`` (the module whose kernels ``the_plan``
    configures)."""
    assert the_plan.strategy == strategy, (the_plan.strategy, strategy)
    m = _MODULE_OF[the_plan.kernels[0].kernel]
    run_pass(m.forward if direction == "fwd" else m.backward, args, the_plan)
