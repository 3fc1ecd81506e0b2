"""The recurrence op: the only place where time is sequential.

``recurrence(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first, save)`` runs one
layer, all of its directions: one GEMM projects the input of every step and direction
(``xg = x W_ih^T + b_x``), then a Triton kernel runs the sequential part. It is a ``torch.library``
custom op (``fastrnn::recurrence``) with a fake implementation and registered autograd, so
``torch.compile`` traces it without graph breaks. Its backward is a second custom op,
``fastrnn::recurrence_backward``, that runs the backward kernel (backpropagation through time);
the gradients of the input and of the weights are whole-sequence GEMMs after it. With
``create_graph=True`` (double backward) the backward instead differentiates the plain-PyTorch
reference, recomputed from the saved inputs.

Strategies (one module each, each with ``forward(problem)`` and ``backward(problem)``):

* ``persistent``: one program per batch tile and direction loops over time (small hidden sizes).
* ``stepwise``: one launch per step, any size.
* ``cooperative``: a grid of at most one program per SM shares each recurrence, one grid
  barrier per step (medium hidden sizes; no proj_size).

``select_strategy`` picks one; ``force_strategy`` / ``FASTRNN_STRATEGY`` override it.

Shapes (D directions, G gates, H hidden, P = proj_size or H):
x [T, B, I] (a batch-major tensor seen time-major when batch_first); w_ih [D*G*H, I];
b_x [D*G*H] (b_ih plus the parts of b_hh that can be pre-summed); h0 [D, B, P]; c0 [D, B, H] (LSTM); w_hh [D, G*H, P]; b_hn [D, H] (GRU with
bias); w_hr [D, P, H] (LSTM with proj_size); lengths [B] int (packed input, sorted decreasing).
Outputs: y [T, B, D*P] (batch-major memory when batch_first), h_n [D, B, P], c_n [D, B, H], and the
activations saved for backward: gates [T, B, D, NSAVE*H] and cell [T, B, D, H] (LSTM).
"""

import collections
import contextlib
import contextvars
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .. import _modes
from ..backend import interpreting
from . import cooperative, persistent, stepwise

STRATEGIES = {
    "persistent": persistent,
    "stepwise": stepwise,
    "cooperative": cooperative,
}

# Kernel launches per strategy and direction of the pass: lets tests prove the kernels ran.
LAUNCHES: collections.Counter = collections.Counter()

# Largest padded weight footprint (elements of W_hh, plus W_hr) the persistent strategy keeps in
# one program. Beyond it the tiles spill out of registers.
PERSISTENT_MAX_WEIGHTS = 16384

# Per thread / task, so one thread's override never leaks into another's.
_forced: contextvars.ContextVar = contextvars.ContextVar("fastrnn_strategy", default=None)


# The Triton interpreter patches triton.language globally while a kernel runs, so two threads
# must not interpret kernels at once. On a GPU, launches need no lock.
_INTERPRETER_LOCK = threading.Lock()


def _launch(name: str, direction: str, problem) -> None:
    run = getattr(STRATEGIES[name], "forward" if direction == "fwd" else "backward")
    if interpreting():
        with _INTERPRETER_LOCK:
            LAUNCHES[name, direction] += run(problem)
    else:
        LAUNCHES[name, direction] += run(problem)


def _check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"unknown fastrnn strategy {name!r}; choose from {sorted(STRATEGIES)}")
    return name


@contextlib.contextmanager
def force_strategy(name: Optional[str]):
    """Run every recurrence inside the block with strategy ``name`` (None: automatic)."""
    token = _forced.set(None if name is None else _check_strategy(name))
    try:
        yield
    finally:
        _forced.reset(token)


def _block(n: int) -> int:
    # tl.dot needs every dimension >= 16 on a GPU; padding is masked.
    return max(16, triton.next_power_of_2(n))


# The cooperative kernel's grid barrier has only run under the interpreter (one program per
# group) so far; until it has been validated and timed on a GPU it runs only when asked for.
COOPERATIVE_VALIDATED = False


def select_strategy(mode: int, H: int, P: int, B: int, dtype: torch.dtype,
                    device: torch.device, has_proj: bool) -> str:
    """The one place that picks a strategy for a problem."""
    forced = _forced.get() or os.environ.get("FASTRNN_STRATEGY") or None
    if forced:
        return _check_strategy(forced)
    weights = _modes.NUM_GATES[mode] * _block(H) * _block(P)
    if has_proj:
        weights += _block(H) * _block(P)
    if weights <= PERSISTENT_MAX_WEIGHTS:
        return "persistent"
    if (COOPERATIVE_VALIDATED and not interpreting()
            and cooperative.plan(mode, H, P, B, 2, device) is not None):
        return "cooperative"
    return "stepwise"


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 recurrent GEMMs follow torch's TF32 switch for matmuls, as the input projection does."""
    tf32 = (dtype == torch.float32 and device.type == "cuda" and not interpreting()
            and torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if tf32 else "ieee"


class _Problem:
    """Sizes, compile-time flags and tensors shared by the launchers of every strategy."""

    def __init__(self, mode, h0, w_hh, b_hn, w_hr, lengths, T):
        self.mode = mode
        self.G = _modes.NUM_GATES[mode]
        self.NSAVE = _modes.NUM_SAVED[mode]
        self.T = T
        self.D, GH, self.P = w_hh.shape
        self.H = GH // self.G
        self.B = h0.shape[1]
        self.has_bhn = b_hn is not None
        self.has_proj = w_hr is not None
        self.has_lengths = lengths is not None
        dtype = w_hh.dtype
        self.acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.acc = tl.float64 if dtype == torch.float64 else tl.float32
        self.precision = dot_precision(dtype, h0.device)
        self.block_h = _block(self.H)
        self.block_p = _block(self.P)
        # Tensors absent for this cell type are replaced by a harmless placeholder pointer.
        self.w_hh = w_hh.contiguous()
        self.h0 = h0.contiguous()
        self.b_hn = b_hn.contiguous() if b_hn is not None else self.w_hh
        self.w_hr = w_hr.contiguous() if w_hr is not None else self.w_hh
        self.lengths = (lengths.to(device=h0.device, dtype=torch.int32) if lengths is not None
                        else self.w_hh)


def _forward_outputs(mode, x, h0, w_hh, batch_first, save):
    T, B = x.shape[0], x.shape[1]
    D, GH, P = w_hh.shape
    H = GH // _modes.NUM_GATES[mode]
    dtype, device = w_hh.dtype, x.device
    if batch_first:
        y = torch.empty(B, T, D * P, dtype=dtype, device=device).transpose(0, 1)
    else:
        y = torch.empty(T, B, D * P, dtype=dtype, device=device)
    hn = torch.empty(D, B, P, dtype=dtype, device=device)
    is_lstm = mode == _modes.LSTM
    cn = torch.empty(D if is_lstm else 0, B, H, dtype=dtype, device=device)
    nsave = _modes.NUM_SAVED[mode] * H
    gates = torch.empty((T, B, D, nsave) if save and nsave else (0,), dtype=dtype, device=device)
    cell_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    cell = torch.empty((T, B, D, H) if save and is_lstm else (0,), dtype=cell_dtype, device=device)
    return y, hn, cn, gates, cell


def _project(x: Tensor, w_ih: Tensor, b_x: Optional[Tensor], batch_first: bool) -> Tensor:
    """xg = x W_ih^T + b_x for every step and direction in one GEMM, in x's memory layout."""
    if batch_first:
        return F.linear(x.transpose(0, 1), w_ih, b_x).transpose(0, 1)
    return F.linear(x, w_ih, b_x)


@torch.library.custom_op("fastrnn::recurrence", mutates_args=())
def recurrence(x: Tensor, w_ih: Tensor, b_x: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
               w_hh: Tensor, b_hn: Optional[Tensor], w_hr: Optional[Tensor],
               lengths: Optional[Tensor], mode: int, batch_first: bool, save: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, hn, cn, gates, cell = _forward_outputs(mode, x, h0, w_hh, batch_first, save)
    f = _Problem(mode, h0, w_hh, b_hn, w_hr, lengths, x.shape[0])
    if f.B == 0:
        return y, hn, cn, gates, cell
    f.xg = _project(x, w_ih, b_x, batch_first)
    f.c0 = c0.contiguous() if c0 is not None else f.h0
    f.y, f.hn, f.cn, f.gates, f.cell = y, hn, cn, gates, cell
    f.cell_dtype = f.acc_dtype
    f.save = save
    name = select_strategy(mode, f.H, f.P, f.B, w_hh.dtype, x.device, f.has_proj)
    _launch(name, "fwd", f)
    return y, hn, cn, gates, cell


@recurrence.register_fake
def _(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first, save):
    return _forward_outputs(mode, x, h0, w_hh, batch_first, save)


def _backward_outputs(mode, dy, h0, w_hh, w_hr):
    T, B = dy.shape[0], dy.shape[1]
    D, GH, P = w_hh.shape
    H = GH // _modes.NUM_GATES[mode]
    dtype, device = dy.dtype, dy.device
    dgx = torch.empty(T, B, D * GH, dtype=dtype, device=device)
    dgh = torch.empty((T, B, D * GH) if mode == _modes.GRU else (0,), dtype=dtype, device=device)
    dhp = torch.empty((T, B, D * P) if w_hr is not None else (0,), dtype=dtype, device=device)
    dh0 = torch.empty(D, B, P, dtype=h0.dtype, device=device)
    dc0 = torch.empty((D, B, H) if mode == _modes.LSTM else (0,), dtype=h0.dtype, device=device)
    return dgx, dgh, dhp, dh0, dc0


@torch.library.custom_op("fastrnn::recurrence_backward", mutates_args=())
def recurrence_backward(dy: Tensor, dhn: Tensor, dcn: Optional[Tensor], y: Tensor, h0: Tensor,
                        c0: Optional[Tensor], gates: Tensor, cell: Tensor, w_hh: Tensor,
                        w_hr: Optional[Tensor], lengths: Optional[Tensor], mode: int
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the input projections xg (dgx, time-major), of W_hh h (+ b_hh) where they
    differ (GRU: dgh), of every h_t (proj_size: dhp), and of h0, c0."""
    dgx, dgh, dhp, dh0, dc0 = _backward_outputs(mode, dy, h0, w_hh, w_hr)
    b = _Problem(mode, h0, w_hh, None, w_hr, lengths, dy.shape[0])
    if b.B == 0:
        dh0.zero_()
        dc0.zero_()
        return dgx, dgh, dhp, dh0, dc0
    b.dy = dy.contiguous()
    b.dhn = dhn.contiguous()
    b.dcn = dcn.contiguous() if dcn is not None else b.dhn
    b.y = y
    b.c0 = c0.contiguous() if c0 is not None else b.h0
    b.gates = gates if gates.numel() else b.w_hh
    b.cell = cell if cell.numel() else b.w_hh
    b.dgx = dgx
    b.dgh = dgh if dgh.numel() else dgx
    b.dhp = dhp if dhp.numel() else dgx
    b.dh0, b.dc0 = dh0, (dc0 if dc0.numel() else dh0)
    name = select_strategy(mode, b.H, b.P, b.B, w_hh.dtype, dy.device, b.has_proj)
    _launch(name, "bwd", b)
    return dgx, dgh, dhp, dh0, dc0


@recurrence_backward.register_fake
def _(dy, dhn, dcn, y, h0, c0, gates, cell, w_hh, w_hr, lengths, mode):
    return _backward_outputs(mode, dy, h0, w_hh, w_hr)


def _previous_states(y: Tensor, h0: Tensor) -> Tensor:
    """[T, B, D, P]: the state each step started from (h_{t-1} forward, h_{t+1} reverse)."""
    D, _, P = h0.shape
    y4 = y.unflatten(-1, (D, P))
    prev = [torch.cat([h0[0].unsqueeze(0), y4[:-1, :, 0]], dim=0)]
    if D == 2:
        prev.append(torch.cat([y4[1:, :, 1], h0[1].unsqueeze(0)], dim=0))
    return torch.stack(prev, dim=2)


def _setup_context(ctx, inputs, output):
    x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first, save = inputs
    y, _, _, gates, cell = output
    ctx.mode = mode
    ctx.batch_first = batch_first
    ctx.saved_activations = save
    ctx.present = [t is not None for t in (x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr)]
    ctx.mark_non_differentiable(gates, cell)
    ctx.save_for_backward(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, y, gates, cell)


def _differentiable_backward(ctx, dy, dhn, dcn):
    """create_graph=True: gradients as differentiable functions of the inputs, by autograd
    through the plain-PyTorch reference recomputed from the saved inputs (slow, but exact)."""
    from ..reference import recurrence_reference

    x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, _, _, _ = ctx.saved_tensors
    xg = _project(x, w_ih, b_x, ctx.batch_first)
    y, hn, cn = recurrence_reference(ctx.mode, xg, h0, c0, w_hh, b_hn, w_hr, lengths)
    inputs = (x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr)
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    outs, grads = [y, hn], [dy, dhn]
    if cn is not None:
        outs.append(cn)
        grads.append(dcn)
    got = torch.autograd.grad(outs, [inputs[i] for i in wanted], grads, create_graph=True,
                              allow_unused=True)
    result = [None] * 12
    for i, g in zip(wanted, got):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(result)


def _backward(ctx, dy, dhn, dcn, _dgates, _dcell):
    x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, y, gates, cell = ctx.saved_tensors
    mode = ctx.mode
    if dy is None:
        dy = torch.zeros_like(y)
    if dhn is None:
        dhn = torch.zeros_like(h0)
    if mode == _modes.LSTM and dcn is None:
        dcn = torch.zeros_like(c0)
    if torch.is_grad_enabled():
        return _differentiable_backward(ctx, dy, dhn, dcn)
    if not ctx.saved_activations and mode in (_modes.LSTM, _modes.GRU):
        raise RuntimeError("fastrnn: backward through a recurrence run without saved "
                           "activations (it ran under no_grad or with inputs not requiring grad)")
    dgx, dgh, dhp, dh0, dc0 = recurrence_backward(
        dy, dhn, dcn if mode == _modes.LSTM else None, y, h0, c0, gates, cell, w_hh,
        w_hr, lengths, mode)
    T, B = y.shape[0], y.shape[1]
    D, GH, P = w_hh.shape
    H = GH // _modes.NUM_GATES[mode]
    needs = ctx.needs_input_grad
    dgx2 = dgx.view(T * B, D * GH)
    d_x = d_w_ih = d_b_x = d_w_hh = d_b_hn = d_w_hr = None
    if needs[0]:
        d_x = torch.matmul(dgx, w_ih)  # time-major, like the x the op was given
    if needs[1]:
        d_w_ih = dgx2.t().mm(x.reshape(T * B, x.shape[-1]))
    if b_x is not None and needs[2]:
        d_b_x = dgx2.sum(dim=0)
    dgh4 = (dgh if mode == _modes.GRU else dgx).view(T, B, D, GH)
    if needs[5]:
        d_w_hh = torch.einsum("tbdg,tbdp->dgp", dgh4, _previous_states(y, h0))
    if b_hn is not None and needs[6]:
        d_b_hn = dgh4[..., 2 * H:].sum(dim=(0, 1))
    if w_hr is not None and needs[7]:
        o = gates[..., 3 * H:4 * H]
        r = (o.to(cell.dtype) * torch.tanh(cell)).to(y.dtype)
        d_w_hr = torch.einsum("tbdp,tbdh->dph", dhp.view(T, B, D, P), r)
    return (d_x, d_w_ih, d_b_x, dh0, dc0 if c0 is not None else None, d_w_hh, d_b_hn, d_w_hr,
            None, None, None, None)


torch.library.register_autograd("fastrnn::recurrence", _backward, setup_context=_setup_context)
