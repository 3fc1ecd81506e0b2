"""Compile every fastrnn kernel variant for an NVIDIA target, without a GPU, and report resources.

Triton ships ptxas and cuobjdump, so kernels can be compiled for sm_90 on any machine. This runs
the real launchers (forward and backward of every cell type, dtype and strategy) with launches
replaced by ahead-of-time compilation, then prints registers, shared memory and local memory
(spills) per kernel variant. It catches what the interpreter lets through (tl.dot shape rules,
type errors in code paths the interpreter never compiles) and shows register pressure.

    python bench/kernel_resources.py [--arch 90] [--quick] [--json out.json]

Exit status 1 if any variant fails to compile. Must run without TRITON_INTERPRET.
"""

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_resources.py compiles for a GPU: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastrnn import _modes  # noqa: E402
from fastrnn.ops import cooperative  # noqa: E402
from fastrnn.ops import recurrence as rec  # noqa: E402

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class Compiler:
    def __init__(self, arch):
        self.arch = arch
        self.results = {}   # key -> dict
        self.failures = []
        self.label = ""

    def run(self, fn, args, kwargs):
        names = [p.name for p in fn.params]
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items()
                   if k not in names and k in ("num_warps", "num_stages", "launch_cooperative_grid")}
        signature, constexprs = {}, {}
        for p in fn.params:
            v = bound[p.name]
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                constexprs[p.name] = v
            elif isinstance(v, torch.Tensor):
                signature[p.name] = "*" + TYPES[v.dtype]
            elif isinstance(v, bool):
                signature[p.name] = "i1"
            elif isinstance(v, int):
                signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            else:
                signature[p.name] = "fp32"
        key = (fn.__name__, tuple(sorted(signature.items())),
               tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(sorted(options.items())))
        if key in self.results:
            return
        entry = {"kernel": fn.__name__, "variant": self.label,
                 "constexprs": {k: str(v) for k, v in constexprs.items()}}
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs),
                                      target=GPUTarget("cuda", self.arch, 32), options=options)
            entry.update(resources(compiled.asm["cubin"]))
        except Exception as e:  # report every failing variant, not just the first
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
            self.failures.append(entry)
        self.results[key] = entry


def resources(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups()))) if m else {}


CONFIGS = [  # label, mode, proj, bias
    ("rnn_tanh", _modes.RNN_TANH, 0, True),
    ("rnn_relu", _modes.RNN_RELU, 0, True),
    ("lstm", _modes.LSTM, 0, True),
    ("lstm_proj", _modes.LSTM, 1, True),
    ("gru", _modes.GRU, 0, True),
    ("gru_nobias", _modes.GRU, 0, False),
]


def largest_persistent_h(mode, proj):
    """The largest hidden size (a power of two) that select_strategy gives to "persistent"."""
    H = 16
    while rec.select_strategy(mode, 2 * H, H if proj else 2 * H, 1, torch.float32,
                              torch.device("cpu"), bool(proj)) == "persistent":
        H *= 2
    return H


def drive(compiler, strategy, mode, proj, bias, dtype, lengths, save, H):
    T, B, D = 3, 5, 2
    G = _modes.NUM_GATES[mode]
    P = H // 2 if proj else H
    x = torch.randn(T, B, 4).to(dtype)
    w_ih = torch.randn(D * G * H, 4).to(dtype)
    h0 = torch.randn(D, B, P).to(dtype)
    c0 = torch.randn(D, B, H).to(dtype) if mode == _modes.LSTM else None
    w_hh = torch.randn(D, G * H, P).to(dtype)
    b_hn = torch.randn(D, H).to(dtype) if mode == _modes.GRU and bias else None
    w_hr = torch.randn(D, P, H).to(dtype) if proj else None
    lens = torch.tensor([3, 3, 2, 1, 1]) if lengths else None
    with rec.force_strategy(strategy):
        y, hn, cn, gates, cell = rec.recurrence(x, w_ih, None, h0, c0, w_hh, b_hn, w_hr, lens, mode, False, save)
        if save:
            rec.recurrence_backward(torch.zeros_like(y), torch.zeros_like(hn),
                                    torch.zeros_like(cn) if c0 is not None else None, y, h0, c0,
                                    gates, cell, w_hh, w_hr, lens, mode)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="fp32 and fp16 only, with lengths")
    ap.add_argument("--dtypes", default=None, help="comma list from fp32,fp16,bf16,fp64")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    compiler = Compiler(a.arch)
    JITFunction.run = lambda self, *args, grid, warmup, **kw: compiler.run(self, args, kw)
    rec.dot_precision = lambda dtype, device: "tf32" if dtype == torch.float32 else "ieee"
    cooperative.sm_count = lambda device: 132  # plan grids for an H100 / H200
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
    dtypes = [names[d] for d in (a.dtypes.split(",") if a.dtypes else
                                 (["fp32", "fp16"] if a.quick else list(names)))]
    lengths_opts = (True,) if a.quick else (False, True)
    for strategy, (label, mode, proj, bias), dtype, lengths in itertools.product(
            ("persistent", "stepwise", "cooperative"), CONFIGS, dtypes, lengths_opts):
        if strategy == "cooperative" and proj:
            continue
        sizes = {"persistent": (32, largest_persistent_h(mode, proj)), "stepwise": (80,),
                 "cooperative": (256,)}[strategy]
        for H, save in itertools.product(dict.fromkeys(sizes),
                                         (True, False) if strategy == "persistent" else (True,)):
            compiler.label = (f"{strategy}/{label}/{TYPES[dtype]}/"
                              f"{'packed' if lengths else 'padded'}/{'train' if save else 'infer'}"
                              f"/H{H}")
            drive(compiler, strategy, mode, proj, bias, dtype, lengths, save, H)
    rows = list(compiler.results.values())
    print(f"{'kernel':<40} {'variant':<44} {'regs':>5} {'shared':>7} {'local':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<40} {r['variant']:<44} FAILED {r['error'].splitlines()[0][:200]}")
        else:
            print(f"{r['kernel']:<40} {r['variant']:<44} {r['regs']:>5} {r['shared']:>7} {r['local']:>6}")
    print(f"{len(rows)} variants compiled for sm_{a.arch}, {len(compiler.failures)} failed")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"arch": a.arch, "triton": triton.__version__, "torch": torch.__version__,
                       "variants": rows}, f, indent=1)
    return 1 if compiler.failures else 0


if __name__ == "__main__":
    sys.exit(main())
