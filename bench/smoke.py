"""The GPU smoke stage of bench/gpu_run.sh: the most information per second of a rare GPU.

    python bench/smoke.py OUT [--dry-run] [--max-seconds S]

Runs the cooperative strategy for every cell at fp32 (TF32 on and off), fp16 and bf16, and the
persistent and stepwise strategies for the LSTM at two precisions, some cases packed, then every
strategy with the options beyond torch.nn at once (precision "options": resets, return_states,
recurrent_grad_clip, recurrent_dropout and zoneout on a bidirectional two-layer LSTM, fp32 without
TF32, against ``fastrnn.reference`` in float64 with the same masks), then LayerNormLSTM /
LayerNormGRU (precision "layernorm", each strategy, the same way, against
``layer_norm_rnn_reference``). Each case runs forward and backward with the strategy forced,
against torch.nn in float64 (fastrnn's error within 2x of torch.nn's own in the same
precision: fastrnn/parity.py), reads every cooperative
barrier's error flag after a synchronize, counts the launches per kernel where they happen, and
takes one timing. Each row is appended to OUT/smoke.jsonl and printed as it completes, so a run
cut short keeps what it measured. Exit status 1 if any case failed.

``--dry-run`` runs the same cases at toy sizes under Triton's CPU interpreter (fp32 and fp16
only): the CPU test of this stage.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cases(dry_run: bool) -> list[tuple]:
    """(strategy, cell, precision, packed) in the order they run: the unproven one first."""
    precisions = ["tf32", "fp32", "fp16"] if dry_run else ["tf32", "fp32", "fp16", "bf16"]
    out = [("cooperative", cell, p, cell == "GRU")
           for p in precisions for cell in ("LSTM", "GRU", "RNN")]
    out += [(s, "LSTM", p, s == "stepwise") for s in ("persistent", "stepwise")
            for p in ("fp16", "tf32")]
    out += [(s, "LSTM", "options", False) for s in ("cooperative", "persistent", "stepwise")]
    out += [("cooperative", "LSTM", "layernorm", True), ("cooperative", "GRU", "layernorm", False),
            ("persistent", "LSTM", "layernorm", False), ("stepwise", "LSTM", "layernorm", False),
            ("persistent", "GRU", "layernorm", True)]
    return out


def layer_norm_error(cell, packed, device, T, B, I, H) -> float:
    """LayerNormLSTM / LayerNormGRU (bidirectional, two layers, fp32 without TF32; gains and
    biases away from 1 and 0), forward and backward, against the float64 reference: the largest
    error relative to each output's and gradient's scale."""
    import fastrnn
    from fastrnn import _modes
    from fastrnn.reference import layer_norm_rnn_reference
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    m = getattr(fastrnn, "LayerNorm" + cell)(I, H, num_layers=2, bidirectional=True).to(device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g).to(device)
    lengths = torch.randint(1, T + 1, (B,), generator=g) if packed else None
    if packed:
        lengths[0] = T
    leaf = x.clone().requires_grad_()
    if packed:
        out, hidden = m(pack_padded_sequence(leaf, lengths, enforce_sorted=False))
        out = pad_packed_sequence(out, total_length=T)[0]
    else:
        out, hidden = m(leaf)
    got = [out] + (list(hidden) if cell == "LSTM" else [hidden])
    params = {k: v.detach().double().requires_grad_() for k, v in m.named_parameters()}
    x64 = x.double().requires_grad_()
    y, hn, cn = layer_norm_rnn_reference(_modes.MODE_IDS[cell], x64, params, 2, True,
                                         lengths=lengths)
    if packed:
        valid = (torch.arange(T)[:, None] < lengths[None, :]).to(device)[:, :, None]
        y = torch.where(valid, y, 0)
    want = [y, hn] + ([cn] if cn is not None else [])
    return _scaled_error(got, [leaf] + list(m.parameters()), want,
                         [x64] + list(params.values()), g)


OPTIONS_TOLERANCE = 1e-3   # largest error, relative to each tensor's scale, of the options case


def options_error(device, T, B, I, H) -> float:
    """The options beyond torch.nn at once, forward and backward, against the float64 reference
    with the very masks the layer drew (the same generator calls under the same seed): the
    largest error, relative to each output's and gradient's scale."""
    import fastrnn
    from fastrnn import _modes
    from fastrnn.reference import dropout_masks, rnn_reference, zoneout_masks

    torch.manual_seed(0)
    m = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True, recurrent_grad_clip=0.5,
                     recurrent_dropout=0.2, zoneout=(0.1, 0.2)).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g).to(device)
    resets = (torch.rand(T, B, generator=g) < 0.1).to(device)
    leaves = [x.clone().requires_grad_()]
    torch.manual_seed(2)
    out, (hn, cn), (h_all, c_all) = m(leaves[0], resets=resets, return_states=True)
    got = [out, hn, cn, h_all, c_all]
    torch.manual_seed(2)  # the same draws, in the layer's order
    w = m.weight_hh_l0
    masks = dropout_masks(0.0, 0.2, 2, 2, 4, H, H, B, w)
    zone = zoneout_masks(0.1, 0.2, 2, T, B, 2, H, H, True, w, True)
    params = {k: v.detach().double().requires_grad_() for k, v in m.named_parameters()}
    x64 = x.double().requires_grad_()
    want = list(rnn_reference(
        _modes.LSTM, x64, params, 2, True, None, resets=resets, clip=0.5, states=True,
        masks=[(None, r.double()) for _, r in masks], zoneout=zone))
    return _scaled_error(got, leaves + list(m.parameters()), want,
                         [x64] + list(params.values()), g)


def _scaled_error(got, inputs, want, inputs64, g) -> float:
    """The largest error of the outputs ``got`` and their gradients (random upstream gradients
    from ``g``) against the float64 ``want``, relative to each tensor's scale."""
    ups = [torch.randn(t.shape, generator=g).to(t.device, torch.float64) for t in want]
    g_got = torch.autograd.grad(got, inputs, [u.float() for u in ups])
    g_want = torch.autograd.grad(want, inputs64, ups)
    error = 0.0
    for a, b in zip(got + list(g_got), want + list(g_want)):
        scale = b.abs().max().item() or 1.0
        error = max(error, (a.double() - b).abs().max().item() / scale)
    return error


def _dtype(precision: str) -> torch.dtype:
    return {"tf32": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
            "bf16": torch.bfloat16}[precision]


def run_case(strategy, cell, precision, packed, device, sizes) -> dict:
    """One case with ``strategy`` forced: its check (``_check_parity``, or ``_check_options``
    for the options case) fills the row; the barrier flags are read after a synchronize, and
    the launches counted where they happen must be the strategy's own. Never raises: a failure
    is the row's ``error``."""
    from fastrnn.ops import cooperative, dispatch, select

    T, B, I, H = sizes
    if strategy == "persistent":
        H = min(H, 32)  # the persistent strategy holds W_hh in one program
    row = {"strategy": strategy, "cell": cell, "precision": precision, "packed": packed,
           "T": T, "B": B, "I": I, "H": H}
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    before = collections.Counter(select.LAUNCHES)
    start = time.perf_counter()
    try:
        with dispatch.force_strategy(strategy):
            if precision == "options":
                _check_options(row, device, T, B, I, H)
            elif precision == "layernorm":
                _check_options(row, device, T, B, I, H, cell, packed)
            else:
                _check_parity(row, cell, precision, packed, device, T, B, I, H)
            cooperative.check_errors()
    except Exception as e:  # the row says what failed; the stage goes on
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:1000],
                   traceback=traceback.format_exc()[-2000:])
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    launched = {k: n - before.get(k, 0) for k, n in select.LAUNCHES.items()
                if n != before.get(k, 0)}
    own = set(dispatch.strategy_kernels(strategy))
    row["launches"] = launched
    if launched and not set(launched) <= own:
        row.update(ok=False,
                   error=f"kernels of another strategy ran: {sorted(set(launched) - own)}")
    elif not launched and "error" not in row:
        row.update(ok=False, error="no kernel launched")
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _check_parity(row, cell, precision, packed, device, T, B, I, H) -> None:
    """Forward and backward against torch.nn in float64, then one timed training step."""
    import fastrnn
    from fastrnn import parity
    from fastrnn.ops import cooperative

    case = parity.Case(cell, bidirectional=packed, packed=packed)
    result = parity.check(case, device, _dtype(precision), T, B, I, H)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cooperative.check_errors()  # every barrier completed (flags read after a sync)
    row.update(ok=result["ok"], fastrnn_error=result["fastrnn_error"],
               torch_error=result["torch_error"], fastrnn_precision=result["fastrnn_precision"],
               first_call_seconds=round(result["seconds"], 4))
    # One timing of forward + backward, compiles done.
    model = getattr(fastrnn, cell)(I, H, **case.kwargs()).to(device, _dtype(precision))
    x = torch.randn(T, B, I, device=device, dtype=_dtype(precision), requires_grad=True)
    for timed in (False, True):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out, _ = model(x)
        out.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if timed:
            row["train_step_ms"] = round((time.perf_counter() - t0) * 1e3, 3)


def _check_options(row, device, T, B, I, H, layer_norm_cell=None, packed=False) -> None:
    """The options case (or, with ``layer_norm_cell``, a LayerNorm layer) against the float64
    reference (``options_error``, ``layer_norm_error``)."""
    error = (layer_norm_error(layer_norm_cell, packed, device, T, B, I, H) if layer_norm_cell
             else options_error(device, T, B, I, H))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row.update(ok=error <= OPTIONS_TOLERANCE, fastrnn_error=error, torch_error=None,
               fastrnn_precision="fp32 (options vs fastrnn.reference)")
    if not row["ok"]:
        row["error"] = (f"error {error:.2e} against the float64 reference "
                        f"(tolerance {OPTIONS_TOLERANCE})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="directory for smoke.jsonl")
    ap.add_argument("--dry-run", action="store_true",
                    help="toy sizes under Triton's CPU interpreter (the stage's CPU check)")
    ap.add_argument("--max-seconds", type=float, default=80.0,
                    help="start no case after this many seconds (default 80)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before fastrnn imports triton
        device = torch.device("cpu")
        sizes = (3, 2, 4, 32)     # T, B, I, H: two 16-unit slices per group under the interpreter
    else:
        device = torch.device("cuda")
        sizes = (64, 16, 64, 256)  # several programs per group on an H100/H200
    sys.path.insert(0, ROOT)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "smoke.jsonl")
    start = time.perf_counter()
    failed = skipped = 0
    todo = cases(args.dry_run)
    for i, (strategy, cell, precision, packed) in enumerate(todo):
        if time.perf_counter() - start > args.max_seconds:
            skipped = len(todo) - i
            print(f"smoke: out of time, {skipped} case(s) not run", flush=True)
            break
        row = run_case(strategy, cell, precision, packed, device, sizes)
        failed += not row["ok"]
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        summary = {k: row.get(k) for k in ("strategy", "cell", "precision", "packed", "ok",
                                           "fastrnn_error", "torch_error", "train_step_ms",
                                           "launches", "error")}
        print("smoke:", json.dumps(summary), flush=True)
    print(f"smoke: {len(todo) - skipped - failed}/{len(todo) - skipped} ok in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
