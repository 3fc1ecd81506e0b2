"""fastrnn inside real PyTorch code: convert(), torch.compile, eval-mode and double backward,
torch.func, parametrizations, copies, serialisation, DDP, ONNX export and CUDA graphs."""

import copy
import io
import os
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from tests.parity import (DEVICE, assert_close_to_truth, assert_forward_matches_torch,
                          assert_matches_torch, exact_twin, full_fp32, launches, make_inputs,
                          make_pair, run, through_kernels)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class RNNModel(nn.Module):
    """pytorch/examples word_language_model: embedding -> multi-layer RNN -> decoder."""

    def __init__(self, rnn_type, ntoken=20, ninp=8, nhid=10, nlayers=2, dropout=0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type == "LSTM_PROJ":
            self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout, proj_size=nhid // 2)
            nout = nhid // 2
        else:
            self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
            nout = nhid
        self.cells = nn.ModuleList([nn.GRUCell(nout, nout)])
        self.decoder = nn.Linear(nout, ntoken)

    def forward(self, tokens):
        emb = self.drop(self.encoder(tokens))
        output, _ = self.rnn(emb)
        output = self.cells[0](output.reshape(-1, output.shape[-1])).reshape(output.shape)
        return self.decoder(self.drop(output))


def _train(model, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    torch.manual_seed(seed)
    for _ in range(steps):
        data = torch.randint(0, 20, (6, 3), generator=g).to(DEVICE)
        target = torch.randint(0, 20, (6, 3), generator=g).to(DEVICE)
        opt.zero_grad()
        loss = F.cross_entropy(model(data).reshape(-1, 20), target.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("rnn_type", ["LSTM", "LSTM_PROJ", "GRU", "RNN_TANH"])
def test_convert_trains_like_torch(rnn_type):
    torch.manual_seed(0)
    ref = RNNModel(rnn_type if rnn_type != "RNN_TANH" else "RNN").to(DEVICE)
    model = copy.deepcopy(ref)
    params_before = [id(p) for p in model.parameters()]
    opt_params = list(model.parameters())
    converted = fastrnn.convert(model)
    assert converted is model
    assert type(model.rnn) in (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN)
    assert type(model.cells[0]) is fastrnn.GRUCell
    assert [id(p) for p in model.parameters()] == params_before
    assert all(a is b for a, b in zip(opt_params, model.parameters()))
    assert model.rnn.proj_size == ref.rnn.proj_size and model.rnn.dropout == ref.rnn.dropout
    with full_fp32():  # trajectories diverge at TF32's precision (cuDNN's default for fp32)
        with through_kernels(backward=True):
            got = _train(model)
        want = _train(ref)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_convert_keeps_hooks_mode_dtype_and_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(4, 6, proj_size=3, batch_first=True, bidirectional=True))
    model.double().eval()
    calls = []
    handle = model[0].register_forward_hook(lambda m, i, o: calls.append(type(m)))
    x = torch.randn(2, 5, 4, dtype=torch.float64, device=DEVICE)
    model.to(DEVICE)
    want = model(x)[0]
    fastrnn.convert(model)
    lstm = model[0]
    assert type(lstm) is fastrnn.LSTM and not lstm.training
    assert lstm.weight_hh_l0.dtype == torch.float64 and lstm.batch_first and lstm.proj_size == 3
    with through_kernels(backward=False):
        got = model(x)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert calls == [nn.LSTM, fastrnn.LSTM]
    handle.remove()
    model(x)
    assert len(calls) == 2
    fastrnn.to_torch(model)
    assert type(model[0]) is nn.LSTM
    torch.testing.assert_close(model(x)[0], want, atol=1e-12, rtol=1e-12)


def test_convert_root_module_user_subclasses_and_parametrized():
    gru = nn.GRU(3, 4)
    twin = fastrnn.convert(gru)
    assert type(twin) is fastrnn.GRU and twin.weight_ih_l0 is gru.weight_ih_l0

    class MyLSTM(nn.LSTM):  # a user's subclass keeps its own behaviour
        pass

    mine = nn.Sequential(MyLSTM(3, 4))
    fastrnn.convert(mine)
    assert type(mine[0]) is MyLSTM

    torch.manual_seed(0)
    wn = nn.utils.parametrizations.weight_norm(nn.LSTM(3, 4).to(DEVICE), "weight_hh_l0")
    x = torch.randn(5, 2, 3, device=DEVICE)
    want = wn(x)[0]
    holder = nn.Sequential(wn)
    fastrnn.convert(holder)
    assert isinstance(holder[0], fastrnn.LSTM)
    assert nn.utils.parametrize.is_parametrized(holder[0], "weight_hh_l0")
    torch.testing.assert_close(holder[0](x)[0], want, atol=1e-5, rtol=1e-5)


# --- torch.compile ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True, proj_size=3)),
    ("GRU", dict(num_layers=2)),
    ("RNN", dict(nonlinearity="relu", bidirectional=True)),
], ids=["lstm", "gru", "rnn"])
def test_compile_fullgraph_no_graph_break(name, kwargs):
    fast, ref = make_pair(name, 5, 7, **kwargs)
    build, leaves = make_inputs(ref, "padded", 4, 3, with_hx=True)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    try:
        got = run(compiled, build, leaves)
    finally:
        torch._dynamo.reset()
    assert_close_to_truth(got, run(ref, build, leaves), run(exact_twin(ref), build, leaves))


def test_compile_fullgraph_with_cells_and_a_model():
    torch.manual_seed(0)
    model = fastrnn.convert(RNNModel("LSTM", dropout=0.0)).to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    tokens = torch.randint(0, 20, (6, 3), device=DEVICE)
    try:
        got = compiled(tokens)
        got.sum().backward()
    finally:
        torch._dynamo.reset()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(tokens)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-6)


def test_torch_nn_graph_breaks_where_fastrnn_does_not():
    lstm = nn.LSTM(3, 4).to(DEVICE)
    try:
        with pytest.raises(Exception, match="RNN, GRU, or LSTM"):
            torch.compile(lstm, fullgraph=True, backend="aot_eager")(torch.randn(2, 1, 3, device=DEVICE))
    finally:
        torch._dynamo.reset()


def test_compile_default_backend_launches_the_kernels():
    """Inductor (the default backend; its C++ codegen on CPU, Triton on a GPU) keeps the custom ops
    opaque: the compiled forward and backward still launch fastrnn's kernels and match torch.nn."""
    fast, ref = make_pair("LSTM", 5, 7, num_layers=2, bidirectional=True, proj_size=3)
    build, leaves = make_inputs(ref, "padded", 4, 3, with_hx=True)
    compiled = torch.compile(fast, fullgraph=True)
    before = launches("fwd"), launches("bwd")
    try:
        got = run(compiled, build, leaves)
    finally:
        torch._dynamo.reset()
    assert launches("fwd") > before[0] and launches("bwd") > before[1]
    assert_close_to_truth(got, run(ref, build, leaves), run(exact_twin(ref), build, leaves))


# --- gradients torch.nn's cuDNN path refuses ---------------------------------------------------

@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_backward_in_eval_mode(name):
    # torch.nn's reference runs on the CPU: cuDNN refuses backward in eval mode.
    fast, ref = make_pair(name, 5, 7, num_layers=2, dropout=0.5, bidirectional=True,
                          ref_device="cpu")
    fast.eval()
    ref.eval()
    build, leaves = make_inputs(ref, "packed_unsorted", 4, 3, with_hx=True)
    assert_matches_torch(fast, ref, build, leaves)


def _gradient_penalty(module, x, lengths, hx):
    x = x.clone().to(next(module.parameters()).device).requires_grad_()
    out, _ = module(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
    (gx,) = torch.autograd.grad(out.data.pow(2).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("name,kwargs", [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("GRU", dict(bidirectional=True)),
    ("RNN", dict(num_layers=2)),
], ids=["lstm", "gru", "rnn"])
def test_double_backward_matches_torch(name, kwargs):
    # torch.nn's reference runs on the CPU: cuDNN has no double backward.
    fast, ref = make_pair(name, 3, 4, ref_device="cpu", **kwargs)
    x = torch.randn(5, 2, 3)
    lengths = torch.tensor([3, 5])
    got = _gradient_penalty(fast, x, lengths, None)
    want = _gradient_penalty(ref, x, lengths, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-4)


def test_double_backward_through_a_cell():
    fast, ref = make_pair("LSTMCell", 3, 4, ref_device="cpu")
    res = []
    for m in (fast, ref):
        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
        x = x.to(next(m.parameters()).device).requires_grad_()
        h, c = m(x)
        (gx,) = torch.autograd.grad((h * c).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        res.append([x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-4)


# --- torch.func, parametrizations, copies, serialisation, dtypes ------------------------------

def test_functional_call():
    fast, ref = make_pair("GRU", 5, 7, bidirectional=True)
    x = torch.randn(4, 3, 5)

    def call(module):
        device = next(module.parameters()).device
        dtype = next(module.parameters()).dtype
        params = {k: (v.detach() * 1.5).requires_grad_() for k, v in module.named_parameters()}
        out = torch.func.functional_call(module, params, (x.to(device, dtype),))[0]
        out.sum().backward()
        return {"output": out.detach(), **{k: v.grad for k, v in params.items()}}

    before = [p.detach().clone() for p in fast.parameters()]
    assert_close_to_truth(call(fast), call(ref), call(exact_twin(ref)))
    assert all(torch.equal(a, b) for a, b in zip(before, fast.parameters()))  # untouched


def test_weight_norm_on_weight_hh():
    fast, ref = make_pair("LSTM", 5, 7, num_layers=2)
    for m in (fast, ref):
        nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    build, leaves = make_inputs(ref, "padded", 4, 3, with_hx=True)
    got = assert_matches_torch(fast, ref, build, leaves)
    assert any("original0" in k for k in got)


def test_deepcopy_and_whole_module_save_load():
    fast, _ = make_pair("LSTM", 5, 7, num_layers=2, proj_size=3)
    x = torch.randn(4, 3, 5, device=DEVICE)
    want = fast(x)[0]
    twin = copy.deepcopy(fast)
    assert type(twin) is fastrnn.LSTM
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(twin.parameters(), fast.parameters()))
    torch.testing.assert_close(twin(x)[0], want, atol=0, rtol=0)
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is fastrnn.LSTM
    torch.testing.assert_close(loaded(x)[0], want, atol=0, rtol=0)


@pytest.mark.parametrize("move", ["double", "to_float64", "half", "float_after_double"])
def test_dtype_moves(move):
    fast, ref = make_pair("GRU", 5, 7, bidirectional=True)
    for m in (fast, ref):
        if move == "double":
            m.double()
        elif move == "to_float64":
            m.to(torch.float64)
        elif move == "half":
            m.half()
        else:
            m.double().float()
    dtype = fast.weight_ih_l0.dtype
    x = torch.randn(4, 3, 5, device=DEVICE).to(dtype)
    assert fast(x)[0].dtype == dtype
    assert_forward_matches_torch(fast, ref, x)


# --- DistributedDataParallel -----------------------------------------------------------------

def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(fastrnn.LSTM(3, 4, num_layers=2))
    x = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1))
    shard = x[:, rank * 2:(rank + 1) * 2]
    model(shard)[0].pow(2).mean().backward()
    torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, f"grads{rank}.pt"))
    dist.destroy_process_group()
    # Leave without Python's teardown: freeing DDP's reducer can deadlock in torch's gloo
    # process group destructor (its worker thread waits for the GIL the joining thread holds;
    # seen here once in the 2-core suite). The results are on disk already.
    os._exit(0)


def test_ddp_two_process_gloo():
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.spawn(_ddp_worker, args=(2, os.path.join(d, "init"), d), nprocs=2)
        grads = [torch.load(os.path.join(d, f"grads{r}.pt")) for r in range(2)]
    torch.manual_seed(0)
    single = fastrnn.LSTM(3, 4, num_layers=2)
    x = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1))
    # Mean over each shard, averaged across the two ranks: the mean over the whole batch.
    single(x)[0].pow(2).mean().backward()
    for rank_grads in grads:
        for g, p in zip(rank_grads, single.parameters()):
            torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


# --- ONNX ------------------------------------------------------------------------------------

def _onnx_ops(layer, x, dynamo):
    import onnx

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.rnn = layer

        def forward(self, x):
            return self.rnn(self.proj(x))[0]

    torch.manual_seed(0)
    model = Wrap()
    if dynamo:
        proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    else:
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False)
        proto = onnx.load_from_string(buf.getvalue())
    return [(n.domain, n.op_type) for n in proto.graph.node]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                            "ignore::FutureWarning")
def _require(module: str):
    """Import ``module``: the test extras install it, so its absence fails the test unless
    FASTRNN_ALLOW_MISSING names it (as bench/gpu_run.sh does on an image without it)."""
    allowed = os.environ.get("FASTRNN_ALLOW_MISSING", "").replace(",", " ").split()
    try:
        __import__(module)
    except ImportError:
        if module in allowed:
            pytest.skip(f"{module} is not installed (allowed by FASTRNN_ALLOW_MISSING)")
        pytest.fail(f"{module} is not installed: pip install -e '.[test]' (or set "
                    f"FASTRNN_ALLOW_MISSING={module} to skip)")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_onnx_export_goes_through_torch_nn(name, dynamo):
    """The ONNX graph of a fastrnn layer is torch.nn's: the standard ONNX RNN/LSTM/GRU operator
    wherever torch.nn's export produces it (both exporters for LSTM and GRU; the dynamo exporter
    writes torch.nn's RNN as MatMul and Tanh)."""
    _require("onnx")
    if dynamo:
        _require("onnxscript")
    x = torch.randn(5, 3, 4)
    kwargs = dict(num_layers=2, bidirectional=True)
    before = launches()
    got = _onnx_ops(getattr(fastrnn, name)(4, 6, **kwargs), x, dynamo)
    assert launches() == before
    want = _onnx_ops(getattr(nn, name)(4, 6, **kwargs), x, dynamo)
    assert got == want
    assert all(domain in ("", "ai.onnx") for domain, _ in got)
    if name != "RNN" or not dynamo:
        assert name in {op for _, op in got}


# --- CUDA graphs -------------------------------------------------------------------------------

_FASTRNN_DIR = os.path.dirname(fastrnn.__file__)


def _record_host_reads(monkeypatch) -> list:
    """Patch the Tensor methods that make a CUDA host wait for the device (reading values on the
    host, or copying to another device) so calls made from fastrnn's own code are recorded."""
    calls = []

    def wrap(name, original):
        def method(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            caller = sys._getframe(1).f_code.co_filename
            moved = isinstance(result, torch.Tensor) and result.device != self.device
            if caller.startswith(_FASTRNN_DIR) and (name != "to" or moved):
                calls.append(f"Tensor.{name} at {os.path.relpath(caller, _FASTRNN_DIR)}:"
                             f"{sys._getframe(1).f_lineno}")
            return result
        return method

    for name in ("item", "tolist", "numpy", "cpu", "to", "nonzero", "__bool__", "__int__",
                 "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    return calls


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_padded_training_step_reads_nothing_on_the_host(name, monkeypatch):
    """What lets a training step be captured in a CUDA graph, checked on any device: the padded
    forward and backward (the glue, the op and its launchers) never read a tensor's values on the
    host nor copy one across devices. The GPU test below captures and replays for real."""
    kwargs = dict(proj_size=3) if name == "LSTM" else {}
    fast, ref = make_pair(name, 5, 7, num_layers=2, bidirectional=True, batch_first=True, **kwargs)
    build, leaves = make_inputs(ref, "padded", 4, 3, with_hx=True)
    want = run(ref, build, leaves)
    truth = run(exact_twin(ref), build, leaves)
    calls = _record_host_reads(monkeypatch)
    got = run(fast, build, leaves)
    assert calls == []
    assert_close_to_truth(got, want, truth)
    # The recorder sees fastrnn's code: packed input reads its batch_sizes (kept on the CPU, as
    # torch.nn requires) on the host.
    build, leaves = make_inputs(ref, "packed_unsorted", 4, 3, with_hx=True)
    run(fast, build, leaves)
    assert any(call.startswith("Tensor.tolist at modules.py") for call in calls)


# --- CUDA graphs on a GPU --------------------------------------------------------------------

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_cuda_graph_training_step_replays(name):
    torch.manual_seed(0)
    model = getattr(fastrnn, name)(32, 64, num_layers=2, bidirectional=True).cuda()
    static_x = torch.randn(20, 8, 32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        for _ in range(2):
            model.zero_grad(set_to_none=False)
            model(static_x)[0].pow(2).mean().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    torch.cuda.set_sync_debug_mode("error")  # a host synchronisation would raise here
    try:
        with torch.cuda.graph(graph):
            static_loss = model(static_x)[0].pow(2).mean()
            static_loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for seed in (1, 2):
        new_x = torch.randn(20, 8, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        static_x.copy_(new_x)
        model.zero_grad(set_to_none=False)
        graph.replay()
        torch.cuda.synchronize()
        replay_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=False)
        eager = model(new_x)[0].pow(2).mean()
        eager.backward()
        torch.testing.assert_close(static_loss, eager, atol=1e-6, rtol=1e-5)
        for a, p in zip(replay_grads, model.parameters()):
            torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)
