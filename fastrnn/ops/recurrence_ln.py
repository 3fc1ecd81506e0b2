"""The LayerNorm recurrence op: ``fastrnn::ln_recurrence`` and its backward.

``ln_recurrence(xg, h0, c0, w_hh, b_hn, g_h, g_c, b_c, lengths, mode, batch_first, save,
strategy)`` runs one LayerNormLSTM / LayerNormGRU layer, all its directions, in the kernels of
``ops/layernorm.py``. The input side is done by the caller (``functional``), parallel over time:
``xg = LN_x(x W_ih^T) + b_ih`` plus LN_h's bias and b_hh (GRU: but their n parts, ``b_hn``).

Shapes (D directions, G gates, H hidden): xg [T, B, D*G*H] (a batch-major tensor seen time-major
when batch_first); h0, c0 [D, B, H]; w_hh [D, G*H, H]; b_hn [D, H] (GRU); g_h [D, G*H] LN_h's
gain; g_c, b_c [D, H] LN_c's gain and bias (LSTM); lengths [B] (packed input, sorted decreasing).
Outputs: y [T, B, D*H] (the layout of xg), h_n, c_n [D, B, H], and what the backward reads:
gates [T, B, D, 4*H], cell [T, B, D, H], qhat [T, B, D, G*H] (the normalised recurrent
products), stats [T, B, D, 4] (LN_h's rstd, LN_c's mean and rstd), empty where not saved.

A ``torch.library`` custom op with a fake implementation and autograd (``torch.compile`` keeps
it opaque, no graph break). Derivatives of its gradients (double backward) are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .. import _modes
from . import dispatch, layernorm, select
from .args import _Common, acc_dtype, tl_acc
from .recurrence import _previous_states, gemm_precision


@dataclasses.dataclass(frozen=True)
class _Args(_Common):
    w_hh: Tensor = None

    @property
    def ACC(self):
        return tl_acc(self.w_hh.dtype)


@dataclasses.dataclass(frozen=True)
class LayerNormArgs(_Args):
    xg: Tensor = None
    h0: Tensor = None
    c0: Optional[Tensor] = None
    b_hn: Optional[Tensor] = None
    g_h: Tensor = None
    g_c: Optional[Tensor] = None
    b_c: Optional[Tensor] = None
    lengths: Optional[Tensor] = None
    y: Tensor = None
    hn: Tensor = None
    cn: Optional[Tensor] = None
    gates: Optional[Tensor] = None
    cell: Optional[Tensor] = None
    qhat: Optional[Tensor] = None
    stats: Optional[Tensor] = None
    save: bool = False
    scratch: tuple = ()          # q [D, B, G*H], cell state [2, D, B, H] (accumulation dtype)


@dataclasses.dataclass(frozen=True)
class LayerNormGradArgs(_Args):
    dy: Tensor = None
    y: Tensor = None
    h0: Tensor = None
    c0: Optional[Tensor] = None
    gates: Tensor = None
    cell: Optional[Tensor] = None
    qhat: Tensor = None
    stats: Tensor = None
    g_h: Tensor = None
    g_c: Optional[Tensor] = None
    b_c: Optional[Tensor] = None
    lengths: Optional[Tensor] = None
    dgx: Tensor = None
    dgh: Optional[Tensor] = None
    dq: Tensor = None
    dh0: Tensor = None
    dc0: Optional[Tensor] = None
    dgc: Optional[Tensor] = None
    scratch: tuple = ()          # dh, keep [D, B, H], dc [2, D, B, H], e [D, B, G*H]


def plan_problem(problem: select.Problem, spec: select.DeviceSpec,
                 strategy: str = "") -> select.Plan:
    """The plan of a LayerNorm layer: ``strategy`` (forced, or "" for the choice,
    ``layernorm.plan``). Raises RuntimeError where it cannot run, before anything launches."""
    strategy = strategy or dispatch.forced_strategy()
    try:
        return layernorm.plan(problem, spec, strategy)
    except select.DoesNotFit as e:
        raise RuntimeError(f"fastrnn: strategy {strategy!r} cannot run LayerNorm "
                           f"{problem.describe()} on {spec.name}: {e}") from None


def why_not(problem: select.Problem, spec: select.DeviceSpec) -> dict:
    """For each LayerNorm strategy, None if it can run the problem, else the reason."""
    out = {}
    for name in layernorm.STRATEGIES:
        try:
            layernorm.plan(problem, spec, name)
            out[name] = None
        except select.DoesNotFit as e:
            out[name] = str(e)
    return out


def _problem(mode: int, B: int, H: int, D: int, dtype: torch.dtype, device) -> select.Problem:
    return select.Problem(mode, B, H, H, D, dtype, select.precision(dtype, device))


def ln_plan(mode: int, B: int, w_hh: Tensor, device, strategy: str) -> select.Plan:
    """``plan_problem`` for a layer's W_hh on ``device``."""
    D, GH, H = w_hh.shape
    return plan_problem(_problem(mode, B, H, D, w_hh.dtype, device), select.describe(device),
                        strategy)


@torch.compiler.assume_constant_result
def ln_resolve(mode: int, B: int, H: int, D: int, dtype: torch.dtype, device) -> str:
    """The strategy of a LayerNorm layer, decided where it is called (a forced strategy is read
    on the caller's thread and recorded for the backward); "" for an empty problem."""
    if B == 0 or H == 0:
        return ""
    return plan_problem(_problem(mode, B, H, D, dtype, device), select.describe(device)).strategy


def _outputs(mode, xg, h0, w_hh, batch_first, save):
    T, B = xg.shape[0], xg.shape[1]
    D, GH, H = w_hh.shape
    dtype, device = w_hh.dtype, xg.device
    acc = acc_dtype(dtype)
    if batch_first:
        y = torch.empty(B, T, D * H, dtype=dtype, device=device).transpose(0, 1)
    else:
        y = torch.empty(T, B, D * H, dtype=dtype, device=device)
    is_lstm = mode == _modes.LSTM
    hn = torch.empty(D, B, H, dtype=dtype, device=device)
    cn = torch.empty(D if is_lstm else 0, B, H, dtype=dtype, device=device)

    def saved(width, dt):
        return torch.empty((T, B, D, width) if save and width else (0,), dtype=dt, device=device)

    return (y, hn, cn, saved(4 * H, dtype), saved(H if is_lstm else 0, acc), saved(GH, acc),
            saved(4, acc))


def _some(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is not None and t.numel() else None


@torch.library.custom_op("fastrnn::ln_recurrence", mutates_args=())
def ln_recurrence_op(xg: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
                     b_hn: Optional[Tensor], g_h: Tensor, g_c: Optional[Tensor],
                     b_c: Optional[Tensor], lengths: Optional[Tensor], mode: int,
                     batch_first: bool, save: bool, strategy: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward op (``ln_recurrence`` below is the differentiable entry point)."""
    outs = _outputs(mode, xg, h0, w_hh, batch_first, save)
    y, hn, cn, gates, cell, qhat, stats = outs
    T, B = xg.shape[0], xg.shape[1]
    D, GH, H = w_hh.shape
    if T == 0 or B == 0 or H == 0:
        return outs
    device = xg.device
    the_plan = ln_plan(mode, B, w_hh, device, strategy)
    acc = acc_dtype(w_hh.dtype)
    is_lstm = mode == _modes.LSTM
    q = torch.empty(D, B, GH, dtype=acc, device=device)
    cs = torch.empty(2, D, B, H, dtype=acc, device=device) if is_lstm else q
    args = LayerNormArgs(
        mode=mode, T=T, B=B, H=H, P=H, D=D, precision=select.precision(w_hh.dtype, device),
        w_hh=w_hh.contiguous(), xg=xg, h0=h0.contiguous(),
        c0=c0.contiguous() if is_lstm else None,
        b_hn=b_hn.contiguous() if b_hn is not None else None, g_h=g_h.contiguous(),
        g_c=g_c.contiguous() if is_lstm else None, b_c=b_c.contiguous() if is_lstm else None,
        lengths=None if lengths is None else lengths.to(device=device, dtype=torch.int32),
        y=y, hn=hn, cn=_some(cn), gates=_some(gates), cell=_some(cell), qhat=_some(qhat),
        stats=_some(stats), save=save, scratch=(q, cs))
    dispatch.run_pass(layernorm.forward, args, the_plan)
    return outs


@ln_recurrence_op.register_fake
def _(xg, h0, c0, w_hh, b_hn, g_h, g_c, b_c, lengths, mode, batch_first, save, strategy):
    return _outputs(mode, xg, h0, w_hh, batch_first, save)


def _grad_outputs(mode, xg, h0, w_hh, has_b_hn):
    D, GH, H = w_hh.shape
    dtype, device = w_hh.dtype, xg.device
    is_lstm = mode == _modes.LSTM

    def out(present, *shape):
        return torch.empty(shape if present else (0,), dtype=dtype, device=device)

    return (out(True, *xg.shape), out(True, *h0.shape), out(is_lstm, D, h0.shape[1], H),
            out(True, *w_hh.shape), out(has_b_hn, D, H), out(True, D, GH),
            out(is_lstm, D, H), out(is_lstm, D, H))


@torch.library.custom_op("fastrnn::ln_recurrence_backward", mutates_args=())
def ln_recurrence_backward(dy: Tensor, dhn: Tensor, dcn: Optional[Tensor], xg: Tensor,
                           y: Tensor, h0: Tensor, c0: Optional[Tensor], gates: Tensor,
                           cell: Tensor, qhat: Tensor, stats: Tensor, w_hh: Tensor,
                           g_h: Tensor, g_c: Optional[Tensor], b_c: Optional[Tensor],
                           lengths: Optional[Tensor], mode: int, has_b_hn: bool, strategy: str
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                      Tensor]:
    """Gradients of (xg, h0, c0, w_hh, b_hn, g_h, g_c, b_c); empty where the input is absent."""
    grads = _grad_outputs(mode, xg, h0, w_hh, has_b_hn)
    dxg, dh0, dc0, dw_hh, db_hn, dg_h, dg_c, db_c = grads
    T, B = dy.shape[0], dy.shape[1]
    D, GH, H = w_hh.shape
    if T == 0 or B == 0 or H == 0:
        for g in grads:
            g.zero_()
        return grads
    device = dy.device
    the_plan = ln_plan(mode, B, w_hh, device, strategy)
    acc = acc_dtype(w_hh.dtype)
    is_lstm = mode == _modes.LSTM
    dgx = torch.empty(T, B, D * GH, dtype=dy.dtype, device=device)
    dgh = torch.empty(T, B, D * GH, dtype=dy.dtype, device=device) if not is_lstm else None
    dq = torch.empty(T, B, D * GH, dtype=dy.dtype, device=device)
    nb = -(-B // layernorm.BLOCK_B)
    dgc = torch.zeros(nb, D, 2, H, dtype=acc, device=device) if is_lstm else None
    keep = dhn.to(acc, copy=True).contiguous()  # the carried dh starts as dh_n (written)
    dcs = torch.empty(2, D, B, H, dtype=acc, device=device)
    if is_lstm:
        dcs[T % 2].copy_(dcn)
    scratch = (torch.empty(D, B, H, dtype=acc, device=device), keep, dcs,
               torch.empty(D, B, GH, dtype=acc, device=device))
    args = LayerNormGradArgs(
        mode=mode, T=T, B=B, H=H, P=H, D=D, precision=select.precision(w_hh.dtype, device),
        w_hh=w_hh.contiguous(), dy=dy.contiguous(), y=y, h0=h0.contiguous(),
        c0=c0.contiguous() if is_lstm else None, gates=gates, cell=_some(cell), qhat=qhat,
        stats=stats, g_h=g_h.contiguous(), g_c=g_c.contiguous() if is_lstm else None,
        b_c=b_c.contiguous() if is_lstm else None,
        lengths=None if lengths is None else lengths.to(device=device, dtype=torch.int32),
        dgx=dgx, dgh=dgh, dq=dq, dh0=dh0, dc0=dc0 if is_lstm else None, dgc=dgc,
        scratch=scratch)
    dispatch.run_pass(layernorm.backward, args, the_plan)

    # Parallel over time: dW_hh as one GEMM, the LN gains' gradients as reductions.
    grads = list(grads)
    grads[0] = dgx.view(xg.shape)
    with gemm_precision(w_hh.dtype, device):
        prev = _previous_states(y, h0)
        grads[3] = torch.einsum("tbdg,tbdp->dgp", dq.view(T, B, D, GH), prev)
    dl = (dgx if is_lstm else dgh).view(T, B, D, GH)
    grads[5] = (dl.to(acc) * qhat).sum(dim=(0, 1)).to(dy.dtype)
    if has_b_hn:
        grads[4] = dl[..., 2 * H:].sum(dim=(0, 1))
    if is_lstm:
        both = dgc.sum(dim=0).to(dy.dtype)
        grads[6], grads[7] = both[:, 0].clone(), both[:, 1].clone()
    return tuple(g.contiguous() for g in grads)


@ln_recurrence_backward.register_fake
def _(dy, dhn, dcn, xg, y, h0, c0, gates, cell, qhat, stats, w_hh, g_h, g_c, b_c, lengths, mode,
      has_b_hn, strategy):
    return _grad_outputs(mode, xg, h0, w_hh, has_b_hn)


class _NoDoubleBackward(torch.autograd.Function):
    """The backward op, whose own derivative is refused (not silently missing)."""

    @staticmethod
    def forward(*args):
        return ln_recurrence_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("fastrnn: derivatives of gradients (double backward, "
                           "create_graph=True) of LayerNormLSTM / LayerNormGRU are not "
                           "supported")


def _setup_context(ctx, inputs, output):
    (xg, h0, c0, w_hh, b_hn, g_h, g_c, b_c, lengths, mode, batch_first, save, strategy) = inputs
    y, _, _, gates, cell, qhat, stats = output
    ctx.mode, ctx.save = mode, save
    ctx.strategy = strategy or (ln_plan(mode, xg.shape[1], w_hh, xg.device, "").strategy
                                if xg.shape[0] and xg.shape[1] and w_hh.numel() else "")
    ctx.has_b_hn = b_hn is not None
    ctx.save_for_backward(xg, y, h0, c0, gates, cell, qhat, stats, w_hh, g_h, g_c, b_c, lengths)


def _backward(ctx, dy, dhn, dcn, *_):
    xg, y, h0, c0, gates, cell, qhat, stats, w_hh, g_h, g_c, b_c, lengths = ctx.saved_tensors
    if not ctx.save:
        raise RuntimeError("fastrnn: backward through a LayerNorm recurrence run without saved "
                           "activations (it ran under no_grad or with inputs not requiring grad)")
    is_lstm = ctx.mode == _modes.LSTM
    dy = torch.zeros_like(y) if dy is None else dy
    dhn = torch.zeros_like(h0) if dhn is None else dhn
    if is_lstm and dcn is None:
        dcn = torch.zeros_like(c0)
    grads = _NoDoubleBackward.apply(dy, dhn, dcn if is_lstm else None, xg, y, h0, c0, gates, cell,
                                    qhat, stats, w_hh, g_h, g_c, b_c, lengths, ctx.mode,
                                    ctx.has_b_hn, ctx.strategy)
    present = (xg, h0, c0, w_hh, ctx.has_b_hn or None, g_h, g_c, b_c)
    out = [g if present[i] is not None and ctx.needs_input_grad[i] else None
           for i, g in enumerate(grads)]
    return tuple(out) + (None,) * 5


torch.library.register_autograd("fastrnn::ln_recurrence", _backward,
                                setup_context=_setup_context)


class LNRecurrence(torch.autograd.Function):
    """The same autograd as a torch.autograd.Function with ``setup_context``, so that torch.func's
    transforms (grad, vjp, jacrev) work through it eagerly (they refuse the Function that
    ``register_autograd`` generates); torch.compile runs the op itself."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return ln_recurrence_op(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def ln_recurrence(xg, h0, c0, w_hh, b_hn, g_h, g_c, b_c, lengths, mode: int, batch_first: bool,
                  save: bool, strategy: str):
    """The differentiable LayerNorm recurrence of one layer (all its directions). Returns
    ``(y, h_n, c_n, gates, cell, qhat, stats)``."""
    args = (xg, h0, c0, w_hh, b_hn, g_h, g_c, b_c, lengths, mode, batch_first, save, strategy)
    if torch.compiler.is_compiling():
        return ln_recurrence_op(*args)
    return LNRecurrence.apply(*args)
