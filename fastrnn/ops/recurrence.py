"""The recurrence op: the only place where time is sequential.

``recurrence(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first, save, strategy,
resets, clip, rmask, zh, zc, z_h, z_c)`` runs one layer, all of its directions: one GEMM projects
the input of every step and direction (``xg = x W_ih^T + b_x``), then a Triton kernel runs the
sequential part. It is a
``torch.library`` custom op (``fastrnn::recurrence``) with a fake implementation and registered
autograd, so ``torch.compile`` traces it without graph breaks. Its backward is a second custom op,
``fastrnn::recurrence_backward``: the backward kernel (backpropagation through time) and, after
it, the whole-sequence GEMMs for the gradients of the input and the weights. Derivatives of those
gradients (double backward) differentiate the plain-PyTorch reference, recomputed from the saved
inputs; forward-mode AD (jvp) likewise. Both ops have vmap rules (torch.func): a vmapped
dimension folds into the batch, one launch for all samples.

``strategy`` names the kernel strategy (``dispatch.resolve`` decides it where the layer is called;
"" lets the op decide). The autograd context records it, so the backward runs the strategy the
forward ran, on whichever thread autograd runs it.

Precision: on CUDA, fp32 recurrences and every GEMM of the op follow cuDNN's RNN TF32 switch, as
torch.nn's cuDNN RNNs do (``select.precision``). All of it happens inside the ops, so it holds
under torch.compile too.

Shapes (D directions, G gates, H hidden, P = proj_size or H):
x [T, B, I] (a batch-major tensor seen time-major when batch_first); w_ih [D*G*H, I];
b_x [D*G*H] (b_ih plus the parts of b_hh that can be pre-summed); h0 [D, B, P]; c0 [D, B, H]
(LSTM); w_hh [D, G*H, P]; b_hn [D, H] (GRU with bias); w_hr [D, P, H] (LSTM with proj_size);
lengths [B] int (packed input, sorted decreasing); resets [T, B] bool (a batch-major tensor seen
time-major when batch_first: episode starts, ``fastrnn.reference``); clip > 0 clamps the recurrent
gradient (``recurrent_grad_clip``; 0: none); rmask [D, B, P] multiplies the state entering the
recurrent product (``recurrent_dropout``); zh [T, B, D, P] and zc [T, B, D, H] bool (training) or
z_h and z_c (eval) are zoneout's keep factors. Outputs: y [T, B, D*P] (batch-major memory when
batch_first), h_n [D, B, P], c_n [D, B, H], and the activations saved for backward: gates
[T, B, D, NSAVE*H] and cell [T, B, D, H] (LSTM; every step's cell state, differentiable: what
``return_states`` returns); empty where not saved.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _modes
from . import dispatch, select
from .args import BackwardArgs, ForwardArgs, acc_dtype


def _problem(mode: int, B: int, w_hh: Tensor, device: torch.device) -> select.Problem:
    D, GH, P = w_hh.shape
    return select.Problem(mode, B, GH // _modes.NUM_GATES[mode], P, D, w_hh.dtype,
                          select.precision(w_hh.dtype, device))


def _plan(mode: int, B: int, w_hh: Tensor, device: torch.device, strategy: str) -> select.Plan:
    return dispatch.plan(_problem(mode, B, w_hh, device), select.describe(device),
                       strategy or dispatch.forced_strategy() or None)


@contextlib.contextmanager
def gemm_precision(dtype: torch.dtype, device: torch.device):
    """The op's GEMMs (cuBLAS) in the recurrence's precision: on CUDA, fp32 follows cuDNN's RNN
    TF32 switch rather than torch's matmul switch. The switch is process-wide, so it is set only
    for the duration of the op's own GEMMs, and only when it differs."""
    if dtype != torch.float32 or torch.device(device).type != "cuda":
        yield
        return
    want = select.cudnn_rnn_tf32()
    matmul = torch.backends.cuda.matmul
    # Speak the API the user's setting is readable in: torch refuses to mix the legacy
    # ``allow_tf32`` with ``fp32_precision`` (torch >= 2.9) once they disagree.
    try:
        old, legacy = matmul.allow_tf32, True
        current = old
    except RuntimeError:
        old, legacy = matmul.fp32_precision, False
        current = old == "tf32"
    if current == want:
        yield
        return
    if legacy:
        matmul.allow_tf32 = want
    else:
        matmul.fp32_precision = "tf32" if want else "ieee"
    try:
        yield
    finally:
        if legacy:
            matmul.allow_tf32 = old
        else:
            matmul.fp32_precision = old


def _forward_outputs(mode, x, h0, w_hh, batch_first, save, zoned=False):
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
    # LSTM: every step's cell state; a zoned RNN: every step's unzoned h (for its backward).
    rnn_zoned = zoned and mode in (_modes.RNN_TANH, _modes.RNN_RELU)
    cell = torch.empty((T, B, D, H) if save and (is_lstm or rnn_zoned) else (0,),
                       dtype=acc_dtype(dtype), device=device)
    return y, hn, cn, gates, cell


def _zoned(zh, zc, z_h, z_c) -> bool:
    return zh is not None or zc is not None or bool(z_h) or bool(z_c)


def _zone_masks(z: Optional[Tensor]) -> Optional[Tensor]:
    """A zoneout mask as the kernels read it: [T, B, D, ·] uint8 contiguous."""
    return None if z is None else z.contiguous().view(torch.uint8)


def project(x: Tensor, w_ih: Tensor, b_x: Optional[Tensor], batch_first: bool) -> Tensor:
    """xg = x W_ih^T + b_x for every step and direction in one GEMM, in x's memory layout."""
    if batch_first:
        return F.linear(x.transpose(0, 1), w_ih, b_x).transpose(0, 1)
    return F.linear(x, w_ih, b_x)


def _empty(T: int, B: int, w_hh: Tensor) -> bool:
    """A problem with no step, no batch row or no hidden unit never reaches a kernel."""
    return T == 0 or B == 0 or w_hh.numel() == 0


def _some(t: Optional[Tensor]) -> Optional[Tensor]:
    """None for an absent or empty (placeholder) tensor."""
    return t if t is not None and t.numel() else None


def _lengths(lengths: Optional[Tensor], device) -> Optional[Tensor]:
    return None if lengths is None else lengths.to(device=device, dtype=torch.int32)


def _resets(resets: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels' view of the episode starts: [T, B] uint8 (the same bytes as the bool)."""
    return None if resets is None else resets.view(torch.uint8)


def _zone_spec(zh, zc, z_h, z_c):
    """Zoneout as the reference takes it, ``(zh, zc)``: masks, probabilities, or None."""
    if not _zoned(zh, zc, z_h, z_c):
        return None
    return (zh if zh is not None else (z_h or None), zc if zc is not None else (z_c or None))


def _rmask(rmask: Optional[Tensor], w_hh: Tensor) -> Optional[Tensor]:
    """The recurrent dropout mask as the kernels read it: [D, B, P] contiguous, W_hh's dtype."""
    return None if rmask is None else rmask.to(w_hh.dtype).contiguous()


@torch.library.custom_op("fastrnn::recurrence", mutates_args=())
def recurrence_op(x: Tensor, w_ih: Tensor, b_x: Optional[Tensor], h0: Tensor,
                  c0: Optional[Tensor], w_hh: Tensor, b_hn: Optional[Tensor],
                  w_hr: Optional[Tensor], lengths: Optional[Tensor], mode: int, batch_first: bool,
                  save: bool, strategy: str, resets: Optional[Tensor] = None, clip: float = 0.0,
                  rmask: Optional[Tensor] = None, zh: Optional[Tensor] = None,
                  zc: Optional[Tensor] = None, z_h: float = 0.0, z_c: float = 0.0
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward op (no autograd of its own: ``recurrence`` below is the differentiable
    entry point). ``clip`` changes only the backward; the op takes it so that its autograd
    sees it."""
    y, hn, cn, gates, cell = _forward_outputs(mode, x, h0, w_hh, batch_first, save,
                                              _zoned(zh, zc, z_h, z_c))
    T, B = x.shape[0], x.shape[1]
    if _empty(T, B, w_hh):  # nothing to compute: torch.nn's empty (or zero-width) results
        return y, hn, cn, gates, cell
    device = x.device
    the_plan = _plan(mode, B, w_hh, device, strategy)
    with gemm_precision(w_hh.dtype, device):
        xg = project(x, w_ih, b_x, batch_first)
    D, GH, P = w_hh.shape
    args = ForwardArgs(
        mode=mode, T=T, B=B, H=GH // _modes.NUM_GATES[mode], P=P, D=D,
        precision=select.precision(w_hh.dtype, device),
        xg=xg, h0=h0.contiguous(), c0=c0.contiguous() if c0 is not None else None,
        w_hh=w_hh.contiguous(), b_hn=b_hn.contiguous() if b_hn is not None else None,
        w_hr=w_hr.contiguous() if w_hr is not None else None, lengths=_lengths(lengths, device),
        y=y, hn=hn, cn=_some(cn), gates=_some(gates), cell=_some(cell), save=save,
        resets=_resets(resets), rmask=_rmask(rmask, w_hh), zh=_zone_masks(zh),
        zc=_zone_masks(zc), z_h=float(z_h), z_c=float(z_c))
    dispatch.launch(the_plan.strategy, "fwd", args, the_plan)
    return y, hn, cn, gates, cell


@recurrence_op.register_fake
def _(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first, save, strategy,
      resets=None, clip=0.0, rmask=None, zh=None, zc=None, z_h=0.0, z_c=0.0):
    return _forward_outputs(mode, x, h0, w_hh, batch_first, save, _zoned(zh, zc, z_h, z_c))


# Which gradients the backward op computes: a bit per differentiable input of ``recurrence``.
GRAD_X, GRAD_W_IH, GRAD_B_X, GRAD_H0, GRAD_C0, GRAD_W_HH, GRAD_B_HN, GRAD_W_HR = (
    1 << i for i in range(8))


def _backward_outputs(mode, dy, x, w_ih, h0, w_hh, w_hr, has_b_x, has_b_hn, wanted, groups=1):
    """Empty tensors for the gradients not wanted (an op cannot return None)."""
    D, GH, P = w_hh.shape
    H = GH // _modes.NUM_GATES[mode]
    dtype, device = dy.dtype, dy.device
    lead = (groups,) if groups > 1 else ()

    def out(bit, *shape):
        return torch.empty(shape if wanted & bit else (0,), dtype=dtype, device=device)

    return (out(GRAD_X, *x.shape), out(GRAD_W_IH, *lead, *w_ih.shape),
            out(GRAD_B_X if has_b_x else 0, *lead, w_ih.shape[0]),
            out(GRAD_H0, *h0.shape), out(GRAD_C0 if mode == _modes.LSTM else 0, D, h0.shape[1], H),
            out(GRAD_W_HH, *lead, *w_hh.shape), out(GRAD_B_HN if has_b_hn else 0, *lead, D, H),
            out(GRAD_W_HR if w_hr is not None else 0, *lead, D, P, H))


def _previous_states(y: Tensor, h0: Tensor, resets: Optional[Tensor] = None,
                     rmask: Optional[Tensor] = None) -> Tensor:
    """[T, B, D, P]: the state each step started from (h_{t-1} forward, h_{t+1} reverse; h0 at
    an episode start), as the recurrent product saw it (times ``rmask``)."""
    from ..reference import entering_resets

    D, _, P = h0.shape
    y4 = y.unflatten(-1, (D, P))
    prev = [torch.cat([h0[0].unsqueeze(0), y4[:-1, :, 0]], dim=0)]
    if D == 2:
        prev.append(torch.cat([y4[1:, :, 1], h0[1].unsqueeze(0)], dim=0))
    if resets is not None:
        prev = [torch.where(entering_resets(resets, d)[:, :, None], h0[d], p)
                for d, p in enumerate(prev)]
    if rmask is not None:
        prev = [p * rmask[d] for d, p in enumerate(prev)]
    return torch.stack(prev, dim=2)


def _previous_cells(cell: Tensor, c0: Tensor, resets: Optional[Tensor] = None) -> Tensor:
    """[T, B, D, H]: the cell state each step started from (as ``_previous_states``)."""
    from ..reference import entering_resets

    c0 = c0.to(cell.dtype)
    prev = [torch.cat([c0[0].unsqueeze(0), cell[:-1, :, 0]], dim=0)]
    if cell.shape[2] == 2:
        prev.append(torch.cat([cell[1:, :, 1], c0[1].unsqueeze(0)], dim=0))
    if resets is not None:
        prev = [torch.where(entering_resets(resets, d)[:, :, None], c0[d], p)
                for d, p in enumerate(prev)]
    return torch.stack(prev, dim=2)


def backward_impl(dy, dhn, dcn, x, w_ih, y, h0, c0, gates, cell, w_hh, w_hr, lengths, mode,
                  batch_first, has_b_x, has_b_hn, wanted, strategy, resets=None, clip=0.0,
                  dcell=None, rmask=None, zh=None, zc=None, z_h=0.0, z_c=0.0, groups=1):
    """The backward op's work. ``groups`` > 1 (vmap) sums the weight gradients per group of
    consecutive batch rows instead of over the whole batch, giving them a leading group dim.
    ``dcell`` is the gradient of every step's cell state (``return_states``) or None."""
    grads = _backward_outputs(mode, dy, x, w_ih, h0, w_hh, w_hr, has_b_x, has_b_hn, wanted,
                              groups)
    d_x, d_w_ih, d_b_x, dh0, dc0, d_w_hh, d_b_hn, d_w_hr = grads
    T, B = dy.shape[0], dy.shape[1]
    D, GH, P = w_hh.shape
    H = GH // _modes.NUM_GATES[mode]
    device = dy.device
    if _empty(T, B, w_hh):  # no step, row or unit: every gradient is zero (or empty)
        for g in grads:
            g.zero_()
        return grads
    the_plan = _plan(mode, B, w_hh, device, strategy)
    is_lstm = mode == _modes.LSTM
    dgx = torch.empty(T, B, D * GH, dtype=dy.dtype, device=device)
    dgh = torch.empty(T, B, D * GH, dtype=dy.dtype, device=device) if mode == _modes.GRU else None
    dhp = torch.empty(T, B, D * P, dtype=dy.dtype, device=device) if w_hr is not None else None
    dh0_k = dh0 if wanted & GRAD_H0 else torch.empty_like(h0)
    dc0_k = (dc0 if wanted & GRAD_C0 else torch.empty_like(c0)) if is_lstm else None
    args = BackwardArgs(
        mode=mode, T=T, B=B, H=H, P=P, D=D, precision=select.precision(w_hh.dtype, device),
        dy=dy.contiguous(), dhn=dhn.contiguous(), dcn=dcn.contiguous() if is_lstm else None,
        y=y, h0=h0.contiguous(), c0=c0.contiguous() if is_lstm else None,
        gates=_some(gates), cell=_some(cell), w_hh=w_hh.contiguous(),
        w_hr=w_hr.contiguous() if w_hr is not None else None, lengths=_lengths(lengths, device),
        dgx=dgx, dgh=dgh, dhp=dhp, dh0=dh0_k, dc0=dc0_k, resets=_resets(resets),
        dcell=dcell.contiguous() if is_lstm and _some(dcell) is not None else None,
        clip=float(clip), rmask=_rmask(rmask, w_hh), zh=_zone_masks(zh), zc=_zone_masks(zc),
        z_h=float(z_h), z_c=float(z_c))
    dispatch.launch(the_plan.strategy, "bwd", args, the_plan)

    # Everything parallel over time: whole-sequence GEMMs (per group of rows under vmap).
    def rows(t, width):
        """[T, B, width] -> [groups, T * B / groups, width]."""
        return t.reshape(T, groups, B // groups, width).transpose(0, 1).reshape(
            groups, T * (B // groups), width)

    def done(t):
        return t if groups > 1 else t[0]

    grads = list(grads)
    with gemm_precision(w_hh.dtype, device):
        if wanted & GRAD_X:
            grads[0] = torch.matmul(dgx, w_ih)  # time-major, like the x the op was given
        if wanted & (GRAD_W_IH | GRAD_B_X):
            g = rows(dgx, D * GH)
            if wanted & GRAD_W_IH:
                grads[1] = done(torch.bmm(g.transpose(1, 2), rows(x, x.shape[-1])))
            if has_b_x and wanted & GRAD_B_X:
                grads[2] = done(g.sum(dim=1))
        dgh4 = (dgh if dgh is not None else dgx).view(T, B, D, GH)
        if wanted & (GRAD_W_HH | GRAD_B_HN):
            g = rows(dgh4.reshape(T, B, D * GH), D * GH).unflatten(-1, (D, GH))
            if wanted & GRAD_W_HH:
                prev = rows(_previous_states(y, h0, resets, rmask).reshape(T, B, D * P),
                            D * P).unflatten(
                    -1, (D, P))
                grads[5] = done(torch.einsum("nrdg,nrdp->ndgp", g, prev))
            if has_b_hn and wanted & GRAD_B_HN:
                grads[6] = done(g[..., 2 * H:].sum(dim=1))
        if w_hr is not None and wanted & GRAD_W_HR:
            o = gates[..., 3 * H:4 * H]
            c_new = cell
            if _zoned(zh, zc, z_h, z_c):  # r = o * tanh(c~), c~ = f * c_{t-1} + i * g unzoned
                i_, f_, g_ = (gates[..., k * H:(k + 1) * H].to(cell.dtype) for k in range(3))
                c_new = f_ * _previous_cells(cell, c0, resets) + i_ * g_
            r = (o.to(cell.dtype) * torch.tanh(c_new)).to(y.dtype)
            grads[7] = done(torch.einsum(
                "nrdp,nrdh->ndph", rows(dhp, D * P).unflatten(-1, (D, P)),
                rows(r.reshape(T, B, D * H), D * H).unflatten(-1, (D, H))))
    return tuple(g.contiguous() for g in grads)


@torch.library.custom_op("fastrnn::recurrence_backward", mutates_args=())
def recurrence_backward(dy: Tensor, dhn: Tensor, dcn: Optional[Tensor], x: Tensor, w_ih: Tensor,
                        y: Tensor, h0: Tensor, c0: Optional[Tensor], gates: Tensor, cell: Tensor,
                        w_hh: Tensor, w_hr: Optional[Tensor], lengths: Optional[Tensor],
                        mode: int, batch_first: bool, has_b_x: bool, has_b_hn: bool, wanted: int,
                        strategy: str, resets: Optional[Tensor] = None, clip: float = 0.0,
                        dcell: Optional[Tensor] = None, rmask: Optional[Tensor] = None,
                        zh: Optional[Tensor] = None, zc: Optional[Tensor] = None,
                        z_h: float = 0.0, z_c: float = 0.0
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr), those ``wanted`` (GRAD_* bits);
    the others come back empty. ``x`` and ``dx`` are time-major views, as in the forward op."""
    return backward_impl(dy, dhn, dcn, x, w_ih, y, h0, c0, gates, cell, w_hh, w_hr, lengths,
                         mode, batch_first, has_b_x, has_b_hn, wanted, strategy, resets, clip,
                         dcell, rmask, zh, zc, z_h, z_c)


@recurrence_backward.register_fake
def _(dy, dhn, dcn, x, w_ih, y, h0, c0, gates, cell, w_hh, w_hr, lengths, mode, batch_first,
      has_b_x, has_b_hn, wanted, strategy, resets=None, clip=0.0, dcell=None, rmask=None,
      zh=None, zc=None, z_h=0.0, z_c=0.0):
    return _backward_outputs(mode, dy, x, w_ih, h0, w_hh, w_hr, has_b_x, has_b_hn, wanted)


# ---------------------------------------------------------------------------------------------
# vmap (torch.func): a vmapped dimension folds into the batch where the weights are shared, so a
# batched call is one kernel launch; where the weights themselves are batched (an ensemble of
# models through torch.func.stack_module_state) each model runs in turn.

def _fold(t: Optional[Tensor], bdim: Optional[int], n: int, batch_dim: int) -> Optional[Tensor]:
    """``t`` with its vmapped dimension ``bdim`` (None: shared) merged into its batch dimension
    (sample-major: row ``i * B + b`` is sample ``i``'s row ``b``)."""
    if t is None:
        return None
    if bdim is None:
        t = t.unsqueeze(0).expand(n, *t.shape)
        bdim = 0
    t = t.movedim(bdim, 0).movedim(0, batch_dim)
    return t.reshape(*t.shape[:batch_dim], -1, *t.shape[batch_dim + 2:])


def _unfold(t: Tensor, n: int, batch_dim: int):
    """(tensor, out_dim): the inverse of ``_fold`` for an output; empty placeholders stay
    unbatched."""
    if t.dim() <= batch_dim or not t.numel() and t.dim() == 1:
        return t, None
    shape = t.shape
    return t.reshape(*shape[:batch_dim], n, shape[batch_dim] // n, *shape[batch_dim + 1:]), \
        batch_dim


def _per_sample(op, n: int, in_dims, args):
    """One call per vmapped index (weights batched): outputs stacked along dim 0."""
    outs = []
    for i in range(n):
        outs.append(op(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]))
    stacked = tuple(torch.stack(list(o)) for o in zip(*outs))
    return stacked, (0,) * len(stacked)


def _strategy_for(strategy: str, mode: int, B: int, w_hh: Tensor, device) -> str:
    """The recorded strategy if it can run the folded batch too, else the choice for it (the
    forward and backward rules decide alike)."""
    if not strategy:
        return ""
    try:
        _plan(mode, B, w_hh, device, strategy)
        return strategy
    except RuntimeError:
        return ""


@recurrence_op.register_vmap
def _(info, in_dims, x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first, save,
      strategy, resets=None, clip=0.0, rmask=None, zh=None, zc=None, z_h=0.0, z_c=0.0):
    n = info.batch_size
    args = (x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first, save, strategy,
            resets, clip, rmask, zh, zc, z_h, z_c)
    in_dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    if any(in_dims[i] is not None for i in (1, 2, 5, 6, 7)):
        return _per_sample(recurrence_op, n, in_dims, args)
    x = _fold(x, in_dims[0], n, 1).contiguous()      # time-major [T, N*B, I]
    h0 = _fold(h0, in_dims[3], n, 1)
    c0 = _fold(c0, in_dims[4], n, 1)
    lengths = _fold(lengths, in_dims[8], n, 0)
    resets = _fold(resets, in_dims[13], n, 1)        # time-major [T, N*B]
    rmask = _fold(rmask, in_dims[15], n, 1)          # [D, N*B, P]
    zh, zc = _fold(zh, in_dims[16], n, 1), _fold(zc, in_dims[17], n, 1)   # [T, N*B, D, .]
    strategy = _strategy_for(strategy, mode, x.shape[1], w_hh, x.device)
    y, hn, cn, gates, cell = recurrence_op(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths,
                                           mode, False, save, strategy, resets, clip, rmask,
                                           zh, zc, z_h, z_c)
    outs = [_unfold(t, n, 1) for t in (y, hn, cn, gates, cell)]
    return tuple(o for o, _ in outs), tuple(d for _, d in outs)


@torch.library.register_vmap("fastrnn::recurrence_backward")
def _(info, in_dims, dy, dhn, dcn, x, w_ih, y, h0, c0, gates, cell, w_hh, w_hr, lengths, mode,
      batch_first, has_b_x, has_b_hn, wanted, strategy, resets=None, clip=0.0, dcell=None,
      rmask=None, zh=None, zc=None, z_h=0.0, z_c=0.0):
    n = info.batch_size
    args = (dy, dhn, dcn, x, w_ih, y, h0, c0, gates, cell, w_hh, w_hr, lengths, mode,
            batch_first, has_b_x, has_b_hn, wanted, strategy, resets, clip, dcell, rmask,
            zh, zc, z_h, z_c)
    in_dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    if any(in_dims[i] is not None for i in (4, 10, 11)):
        return _per_sample(recurrence_backward, n, in_dims, args)
    weights = (4, 10, 11)                           # w_ih, w_hh, w_hr: shared here
    folded = [t if i in weights or t is None or (d is None and not t.numel())
              else _fold(t, d, n, 0 if i == 12 else 1)
              for i, (t, d) in enumerate(zip(args[:13], in_dims[:13]))]
    dy, dhn, dcn, x, w_ih, y, h0, c0, gates, cell, w_hh, w_hr, lengths = folded
    resets = _fold(resets, in_dims[19], n, 1)        # [T, N*B]
    dcell = _fold(dcell, in_dims[21], n, 1)          # [T, N*B, D, H]
    rmask = _fold(rmask, in_dims[22], n, 1)          # [D, N*B, P]
    zh, zc = _fold(zh, in_dims[23], n, 1), _fold(zc, in_dims[24], n, 1)
    strategy = _strategy_for(strategy, mode, dy.shape[1], w_hh, dy.device)
    # One launch for every sample; the weight gradients are summed per sample (groups).
    grads = backward_impl(dy.contiguous(), dhn, dcn, x, w_ih, y.contiguous(), h0, c0,
                          gates.contiguous(), cell.contiguous(), w_hh, w_hr, lengths, mode,
                          batch_first, has_b_x, has_b_hn, wanted, strategy, resets, clip,
                          dcell, rmask, zh, zc, z_h, z_c, groups=n)
    out, dims = [], []
    for i, g in enumerate(grads):
        if i in (0, 3, 4):                          # dx, dh0, dc0: per row of the batch
            g, d = _unfold(g, n, 1)
        else:                                       # weight gradients: a leading sample dim
            d = 0 if g.numel() or g.dim() > 1 else None
        out.append(g)
        dims.append(d)
    return tuple(out), tuple(dims)


class Recurrence(torch.autograd.Function):
    """Autograd of the recurrence op, as a torch.autograd.Function so that torch.func's
    transforms (grad, vjp, jacrev, jacfwd, vmap of any of them) work through it: they refuse the
    Function torch.library generates for ``register_autograd`` (it has no ``setup_context``).
    vmap goes through to the ops' own vmap rules (``generate_vmap_rule``); torch.compile traces
    the Function and keeps the ops opaque."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first, save,
                strategy, resets, clip, rmask, zh, zc, z_h, z_c):
        return recurrence_op(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first,
                             save, strategy, resets, clip, rmask, zh, zc, z_h, z_c)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first, save,
         strategy, resets, clip, rmask, zh, zc, z_h, z_c) = (
             tuple(inputs) + (None, 0.0, None, None, None, 0.0, 0.0)[len(inputs) - 13:])
        y, _, _, gates, cell = output
        ctx.mode = mode
        ctx.batch_first = batch_first
        ctx.saved_activations = save
        ctx.clip = clip
        ctx.zone = (z_h, z_c)
        # The strategy the forward ran (resolved now if the caller left it to the op): the
        # backward runs the same one, whichever thread autograd runs it on.
        ctx.strategy = strategy or (_plan(mode, x.shape[1], w_hh, x.device, "").strategy
                                    if not _empty(x.shape[0], x.shape[1], w_hh) else "")
        ctx.has_b_x = b_x is not None
        ctx.has_b_hn = b_hn is not None
        # Every step's cell state (an LSTM's ``cell``, where saved) is differentiable:
        # return_states hands it out.
        ctx.cell_differentiable = mode == _modes.LSTM and cell.numel() > 0
        if ctx.cell_differentiable:
            ctx.mark_non_differentiable(gates)
        else:
            ctx.mark_non_differentiable(gates, cell)
        ctx.save_for_backward(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, resets, rmask,
                              zh, zc, y, gates, cell)
        ctx.save_for_forward(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, resets, rmask, zh,
                             zc)

    @staticmethod
    def backward(ctx, dy, dhn, dcn, _dgates, dcell):
        (x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, resets, rmask, zh, zc, y, gates,
         cell) = ctx.saved_tensors
        mode = ctx.mode
        if dy is None:
            dy = torch.zeros_like(y)
        if dhn is None:
            dhn = torch.zeros_like(h0)
        if mode == _modes.LSTM and dcn is None:
            dcn = torch.zeros_like(c0)
        if not ctx.saved_activations and mode in (_modes.LSTM, _modes.GRU):
            raise RuntimeError("fastrnn: backward through a recurrence run without saved "
                               "activations (it ran under no_grad or with inputs not requiring "
                               "grad)")
        if dcell is not None and (mode != _modes.LSTM or not dcell.numel()):
            dcell = None
        needs = ctx.needs_input_grad
        wanted = sum(1 << i for i in range(8) if needs[i])
        grads = RecurrenceBackward.apply(
            dy, dhn, dcn if mode == _modes.LSTM else None, x, w_ih, b_x, y, h0, c0, gates, cell,
            w_hh, b_hn, w_hr, lengths, mode, ctx.batch_first, wanted, ctx.strategy, resets,
            ctx.clip, dcell, rmask, zh, zc, *ctx.zone)
        present = (x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr)
        out = [g if needs[i] and present[i] is not None else None for i, g in enumerate(grads)]
        return tuple(out) + (None,) * 12

    @staticmethod
    def jvp(ctx, *tangents):
        """Forward-mode AD (jvp, jacfwd): fastrnn's kernels have no forward-mode pass, so the
        tangents come from the plain-PyTorch reference (slow, exact). torch.nn has none at all
        on the CPU or cuDNN."""
        from ..reference import recurrence_reference

        primals = ctx.saved_tensors
        x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, resets, rmask, zh, zc = primals
        mode, batch_first = ctx.mode, ctx.batch_first
        present = [i for i in range(8) if primals[i] is not None]

        def f(*args):
            full = list(primals[:8])
            for i, a in zip(present, args):
                full[i] = a
            xg = project(full[0], full[1], full[2], batch_first)
            y, hn, cn, cells = recurrence_reference(mode, xg, full[3], full[4], full[5], full[6],
                                                    full[7], lengths, resets, states=True,
                                                    rmask=rmask,
                                                    zoneout=_zone_spec(zh, zc, *ctx.zone))
            return (y, hn) if cn is None else (y, hn, cn, cells)

        tangent_in = [tangents[i] if tangents[i] is not None else torch.zeros_like(primals[i])
                      for i in present]
        _, out = torch.func.jvp(f, tuple(primals[i] for i in present), tuple(tangent_in))
        dy, dhn = out[0], out[1]
        dcell = None
        if mode == _modes.LSTM:
            dcn = out[2]
            if ctx.saved_activations and ctx.cell_differentiable:
                dcell = out[3].to(acc_dtype(out[3].dtype))  # every step's cell state
        else:  # the forward's c_n is empty, [0, B, H]
            dcn = dhn.new_zeros(0, dhn.shape[1], w_hh.shape[1] // _modes.NUM_GATES[mode])
        return dy, dhn, dcn, None, dcell


def recurrence(x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode: int, batch_first: bool,
               save: bool, strategy: str, resets: Optional[Tensor] = None, clip: float = 0.0,
               rmask: Optional[Tensor] = None, zh: Optional[Tensor] = None,
               zc: Optional[Tensor] = None, z_h: float = 0.0, z_c: float = 0.0):
    """The differentiable recurrence of one layer (all its directions); see the module docstring.
    Returns ``(y, h_n, c_n, gates, cell)``.

    Eagerly (and under torch.func) this is the ``Recurrence`` Function. torch.compile cannot trace
    a Function with a custom jvp, so there the op runs with the same autograd registered on it
    (``register_autograd``), which torch.compile keeps opaque."""
    args = (x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, lengths, mode, batch_first, save, strategy,
            resets, float(clip or 0.0), rmask, zh, zc, float(z_h or 0.0), float(z_c or 0.0))
    if torch.compiler.is_compiling():
        return recurrence_op(*args)
    return Recurrence.apply(*args)


torch.library.register_autograd("fastrnn::recurrence", Recurrence.backward,
                                setup_context=Recurrence.setup_context)


class RecurrenceBackward(torch.autograd.Function):
    """The backward of a recurrence as a differentiable function. Its forward is the backward
    op (kernels and GEMMs), so every first-order gradient runs on fastrnn's kernels, under
    torch.func's transforms too (which always record a differentiable backward). Its own
    backward, reached only for derivatives of gradients (gradient penalties, Hessian-vector
    products, grad of grad), differentiates the plain-PyTorch reference recomputed from the saved
    inputs: slow, but exact. The saved activations (y, gates, cell) get no gradient: the
    recomputation accounts for their dependence on the inputs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dy, dhn, dcn, x, w_ih, b_x, y, h0, c0, gates, cell, w_hh, b_hn, w_hr, lengths,
                mode, batch_first, wanted, strategy, resets, clip, dcell, rmask, zh, zc, z_h, z_c):
        return recurrence_backward(dy, dhn, dcn, x, w_ih, y, h0, c0, gates, cell, w_hh, w_hr,
                                   lengths, mode, batch_first, b_x is not None,
                                   b_hn is not None, wanted, strategy, resets, clip, dcell, rmask,
                                   zh, zc, z_h, z_c)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (dy, dhn, dcn, x, w_ih, b_x, _, h0, c0, _, _, w_hh, b_hn, w_hr, lengths, mode,
         batch_first, wanted, _, resets, clip, dcell, rmask, zh, zc, z_h, z_c) = inputs
        ctx.mode, ctx.batch_first, ctx.wanted, ctx.clip = mode, batch_first, wanted, clip
        ctx.zone = (z_h, z_c)
        ctx.save_for_backward(dy, dhn, dcn, x, w_ih, b_x, h0, c0, w_hh, b_hn, w_hr, dcell,
                              lengths, resets, rmask, zh, zc)

    @staticmethod
    def backward(ctx, *grad_grads):
        from ..reference import recurrence_reference

        if ctx.clip:
            # The clip is part of the backward program, not of the forward's maths: autograd of
            # a gradient-clamping node would clamp the second-order adjoints that flow along the
            # forward's edges too, giving a wrong answer. Refuse rather than compute it.
            raise RuntimeError(
                "fastrnn: derivatives of gradients (double backward, create_graph=True) through "
                "a layer with recurrent_grad_clip are not supported: the clipped gradient is not "
                "the derivative of anything autograd can differentiate again. Set "
                "recurrent_grad_clip=None for gradient penalties or Hessian products.")
        saved = ctx.saved_tensors
        # dy, dhn, dcn, the op's 8 inputs, dcell: what the first-order gradients depend on.
        wrt, (lengths, resets, rmask, zh, zc) = list(saved[:12]), saved[12:]
        zoneout = _zone_spec(zh, zc, *ctx.zone)
        mode, batch_first, wanted, clip = ctx.mode, ctx.batch_first, ctx.wanted, ctx.clip
        present = [i for i, t in enumerate(wrt) if t is not None]
        # The first-order gradients this Function returned (GRAD_* bits of present inputs).
        firsts = [j for j in range(8) if wrt[3 + j] is not None and wanted >> j & 1]

        def first_order(*args):
            """The gradients of the recurrence's inputs, as a function of (dy, dhn, dcn, inputs,
            dcell): autograd of the plain-PyTorch reference. torch.func.vjp keeps every argument
            independent, so derivatives are partial, as a backward must return them."""
            full = [None] * 12
            for i, a in zip(present, args):
                full[i] = a
            ins = full[3:11]
            live = [j for j in range(8) if ins[j] is not None]

            def reference(*ps):
                xs = list(ins)
                for j, p in zip(live, ps):
                    xs[j] = p
                xg = project(xs[0], xs[1], xs[2], batch_first)
                y, hn, cn, cells = recurrence_reference(mode, xg, xs[3], xs[4], xs[5], xs[6],
                                                        xs[7], lengths, resets, clip, states=True,
                                                        rmask=rmask, zoneout=zoneout)
                if cn is None:
                    return y, hn
                return (y, hn, cn) if full[11] is None else (y, hn, cn, cells)

            outs, pull = torch.func.vjp(reference, *[ins[j] for j in live])
            ups = (full[0], full[1]) if mode != _modes.LSTM else (full[0], full[1], full[2])
            if len(outs) == 4:
                ups += (full[11].to(outs[3].dtype),)
            got = dict(zip(live, pull(ups)))
            return tuple(got[j] for j in firsts)

        _, pull = torch.func.vjp(first_order, *[wrt[i] for i in present])
        cotangents = tuple(grad_grads[j] if grad_grads[j] is not None and grad_grads[j].numel()
                           else torch.zeros_like(wrt[3 + j]) for j in firsts)
        d = [None] * 12
        for i, g in zip(present, pull(cotangents)):
            d[i] = g
        # Inputs: dy, dhn, dcn, x, w_ih, b_x, y, h0, c0, gates, cell, w_hh, b_hn, w_hr, lengths,
        # four non-tensors, resets, clip, dcell, rmask, zh, zc, z_h, z_c.
        return (d[0], d[1], d[2], d[3], d[4], d[5], None, d[6], d[7], None, None, d[8], d[9],
                d[10], None, None, None, None, None, None, None, d[11], None, None, None, None,
                None)
