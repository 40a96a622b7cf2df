"""Typed Python wrappers of torch.ops.mmfree.* with their fake kernels and autograd.

Importing this package registers the fake (meta) kernels and autograd formulas; the
native schemas and CPU/CUDA kernels are registered by importing mmfree_ext._C.
"""

from .. import _native  # noqa: F401  (registers the native schemas before the fakes below)
from .mlgru import mlgru_scan
from .pack import quantize_ternary, unpack_ternary

__all__ = ["mlgru_scan", "quantize_ternary", "unpack_ternary"]
