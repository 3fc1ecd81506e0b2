"""Which kernels a layer runs, with which tiles and resources: ``python -m fastrnn explain`` and
``fastrnn.explain(module, input)``.

Per layer: the strategy, the kernel launches per forward and per backward, each kernel's tiles and
the compiled kernel's own shared memory, registers and spills (compiled ahead of time for the GPU,
which need not be present), and the precision. Selection is a pure function of the problem and the
device's description (``fastrnn.ops.select``), so the answer for a named GPU on any machine is the
answer on that GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.nn.utils.rnn import PackedSequence

from . import _modes
from .backend import interpreting, use_kernels
from .ops import costs, dispatch, recurrence_ln, resources, select

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}


def _precision_text(problem: select.Problem) -> str:
    if problem.dtype == torch.float32:
        return {"tf32": "fp32 on TF32 tensor cores (fp32 accumulation)",
                "tf32x3": "fp32 as three TF32 products (about fp32 accuracy, tensor cores)",
                "ieee": "fp32"}[problem.precision]
    name = str(problem.dtype).replace("torch.", "")
    return f"{name} (fp64 accumulation)" if problem.dtype == torch.float64 else \
        f"{name} (fp32 accumulation, fp32 cell state)"


def explain_problem(problem: select.Problem, spec: select.DeviceSpec, T: int, layers: int = 1,
                    compiled: bool = True, recurrent_grad_clip: float | None = None,
                    layer_norm: bool = False) -> list[dict]:
    """One entry per layer (the recurrence is the same problem in every layer). ``layer_norm``:
    a LayerNormLSTM / LayerNormGRU (its own kernels, ``ops/layernorm.py``)."""
    if layer_norm:
        the_plan = recurrence_ln.plan_problem(problem, spec)
    else:
        the_plan = dispatch.plan(problem, spec, dispatch.forced_strategy() or None)
    fwd, bwd = the_plan.launches(T)
    kernels = []
    if compiled and resources.available() and not spec.interpreter:
        compiler = resources.Compiler(spec)
        if layer_norm:
            entries = resources.compile_layer_norm(problem, spec, compiler, the_plan.strategy)
        else:
            entries = resources.compile_problem(problem, spec, compiler, the_plan.strategy)
        by_name = {e["kernel"]: e for e in entries}
    else:
        by_name = {}
    step = costs.per_step(problem, the_plan)
    for cfg in the_plan.kernels:
        entry = by_name.get(cfg.kernel, {})
        kernels.append({
            "kernel": cfg.kernel, "block_b": cfg.block_b, "block_h": cfg.block_h,
            "block_k": cfg.block_k, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "estimated_shared_memory_bytes": cfg.shared_bytes,
            **{k: entry[k] for k in ("shared_memory_bytes", "registers", "stack_bytes",
                                     "loop_spills", "mma", "wgmma") if k in entry},
            **({"error": entry["error"]} if "error" in entry else {}),
            "per_step": step[cfg.kernel]})

    def most(key):
        values = [k[key] for k in kernels if key in k]
        return max(values) if values else None

    base = {"strategy": the_plan.strategy, "launches_forward": fwd, "launches_backward": bwd,
            "shared_memory_bytes": most("shared_memory_bytes"), "registers": most("registers"),
            "precision": problem.precision if problem.dtype == torch.float32 else
            str(problem.dtype).replace("torch.", ""),
            "precision_text": _precision_text(problem), "device": spec.name,
            "grid": list(the_plan.grid), "kernels": kernels,
            "recurrent_grad_clip": recurrent_grad_clip, "layer_norm": layer_norm,
            "other_strategies": {
                k: v for k, v in (recurrence_ln.why_not(problem, spec) if layer_norm else
                                  dispatch.why_not(problem, spec)).items()
                if k != the_plan.strategy}}
    return [{"layer": i, **base} for i in range(layers)]


def format_explanation(rows: list[dict], header: str = "") -> str:
    lines = [header] if header else []
    for r in rows:
        if r["strategy"] == "torch.nn":
            lines.append(f"layer {r['layer']}: torch.nn's implementation ({r['reason']})")
            continue
        lines.append(f"layer {r['layer']}: {r['strategy']}: {r['launches_forward']} kernel "
                     f"launch(es) per forward, {r['launches_backward']} per backward; "
                     f"{r['precision_text']}")
        if r.get("layer_norm") and r["strategy"] == "cooperative":
            lines.append("  LayerNorm cell: the recurrent LayerNorm fused, W_hh sliced over the "
                         "programs; each step's statistics are reduced across them (forward 2 "
                         "grid barriers per step, backward 2 (LSTM) or 1 (GRU)); the input "
                         "side's LayerNorm runs with the input projection, before the recurrence")
        elif r["strategy"] == "cooperative" and any(k["kernel"].startswith("_lstmp_")
                                                    for k in r["kernels"]):
            lines.append("  proj_size: two grid barriers per step (forward: the cell, then "
                         "h = W_hr r for the state rows each program owns; backward: dh of "
                         "the state rows, then the cell's gradients; ops/cooperative_proj.py)")
        elif r.get("layer_norm"):
            lines.append("  LayerNorm cell: the recurrent LayerNorm fused, a program per (batch "
                         "tile, direction) owning whole rows; the input side's LayerNorm runs "
                         "with the input projection, before the recurrence")
        if r.get("recurrent_grad_clip"):
            lines.append(f"  recurrent_grad_clip={r['recurrent_grad_clip']}: the backward kernel "
                         "clamps the gradient flowing into each step's previous state (dh, and "
                         f"dc for an LSTM) to [-{r['recurrent_grad_clip']}, "
                         f"{r['recurrent_grad_clip']}]: it changes the gradient on purpose")
        for k in r["kernels"]:
            tiles = (f"tiles batch {k['block_b']} x out {k['block_h']} x inner {k['block_k']}, "
                     f"{k['num_warps']} warps, {k['num_stages']} stage(s)")
            if "error" in k:
                figures = f"does not compile: {k['error'].splitlines()[0][:120]}"
            elif "registers" in k:
                cores = ("wgmma and mma.sync" if k["wgmma"] and k["mma"] else "wgmma"
                         if k["wgmma"] else "mma.sync" if k["mma"] else "none (FMA)")
                figures = (f"{k['shared_memory_bytes']} B shared memory, {k['registers']} "
                           f"registers/thread, {k['stack_bytes']} B stack (spills; "
                           f"{k['loop_spills']} spill instructions in the time loop), tensor "
                           f"cores: {cores}")
            else:
                figures = (f"about {k['estimated_shared_memory_bytes']} B shared memory "
                           "(estimate: no compiled figures here)")
            lines.append(f"  {k['kernel']}: {tiles}: {figures}")
            s = k["per_step"]
            lines.append(f"    per step and program: {s['smem_read_bytes']} B from shared memory, "
                         f"{s['l2_read_bytes']} B read and {s['l2_write_bytes']} B written in "
                         f"global memory/L2, {s['barriers']} barrier(s), {s['launches']} "
                         f"launch(es): {s['model']}")
        others = "; ".join(f"{name}: {why}" for name, why in r["other_strategies"].items()
                           if why)
        if others:
            lines.append(f"  not chosen: {others}")
    lines.append("Per layer also: one input-projection GEMM before the recurrence and the "
                 "weight-gradient GEMMs after it (cuBLAS).")
    return "\n".join(lines)


def explain(module, input, hx=None) -> list[dict]:
    """What a live fastrnn layer (RNN, LSTM, GRU) does with ``input`` on its device: one dict per
    layer with ``strategy``, ``launches_forward``, ``launches_backward``, ``shared_memory_bytes``
    and ``registers`` (the compiled kernels' figures where they can be had: CUDA devices, not the
    interpreter), ``precision``, and per kernel its tiles and figures. ``strategy`` is
    "torch.nn" (with a ``reason``) where fastrnn runs torch.nn's implementation instead."""
    del hx  # the states do not change the plan
    data = input.data if isinstance(input, PackedSequence) else input
    device = data.device
    layers = module.num_layers
    clip = getattr(module, "recurrent_grad_clip", None)
    if not use_kernels(device):
        reason = ("FASTRNN_BACKEND=torch" if os.environ.get("FASTRNN_BACKEND", "auto") == "torch"
                  else f"fastrnn's kernels do not run on {device.type} tensors here")
        return [{"layer": i, "strategy": "torch.nn", "reason": reason,
                 "recurrent_grad_clip": clip} for i in range(layers)]
    if isinstance(input, PackedSequence):
        B, T = int(input.batch_sizes[0]), len(input.batch_sizes)
    elif input.dim() == 2:
        B, T = 1, input.shape[0]
    else:
        B = input.shape[0 if module.batch_first else 1]
        T = input.shape[1 if module.batch_first else 0]
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
             else data.dtype)
    D = 2 if module.bidirectional else 1
    P = module.proj_size or module.hidden_size
    problem = select.Problem(_modes.MODE_IDS[module.mode], B, module.hidden_size, P, D, dtype,
                             select.precision(dtype, device))
    return explain_problem(problem, select.describe(device), T, layers,
                           recurrent_grad_clip=clip,
                           layer_norm=module._layer_norm_params() is not None
                           if hasattr(module, "_layer_norm_params") else False)


# ---------------------------------------------------------------------------------------------
# python -m fastrnn explain

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", required=True, choices=list(_modes.MODE_IDS))
    p.add_argument("--input-size", type=int, required=True, metavar="I")
    p.add_argument("--hidden-size", type=int, required=True, metavar="H")
    p.add_argument("--batch", type=int, required=True, metavar="B")
    p.add_argument("--seq-len", type=int, required=True, metavar="T")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--layers", type=int, default=1, metavar="N")
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--proj-size", type=int, default=0, metavar="P", help="LSTM only")
    p.add_argument("--gpu", required=True, choices=sorted(select.GPUS))
    p.add_argument("--no-tf32", action="store_true",
                   help="fp32 as with cuDNN's TF32 switched off (default: torch's current "
                        "setting, TF32 on unless changed)")
    p.add_argument("--recurrent-grad-clip", type=float, default=None, metavar="C",
                   help="the layer's recurrent_grad_clip (changes the gradient on purpose)")
    p.add_argument("--layernorm", action="store_true",
                   help="LayerNormLSTM / LayerNormGRU (LSTM and GRU, no proj_size)")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per layer")


def main(args) -> int:
    if interpreting():
        # Compiled figures need the kernels compiled for a GPU, not interpreted: start afresh.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "fastrnn", *sys.argv[1:]], env)
    if args.layernorm and (args.mode not in ("LSTM", "GRU") or args.proj_size):
        print("error: --layernorm is for LSTM and GRU without proj_size", file=sys.stderr)
        return 2
    if args.proj_size and args.mode != "LSTM":
        print("error: --proj-size is for LSTM only", file=sys.stderr)
        return 2
    if args.proj_size and not 0 < args.proj_size < args.hidden_size:
        print("error: --proj-size must be between 1 and hidden_size - 1", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    tf32 = not args.no_tf32 and select.cudnn_rnn_tf32()
    precision = ("tf32" if tf32 else "tf32x3") if dtype == torch.float32 else "ieee"
    P = args.proj_size or args.hidden_size
    problem = select.Problem(_modes.MODE_IDS[args.mode], args.batch, args.hidden_size, P,
                             2 if args.bidirectional else 1, dtype, precision)
    spec = select.GPUS[args.gpu]
    try:
        rows = explain_problem(problem, spec, args.seq_len, args.layers,
                               recurrent_grad_clip=args.recurrent_grad_clip,
                               layer_norm=args.layernorm)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in rows:
        r["input_size"] = args.input_size if r["layer"] == 0 else P * problem.D
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_explanation(rows, (
            f"fastrnn explain: {'LayerNorm ' if args.layernorm else ''}{args.mode} "
            f"input_size={args.input_size} "
            f"hidden_size={args.hidden_size}{f' proj_size={P}' if args.proj_size else ''} "
            f"batch={args.batch} seq_len={args.seq_len} {args.dtype}, {args.layers} layer(s)"
            f"{', bidirectional' if args.bidirectional else ''} on {spec.name} "
            f"(sm_{spec.arch}, {spec.sm_count} SMs, {spec.smem_per_block} B of shared memory "
            "per block)")))
    return 0
