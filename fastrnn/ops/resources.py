"""The compiled kernels' own resource figures, for any NVIDIA GPU, on any machine.

Triton ships ptxas and cuobjdump, so a kernel can be compiled ahead of time for a GPU that is not
present. ``compile_problem`` runs the real launchers of a recurrence (forward with activations
saved, and backward) for a problem planned on a described GPU, with every launch replaced by such
a compile (``select.launching_with``), and reads each compiled kernel's figures:

* dynamic shared memory (the kernel's metadata) plus static shared memory (cuobjdump);
* registers per thread, stack bytes (where ptxas puts spilled registers) and local memory;
* tensor-core instructions in the PTX: ``mma.sync`` (Ampere and later) or ``wgmma`` (Hopper).

Used by ``fastrnn.explain`` and ``bench/kernel_resources.py``. Needs kernels compiled for a GPU,
so not under TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading

import torch
import triton

from .. import _modes
from ..backend import interpreting
from . import dispatch, select

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg", "launch_cooperative_grid")
# The sizes bench/kernel_resources.py walks (odd ones included: masks and padding).
HIDDEN = (16, 17, 33, 64, 100, 128, 255, 256, 511, 512, 1000, 1024, 2047, 2048)
BATCH = (1, 7, 16, 64, 100, 256)
_LOCK = threading.Lock()


def _tools_dir() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def available() -> bool:
    """Whether compiled figures can be had here (Triton's bundled CUDA tools, no interpreter)."""
    return not interpreting() and os.path.exists(os.path.join(_tools_dir(), "cuobjdump"))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def loop_spills(sass: str) -> int:
    """Spill instructions (local loads and stores, LDL / STL) inside a loop of the machine code:
    between a backward branch's target and the branch. Spills outside every loop (the prologue
    that loads a resident weight slice) run once per launch; these run on every step."""
    code = [(int(a, 16), ins.strip()) for a, ins in _SASS_LINE.findall(sass)]
    loops = []
    for addr, ins in code:
        m = re.search(r"\bBRA\b[^0-9]*(0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    return sum(1 for addr, ins in code if re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", ins)
               and any(lo <= addr <= hi for lo, hi in loops))


def figures(compiled) -> dict:
    """A compiled kernel's own resource figures (its machine code read only where it spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()

        def cuobjdump(flag: str) -> str:
            return subprocess.run([os.path.join(_tools_dir(), "cuobjdump"), flag, f.name],
                                  capture_output=True, text=True, check=True).stdout

        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
                      cuobjdump("--dump-resource-usage"))
        regs, stack, static, local = map(int, m.groups())
        loop = loop_spills(cuobjdump("-sass")) if stack else 0
    ptx = compiled.asm["ptx"]
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local,
            "loop_spills": loop,
            "shared_memory_bytes": int(compiled.metadata.shared) + static,
            "mma": len(re.findall(r"\bmma\.sync", ptx)),
            "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
            "tanh_approx": len(re.findall(r"\btanh\.approx\.f32", ptx))}


def fits(entry: dict, spec: select.DeviceSpec) -> str:
    """"" if a compiled kernel fits the device, else why not."""
    problems = []
    if entry["shared_memory_bytes"] > spec.smem_per_block:
        problems.append(f"shared memory {entry['shared_memory_bytes']} > {spec.smem_per_block}")
    threads = 32 * entry["num_warps"]
    if entry["registers"] * threads > spec.regs_per_sm:
        problems.append(f"registers {entry['registers']} x {threads} threads > "
                        f"{spec.regs_per_sm}")
    return "; ".join(problems)


class Compiler:
    """Stands in for launching: compiles each distinct launch once, for one GPU."""

    def __init__(self, spec: select.DeviceSpec):
        self.spec = spec
        self.results: dict = {}    # variant key -> entry
        self.used: list = []       # the keys launched by the last problem, in order
        self.label = ""

    def __call__(self, kernel, grid, kwargs):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn, values = select.resolve_heuristics(kernel, kwargs)
        names = [p.name for p in fn.params]
        options = {k: v for k, v in values.items() if k not in names and k in _OPTIONS}
        signature, constexprs = {}, {}
        for p in fn.params:
            v = values[p.name]
            if p.is_constexpr or v is None:
                signature[p.name] = "constexpr"
                constexprs[p.name] = v
            elif isinstance(v, torch.Tensor):
                signature[p.name] = "*" + _TYPES[v.dtype]
            elif isinstance(v, bool):
                signature[p.name] = "i1"
            elif isinstance(v, int):
                signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            else:
                signature[p.name] = "fp32"
        key = (fn.__name__, tuple(sorted(signature.items())),
               tuple(sorted((k, str(v)) for k, v in constexprs.items())),
               tuple(sorted(options.items())))
        if key not in self.used:
            self.used.append(key)
        if key in self.results:
            self.results[key]["problems"] += 1
            return None
        dtype = next((signature[n][1:] for n in ("w_hh_ptr", "w_hr_ptr", "y_ptr", "dgx_ptr")
                      if signature.get(n, "").startswith("*")), None)
        entry = {"kernel": fn.__name__, "first_problem": self.label, "problems": 1,
                 "dtype": dtype,
                 "constexprs": {k: str(v) for k, v in constexprs.items()},
                 "num_warps": options.get("num_warps", 4),
                 "num_stages": options.get("num_stages", 3), "grid": list(grid),
                 "cooperative_launch": bool(options.get("launch_cooperative_grid"))}
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs),
                                      target=GPUTarget("cuda", self.spec.arch, 32),
                                      options=options)
            entry.update(figures(compiled))
            entry["misfit"] = fits(entry, self.spec)
        except Exception as e:  # reported, never hidden: a variant that does not compile
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        self.results[key] = entry
        return None


def compile_problem(problem: select.Problem, spec: select.DeviceSpec, compiler: Compiler,
                    strategy: str | None = None, T: int = 2, beyond: bool = False) -> list[dict]:
    """Compile the kernels a recurrence runs (forward with activations saved, then backward) on
    ``spec``; returns their entries in launch order. The heaviest variant: packed input (lengths)
    and biases; inference and padded runs use the same kernels minus code paths. ``beyond``:
    the variant with every option beyond torch.nn instead of lengths (resets, the cell states'
    gradient, recurrent gradient clipping, recurrent dropout, zoneout masks)."""
    if not available():
        raise RuntimeError("compiled figures need Triton's CUDA tools and no TRITON_INTERPRET")
    from . import recurrence as rec

    mode, B, H, P, D, dtype = (problem.mode, problem.B, problem.H, problem.P, problem.D,
                               problem.dtype)
    G = _modes.NUM_GATES[mode]
    I = 4
    z = dict(dtype=dtype)
    x = torch.zeros(T, B, I, **z)
    w_ih = torch.zeros(D * G * H, I, **z)
    b_x = torch.zeros(D * G * H, **z)
    h0 = torch.zeros(D, B, P, **z)
    c0 = torch.zeros(D, B, H, **z) if mode == _modes.LSTM else None
    w_hh = torch.zeros(D, G * H, P, **z)
    b_hn = torch.zeros(D, H, **z) if mode == _modes.GRU else None
    w_hr = torch.zeros(D, P, H, **z) if problem.has_proj else None
    lengths = None if beyond else torch.full((B,), T, dtype=torch.int64)
    resets = torch.zeros(T, B, dtype=torch.bool) if beyond else None
    clip = 1.0 if beyond else 0.0
    rmask = torch.ones(D, B, P, **z) if beyond else None
    zh = torch.zeros(T, B, D, P, dtype=torch.bool) if beyond else None
    zc = torch.zeros(T, B, D, H, dtype=torch.bool) if beyond and c0 is not None else None
    compiler.used = []
    with _LOCK, select.targeting(spec, problem.precision), select.launching_with(compiler):
        chosen = dispatch.plan(problem, spec, strategy).strategy
        y, hn, cn, gates, cell = rec.recurrence(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths,
                                                mode, False, True, chosen, resets, clip, rmask,
                                                zh, zc)
        dcell = torch.zeros_like(cell) if beyond and c0 is not None else None
        rec.recurrence_backward(torch.zeros_like(y), torch.zeros_like(hn),
                                torch.zeros_like(cn) if c0 is not None else None, x, w_ih, y, h0,
                                c0, gates, cell, w_hh, w_hr, lengths, mode, False, True,
                                b_hn is not None, 0, chosen, resets, clip, dcell, rmask, zh, zc)
    return [compiler.results[k] for k in compiler.used]


def compile_layer_norm(problem: select.Problem, spec: select.DeviceSpec, compiler: Compiler,
                       strategy: str = "", T: int = 2) -> list[dict]:
    """As ``compile_problem``, for a LayerNorm layer (``ops/layernorm.py``; packed input)."""
    if not available():
        raise RuntimeError("compiled figures need Triton's CUDA tools and no TRITON_INTERPRET")
    from . import recurrence_ln as rln

    mode, B, H, D, dtype = problem.mode, problem.B, problem.H, problem.D, problem.dtype
    G = _modes.NUM_GATES[mode]
    z = dict(dtype=dtype)
    lstm = mode == _modes.LSTM
    xg = torch.zeros(T, B, D * G * H, **z)
    h0 = torch.zeros(D, B, H, **z)
    c0 = torch.zeros(D, B, H, **z) if lstm else None
    w_hh = torch.zeros(D, G * H, H, **z)
    b_hn = None if lstm else torch.zeros(D, H, **z)
    g_h = torch.ones(D, G * H, **z)
    g_c = torch.ones(D, H, **z) if lstm else None
    b_c = torch.zeros(D, H, **z) if lstm else None
    lengths = torch.full((B,), T, dtype=torch.int64)
    compiler.used = []
    with _LOCK, select.targeting(spec, problem.precision), select.launching_with(compiler):
        chosen = rln.plan_problem(problem, spec, strategy).strategy
        y, hn, cn, gates, cell, qhat, stats = rln.ln_recurrence_op(
            xg, h0, c0, w_hh, b_hn, g_h, g_c, b_c, lengths, mode, False, True, chosen)
        rln.ln_recurrence_backward(torch.zeros_like(y), torch.zeros_like(hn),
                                   torch.zeros_like(cn) if lstm else None, xg, y, h0, c0, gates,
                                   cell, qhat, stats, w_hh, g_h, g_c, b_c, lengths, mode,
                                   b_hn is not None, chosen)
    return [compiler.results[k] for k in compiler.used]
