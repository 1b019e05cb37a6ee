"""Quantized linear kernels: the pure-torch reference (the definition) and the backend dispatch."""

from lowbit.kernels.dispatch import BACKENDS, BackendError, qlinear
from lowbit.kernels.reference import KernelInputError

__all__ = ["BACKENDS", "BackendError", "KernelInputError", "qlinear"]
