"""Benchmark report: fastrnn against torch.nn (cuDNN), side by side, on the device present.

``python -m fastrnn bench [--grid NAME ...]`` runs named configuration grids and, per configuration
and phase, times every provider, measures peak memory and the largest difference between the
fastrnn and torch.nn outputs, prints a table, and writes JSON (schema in the README), CSV and a PNG
plot of the speedup over torch.nn.

Providers:

* ``fastrnn``: fastrnn's layer as users run it.
* ``torch.nn``: torch.nn's layer as users run it (cuDNN; for fp32 cuDNN follows
  ``torch.backends.cudnn.allow_tf32``, True by default).
* ``torch.nn-tf32off``: torch.nn with cuDNN's TF32 switched off (fp32 only): the like-for-like
  comparison when fastrnn's fp32 GEMMs run in IEEE fp32 (torch's default matmul setting).
* ``torch.nn-graph``: torch.nn captured in a CUDA graph and replayed (padded input only), so no
  launch overhead is counted against it.

Phases: ``fwd`` is inference (forward under ``torch.no_grad``); ``fwd+bwd`` is a training step
(forward, then backward with fixed upstream gradients into the input, the states and every
weight). Times are medians over repetitions after warm-up, with CUDA events; peak memory is the
growth of ``torch.cuda.max_memory_allocated`` over one run.
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
from typing import Callable

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from . import modules
from .backend import interpreting

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
        return " ".join(parts)


CELLS = ("LSTM", "GRU", "RNN_TANH")


def _grid_fastrnns():
    # PyTorch's benchmarks/fastrnns default: LSTM, T=100, 1 layer, I=H=512, B=64, fp32.
    return [Config("fastrnns", m, 100, 64, 512, 512) for m in CELLS]


def _grid_cudnn_sample():
    # cuDNN's RNN sample: T=100, 4 layers, H=512, B=64.
    return [Config("cudnn-sample", m, 100, 64, 512, 512, layers=4) for m in CELLS]


def _grid_haste():
    # Haste's benchmark grid: T=50, B in 1..128, H in 128..4096 (LSTM and GRU).
    return [Config("haste", m, 50, b, h, h) for m in ("LSTM", "GRU")
            for h in (128, 256, 512, 1024, 2048, 4096) for b in (1, 16, 32, 64, 128)]


def _grid_flashrnn():
    # FlashRNN's H100 point: fp16, I=H=768, B=16, T=1024.
    return [Config("flashrnn", m, 1024, 16, 768, 768, dtype="float16") for m in CELLS]


def _grid_small_batch():
    # Small-batch inference: B=1..8, H 256..1024, T=1000.
    return [Config("small-batch", m, 1000, b, h, h, phases=("fwd",)) for m in CELLS
            for h in (256, 512, 1024) for b in (1, 2, 4, 8)]


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
    return out


def _grid_smoke():
    # Tiny shapes that run in seconds under the Triton interpreter (CI without a GPU).
    return [Config("smoke", "LSTM", 4, 2, 3, 5, layers=2, bidirectional=True),
            Config("smoke", "GRU", 4, 3, 3, 5, packed=True),
            Config("smoke", "RNN_TANH", 3, 2, 3, 4),
            Config("smoke", "LSTM", 3, 2, 3, 5, proj=3, phases=("fwd",))]


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
    torch.manual_seed(seed)
    cls = getattr(library, CELL_CLASSES[config.mode])
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
    with torch.no_grad():
        outs = case.outputs(False)
    case.grads = [torch.randn(o.shape, generator=g).to(device, o.dtype) for o in outs]
    return case


# ---------------------------------------------------------------------------------------------
# Timing.

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _tf32_state(provider: str, config: Config) -> bool:
    """Whether fp32 matrix products may use TF32 for this provider."""
    if config.dtype != "float32":
        return False
    if provider.startswith("fastrnn"):
        return bool(torch.backends.cuda.matmul.allow_tf32)
    if provider == "torch.nn-tf32off":
        return False
    return bool(torch.backends.cudnn.allow_tf32)


def providers_for(config: Config, device: torch.device) -> list[str]:
    out = ["fastrnn", "torch.nn"]
    if device.type == "cuda":
        if config.dtype == "float32":
            out.append("torch.nn-tf32off")
        if not config.packed:
            out.append("torch.nn-graph")
    return out


def measure(config: Config, device: torch.device, budget_s: float = 0.25) -> list[dict]:
    """Every provider and phase of one configuration: records in the results schema."""
    records = []
    reference_out = None
    fast_out = None
    for provider in providers_for(config, device):
        case = build_case(config, provider, device)
        if provider == "fastrnn":
            fast_out = [o.float() for o in case.forward()]
        elif provider == "torch.nn":
            reference_out = [o.float() for o in case.forward()]
        for phase in config.phases:
            fn = case.forward if phase == "fwd" else case.step
            ctx = _TF32Off() if provider == "torch.nn-tf32off" else _Null()
            note = ""
            with ctx:
                try:
                    if provider == "torch.nn-graph":
                        fn = _graphed(fn, device)
                    ms = time_ms(fn, device, budget_s=budget_s)
                    mem = peak_memory_mb(fn, device)
                except RuntimeError as e:
                    if provider != "torch.nn-graph":
                        raise
                    # cuDNN refuses capture for some cases: reported as such, never hidden.
                    ms, mem, note = None, None, f"not capturable: {str(e).splitlines()[0][:80]}"
            records.append(_record(config, provider, phase, ms, mem, note))
    diff = max((a - b).abs().max().item() for a, b in zip(fast_out, reference_out))
    for r in records:
        r["max_abs_diff"] = diff
    return records


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _record(config, provider, phase, ms, mem, note=""):
    return {
        "grid": config.grid, "config": config.label(), "mode": config.mode,
        "dtype": config.dtype,
        "tf32": _tf32_state(provider, config), "T": config.T, "B": config.B, "I": config.I,
        "H": config.H, "layers": config.layers, "bidirectional": config.bidirectional,
        "packed": config.packed, "proj_size": config.proj, "phase": phase, "provider": provider,
        "median_ms": ms, "us_per_step": None if ms is None else ms * 1e3 / config.T,
        "peak_mem_mb": mem, "note": note,
    }


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
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "cudnn": cudnn, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def summarize(records: list[dict]) -> list[dict]:
    """One row per (configuration, phase): fastrnn against each torch.nn provider."""
    rows = {}
    for r in records:
        key = tuple(r[k] for k in ("grid", "mode", "dtype", "T", "B", "I", "H", "layers",
                                   "bidirectional", "packed", "proj_size", "phase"))
        row = rows.setdefault(key, {k: r[k] for k in r if k not in (
            "provider", "median_ms", "us_per_step", "peak_mem_mb", "tf32", "note")})
        row[f"{r['provider']}_ms"] = r["median_ms"]
        row[f"{r['provider']}_mem_mb"] = r["peak_mem_mb"]
    out = []
    for row in rows.values():
        fast, ref = row.get("fastrnn_ms"), row.get("torch.nn_ms")
        row["speedup"] = ref / fast if fast and ref else None
        best = [v for k, v in row.items() if k.startswith("torch.nn") and k.endswith("_ms") and v]
        row["speedup_vs_best_torch"] = min(best) / fast if fast and best else None
        row["us_per_step"] = fast * 1e3 / row["T"] if fast else None
        out.append(row)
    return out


def geomean(values):
    values = [v for v in values if v]
    return float(torch.tensor(values, dtype=torch.float64).log().mean().exp()) if values else None


def _fmt(v, spec):
    return format(v, spec) if v is not None else "-"


def print_table(rows: list[dict], echo=print) -> None:
    grids = []
    for r in rows:
        if r["grid"] not in grids:
            grids.append(r["grid"])
    for grid in grids:
        echo(f"\n== {grid}")
        echo(f"{'configuration':<44} {'phase':<8} {'fastrnn':>9} {'torch.nn':>9} {'speedup':>8} "
             f"{'tf32off':>9} {'graph':>9} {'us/step':>8} {'mem MB f/t':>13} {'max|diff|':>9}")
        for r in rows:
            if r["grid"] != grid:
                continue
            mem = f"{_fmt(r.get('fastrnn_mem_mb'), '.0f')}/{_fmt(r.get('torch.nn_mem_mb'), '.0f')}"
            echo(f"{r['config']:<44} {r['phase']:<8} {_fmt(r.get('fastrnn_ms'), '9.3f')} "
                 f"{_fmt(r.get('torch.nn_ms'), '9.3f')} {_fmt(r['speedup'], '7.2f')}x "
                 f"{_fmt(r.get('torch.nn-tf32off_ms'), '9.3f')} "
                 f"{_fmt(r.get('torch.nn-graph_ms'), '9.3f')} {_fmt(r['us_per_step'], '8.2f')} "
                 f"{mem:>13} {r['max_abs_diff']:9.2e}")
    g = geomean([r["speedup"] for r in rows])
    echo(f"\ngeometric-mean speedup over torch.nn: {_fmt(g, '.2f')}x "
         f"({sum(1 for r in rows if r['speedup'])} configuration-phases); "
         f"min {_fmt(min((r['speedup'] for r in rows if r['speedup']), default=None), '.2f')}x")


def write_outputs(env: dict, records: list[dict], rows: list[dict], out_dir: str,
                  stem: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    json_path = os.path.join(out_dir, stem + ".json")
    with open(json_path, "w") as f:
        json.dump({**env, "records": records}, f, indent=1)
    paths.append(json_path)
    csv_path = os.path.join(out_dir, stem + ".csv")
    with open(csv_path, "w", newline="") as f:
        fields = list(rows[0].keys()) if rows else []
        for r in rows:
            fields += [k for k in r if k not in fields]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    paths.append(csv_path)
    png = plot(rows, env, os.path.join(out_dir, stem + ".png"))
    if png:
        paths.append(png)
    return paths


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


def run(grids=None, device: torch.device | None = None, out_dir: str = "fastrnn-bench",
        budget_s: float = 0.25, echo=print, progress=None) -> tuple[dict, list[dict], list[str]]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if grids is None:
        grids = list(DEFAULT_GRIDS) if device.type == "cuda" else ["smoke"]
    configs = [c for g in grids for c in GRIDS[g]()]
    env = environment(device)
    echo(f"fastrnn bench on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
         f"cuDNN {env['cudnn']}; fp32 TF32: torch.nn (cuDNN) {'on' if env['cudnn_allow_tf32'] else 'off'}, "
         f"fastrnn (matmul setting) {'on' if env['matmul_allow_tf32'] else 'off'}")
    echo(f"grids: {', '.join(grids)} ({len(configs)} configurations)")
    if device.type != "cuda":
        echo("no GPU: the kernels run in Triton's CPU interpreter, so these timings are a smoke "
             "check of the benchmark, not a performance measurement")
    progress = progress or (lambda i, n, c, s: print(
        f"  [{i}/{n}] {c.grid}: {c.label()} ({s:.1f}s)", file=sys.stderr, flush=True))
    records = []
    start = time.perf_counter()
    for i, config in enumerate(configs, 1):
        records += measure(config, device, budget_s=budget_s)
        progress(i, len(configs), config, time.perf_counter() - start)
    rows = summarize(records)
    print_table(rows, echo)
    slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower()
    stem = f"{slug}-{env['date'][:10]}"
    paths = write_outputs(env, records, rows, out_dir, stem)
    echo("\nwrote " + ", ".join(paths))
    return env, records, paths
