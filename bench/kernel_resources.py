"""Compile every kernel configuration fastrnn's selection can choose for a GPU, without a GPU, and
check that each fits: the compiled kernel's own figures, not estimates.

For each named GPU (its ``fastrnn.ops.select.DeviceSpec``: SM count, shared memory per block,
registers per SM, compute capability) this walks a grid of problems (every cell, dtype and fp32
precision; hidden sizes 16..2048 with odd ones; batch 1..256; with and without proj_size; one and
two directions), lets selection plan each, and compiles the kernels the plan launches, forward and
backward, ahead of time for that GPU's architecture (``fastrnn.ops.resources``). Each distinct
kernel variant is compiled once and reported with its dynamic plus static shared memory, registers
per thread, stack bytes (spills), spill instructions inside its loops (``loop``: those run every
step; spills outside them, the prologue that loads a resident slice, run once per launch) and
tensor-core instructions, and checked against the device:
shared memory per block, and registers per program against the SM's register file.

    python bench/kernel_resources.py [--gpu H100 ...] [--quick] [--json out.json]
        [--beyond | --layernorm] [--hidden N ...] [--precision P ...] [--cell C ...]

Exit status 1 if a variant fails to compile or does not fit. Runs without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_resources.py compiles for a GPU: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastrnn import _modes  # noqa: E402
from fastrnn.ops import costs, dispatch, resources, select  # noqa: E402
from fastrnn.ops import recurrence_ln as rln  # noqa: E402

CELLS = {  # label -> (mode, proj)
    "rnn_tanh": (_modes.RNN_TANH, False),
    "rnn_relu": (_modes.RNN_RELU, False),
    "lstm": (_modes.LSTM, False),
    "lstm_proj": (_modes.LSTM, True),
    "gru": (_modes.GRU, False),
}
PRECISIONS = {  # label -> (dtype, fp32 dot precision)
    "fp32-tf32": (torch.float32, "tf32"),
    "fp32-tf32x3": (torch.float32, "tf32x3"),
    "fp16": (torch.float16, "ieee"),
    "bf16": (torch.bfloat16, "ieee"),
    "fp64": (torch.float64, "ieee"),
}
HIDDEN, BATCH = resources.HIDDEN, resources.BATCH
QUICK_HIDDEN = (17, 64, 256, 1024, 2048)
QUICK_BATCH = (1, 64, 256)


def problems(quick: bool, cells=None, precisions=None):
    hidden, batch = (QUICK_HIDDEN, QUICK_BATCH) if quick else (HIDDEN, BATCH)
    for cell, prec, H, B, D in itertools.product(cells or CELLS, precisions or PRECISIONS,
                                                 hidden, batch, (1, 2)):
        mode, proj = CELLS[cell]
        dtype, precision = PRECISIONS[prec]
        P = max(1, H // 3) if proj else H
        yield f"{cell}/{prec}/H{H}/B{B}/D{D}", select.Problem(mode, B, H, P, D, dtype, precision)


def _step(row: dict, key: str) -> str:
    """A static per-step figure of a variant (fastrnn/ops/costs.py), per program."""
    step = row.get("per_step")
    if not step:
        return "-"
    if key == "l2":
        return str(step["l2_read_bytes"] + step["l2_write_bytes"])
    return str(step[key])


def check(spec: select.DeviceSpec, quick: bool = False, cells=None, precisions=None,
          echo=print, beyond: bool = False, layer_norm: bool = False) -> tuple[list, list]:
    compiler = resources.Compiler(spec)
    chosen = {}
    start = time.perf_counter()
    if layer_norm:  # LayerNormLSTM / LayerNormGRU: their own kernels (ops/layernorm.py)
        cells = [c for c in cells or ("lstm", "gru") if c in ("lstm", "gru")]
    for label, problem in problems(quick, cells, precisions):
        compiler.label = label
        if layer_norm:
            if problem.dtype == torch.float64:
                continue  # fp64 layers run stepwise on a GPU: no LayerNorm kernel to check
            # Both one-launch strategies where they fit (the choice is cooperative where it
            # fits: ops/layernorm.py), each variant with its static per-step cost.
            the_plan = rln.plan_problem(problem, spec)
            chosen[f"layernorm {the_plan.strategy}"] = \
                chosen.get(f"layernorm {the_plan.strategy}", 0) + 1
            for strategy in ("persistent", "cooperative"):
                try:
                    entries = resources.compile_layer_norm(problem, spec, compiler, strategy)
                except RuntimeError:
                    continue  # does not fit (the plan says why)
                step = costs.per_step(problem, rln.plan_problem(problem, spec, strategy))
                for e in entries:
                    if "per_step" not in e and e["kernel"] in step:
                        e["per_step"] = step[e["kernel"]]
            continue
        entries = resources.compile_problem(problem, spec, compiler, beyond=beyond)
        the_plan = dispatch.plan(problem, spec)
        chosen[the_plan.strategy] = chosen.get(the_plan.strategy, 0) + 1
        step = costs.per_step(problem, the_plan)
        for e in entries:  # each variant's static cost, at the first problem that compiled it
            if "per_step" not in e and e["kernel"] in step:
                e["per_step"] = step[e["kernel"]]
    rows = list(compiler.results.values())
    echo(f"== {spec.name} (sm_{spec.arch}: {spec.sm_count} SMs, {spec.smem_per_block} bytes of "
         f"shared memory per block): strategies chosen {chosen}")
    echo(f"{'kernel':<36} {'first problem':<34} {'warps':>5} {'stg':>3} {'regs':>4} "
         f"{'shared':>7} {'stack':>5} {'loop':>4} {'mma':>4} {'wgmma':>5} {'smem/step':>9} "
         f"{'L2/step':>8} "
         f"{'bar':>3}  fits")
    for r in sorted(rows, key=lambda r: (r["kernel"], r["first_problem"])):
        if "error" in r:
            echo(f"{r['kernel']:<36} {r['first_problem']:<34} FAILED "
                 f"{r['error'].splitlines()[0][:200]}")
            continue
        echo(f"{r['kernel']:<36} {r['first_problem']:<34} {r['num_warps']:>5} "
             f"{r['num_stages']:>3} {r['registers']:>4} {r['shared_memory_bytes']:>7} "
             f"{r['stack_bytes']:>5} {r['loop_spills']:>4} {r['mma']:>4} {r['wgmma']:>5} "
             f"{_step(r, 'smem_read_bytes'):>9} {_step(r, 'l2') :>8} {_step(r, 'barriers'):>3}  "
             f"{'NO: ' + r['misfit'] if r['misfit'] else 'yes'}")
    failed = [r for r in rows if "error" in r or r["misfit"]]
    spills = sum(1 for r in rows if r.get("stack_bytes", 0) > 0)
    per_step = sum(1 for r in rows if r.get("loop_spills", 0) > 0)
    echo(f"{len(rows)} variants compiled for sm_{spec.arch} in {time.perf_counter() - start:.0f} s,"
         f" {len(failed)} failed or do not fit, {spills} spill, {per_step} inside their loops")
    return rows, failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="append", choices=sorted(select.GPUS),
                    help="a GPU to check (repeatable; default H100, A100 and L4)")
    ap.add_argument("--quick", action="store_true", help="a smaller grid of sizes")
    ap.add_argument("--json", default=None, help="write every variant's figures here")
    ap.add_argument("--beyond", action="store_true",
                    help="the variants with resets, the cell states' gradient (return_states), "
                         "recurrent gradient clipping, recurrent dropout and zoneout, instead of "
                         "packed input")
    ap.add_argument("--layernorm", action="store_true",
                    help="the LayerNormLSTM / LayerNormGRU kernels instead")
    ap.add_argument("--hidden", type=int, action="append",
                    help="hidden sizes (repeatable; default: the grid's)")
    ap.add_argument("--precision", action="append", choices=sorted(PRECISIONS),
                    help="precisions (repeatable; default: all)")
    ap.add_argument("--cell", action="append", choices=sorted(CELLS),
                    help="cells (repeatable; default: all)")
    a = ap.parse_args(argv)
    if a.hidden:
        global HIDDEN, QUICK_HIDDEN
        HIDDEN = QUICK_HIDDEN = tuple(a.hidden)
    out, ok = {}, True
    for name in a.gpu or ("H100", "A100", "L4"):
        rows, failed = check(select.GPUS[name], a.quick, cells=a.cell, precisions=a.precision,
                             beyond=a.beyond, layer_norm=a.layernorm)
        out[name] = rows
        ok &= not failed
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__,
                       "gpus": {k: vars(select.GPUS[k]) for k in out}, "variants": out}, f,
                      indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
