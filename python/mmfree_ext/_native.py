"""Loads the compiled extension and re-exports its build and CPU information.

The native code uses torch only through the LibTorch stable ABI, so one build loads into
every torch from its target release on (``build_info()["torch_target_version"]``). It comes
in two parts: ``_C`` (a pybind11 module: build/CPU info; importing it registers the
``torch.ops.mmfree.*`` schemas and CPU kernels) and, in CUDA builds, ``_C_cuda.so`` (the
CUDA kernels), loaded here only where torch has CUDA, so that the same wheel works with a
CPU-only torch.
"""

from __future__ import annotations

import pathlib

import torch

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "mmfree_ext._C is not built or does not load with this torch "
        f"({torch.__version__}): install mmfree-ext with `pip install mmfree-ext` (or `pip install .` "
        f"from a checkout), or run `make build` for an in-place build. Cause: {exc}"
    ) from exc

_CUDA_LIB = pathlib.Path(__file__).with_name("_C_cuda.so")


def _load_cuda_kernels() -> str:
    """Registers the CUDA kernels where they were built and torch has CUDA; returns why not."""
    if not _C.build_info()["cuda"]:
        return "built without CUDA"
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    try:
        torch.ops.load_library(str(_CUDA_LIB))
    except OSError as exc:  # e.g. a torch built for another CUDA major (no libcudart.so.13)
        return f"cannot load {_CUDA_LIB.name}: {exc}"
    return ""


_CUDA_SKIP_REASON = _load_cuda_kernels()

# The fused CPU decode step runs as a team of threads that wait for each other, which only
# torch's OpenMP backend promises (all chunks of one parallel_for run at once); the stable
# ABI does not say which backend torch has, so it is read here.
_C._set_team_concurrent("parallel backend: OpenMP" in torch.__config__.parallel_info())

# The quantizing ops are not differentiable: their outputs are constants to autograd (int8
# codes have no gradient; BitLinear's straight-through estimator differentiates the
# normalized activation itself, as reference.bit_linear does). The stable ABI cannot
# register a fallthrough kernel, so it is registered here.
_AUTOGRAD_LIB = torch.library.Library("mmfree", "IMPL")  # kept alive for the process
for _name in ("rms_norm_quant", "rms_norm_quant_multi", "rms_norm_swish_gate_quant"):
    _AUTOGRAD_LIB.impl(_name, torch.library.fallthrough_kernel, "Autograd")


def build_info() -> dict:
    """What this build was compiled with (torch, stable-ABI target, CUDA archs, CPU ISA paths).

    ``cuda_loaded`` says whether the CUDA kernels are registered in this process, and
    ``cuda_skip_reason`` why not.
    """
    info = dict(_C.build_info())
    info["cuda_loaded"] = not _CUDA_SKIP_REASON
    info["cuda_skip_reason"] = _CUDA_SKIP_REASON
    return info


def cpu_features() -> dict:
    """What this CPU supports at run time and which CPU kernel path is active."""
    return dict(_C.cpu_features())


def set_cpu_isa(name: str) -> None:
    """Cap the CPU kernel path at 'scalar', 'avx2' or 'avx512' (for tests and comparisons)."""
    _C.set_cpu_isa(name)


def cpu_isa() -> str:
    """The CPU kernel path in use ('scalar', 'avx2' or 'avx512')."""
    return str(_C.cpu_isa())


def set_cpu_ext(name: str) -> None:
    """Cap the CPU instruction-set extensions at 'none' (no vpdpbusd), 'vnni' or 'amx' (the
    default: everything the CPU has). Independent of :func:`set_cpu_isa`; tests use both to
    run every kernel path on one machine."""
    _C.set_cpu_ext(name)


def cpu_ext() -> str:
    """The CPU extension cap in use ('none', 'vnni' or 'amx')."""
    return str(_C.cpu_ext())


def cuda_available() -> bool:
    """True when this build's CUDA kernels are loaded and torch sees a CUDA device."""
    return not _CUDA_SKIP_REASON and torch.cuda.is_available()
