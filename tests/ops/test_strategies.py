"""The strategies' claims that can be checked without a GPU: what selection picks for a described
GPU, that a barrier wait gives up instead of hanging, and the host cost of a stepwise step."""

import itertools
import time

import pytest
import torch

from fastrnn import _modes
from fastrnn.explain import explain_problem
from fastrnn.ops import cooperative, dispatch, select, stepwise
from fastrnn.ops.args import BackwardArgs, ForwardArgs
from tests.parity import DEVICE

H100 = select.GPUS["H100"]
CELLS = {"RNN": _modes.RNN_TANH, "LSTM": _modes.LSTM, "GRU": _modes.GRU}


# Where one launch per layer is expected on an H100, per cell and dtype: (hidden sizes with one
# or two directions, hidden sizes with one direction only), H up to 2048 where the weights fit on
# chip. Known gaps, running stepwise (README, "How it works"): fp32 LSTM and GRU at H = 1024 in
# both directions (32 MiB of weights), fp32 with TF32 off (three products: twice the operands)
# beyond H = 512, fp32 RNN beyond H = 1024, LSTM beyond H = 1024 in any dtype, GRU beyond
# H = 1024 in fp32 and bidirectional. GRU fp16/bf16 to H = 2048 (one direction) holds its three
# gates unpadded, in column tiles.
ONE_LAUNCH = {
    ("RNN", "fp16"): ((64, 256, 512, 1024, 2048), ()),
    ("RNN", "bf16"): ((64, 256, 512, 1024, 2048), ()),
    ("RNN", "tf32"): ((64, 256, 512, 1024), ()),
    ("RNN", "tf32x3"): ((64, 256, 512), ()),
    ("LSTM", "fp16"): ((64, 256, 512, 1024), ()),
    ("LSTM", "bf16"): ((64, 256, 512, 1024), ()),
    ("LSTM", "tf32"): ((64, 256, 512), (768, 1024)),
    ("LSTM", "tf32x3"): ((64, 256, 512), ()),
    ("GRU", "fp16"): ((64, 256, 512, 1024), (1536, 2048)),
    ("GRU", "bf16"): ((64, 256, 512, 1024), (1536, 2048)),
    ("GRU", "tf32"): ((64, 256, 512), (768, 1024)),
    ("GRU", "tf32x3"): ((64, 256, 512), ()),
}
# LSTM with proj_size = H / 4 (ops/cooperative_proj.py; H <= 64 persistent): the same, stepwise
# beyond (fp32 with TF32 off from H = 1536; bidirectional from H = 1536).
ONE_LAUNCH_PROJ = {
    "fp16": ((64, 256, 512, 1024), (1536, 2048)),
    "bf16": ((64, 256, 512, 1024), (1536, 2048)),
    "tf32": ((64, 256, 512, 1024), (1536, 2048)),
    "tf32x3": ((64, 256, 512, 1024), ()),
}
DTYPES = {"fp16": (torch.float16, "ieee"), "bf16": (torch.bfloat16, "ieee"),
          "tf32": (torch.float32, "tf32"), "tf32x3": (torch.float32, "tf32x3")}


@pytest.mark.parametrize("cell,dtype", list(ONE_LAUNCH) + [("LSTMP", d) for d in ONE_LAUNCH_PROJ],
                         ids="-".join)
def test_h100_runs_each_layer_in_one_launch(cell, dtype):
    """On the H100 description: one kernel launch per layer for the forward and one for the
    backward (both directions in it), for batches 1 to 256, counted over a 3-layer stack."""
    torch_dtype, precision = DTYPES[dtype]
    both, one = ONE_LAUNCH_PROJ[dtype] if cell == "LSTMP" else ONE_LAUNCH[cell, dtype]
    cases = [*itertools.product(both, (1, 2)), *itertools.product(one, (1,))]
    for (H, D), B in itertools.product(cases, (1, 16, 64, 256)):
        P = H // 4 if cell == "LSTMP" else H
        problem = select.Problem(CELLS.get(cell, _modes.LSTM), B, H, P, D, torch_dtype,
                                 precision)
        rows = explain_problem(problem, H100, T=100, layers=3, compiled=False)
        assert [(r["launches_forward"], r["launches_backward"]) for r in rows] == [(1, 1)] * 3, \
            (H, B, D, rows[0]["strategy"], rows[0]["other_strategies"])
        assert rows[0]["strategy"] in ("persistent", "cooperative")


def test_cooperative_plans_stay_within_the_gpu():
    for gpu, cell, H, B, D in itertools.product(select.GPUS, [*CELLS, "LSTMP"],
                                                (64, 256, 512, 1024), (1, 16, 256), (1, 2)):
        spec = select.GPUS[gpu]
        P = H // 4 if cell == "LSTMP" else H
        problem = select.Problem(CELLS.get(cell, _modes.LSTM), B, H, P, D, torch.float16)
        try:
            plan = dispatch.plan(problem, spec, "cooperative")
        except RuntimeError:
            continue
        nj, nbt, d = plan.grid
        assert nj * nbt * d <= spec.sm_count
        cfg = plan.kernels[0]
        assert cfg.shared_bytes <= spec.smem_per_block
        assert nbt * cfg.block_b >= B and cfg.block_h * nj >= H


def test_a_barrier_wait_gives_up_and_the_error_is_raised():
    """Programs that never arrive (a grid that is not co-resident): each wait stops after its
    time bound (the GPU's timer; polls under the interpreter), flags the error, the program
    waits no more, and fastrnn raises with the remedy instead of hanging."""
    import triton
    import triton.language as tl

    on_gpu = DEVICE == "cuda"

    @triton.jit
    def wait_for_nobody(flags_ptr, err_ptr, out_ptr, wait_ns, GLOBALTIMER: tl.constexpr):
        alive = cooperative._await(flags_ptr, 3, 1, err_ptr, 1, wait_ns, 4, 8, GLOBALTIMER)
        tl.store(out_ptr, alive)
        # A second wait after a timeout returns at once, still flagged.
        alive = cooperative._await(flags_ptr, 3, 2, err_ptr, alive, wait_ns, 4, 8, GLOBALTIMER)
        tl.store(out_ptr + 1, alive)

    flags = torch.zeros(3 * 8, dtype=torch.int32, device=DEVICE)
    err = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = torch.full((2,), -1, dtype=torch.int32, device=DEVICE)
    bound = 20_000_000 if on_gpu else 50 * cooperative.POLL_NS  # 20 ms; 50 polls
    start = time.perf_counter()
    wait_for_nobody[(1,)](flags, err, out, bound, on_gpu)
    if on_gpu:
        torch.cuda.synchronize()
        assert time.perf_counter() - start < 5  # seconds, not the old per-launch poll budget
    assert err.item() == 1 and out.tolist() == [0, 0]
    with pytest.raises(RuntimeError, match="gave up waiting at a grid barrier.*stepwise"):
        cooperative._watch(err, "forward")  # raises here on the CPU
        torch.cuda.synchronize() if on_gpu else None
        cooperative.check_errors()          # on a GPU, once the launch has finished
    flags[::8] = 2  # everyone arrived: no error
    err.zero_()
    wait_for_nobody[(1,)](flags, err, out, bound, on_gpu)
    assert err.item() == 0 and out.tolist() == [1, 1]
    cooperative._watch(err, "forward")
    if on_gpu:
        torch.cuda.synchronize()
    cooperative.check_errors()


def test_wait_bound_comes_from_fastrnn_wait_s(monkeypatch):
    monkeypatch.delenv("FASTRNN_WAIT_S", raising=False)
    assert cooperative.wait_ns() == 1_000_000_000
    monkeypatch.setenv("FASTRNN_WAIT_S", "0.25")
    assert cooperative.wait_ns() == 250_000_000
    monkeypatch.setenv("FASTRNN_WAIT_S", "-1")
    with pytest.raises(ValueError, match="FASTRNN_WAIT_S"):
        cooperative.wait_ns()


class _CompiledKernel:
    """Stands in for Triton's compiled kernel: its launcher does nothing."""

    function = None
    packed_metadata = None

    def __init__(self):
        self.launches = 0

    def run(self, *args):
        self.launches += 1


CompiledKernel = type("CompiledKernel", (_CompiledKernel,), {})


@pytest.mark.parametrize("mode", [_modes.LSTM, _modes.GRU])
def test_stepwise_host_time_per_step_is_under_5_us(mode, monkeypatch):
    """The host's part of a stepwise step with the launches themselves stubbed: after the first
    step each launch goes straight to the compiled kernel's launcher with only the step changed
    (measured on this CPU; Triton's JIT path took 25-65 us per step on the H100's host)."""
    monkeypatch.setattr(stepwise, "_current_stream", lambda: 0)
    compiled = []

    def stub(kernel, grid, kwargs):
        compiled.append(CompiledKernel())
        return compiled[-1]

    T, B, H, D = 4000, 8, 32, 2
    G = _modes.NUM_GATES[mode]
    problem = select.Problem(mode, B, H, H, D, torch.float32)
    the_plan = dispatch.plan(problem, select.GPUS["H100"], "stepwise")
    z = torch.zeros
    fwd = ForwardArgs(mode=mode, T=T, B=B, H=H, P=H, D=D, precision="tf32",
                      xg=z(T, B, D * G * H), h0=z(D, B, H),
                      c0=z(D, B, H) if mode == _modes.LSTM else None, w_hh=z(D, G * H, H),
                      b_hn=None, w_hr=None, lengths=None, y=z(T, B, D * H), hn=z(D, B, H),
                      cn=z(D, B, H) if mode == _modes.LSTM else None,
                      gates=z(T, B, D, 4 * H), cell=z(T, B, D, H) if mode == _modes.LSTM else None,
                      save=True)
    bwd = BackwardArgs(mode=mode, T=T, B=B, H=H, P=H, D=D, precision="tf32",
                       dy=z(T, B, D * H), dhn=z(D, B, H),
                       dcn=z(D, B, H) if mode == _modes.LSTM else None, y=fwd.y, h0=fwd.h0,
                       c0=fwd.c0, gates=fwd.gates, cell=fwd.cell, w_hh=fwd.w_hh, w_hr=None,
                       lengths=None, dgx=z(T, B, D * G * H),
                       dgh=z(T, B, D * G * H) if mode == _modes.GRU else None, dhp=None,
                       dh0=z(D, B, H), dc0=z(D, B, H) if mode == _modes.LSTM else None)
    with select.launching_with(stub):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            stepwise.forward(fwd, the_plan)
            stepwise.backward(bwd, the_plan)
            times.append(time.perf_counter() - start)
    assert sum(k.launches for k in compiled) > 3 * 2 * T  # every step launched, fast path
    per_step = min(times) / T * 1e6
    assert per_step <= 5.0, f"{per_step:.2f} us of host time per step (forward + backward)"


def test_fast_activations_for_bf16_only(monkeypatch):
    """bf16 layers use the hardware tanh approximation on a GPU (read from the PTX compiled for
    sm_90, in a process without the interpreter); fp16 and fp32 layers, the interpreter and
    FASTRNN_FAST_ACTIVATIONS=0 do not."""
    import ast
    import os
    import subprocess
    import sys

    import triton

    assert not select.fast_activations(torch.bfloat16) or not select.interpreting()
    monkeypatch.setattr(select, "interpreting", lambda: False)
    assert select.fast_activations(torch.bfloat16)
    assert not select.fast_activations(torch.float16)
    assert not select.fast_activations(torch.float32)
    monkeypatch.setattr(select, "_FAST_ACTIVATIONS", False)
    assert not select.fast_activations(torch.bfloat16)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(tools, "ptxas")):
        pytest.skip("this triton build ships no ptxas")
    script = """
import torch
from fastrnn import _modes
from fastrnn.ops import resources, select
spec = select.GPUS["H100"]
compiler = resources.Compiler(spec)
for dtype in (torch.bfloat16, torch.float16):
    problem = select.Problem(_modes.LSTM, 4, 32, 32, 1, dtype)
    rows = resources.compile_problem(problem, spec, compiler, "persistent")
    print(dtype, [r["tanh_approx"] for r in rows])
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTRNN_FAST_ACTIVATIONS")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert all(n > 0 for n in ast.literal_eval(counts["torch.bfloat16"])), counts
    assert all(n == 0 for n in ast.literal_eval(counts["torch.float16"])), counts


def test_stepwise_kernels_never_specialise_on_the_step():
    """What Triton's JIT would compile for sm_90 from a stepwise launch (its binder, run on the
    launch's own arguments): the step is a plain runtime int whether the first launch is at
    step 0 (a multiple of 16), 1 (Triton makes 1 a constant) or 17, so the one kernel the fast
    launcher reuses computes every step; and the launcher's bind-time check refuses a kernel
    compiled otherwise."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    launched = []
    problem = select.Problem(_modes.LSTM, 3, 32, 16, 2, torch.float16)
    with select.targeting(H100), select.launching_with(
            lambda kernel, grid, kwargs: launched.append((kernel, kwargs))):
        the_plan = dispatch.plan(problem, H100, "stepwise")
        fwd, bwd = _stepwise_args(problem, T=3)
        stepwise.forward(fwd, the_plan)
        stepwise.backward(bwd, the_plan)
    kernels = {select.kernel_name(k): (k, kw) for k, kw in launched}
    assert set(kernels) == set(stepwise.KERNELS["fwd"] + stepwise.KERNELS["bwd"])
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for name, (kernel, kwargs) in kernels.items():
        jit, values = select.resolve_heuristics(kernel, kwargs)
        if not hasattr(jit, "signature"):  # the interpreter's stand-in: the JIT function it wraps
            jit = JITFunction(jit.fn, **jit.kwargs)
        step_arg = "s" if "s" in jit.arg_names else "k"
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        i = jit.arg_names.index(step_arg)
        seen = {binder(**{**values, step_arg: step})[1][i] for step in (0, 1, 16, 17)}
        assert len(seen) == 1, (name, seen)
        (kind, attr), = seen
        assert kind not in ("constexpr",) and not attr, (name, kind, attr)

    def src(kind, constants=None, attrs=None, names=("a", "s")):
        return type("Src", (), dict(signature={"a": "*fp32", "s": kind} if names == ("a", "s")
                                    else {n: "i32" for n in names},
                                    constants=constants or {}, attrs=attrs or {}))()

    stepwise.check_step_signature(src("i32"), ["a", "s"], "s", "k")
    with pytest.raises(RuntimeError, match="'s' is compiled in as a constant"):
        stepwise.check_step_signature(src("constexpr", {(1,): 1}), ["a", "s"], "s", "k")
    with pytest.raises(RuntimeError, match="'s' is specialised"):
        stepwise.check_step_signature(src("i32", attrs={(1,): [["tt.divisibility", 16]]}),
                                      ["a", "s"], "s", "k")
    with pytest.raises(RuntimeError, match="parameters are"):
        stepwise.check_step_signature(src("i32", names=("s", "a")), ["a", "s"], "s", "k")


def _stepwise_args(problem, T):
    """Zeroed ForwardArgs and BackwardArgs for ``problem`` on the CPU (launches stubbed)."""
    mode, B, H, P, D = problem.mode, problem.B, problem.H, problem.P, problem.D
    G = _modes.NUM_GATES[mode]
    lstm = mode == _modes.LSTM
    z = lambda *s: torch.zeros(*s, dtype=problem.dtype)  # noqa: E731
    fwd = ForwardArgs(mode=mode, T=T, B=B, H=H, P=P, D=D, precision="ieee",
                      xg=z(T, B, D * G * H), h0=z(D, B, P), c0=z(D, B, H) if lstm else None,
                      w_hh=z(D, G * H, P), b_hn=None,
                      w_hr=z(D, P, H) if problem.has_proj else None,
                      lengths=torch.full((B,), T, dtype=torch.int64), y=z(T, B, D * P),
                      hn=z(D, B, P), cn=z(D, B, H) if lstm else None, gates=z(T, B, D, 4 * H),
                      cell=torch.zeros(T, B, D, H) if lstm else None, save=True)
    bwd = BackwardArgs(mode=mode, T=T, B=B, H=H, P=P, D=D, precision="ieee",
                       dy=z(T, B, D * P), dhn=z(D, B, P), dcn=z(D, B, H) if lstm else None,
                       y=fwd.y, h0=fwd.h0, c0=fwd.c0, gates=fwd.gates, cell=fwd.cell,
                       w_hh=fwd.w_hh, w_hr=fwd.w_hr, lengths=fwd.lengths,
                       dgx=z(T, B, D * G * H), dgh=None,
                       dhp=z(T, B, D * P) if problem.has_proj else None,
                       dh0=z(D, B, P), dc0=z(D, B, H) if lstm else None)
    return fwd, bwd


def test_compiling_for_a_gpu_compiles_the_cooperative_kernels_as_launched():
    """Under select.targeting (the resource check, explain --gpu) the cooperative kernels get
    what a GPU launch gives them, whatever the tensors' device: the barrier compiled in
    (SYNC=True), one launch for the sequence, and the cooperative launch option where this
    Triton has it."""
    launched = []
    with select.targeting(H100), select.launching_with(
            lambda kernel, grid, kwargs: launched.append((select.kernel_name(kernel), kwargs))):
        for P in (256, 64):  # GRU; LSTM with proj_size (its own module, two barriers a step)
            mode = _modes.GRU if P == 256 else _modes.LSTM
            problem = select.Problem(mode, 4, 256, P, 1, torch.float16)
            the_plan = dispatch.plan(problem, H100, "cooperative")
            assert the_plan.grid[0] > 1  # several programs per group: a barrier to compile
            fwd, bwd = _stepwise_args(problem, T=3)
            dispatch.launch("cooperative", "fwd", fwd, the_plan)
            dispatch.launch("cooperative", "bwd", bwd, the_plan)
    assert [name for name, _ in launched] == ["_recurrence_fwd_coop_kernel",
                                              "_recurrence_bwd_coop_kernel",
                                              "_lstmp_fwd_coop_kernel", "_lstmp_bwd_coop_kernel"]
    for _, kwargs in launched:
        assert kwargs["SYNC"] is True
        assert kwargs.get("launch_cooperative_grid", False) == \
            cooperative._cooperative_launch_supported()
        assert kwargs["wait_ns"] == cooperative.wait_ns()


def test_ops_imports_flow_one_way():
    """select (descriptions, plans, the launch point) imports no strategy; strategies import no
    dispatch, no recurrence and no other strategy; dispatch sits above them (no circle)."""
    import ast
    import os

    import fastrnn.ops

    here = os.path.dirname(fastrnn.ops.__file__)

    def imports(module):
        tree = ast.parse(open(os.path.join(here, module + ".py")).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
        return found

    strategies = set(dispatch.STRATEGIES)
    modules = {name: {m.__name__.rsplit(".", 1)[1] for m in ms}
               for name, ms in dispatch.STRATEGIES.items()}
    assert not imports("select") & (strategies | {"dispatch", "recurrence", "resources"})
    for name, own in modules.items():
        others = set().union(*(m for n, m in modules.items() if n != name))
        for module in own:  # a strategy's modules may share code; no other strategy's
            assert not imports(module) & (others | {"dispatch", "recurrence"}), module
    assert strategies <= imports("dispatch")
    assert "dispatch" not in imports("select")
