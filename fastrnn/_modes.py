"""Cell types as small integers (what the kernels take as a compile-time constant)."""

RNN_TANH, RNN_RELU, LSTM, GRU = 0, 1, 2, 3

MODE_IDS = {"RNN_TANH": RNN_TANH, "RNN_RELU": RNN_RELU, "LSTM": LSTM, "GRU": GRU}
MODE_NAMES = {v: k for k, v in MODE_IDS.items()}

# Gates per hidden unit in the stacked weights (torch.nn order: LSTM i, f, g, o; GRU r, z, n).
NUM_GATES = {RNN_TANH: 1, RNN_RELU: 1, LSTM: 4, GRU: 3}

# Per-step activations saved for the backward pass, in units of hidden_size:
# LSTM i, f, g, o (and the cell state separately); GRU r, z, n and W_hn h + b_hn; RNN none
# (its backward reads h_t from the output).
NUM_SAVED = {RNN_TANH: 0, RNN_RELU: 0, LSTM: 4, GRU: 4}
