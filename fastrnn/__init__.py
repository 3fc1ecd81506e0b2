"""fastrnn: drop-in torch.nn.RNN / LSTM / GRU whose recurrences run in fused Triton kernels."""

from .backend import get_backend, use_kernels
from .modules import GRU, LSTM, RNN
from .ops.recurrence import force_strategy, select_strategy

__version__ = "0.1.0"

__all__ = ["RNN", "LSTM", "GRU", "force_strategy", "select_strategy", "get_backend",
           "use_kernels", "__version__"]
