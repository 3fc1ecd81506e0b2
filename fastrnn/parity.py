"""Parity report: fastrnn against torch.nn on the device present, forward and every gradient.

Run as ``python -m fastrnn parity``. Each row builds a torch.nn layer and its fastrnn twin with the
same weights, runs both on the same input with the same upstream gradients, and reports the
largest difference over the outputs and all gradients, against a tolerance for the dtype.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from . import modules
from .backend import use_kernels

# Tolerances on the largest absolute difference, relative to the largest reference magnitude.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float64: 1e-10}


@dataclasses.dataclass
class Case:
    cell: str
    layers: int = 1
    bidirectional: bool = False
    proj: int = 0
    packed: bool = False
    batch_first: bool = False
    nonlinearity: str = "tanh"

    def kwargs(self):
        kw = dict(num_layers=self.layers, bidirectional=self.bidirectional,
                  batch_first=self.batch_first)
        if self.proj:
            kw["proj_size"] = self.proj
        if self.cell == "RNN":
            kw["nonlinearity"] = self.nonlinearity
        return kw

    def name(self):
        cell = f"RNN-{self.nonlinearity}" if self.cell == "RNN" else self.cell
        parts = [cell, f"L{self.layers}"]
        if self.bidirectional:
            parts.append("bi")
        if self.proj:
            parts.append(f"proj{self.proj}")
        if self.packed:
            parts.append("packed")
        if self.batch_first:
            parts.append("batch_first")
        return " ".join(parts)


def default_cases() -> list[Case]:
    cases = []
    for cell, extra in (("RNN", {}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {}),
                        ("LSTM", {"proj": 8}), ("GRU", {})):
        cases.append(Case(cell, **extra))
        cases.append(Case(cell, layers=2, bidirectional=True, packed=True, **extra))
        cases.append(Case(cell, layers=2, batch_first=True, **extra))
    return cases


def _run(module, x, hx, lengths, grads):
    """Outputs, then the gradients of x, the states and every parameter."""
    leaves = [x] + (list(hx) if isinstance(hx, tuple) else [hx])
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    inp, h = leaves[0], (tuple(leaves[1:]) if isinstance(hx, tuple) else leaves[1])
    if lengths is not None:
        inp = pack_padded_sequence(inp, lengths, enforce_sorted=False)
    out, hidden = module(inp, h)
    outs = [out.data if isinstance(out, PackedSequence) else out]
    outs += list(hidden) if isinstance(hidden, tuple) else [hidden]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [t.grad for t in leaves] + [
        p.grad for p in module.parameters()]


def check(case: Case, device: torch.device, dtype: torch.dtype, T: int, B: int, I: int,
          H: int) -> dict:
    torch.manual_seed(0)
    ref = getattr(torch.nn, case.cell)(I, H, **case.kwargs()).to(device, dtype)
    fast = getattr(modules, case.cell)(I, H, **case.kwargs()).to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    D = 2 if case.bidirectional else 1
    P = case.proj or H
    shape = (B, T, I) if case.batch_first else (T, B, I)
    x = torch.randn(*shape, device=device, dtype=dtype)
    h0 = torch.randn(case.layers * D, B, P, device=device, dtype=dtype)
    hx = (h0, torch.randn(case.layers * D, B, H, device=device, dtype=dtype)) \
        if case.cell == "LSTM" else h0
    lengths = None
    if case.packed:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
    with torch.no_grad():
        probe, probe_h = ref(pack_padded_sequence(x, lengths, enforce_sorted=False)
                             if lengths is not None else x, hx)
    outs = [probe.data if isinstance(probe, PackedSequence) else probe]
    outs += list(probe_h) if isinstance(probe_h, tuple) else [probe_h]
    grads = [torch.randn_like(o) for o in outs]
    start = time.perf_counter()
    got = _run(fast, x, hx, lengths, grads)
    elapsed = time.perf_counter() - start
    want = _run(ref, x, hx, lengths, grads)
    scale = max(w.abs().max().item() for w in want if w is not None and w.numel()) or 1.0
    diff = max(((g.double() - w.double()).abs().max().item() if w.numel() else 0.0)
               for g, w in zip(got, want) if w is not None)
    return {"case": case.name(), "dtype": str(dtype).replace("torch.", ""), "max_abs_diff": diff,
            "tolerance": TOLERANCE[dtype] * scale, "ok": diff <= TOLERANCE[dtype] * scale,
            "seconds": elapsed}


def report(device: torch.device | None = None, dtypes=None, cases=None, sizes=None,
           echo=print) -> list[dict]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not use_kernels(device):
        raise SystemExit(f"fastrnn's kernels do not run on {device} here (FASTRNN_BACKEND, "
                         "TRITON_INTERPRET): nothing to compare")
    if dtypes is None:
        dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])
    T, B, I, H = sizes or ((50, 16, 64, 128) if device.type == "cuda" else (5, 3, 6, 16))
    cases = cases or default_cases()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    echo(f"fastrnn parity vs torch.nn on {name}: T={T} B={B} I={I} H={H}; forward outputs and "
         "every gradient")
    echo(f"{'case':<34} {'dtype':<9} {'max |diff|':>11} {'tolerance':>10}  result")
    rows = []
    for dtype in dtypes:
        for case in cases:
            row = check(case, device, dtype, T, B, I, H)
            rows.append(row)
            echo(f"{row['case']:<34} {row['dtype']:<9} {row['max_abs_diff']:>11.3e} "
                 f"{row['tolerance']:>10.1e}  {'ok' if row['ok'] else 'MISMATCH'}")
    failed = sum(not r["ok"] for r in rows)
    echo(f"{len(rows) - failed}/{len(rows)} configurations match torch.nn")
    return rows
