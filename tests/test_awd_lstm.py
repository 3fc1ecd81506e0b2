"""A real client of ``weight_dropout``: a language model with AWD-LSTM's published structure
(Merity et al., salesforce/awd-lstm-lm: three LSTM layers, embedding dropout, locked dropout on
the input, between layers and on the output, DropConnect on every W_hh, tied decoder weights),
trained a few steps on the CPU under the interpreter. Its losses match the same model built from
``torch.lstm_cell`` loops (what torch.nn's LSTMCell runs) with the same masks, step after step.

The masks are the same because both models draw them from torch's generator in the same order:
the embedding mask, the input's locked mask, then per layer its W_hh mask (fastrnn's layer draws
``fastrnn.reference.dropout_masks``; the loop draws it with the same call) and the next locked
mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastrnn
from fastrnn.reference import dropout_masks
from tests.parity import DEVICE, through_kernels

DT = torch.float64


def locked_dropout(x, p, training):
    """AWD-LSTM's LockedDropout: one mask per sequence, the same at every step."""
    if not training or not p:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


def embedded_dropout(embed, words, p, training):
    """AWD-LSTM's embedding dropout: whole words dropped from the embedding matrix."""
    weight = embed.weight
    if training and p:
        weight = weight * (weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p))
    return F.embedding(words, weight)


class CellLoopLSTM(nn.Module):
    """The twin of ``fastrnn.LSTM(I, H, weight_dropout=p)``: the same parameters, a Python loop
    over ``torch.lstm_cell`` with W_hh masked once per call."""

    def __init__(self, I, H, weight_dropout):
        super().__init__()
        self.weight_ih_l0 = nn.Parameter(torch.empty(4 * H, I))
        self.weight_hh_l0 = nn.Parameter(torch.empty(4 * H, H))
        self.bias_ih_l0 = nn.Parameter(torch.empty(4 * H))
        self.bias_hh_l0 = nn.Parameter(torch.empty(4 * H))
        self.H, self.p = H, weight_dropout

    def forward(self, x):
        T, B, _ = x.shape
        w_hh = self.weight_hh_l0
        if self.training and self.p:
            ((wmask, _),) = dropout_masks(self.p, 0.0, 1, 1, 4, self.H, self.H, B, w_hh)
            w_hh = w_hh * wmask[0]
        h = c = x.new_zeros(B, self.H)
        out = []
        for t in range(T):
            h, c = torch.lstm_cell(x[t], (h, c), self.weight_ih_l0, w_hh, self.bias_ih_l0,
                                   self.bias_hh_l0)
            out.append(h)
        return torch.stack(out), (h, c)


class AWDLanguageModel(nn.Module):
    """AWD-LSTM's RNNModel (model.py) for ``rnn_type="LSTM"``, at toy sizes."""

    def __init__(self, layer, ntoken=23, ninp=6, nhid=8, nlayers=3, dropout=0.4, dropouth=0.25,
                 dropouti=0.65, dropoute=0.1, wdrop=0.5):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnns = nn.ModuleList([
            layer(ninp if k == 0 else nhid, nhid if k != nlayers - 1 else ninp, wdrop)
            for k in range(nlayers)])
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight  # tied weights
        self.p = dict(dropout=dropout, dropouth=dropouth, dropouti=dropouti, dropoute=dropoute)

    def forward(self, words):
        emb = embedded_dropout(self.encoder, words, self.p["dropoute"], self.training)
        x = locked_dropout(emb, self.p["dropouti"], self.training)
        for k, rnn in enumerate(self.rnns):
            x, _ = rnn(x)
            last = k == len(self.rnns) - 1
            x = locked_dropout(x, self.p["dropout" if last else "dropouth"], self.training)
        return self.decoder(x)


def _fastrnn_layer(I, H, wdrop):
    return fastrnn.LSTM(I, H, weight_dropout=wdrop)


def test_awd_lstm_language_model_trains_like_its_cell_loop_twin():
    torch.manual_seed(0)
    fast = AWDLanguageModel(_fastrnn_layer).to(DEVICE, DT)
    twin = AWDLanguageModel(CellLoopLSTM).to(DEVICE, DT)
    twin.load_state_dict(fast.state_dict())  # the same names: weight_hh_l0 and friends
    data = torch.randint(0, 23, (7, 3), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    inputs, targets = data[:-1], data[1:]
    optimisers = [torch.optim.SGD(m.parameters(), lr=5.0) for m in (fast, twin)]
    losses = {"fast": [], "twin": []}
    for step in range(3):
        for name, model, opt in (("fast", fast, optimisers[0]), ("twin", twin, optimisers[1])):
            torch.manual_seed(100 + step)  # the same masks for both models
            opt.zero_grad()
            if name == "fast":
                with through_kernels():
                    logits = model(inputs)
                    loss = F.cross_entropy(logits.reshape(-1, 23), targets.reshape(-1))
                    loss.backward()
            else:
                logits = model(inputs)
                loss = F.cross_entropy(logits.reshape(-1, 23), targets.reshape(-1))
                loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["fast"], losses["twin"], atol=1e-10, rtol=1e-10)
    assert losses["fast"][-1] < losses["fast"][0]  # it learns
    for a, b in zip(fast.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
