"""fastrnn: drop-in torch.nn.RNN / LSTM / GRU whose recurrences run in fused Triton kernels."""

from .backend import get_backend, use_kernels
from .convert import convert, to_torch
from .explain import explain
from .modules import (GRU, LSTM, RNN, GRUCell, LayerNormGRU, LayerNormGRUCell, LayerNormLSTM,
                      LayerNormLSTMCell, LSTMCell, RNNCell)
from .ops.dispatch import force_strategy, select_strategy

__version__ = "0.1.0"

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "LayerNormLSTM",
           "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell", "convert", "to_torch",
           "explain", "force_strategy", "select_strategy", "get_backend", "use_kernels",
           "__version__"]
