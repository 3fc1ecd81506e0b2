"""Parity report: fastrnn against torch.nn on the device present, forward and every gradient.

Run as ``python -m fastrnn parity``. Each row builds a torch.nn layer and its fastrnn twin with the
same weights, runs both on the same input with the same upstream gradients, and runs torch.nn in
float64 on the CPU as the truth. A row is ok when fastrnn's largest error against the truth (over
the outputs and every gradient, relative to the largest magnitude) is at most twice torch.nn's own,
or within a few units in the last place of the dtype. Both sides compute at the same precision:
on CUDA, fp32 follows cuDNN's RNN TF32 switch for both; each row prints what each side used.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import warnings

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from . import modules
from .backend import use_kernels
from .ops import select

ULPS = 64          # the floor: ulps of the dtype, relative to the tensor's largest magnitude
FACTOR = 2.0       # fastrnn's error may be this many times torch.nn's


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
    """Outputs, then the gradients of x, the states and every parameter, on the module's device
    and dtype."""
    p = next(module.parameters())
    leaves = [x] + (list(hx) if isinstance(hx, tuple) else [hx])
    leaves = [t.detach().to(p.device, p.dtype).requires_grad_(True) for t in leaves]
    inp, h = leaves[0], (tuple(leaves[1:]) if isinstance(hx, tuple) else leaves[1])
    if lengths is not None:
        inp = pack_padded_sequence(inp, lengths, enforce_sorted=False)
    out, hidden = module(inp, h)
    outs = [out.data if isinstance(out, PackedSequence) else out]
    outs += list(hidden) if isinstance(hidden, tuple) else [hidden]
    torch.autograd.backward(outs, [g.to(o) for g, o in zip(grads, outs)])
    return [o.detach() for o in outs] + [t.grad for t in leaves] + [
        q.grad for q in module.parameters()]


def _precision(side: str, dtype: torch.dtype, device: torch.device) -> str:
    """What a side computes in: the dtype, and for fp32 on CUDA whether TF32 is used."""
    name = str(dtype).replace("torch.", "")
    if dtype != torch.float32 or device.type != "cuda":
        return name
    if side == "torch.nn":
        return "tf32" if select.cudnn_rnn_tf32() else "fp32"
    return {"tf32": "tf32", "tf32x3": "fp32 (3xTF32)", "ieee": "fp32"}[
        select.precision(dtype, device)]


def check(case: Case, device: torch.device, dtype: torch.dtype, T: int, B: int, I: int,
          H: int) -> dict:
    torch.manual_seed(0)
    ref = getattr(torch.nn, case.cell)(I, H, **case.kwargs()).to(device, dtype)
    fast = getattr(modules, case.cell)(I, H, **case.kwargs()).to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    truth_module = copy.deepcopy(ref).cpu().double()
    D = 2 if case.bidirectional else 1
    P = case.proj or H
    g = torch.Generator().manual_seed(1)
    shape = (B, T, I) if case.batch_first else (T, B, I)
    x = torch.randn(*shape, generator=g)
    h0 = torch.randn(case.layers * D, B, P, generator=g)
    hx = (h0, torch.randn(case.layers * D, B, H, generator=g)) if case.cell == "LSTM" else h0
    lengths = None
    if case.packed:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
    with torch.no_grad():
        probe, probe_h = truth_module(pack_padded_sequence(x.double(), lengths,
                                                           enforce_sorted=False)
                                      if lengths is not None else x.double(),
                                      tuple(t.double() for t in hx) if isinstance(hx, tuple)
                                      else hx.double())
    outs = [probe.data if isinstance(probe, PackedSequence) else probe]
    outs += list(probe_h) if isinstance(probe_h, tuple) else [probe_h]
    grads = [torch.randn(o.shape, generator=g) for o in outs]
    start = time.perf_counter()
    got = _run(fast, x, hx, lengths, grads)
    if device.type == "cuda":  # a barrier timeout is this case's, reported here
        torch.cuda.synchronize(device)
        from .ops.cooperative import check_errors

        check_errors()
    elapsed = time.perf_counter() - start
    want = _run(ref, x, hx, lengths, grads)
    truth = _run(truth_module, x, hx, lengths, grads)
    err_fast = err_torch = 0.0
    ok = True
    for gf, gt, t in zip(got, want, truth):
        if t is None or not t.numel():
            continue
        scale = t.abs().max().item() or 1.0
        e_fast = (gf.cpu().double() - t).abs().max().item() / scale
        e_torch = (gt.cpu().double() - t).abs().max().item() / scale
        err_fast, err_torch = max(err_fast, e_fast), max(err_torch, e_torch)
        ok &= e_fast <= max(FACTOR * e_torch, ULPS * torch.finfo(dtype).eps)
    return {"case": case.name(), "dtype": str(dtype).replace("torch.", ""),
            "fastrnn_precision": _precision("fastrnn", dtype, device),
            "torch_precision": _precision("torch.nn", dtype, device),
            "fastrnn_error": err_fast, "torch_error": err_torch, "ok": ok, "seconds": elapsed}


def report(device: torch.device | None = None, dtypes=None, cases=None, sizes=None,
           echo=print, sink=None) -> list[dict]:
    """Check every case in every dtype, printing each row as it completes (and handing it to
    ``sink``, if given: ``python -m fastrnn parity --jsonl`` writes it out at once)."""
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
         "every gradient, each side's largest error against torch.nn in float64 (relative to the "
         f"largest magnitude); ok when fastrnn's is at most {FACTOR:g}x torch.nn's or "
         f"{ULPS} ulps")
    echo(f"{'case':<30} {'precision fastrnn / torch.nn':<30} {'fastrnn err':>11} "
         f"{'torch.nn err':>12}  result")
    rows = []
    with warnings.catch_warnings(record=True) as caught:  # torch's notes, after the table
        warnings.simplefilter("always")
        for dtype in dtypes:
            for case in cases:
                row = check(case, device, dtype, T, B, I, H)
                rows.append(row)
                if sink is not None:
                    sink(row)
                prec = f"{row['fastrnn_precision']} / {row['torch_precision']}"
                echo(f"{row['case']:<30} {prec:<30} {row['fastrnn_error']:>11.2e} "
                     f"{row['torch_error']:>12.2e}  {'ok' if row['ok'] else 'MISMATCH'}")
    failed = sum(not r["ok"] for r in rows)
    echo(f"{len(rows) - failed}/{len(rows)} configurations match torch.nn")
    notes = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    if notes:
        echo("Notes (warnings raised during the run, once each):")
        for note in notes:
            echo(f"  {note}")
    return rows


def write_json(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
