"""Typed Python wrappers of torch.ops.mmfree.* with their fake kernels and autograd.

Importing this package registers the fake (meta) kernels and autograd formulas; the
native schemas and CPU/CUDA kernels are registered by importing mmfree_ext._C.
"""

from .. import _native  # noqa: F401  (registers the native schemas before the fakes below)
from .act import silu_mul
from .bitlinear import bitlinear
from .decode import decode_step
from .dequant import dequantize_rows, quantize_rows_int8
from .glu import silu_mul_ternary_linear
from .loss import ternary_linear_cross_entropy
from .mlgru import mlgru_scan
from .norm import (
    rms_norm,
    rms_norm_quant,
    rms_norm_quant_multi,
    rms_norm_swish_gate,
    rms_norm_swish_gate_quant,
)
from .pack import quantize_ternary, unpack_ternary
from .ternary import (
    ternary_linear,
    ternary_linear_packed,
    ternary_matmul,
    ternary_matmul_grouped,
    ternary_matmul_t,
)

__all__ = [
    "bitlinear",
    "decode_step",
    "dequantize_rows",
    "mlgru_scan",
    "quantize_rows_int8",
    "quantize_ternary",
    "rms_norm",
    "rms_norm_quant",
    "rms_norm_quant_multi",
    "rms_norm_swish_gate",
    "rms_norm_swish_gate_quant",
    "silu_mul",
    "silu_mul_ternary_linear",
    "ternary_linear",
    "ternary_linear_cross_entropy",
    "ternary_linear_packed",
    "ternary_matmul",
    "ternary_matmul_grouped",
    "ternary_matmul_t",
    "unpack_ternary",
]
