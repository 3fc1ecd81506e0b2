"""Triton recurrence kernels and the ``fastrnn::recurrence`` custom op."""
