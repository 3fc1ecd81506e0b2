"""Benchmark report: fastrnn against torch.nn (cuDNN), side by side, on the device present.

``python -m fastrnn bench [--grid NAME ...]`` runs named configuration grids and, per configuration
and phase, times every provider, measures peak memory and the largest difference between the
fastrnn and torch.nn outputs, prints a table, and writes JSON (schema in the README), CSV and a PNG
plot of the speedup over torch.nn.

Providers:

* ``fastrnn``: fastrnn's layer as users run it.
* ``torch.nn``: torch.nn's layer as users run it (cuDNN on a GPU). For fp32 both follow cuDNN's
  RNN TF32 switch (``torch.backends.cudnn.rnn.fp32_precision``, or ``allow_tf32`` on older torch;
  on by default), so the two compute at the same precision.
* ``torch.nn-tf32off``: torch.nn with cuDNN's TF32 switched off (fp32 only), for reference.
* ``torch.nn-graph``: torch.nn captured in a CUDA graph and replayed (padded input only), so no
  launch overhead is counted against it.

A configuration with a ``feature`` (beyond torch.nn: ``resets``, ``states``, ``clip``) has other
providers: ``fastrnn`` runs the layer with the feature, ``fastrnn-plain`` the same layer without it
(its overhead), and ``torch.nn`` what users write with torch.nn today (``WORKAROUNDS``): a Python
loop over torch.nn's cell with the state multiplied by ``(1 - done)`` (resets) or a gradient hook
clamping it (clip), or torch.nn's layer called one step at a time (states).

Phases: ``fwd`` is inference (forward under ``torch.no_grad``); ``fwd+bwd`` is a training step
(forward, then backward with fixed upstream gradients into the input, the states and every
weight). Times are medians over repetitions after warm-up, with CUDA events; peak memory is the
growth of ``torch.cuda.max_memory_allocated`` over one run. A configuration that fails is a row
with its error, and the run goes on; JSON and CSV are rewritten after every configuration.
Under Triton's CPU interpreter fastrnn's times are not reported (they say nothing of its speed).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from . import modules
from .backend import interpreting
from .ops import select

PROVIDERS = ("fastrnn", "torch.nn", "torch.nn-tf32off", "torch.nn-graph")
PHASES = ("fwd", "fwd+bwd")
CELL_CLASSES = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN"}


@dataclasses.dataclass(frozen=True)
class Config:
    grid: str
    mode: str           # LSTM, GRU or RNN_TANH
    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False
    proj: int = 0
    dtype: str = "float32"
    phases: tuple = PHASES
    feature: str = ""   # beyond torch.nn: "resets", "states" or "clip" (unidirectional)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def label(self) -> str:
        parts = [self.mode, f"T={self.T}", f"B={self.B}", f"I={self.I}", f"H={self.H}"]
        if self.layers > 1:
            parts.append(f"L={self.layers}")
        if self.bidirectional:
            parts.append("bi")
        if self.packed:
            parts.append("packed")
        if self.proj:
            parts.append(f"proj={self.proj}")
        parts.append(self.dtype.replace("float", "fp").replace("bfp16", "bf16"))
        if self.feature:
            parts.append(self.feature)
        return " ".join(parts)


CELLS = ("LSTM", "GRU", "RNN_TANH")
FEATURES = ("resets", "states", "clip", "weight_dropout", "recurrent_dropout", "zoneout",
            "layernorm")
WORKAROUNDS = {
    "resets": "torch.nn's cell in a Python loop, the state multiplied by (1 - done)",
    "states": "torch.nn's layer called one step at a time",
    "clip": "torch.nn's cell in a Python loop, a hook clamping the state's gradient",
    "weight_dropout": "AWD-LSTM's WeightDrop around torch.nn's layer (a masked W_hh set before "
                      "each call)",
    "recurrent_dropout": "torch.nn's cell in a Python loop, the state times one mask per call",
    "zoneout": "torch.nn's cell in a Python loop, the states mixed with a mask per step",
    "layernorm": "a LayerNorm cell written with torch.nn.LayerNorm in a Python loop (Ba et al.; "
                 "PyTorch's custom_lstms.py example), against fastrnn.LayerNormLSTM / GRU",
}
RANDOM = ("weight_dropout", "recurrent_dropout", "zoneout")  # masks differ: no parity
CLIP = 1.0          # the recurrent_grad_clip of the "clip" configurations
DROPOUT = 0.25      # the probability of the dropout configurations


def _grid_fastrnns():
    # PyTorch's benchmarks/fastrnns default: LSTM, T=100, 1 layer, I=H=512, B=64, fp32.
    return [Config("fastrnns", m, 100, 64, 512, 512) for m in CELLS]


def _grid_cudnn_sample():
    # cuDNN's RNN sample: T=100, 4 layers, H=512, B=64.
    return [Config("cudnn-sample", m, 100, 64, 512, 512, layers=4) for m in CELLS]


def _grid_haste():
    # Haste's benchmark grid: T=50, B in 1..128, H in 128..4096 (LSTM and GRU).
    return [Config("haste", m, 50, b, h, h) for m in ("LSTM", "GRU")
            for h in (128, 256, 512, 1024, 2048, 4096) for b in (1, 16, 64, 128)]


def _grid_flashrnn():
    # FlashRNN's H100 point: fp16, I=H=768, B=16, T=1024.
    return [Config("flashrnn", m, 1024, 16, 768, 768, dtype="float16") for m in CELLS]


def _grid_small_batch():
    # Small-batch inference: B=1..8, H 256..1024, T=1000.
    return [Config("small-batch", m, 1000, b, h, h, phases=("fwd",)) for m in CELLS
            for h in (256, 512, 1024) for b in (1, 8)]


def _grid_variants():
    base = dict(T=100, B=32, I=256, H=256)
    out = []
    for m in CELLS:
        out += [
            Config("variants", m, layers=2, **base),
            Config("variants", m, layers=4, **base),
            Config("variants", m, layers=2, bidirectional=True, **base),
            Config("variants", m, packed=True, **base),
            Config("variants", m, layers=2, bidirectional=True, packed=True, **base),
            Config("variants", m, dtype="bfloat16", **base),
            Config("variants", m, dtype="float16", **base),
            Config("variants", m, layers=2, dtype="bfloat16", bidirectional=True, **base),
        ]
    out += [Config("variants", "LSTM", proj=128, **base),
            Config("variants", "LSTM", proj=128, layers=2, bidirectional=True, **base)]
    # Beyond torch.nn, against the users' workaround (issue 18's point: T=128, B=64, H=512).
    out += [Config("variants", m, 128, 64, 512, 512, feature=f)
            for f in FEATURES if f != "layernorm" for m in ("LSTM", "GRU")]
    # LayerNorm cells against the cell loop users write (issue 19's point: bf16 T=256 B=64
    # H=512); fastrnn-plain is the plain layer.
    out += [Config("variants", m, 256, 64, 512, 512, dtype="bfloat16", feature="layernorm")
            for m in ("LSTM", "GRU")]
    # GRU whose padded slice does not fit: its three gates unpadded, one launch per pass on an
    # H100 (issue 17); stepwise where the GPU is smaller.
    out += [Config("variants", "GRU", 100, 64, 2048, 2048, dtype="bfloat16")]
    # LSTMP at a speech recognizer's size: one launch per pass (ops/cooperative_proj.py), where
    # it ran one launch per step before (issue 17).
    out += [Config("variants", "LSTM", 100, 64, 512, 1024, dtype="bfloat16", proj=256)]
    return out


def _grid_smoke():
    # Tiny shapes that run in seconds under the Triton interpreter (CI without a GPU).
    return [Config("smoke", "LSTM", 4, 2, 3, 5, layers=2, bidirectional=True),
            Config("smoke", "GRU", 4, 3, 3, 5, packed=True),
            Config("smoke", "RNN_TANH", 3, 2, 3, 4),
            Config("smoke", "LSTM", 3, 2, 3, 5, proj=3, phases=("fwd",)),
            Config("smoke", "LSTM", 5, 3, 3, 4, layers=2, feature="resets")]


GRIDS: dict[str, Callable[[], list[Config]]] = {
    "fastrnns": _grid_fastrnns,
    "cudnn-sample": _grid_cudnn_sample,
    "haste": _grid_haste,
    "flashrnn": _grid_flashrnn,
    "small-batch": _grid_small_batch,
    "variants": _grid_variants,
    "smoke": _grid_smoke,
}
DEFAULT_GRIDS = ("fastrnns", "cudnn-sample", "haste", "flashrnn", "small-batch", "variants")


# ---------------------------------------------------------------------------------------------
# One configuration, one provider: the module, its inputs, and the callables to time.

@dataclasses.dataclass
class Case:
    module: torch.nn.Module
    x: torch.Tensor
    hx: object
    lengths: torch.Tensor | None
    grads: list | None = None
    call: Callable | None = None   # (module, input, hx) -> outputs; None: module(input, hx)

    def inputs(self, requires_grad: bool):
        x = self.x.detach().requires_grad_(requires_grad)
        hx = self.hx
        if requires_grad:
            hx = tuple(h.detach().requires_grad_() for h in hx) if isinstance(hx, tuple) else \
                hx.detach().requires_grad_()
        inp = x if self.lengths is None else pack_padded_sequence(x, self.lengths,
                                                                  enforce_sorted=False)
        return inp, hx

    def outputs(self, requires_grad: bool) -> list[torch.Tensor]:
        if self.call is not None:
            return list(self.call(self.module, *self.inputs(requires_grad)))
        out, hidden = self.module(*self.inputs(requires_grad))
        outs = [out.data if isinstance(out, PackedSequence) else out]
        return outs + (list(hidden) if isinstance(hidden, tuple) else [hidden])

    def forward(self):
        with torch.no_grad():
            return self.outputs(False)

    def forward_for_backward(self):
        for p in self.module.parameters():
            p.grad = None
        return self.outputs(True)

    def backward(self, outs):
        torch.autograd.backward(outs, self.grads)

    def step(self):
        self.backward(self.forward_for_backward())


def build_case(config: Config, provider: str, device: torch.device, seed: int = 0) -> Case:
    """The layer of ``provider`` for ``config`` (same weights for every provider), its inputs and
    the upstream gradients used by the backward phase."""
    library = modules if provider.startswith("fastrnn") else torch.nn
    kwargs = dict(num_layers=config.layers, bidirectional=config.bidirectional)
    if config.proj:
        kwargs["proj_size"] = config.proj
    if config.feature == "clip" and provider == "fastrnn":
        kwargs["recurrent_grad_clip"] = CLIP
    if config.feature in RANDOM and provider == "fastrnn":
        kwargs[config.feature] = DROPOUT
    torch.manual_seed(seed)
    cls = getattr(library, CELL_CLASSES[config.mode])
    if config.feature == "layernorm" and provider == "fastrnn":
        cls = getattr(modules, "LayerNorm" + CELL_CLASSES[config.mode])
    module = cls(config.I, config.H, **kwargs).to(device=device, dtype=config.torch_dtype)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    dt = config.torch_dtype
    D = 2 if config.bidirectional else 1
    P = config.proj or config.H
    x = torch.randn(config.T, config.B, config.I, generator=g).to(device, dt)
    h0 = torch.randn(config.layers * D, config.B, P, generator=g).to(device, dt)
    hx = (h0, torch.randn(config.layers * D, config.B, config.H, generator=g).to(device, dt)) \
        if config.mode == "LSTM" else h0
    lengths = None
    if config.packed:  # varied lengths, longest first is not required
        lengths = torch.randint(max(1, config.T // 4), config.T + 1, (config.B,), generator=g)
        lengths[0] = config.T
    case = Case(module, x, hx, lengths)
    if config.feature:
        _with_feature(case, config, provider, g)
    with torch.no_grad():
        outs = case.outputs(False)
    case.grads = [torch.randn(o.shape, generator=g).to(device, o.dtype) for o in outs]
    return case


def _with_feature(case: Case, config: Config, provider: str, g: torch.Generator) -> None:
    """A ``feature`` configuration: the call each provider makes (see the module docstring)."""
    if config.bidirectional or config.packed or config.proj:
        raise ValueError("feature configurations are unidirectional, padded, without proj_size")
    feature = config.feature
    if feature == "resets":
        # Episodes of about 32 steps; the initial state is zeros, as the workaround's mask gives.
        done = torch.rand(config.T, config.B, generator=g) < 1 / 32
        done[0] = False
        done = done.to(case.x.device)
        case.hx = tuple(torch.zeros_like(h) for h in case.hx) if isinstance(case.hx, tuple) \
            else torch.zeros_like(case.hx)
    else:
        done = None
    if provider == "fastrnn-plain":
        return
    if provider == "fastrnn":
        if feature == "resets":
            case.call = lambda m, x, hx: _flat(m(x, hx, resets=done))
        elif feature == "states":
            case.call = lambda m, x, hx: _flat(m(x, hx, return_states=True))
        return
    if feature == "states":
        case.call = _stepped
    elif feature == "layernorm":
        case.call = _LayerNormLoop(case.module)
    elif feature == "weight_dropout":
        case.call = _WeightDrop(case.module)
    else:
        case.call = _CellLoop(case.module, done, feature)


def _zone(old, new, training):
    d = (torch.rand_like(new) < DROPOUT).to(new.dtype) if training else DROPOUT
    return d * old + (1 - d) * new


def _flat(result) -> list:
    out = []
    for r in result:
        out += list(r) if isinstance(r, tuple) else [r]
    return out


class _CellLoop:
    """The users' workaround: torch.nn's cell per layer in a Python loop over the steps (the
    state multiplied by ``(1 - done)`` for resets; a gradient hook clamping it for clip)."""

    def __init__(self, layer: torch.nn.Module, done, feature: str):
        cls = {"LSTM": torch.nn.LSTMCell, "GRU": torch.nn.GRUCell}.get(layer.mode,
                                                                      torch.nn.RNNCell)
        self.cells = []
        for k in range(layer.num_layers):
            cell = cls(layer.input_size if k == 0 else layer.hidden_size, layer.hidden_size,
                       device=layer.weight_hh_l0.device, dtype=layer.weight_hh_l0.dtype)
            with torch.no_grad():
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(cell, name).copy_(getattr(layer, f"{name}_l{k}"))
            self.cells.append(cell)
        self.layer, self.done, self.feature = layer, done, feature
        self.is_lstm = layer.mode == "LSTM"

    def _clip(self, t):
        """``t`` as the next step's input, its gradient clamped there (a node of its own, so
        the output's gradient is not clamped: ``fastrnn.reference``'s clip)."""
        if self.feature == "clip" and t.requires_grad:
            t = t.clone()
            t.register_hook(lambda grad: grad.clamp(-CLIP, CLIP))
        return t

    def __call__(self, _module, x, hx):
        h0, c0 = hx if self.is_lstm else (hx, None)
        h_n, c_n = [], []
        for k, cell in enumerate(self.cells):
            h = h0[k]
            c = c0[k] if self.is_lstm else None
            mask = None
            if self.feature == "recurrent_dropout":  # one mask per call and layer
                mask = torch.nn.functional.dropout(torch.ones_like(h), DROPOUT,
                                                   self.layer.training)
            zoning = self.feature == "zoneout"
            ys = []
            for t in range(x.shape[0]):
                if self.done is not None:
                    keep = (~self.done[t]).to(h.dtype)[:, None]
                    h = h * keep
                    c = c * keep if c is not None else None
                h = self._clip(h)
                h_in = h if mask is None else h * mask
                h_old, c_old = h, c
                if self.is_lstm:
                    h, c = cell(x[t], (h_in, self._clip(c)))
                else:
                    h = cell(x[t], h_in)
                if zoning:  # keep the previous state with probability DROPOUT (eval: factor)
                    h = _zone(h_old, h, self.layer.training)
                    c = _zone(c_old, c, self.layer.training) if c is not None else None
                ys.append(h)
            x = torch.stack(ys)
            h_n.append(h)
            c_n.append(c)
        return [x, torch.stack(h_n)] + ([torch.stack(c_n)] if self.is_lstm else [])


class _LayerNormLoop:
    """The users' LayerNorm LSTM / GRU: per layer, torch.nn.LayerNorm modules (gain 1, bias 0,
    as fastrnn's are initialised) around the gate products of a step, in a Python loop
    (``fastrnn.reference.layer_norm_rnn_reference``'s maths)."""

    def __init__(self, layer: torch.nn.Module):
        self.layer, self.is_lstm = layer, layer.mode == "LSTM"
        G, H = (4 if self.is_lstm else 3), layer.hidden_size
        w = layer.weight_hh_l0
        self.norms = [[torch.nn.LayerNorm(n, device=w.device, dtype=w.dtype)
                       for n in (G * H, G * H) + ((H,) if self.is_lstm else ())]
                      for _ in range(layer.num_layers)]

    def __call__(self, _module, x, hx):
        h0, c0 = hx if self.is_lstm else (hx, None)
        h_n, c_n = [], []
        for k, norms in enumerate(self.norms):
            w_ih, w_hh, b_ih, b_hh = (getattr(self.layer, f"{n}_l{k}") for n in (
                "weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            h, c = h0[k], (c0[k] if self.is_lstm else None)
            ys = []
            for t in range(x.shape[0]):
                gx = norms[0](x[t] @ w_ih.t()) + b_ih
                gh = norms[1](h @ w_hh.t()) + b_hh
                if self.is_lstm:
                    i, f, g, o = (gx + gh).chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(norms[2](c))
                else:
                    xr, xz, xn = gx.chunk(3, 1)
                    hr, hz, hn = gh.chunk(3, 1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    n = torch.tanh(xn + r * hn)
                    h = (1 - z) * n + z * h
                ys.append(h)
            x = torch.stack(ys)
            h_n.append(h)
            c_n.append(c)
        return [x, torch.stack(h_n)] + ([torch.stack(c_n)] if self.is_lstm else [])


class _WeightDrop:
    """AWD-LSTM's WeightDrop, as users copy it: each ``weight_hh_l{k}`` becomes a raw parameter,
    and before every call a dropped-out copy is set as the module's attribute."""

    def __init__(self, module: torch.nn.Module):
        self.names = [f"weight_hh_l{k}" for k in range(module.num_layers)]
        for name in self.names:
            w = getattr(module, name)
            del module._parameters[name]
            module.register_parameter(name + "_raw", torch.nn.Parameter(w.data))
            setattr(module, name, w.data)

    def __call__(self, module, x, hx):
        for name in self.names:
            setattr(module, name, torch.nn.functional.dropout(getattr(module, name + "_raw"),
                                                              DROPOUT, module.training))
        with warnings.catch_warnings():  # cuDNN: the weights are not one contiguous chunk
            warnings.simplefilter("ignore", UserWarning)
            return _flat(module(x, hx))


def _stepped(module, x, hx):
    """The users' way to every state with torch.nn: the layer called one step at a time."""
    hs, cs = [], []
    for t in range(x.shape[0]):
        _, hx = module(x[t:t + 1], hx)
        hs.append(hx[0] if isinstance(hx, tuple) else hx)
        if isinstance(hx, tuple):
            cs.append(hx[1])
    out = [torch.stack([h[-1] for h in hs])] + (list(hx) if isinstance(hx, tuple) else [hx])
    return out + [torch.stack(hs)] + ([torch.stack(cs)] if cs else [])


# ---------------------------------------------------------------------------------------------
# Timing.

def _sync(device):
    """Wait for the device, then raise if a cooperative launch gave up at a barrier: a timeout
    is reported against the case that had it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        from .ops.cooperative import check_errors

        check_errors()


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, min_reps: int = 3,
            max_reps: int = 50, budget_s: float = 0.5) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on a GPU), after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph; calling the result replays it."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class _TF32Off:
    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def _tf32_state(provider: str, config: Config, device: torch.device) -> bool:
    """Whether fp32 matrix products may use TF32 for this provider (both sides follow cuDNN's RNN
    switch on CUDA; never on a CPU)."""
    if config.dtype != "float32" or device.type != "cuda" or provider == "torch.nn-tf32off":
        return False
    return select.cudnn_rnn_tf32()


def providers_for(config: Config, device: torch.device) -> list[str]:
    if config.feature:
        return ["fastrnn", "fastrnn-plain", "torch.nn"]
    out = ["fastrnn", "torch.nn"]
    if device.type == "cuda":
        if config.dtype == "float32":
            out.append("torch.nn-tf32off")
        if not config.packed:
            out.append("torch.nn-graph")
    return out


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:limit]


def measure(config: Config, device: torch.device, budget_s: float = 0.25) -> list[dict]:
    """Every provider and phase of one configuration: records in the results schema. Never
    raises: a provider that fails gives records carrying its error, and the others still run."""
    records = []
    outputs = {}
    interpreted = device.type == "cpu" and interpreting()
    for provider in providers_for(config, device):
        try:
            case = build_case(config, provider, device)
            if provider in ("fastrnn", "torch.nn"):
                outputs[provider] = [o.float() for o in case.forward()]
        except Exception as e:  # reported as a row, never hidden
            for phase in config.phases:
                records.append(_record(config, provider, phase, None, None, device,
                                       error=_first_line(e)))
            continue
        for phase in config.phases:
            if interpreted and provider.startswith("fastrnn"):
                # The interpreter's times say nothing about fastrnn's speed: not reported.
                records.append(_record(config, provider, phase, None, None, device,
                                       note="interpreter: no timing"))
                continue
            fn = case.forward if phase == "fwd" else case.step
            ctx = _TF32Off() if provider == "torch.nn-tf32off" else _Null()
            ms = mem = None
            note = error = ""
            with ctx:
                try:
                    if provider == "torch.nn-graph":
                        fn = _graphed(fn, device)
                    ms = time_ms(fn, device, budget_s=budget_s)
                    mem = peak_memory_mb(fn, device)
                except Exception as e:
                    if provider == "torch.nn-graph":  # cuDNN refuses capture for some cases
                        note = f"not capturable: {_first_line(e, 80)}"
                    else:
                        error = _first_line(e)
            records.append(_record(config, provider, phase, ms, mem, device, note, error))
    diff = None
    if "fastrnn" in outputs and "torch.nn" in outputs and config.feature not in RANDOM:
        diff = max((a - b).abs().max().item() for a, b in zip(outputs["fastrnn"],
                                                                outputs["torch.nn"]))
    for r in records:
        r["max_abs_diff"] = diff
    return records


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _record(config, provider, phase, ms, mem, device, note="", error=""):
    return {
        "grid": config.grid, "config": config.label(), "mode": config.mode,
        "dtype": config.dtype,
        "tf32": _tf32_state(provider, config, device), "T": config.T, "B": config.B,
        "I": config.I, "H": config.H, "layers": config.layers,
        "bidirectional": config.bidirectional, "packed": config.packed,
        "proj_size": config.proj, "feature": config.feature, "phase": phase,
        "provider": provider,
        "median_ms": ms, "us_per_step": None if ms is None else ms * 1e3 / config.T,
        "peak_mem_mb": mem, "note": note, "error": error or None,
    }


def _skipped(config: Config, device: torch.device, why: str) -> list[dict]:
    return [dict(_record(config, provider, phase, None, None, device, note=why),
                 max_abs_diff=None)
            for provider in providers_for(config, device) for phase in config.phases]


# ---------------------------------------------------------------------------------------------
# The report.

def environment(device: torch.device) -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10
                                ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}"
        name += ", Triton interpreter)" if interpreting() else ")"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
           "cudnn": cudnn, "commit": commit,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["fp32_tf32"] = select.cudnn_rnn_tf32()
    return env


def summarize(records: list[dict]) -> list[dict]:
    """One row per (configuration, phase): fastrnn against each torch.nn provider."""
    rows = {}
    for r in records:
        key = tuple(r.get(k) for k in ("grid", "mode", "dtype", "T", "B", "I", "H", "layers",
                                       "bidirectional", "packed", "proj_size", "feature",
                                       "phase"))
        row = rows.setdefault(key, {k: r[k] for k in r if k not in (
            "provider", "median_ms", "us_per_step", "peak_mem_mb", "tf32", "note", "error")})
        row[f"{r['provider']}_ms"] = r["median_ms"]
        row[f"{r['provider']}_mem_mb"] = r["peak_mem_mb"]
        row.setdefault("status", "ok")
        if r["error"]:
            row["status"] = f"error ({r['provider']}): {r['error']}"
        elif r["note"] and r["note"].startswith(("skipped", "interpreter")) \
                and row["status"] == "ok":
            row["status"] = r["note"]
    out = []
    for row in rows.values():
        fast, ref = row.get("fastrnn_ms"), row.get("torch.nn_ms")
        row["speedup"] = ref / fast if fast and ref else None
        best = [v for k, v in row.items() if k.startswith("torch.nn") and k.endswith("_ms") and v]
        row["speedup_vs_best_torch"] = min(best) / fast if fast and best else None
        row["us_per_step"] = fast * 1e3 / row["T"] if fast else None
        plain = row.get("fastrnn-plain_ms")
        row["overhead"] = fast / plain if fast and plain else None  # a feature's cost
        out.append(row)
    return out


def geomean(values):
    values = [v for v in values if v]
    return float(torch.tensor(values, dtype=torch.float64).log().mean().exp()) if values else None


def _fmt(v, spec):
    """``v`` formatted, or "-" for a missing value, at the same width."""
    if v is not None:
        return format(v, spec)
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return "-".rjust(int(width) if width else 1)


LEGEND = [
    ("fastrnn, torch.nn", "median milliseconds per call (fwd: forward under no_grad; "
                          "fwd+bwd: forward and backward into input, states and weights)"),
    ("speedup", "torch.nn ms / fastrnn ms (> 1: fastrnn is faster)"),
    ("tf32off", "torch.nn with cuDNN's TF32 switched off (fp32 only)"),
    ("graph", "torch.nn captured in a CUDA graph and replayed (no launch overhead)"),
    ("us/step", "fastrnn microseconds per time step"),
    ("mem f/t", "peak memory growth in MB, fastrnn / torch.nn"),
    ("max|diff|", "largest difference between fastrnn's and torch.nn's forward outputs"),
    ("-", "not measured (not applicable, skipped, or failed: see the line below the row)"),
    ("feature rows", "beyond torch.nn (resets, states, clip): torch.nn is the users' "
                     "workaround with torch.nn, named below the row; not in the geometric mean"),
]


GPU_COLUMNS = ("tf32off", "graph", "mem f/t")   # measured on CUDA only


def print_table(rows: list[dict], echo=print, interpreted: bool = False,
                gpu: bool = True) -> None:
    grids = []
    for r in rows:
        if r["grid"] not in grids:
            grids.append(r["grid"])
    for grid in grids:
        echo(f"\n== {grid}")
        head = f"{'configuration':<44} {'phase':<8} {'fastrnn':>9} {'torch.nn':>9} {'speedup':>8}"
        if gpu:
            head += f" {'tf32off':>9} {'graph':>9}"
        head += f" {'us/step':>8}"
        if gpu:
            head += f" {'mem f/t':>11}"
        echo(head + f" {'max|diff|':>9}")
        for r in rows:
            if r["grid"] != grid:
                continue
            speedup = "interp." if interpreted else f"{_fmt(r['speedup'], '7.2f')}x"
            line = (f"{r['config']:<44} {r['phase']:<8} {_fmt(r.get('fastrnn_ms'), '9.3f')} "
                    f"{_fmt(r.get('torch.nn_ms'), '9.3f')} {speedup:>8}")
            if gpu:
                line += (f" {_fmt(r.get('torch.nn-tf32off_ms'), '9.3f')}"
                         f" {_fmt(r.get('torch.nn-graph_ms'), '9.3f')}")
            line += f" {_fmt(r['us_per_step'], '8.2f')}"
            if gpu:
                mem = (f"{_fmt(r.get('fastrnn_mem_mb'), '.0f')}/"
                       f"{_fmt(r.get('torch.nn_mem_mb'), '.0f')}")
                line += f" {mem:>11}"
            echo(line + f" {_fmt(r.get('max_abs_diff'), '9.2e')}")
            if r.get("feature"):
                echo(f"    {r['feature']}: torch.nn here is {WORKAROUNDS[r['feature']]}; "
                     f"overhead over the same layer without it: "
                     f"{_fmt(r.get('overhead'), '.3f')}x "
                     f"(fastrnn-plain {_fmt(r.get('fastrnn-plain_ms'), '.3f')} ms)")
            if r["status"] != "ok" and not r["status"].startswith("interpreter"):
                echo(f"    {r['status']}")
    echo("\nColumns:")
    for name, meaning in LEGEND:
        if name in GPU_COLUMNS and not gpu:
            continue
        if name == "speedup" and interpreted:
            meaning = ("'interp.': fastrnn ran in Triton's CPU interpreter, whose times say "
                       "nothing about its speed on a GPU, so none is reported")
        echo(f"  {name:<18} {meaning}")
    if interpreted:
        return
    speedups = [r["speedup"] for r in rows if r["speedup"] and not r.get("feature")]
    g = geomean(speedups)
    failed = sum(1 for r in rows if r["status"].startswith("error"))
    skipped = sum(1 for r in rows if r["status"].startswith("skipped"))
    echo(f"\ngeometric-mean speedup over torch.nn: {_fmt(g, '.2f')}x ({len(speedups)} "
         f"configuration-phases; min {_fmt(min(speedups, default=None), '.2f')}x); "
         f"{failed} failed, {skipped} skipped")


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


def write_data(env: dict, records: list[dict], rows: list[dict], out_dir: str,
               stem: str) -> list[str]:
    """JSON (every record) and CSV (one row per configuration and phase); rewritten after every
    configuration, so a run that is killed keeps what it measured."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, stem + ".json")
    _atomic_write(json_path, lambda f: json.dump({**env, "records": records}, f, indent=1))
    csv_path = os.path.join(out_dir, stem + ".csv")

    def write_csv(f):
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    _atomic_write(csv_path, write_csv)
    return [json_path, csv_path]


def plot(rows: list[dict], env: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if r["speedup"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(8, 0.18 * len(rows) + 2), 5))
    colors = {"fwd": "#4c72b0", "fwd+bwd": "#dd8452"}
    xs = range(len(rows))
    ax.bar(xs, [r["speedup"] for r in rows], color=[colors[r["phase"]] for r in rows])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speedup over torch.nn (x)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['grid']}: {r['config']}" for r in rows], rotation=90, fontsize=6)
    ax.set_title(f"fastrnn vs torch.nn on {env['device']} (torch {env['torch']}, "
                 f"triton {env['triton']}); blue fwd, orange fwd+bwd", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _progress_line(i, n, config, seconds, elapsed, eta):
    return (f"  [{i}/{n}] {config.grid}: {config.label()}: {seconds:.1f} s "
            f"(elapsed {elapsed:.0f} s, ETA {eta:.0f} s)")


def run(grids=None, device: torch.device | None = None, out_dir: str = "fastrnn-bench",
        budget_s: float = 0.25, echo=print, progress=None, max_minutes: float | None = None,
        suite: str | None = None) -> tuple[dict, list[dict], list[str]]:
    """Measure the named grids; print the tables; write JSON, CSV (as the run goes) and a PNG.

    ``max_minutes``: configurations that would start after it are skipped (visible rows).
    ``suite``: the test suite's summary line, stored in the JSON (the GPU run script passes it).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if grids is None:
        grids = list(DEFAULT_GRIDS) if device.type == "cuda" else ["smoke"]
    configs = [c for g in grids for c in GRIDS[g]()]
    env = environment(device)
    if suite:
        env["suite"] = suite
    interpreted = device.type == "cpu" and interpreting()
    echo(f"fastrnn bench on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
         f"cuDNN {env['cudnn']}")
    if device.type == "cuda":
        echo(f"fp32 runs {'with' if env['fp32_tf32'] else 'without'} TF32 on both sides "
             "(cuDNN's RNN switch, torch.backends.cudnn.rnn.fp32_precision / allow_tf32)")
    echo(f"grids: {', '.join(grids)} ({len(configs)} configurations)")
    if interpreted:
        echo("no GPU: fastrnn's kernels run in Triton's CPU interpreter, so this run checks that "
             "the benchmark works; it times nothing of fastrnn's")
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower()
    stem = f"{slug}-{env['date'][:19].replace(':', '')}"
    records, paths = [], []
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, config in enumerate(configs, 1):
            elapsed = time.perf_counter() - start
            per_config = elapsed / (i - 1) if i > 1 else 0.0
            if max_minutes is not None and elapsed + per_config > 60 * max_minutes:
                records += _skipped(config, device, f"skipped: past --max-minutes {max_minutes}")
                continue
            t0 = time.perf_counter()
            records += measure(config, device, budget_s=budget_s)
            now = time.perf_counter()
            paths = write_data(env, records, summarize(records), out_dir, stem)
            eta = (now - start) / i * (len(configs) - i)
            progress(_progress_line(i, len(configs), config, now - t0, now - start, eta))
    rows = summarize(records)
    paths = write_data(env, records, rows, out_dir, stem)
    print_table(rows, echo, interpreted, gpu=device.type == "cuda")
    png = plot(rows, env, os.path.join(out_dir, stem + ".png"))
    if png:
        paths.append(png)
    notes = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    if notes:
        echo("\nNotes (warnings raised during the run, once each):")
        for note in notes:
            echo(f"  {note}")
    echo("\nwrote " + ", ".join(paths))
    return env, records, paths
