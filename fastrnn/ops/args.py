"""Typed arguments of the strategies' launchers: one frozen dataclass per pass.

Shapes (D directions, G gates, H hidden, P = proj_size or H, NSAVE saved activations per unit):
xg [T, B, D*G*H] (feature dim contiguous; time and batch through strides); h0 [D, B, P];
c0 [D, B, H]; w_hh [D, G*H, P]; b_hn [D, H]; w_hr [D, P, H]; lengths [B] int32 (packed input);
y [T, B, D*P] (time and batch through strides); hn [D, B, P]; cn [D, B, H];
gates [T, B, D, NSAVE*H]; cell [T, B, D, H] (accumulation dtype); resets [T, B] uint8 (time
and batch through strides: 1 where an episode starts); dcell [T, B, D, H] (the gradient of every
step's cell state, ``return_states``). Absent tensors are None.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from .. import _modes


@dataclasses.dataclass(frozen=True)
class _Common:
    mode: int
    T: int
    B: int
    H: int
    P: int
    D: int
    precision: str

    @property
    def G(self) -> int:
        return _modes.NUM_GATES[self.mode]

    @property
    def NSAVE(self) -> int:
        return _modes.NUM_SAVED[self.mode]

    @property
    def is_lstm(self) -> bool:
        return self.mode == _modes.LSTM

    def zone_args(self) -> dict:
        """Zoneout's kernel arguments: ZH / ZC are 0 (off), 1 (a mask per step) or 2 (eval: the
        probability as the factor, ``zf_ptr`` [2] in the accumulation dtype: filled on the
        device, so a CUDA graph can capture it)."""
        ZH = 1 if self.zh is not None else 2 if self.z_h else 0
        ZC = 1 if self.zc is not None else 2 if self.z_c else 0
        zf = None
        if ZH or ZC:  # the kernels' factor dtype even where the masks carry them
            zf = torch.empty(2, dtype=acc_dtype(self.w_hh.dtype), device=self.w_hh.device)
            zf[0].fill_(self.z_h)
            zf[1].fill_(self.z_c)
        return dict(zh_ptr=self.zh, zc_ptr=self.zc, zf_ptr=zf, ZH=ZH, ZC=ZC)

    def reset_args(self) -> dict:
        """The kernels' episode-start arguments (a null pointer without resets)."""
        r = self.resets
        return dict(rs_ptr=r, stride_rt=r.stride(0) if r is not None else 0,
                    stride_rb=r.stride(1) if r is not None else 0)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and LSTM cell-state) dtype: fp64 for fp64 layers, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclasses.dataclass(frozen=True)
class ForwardArgs(_Common):
    xg: Tensor
    h0: Tensor
    c0: Optional[Tensor]
    w_hh: Tensor
    b_hn: Optional[Tensor]
    w_hr: Optional[Tensor]
    lengths: Optional[Tensor]
    y: Tensor
    hn: Tensor
    cn: Optional[Tensor]
    gates: Optional[Tensor]      # saved activations (training only)
    cell: Optional[Tensor]       # saved cell states (LSTM, training only)
    save: bool
    resets: Optional[Tensor] = None
    rmask: Optional[Tensor] = None   # [D, B, P] recurrent dropout (W_hh's dtype)
    zh: Optional[Tensor] = None      # [T, B, D, P] uint8 zoneout keep mask of h (training)
    zc: Optional[Tensor] = None      # [T, B, D, H] uint8 zoneout keep mask of c (training)
    z_h: float = 0.0                 # zoneout probabilities (eval: the keep factors)
    z_c: float = 0.0

    @property
    def ACC(self):
        return tl_acc(self.w_hh.dtype)


@dataclasses.dataclass(frozen=True)
class BackwardArgs(_Common):
    dy: Tensor                   # [T, B, D*P] contiguous
    dhn: Tensor                  # [D, B, P]
    dcn: Optional[Tensor]        # [D, B, H] (LSTM)
    y: Tensor
    h0: Tensor
    c0: Optional[Tensor]
    gates: Optional[Tensor]
    cell: Optional[Tensor]
    w_hh: Tensor
    w_hr: Optional[Tensor]
    lengths: Optional[Tensor]
    dgx: Tensor                  # [T, B, D*G*H] gradients of the input projections
    dgh: Optional[Tensor]        # [T, B, D*G*H] gradients of W_hh h (+ b_hh) (GRU: they differ)
    dhp: Optional[Tensor]        # [T, B, D*P] total dh per step (proj_size: for dW_hr)
    dh0: Tensor
    dc0: Optional[Tensor]
    resets: Optional[Tensor] = None
    dcell: Optional[Tensor] = None   # [T, B, D, H] contiguous, accumulation dtype
    clip: float = 0.0                # recurrent_grad_clip (0: none)
    rmask: Optional[Tensor] = None   # [D, B, P] recurrent dropout (W_hh's dtype)
    zh: Optional[Tensor] = None      # [T, B, D, P] uint8 zoneout keep mask of h (training)
    zc: Optional[Tensor] = None      # [T, B, D, H] uint8 zoneout keep mask of c (training)
    z_h: float = 0.0                 # zoneout probabilities (eval: the keep factors)
    z_c: float = 0.0

    @property
    def ACC(self):
        return tl_acc(self.w_hh.dtype)
