"""Loads the compiled extension and re-exports its build and CPU information."""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "mmfree_ext._C is not built. Install the package with "
        "`pip install --no-build-isolation .` or run `make build` for an in-place build."
    ) from exc


def build_info() -> dict:
    """What this build was compiled with: torch version, CUDA archs, CPU ISA paths."""
    return dict(_C.build_info())


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
    """True when this build has CUDA kernels and torch sees a CUDA device."""
    return bool(_C.build_info()["cuda"]) and torch.cuda.is_available()
