"""``fastrnn.convert(model)`` and ``fastrnn.to_torch(model)``: swap torch.nn's recurrent layers for
fastrnn's twins and back, in place.

A swapped module is the same object state under another class: it keeps the very Parameter
objects (so an optimizer built before the swap keeps working), buffers, hooks, train/eval mode,
device, dtype and every constructor argument (``proj_size`` included). Only exact torch.nn classes
are swapped (a user's subclass of ``nn.LSTM`` has its own behaviour and is left alone), and
parametrized modules (``torch.nn.utils.parametrize``, e.g. ``weight_norm``) keep their
parametrizations.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from . import modules

TO_FASTRNN: dict[type, type] = {
    nn.RNN: modules.RNN,
    nn.LSTM: modules.LSTM,
    nn.GRU: modules.GRU,
    nn.RNNCell: modules.RNNCell,
    nn.LSTMCell: modules.LSTMCell,
    nn.GRUCell: modules.GRUCell,
}
TO_TORCH: dict[type, type] = {v: k for k, v in TO_FASTRNN.items()}

_CLASS_ATTRS = ("__dict__", "__weakref__", "__module__", "__doc__", "__qualname__")


def _target_class(module: nn.Module, mapping: dict[type, type]) -> type | None:
    cls = type(module)
    if not parametrize.is_parametrized(module):
        return mapping.get(cls)
    # parametrize swapped the module's class for a generated subclass holding the properties.
    base = cls.__bases__[0]
    if base not in mapping:
        return None
    target = mapping[base]
    extra = {k: v for k, v in cls.__dict__.items() if k not in _CLASS_ATTRS}
    return type(f"Parametrized{target.__name__}", (target,), extra)


def _swap(module: nn.Module, mapping: dict[type, type]) -> nn.Module:
    target = _target_class(module, mapping)
    if target is not None:
        new = target.__new__(target)
        # Share, not copy: same Parameters, hook dicts (so hook handles stay valid), flags.
        new.__dict__.update(module.__dict__)
        if mapping is TO_TORCH and isinstance(new, nn.RNNBase):
            new.flatten_parameters()  # cuDNN wants its packed weight layout
        return new
    for name, child in list(module.named_children()):
        new_child = _swap(child, mapping)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert(module: nn.Module) -> nn.Module:
    """Replace, in place and recursively, every torch.nn RNN/LSTM/GRU and cell in ``module``
    with its fastrnn twin. Returns ``module`` (or its twin, if ``module`` itself is one)."""
    return _swap(module, TO_FASTRNN)


def to_torch(module: nn.Module) -> nn.Module:
    """The way back: replace every fastrnn layer and cell with its torch.nn class. A layer with
    an option torch.nn cannot express (``recurrent_grad_clip``, ``weight_dropout``,
    ``recurrent_dropout``, ``zoneout``), and a LayerNorm layer, is refused, before anything is
    swapped."""
    for name, m in module.named_modules():
        where = f" ({name})" if name else ""
        if isinstance(m, modules._LayerNormParams):
            raise ValueError(f"fastrnn.to_torch: {type(m).__name__}{where} has LayerNorm "
                             "parameters, which torch.nn cannot express")
        if _target_class(m, TO_TORCH) is None:
            continue
        for option, off in _OPTIONS:
            value = getattr(m, option, off)
            if value != off:
                raise ValueError(
                    f"fastrnn.to_torch: {type(m).__name__}{where} has {option}={value}, which "
                    f"torch.nn cannot express; set it to {off} to convert it")
    return _swap(module, TO_TORCH)


# fastrnn's options beyond torch.nn, with the value that turns each off.
_OPTIONS = (("recurrent_grad_clip", None), ("weight_dropout", 0.0), ("recurrent_dropout", 0.0),
            ("zoneout", 0.0))
