"""mmfree-ext: kernels and a model layer for MatMul-free language models.

Importing the package loads the native extension, which registers the custom ops
``torch.ops.mmfree.*`` (CPU and, where built, CUDA), and registers their fake kernels
and autograd formulas. The typed wrappers live in :mod:`mmfree_ext.ops`; a plain-PyTorch
implementation of everything is in :mod:`mmfree_ext.reference`.
"""

from __future__ import annotations

from . import _inductor_compat, nn, ops
from ._native import build_info, cpu_ext, cpu_features, cpu_isa, cuda_available, set_cpu_ext, set_cpu_isa
from .ops import (
    mlgru_scan,
    quantize_ternary,
    rms_norm,
    rms_norm_quant,
    rms_norm_quant_multi,
    rms_norm_swish_gate,
    rms_norm_swish_gate_quant,
    ternary_linear,
    ternary_linear_packed,
    ternary_matmul,
    ternary_matmul_grouped,
    ternary_matmul_t,
    unpack_ternary,
)

__version__ = "0.1.0"

_inductor_compat.install()

__all__ = [
    "__version__",
    "build_info",
    "cpu_ext",
    "cpu_features",
    "cpu_isa",
    "cuda_available",
    "mlgru_scan",
    "nn",
    "ops",
    "quantize_ternary",
    "rms_norm",
    "rms_norm_quant",
    "rms_norm_quant_multi",
    "rms_norm_swish_gate",
    "rms_norm_swish_gate_quant",
    "set_cpu_ext",
    "set_cpu_isa",
    "ternary_linear",
    "ternary_linear_packed",
    "ternary_matmul",
    "ternary_matmul_grouped",
    "ternary_matmul_t",
    "unpack_ternary",
]
