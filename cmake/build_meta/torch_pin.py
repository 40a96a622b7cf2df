"""scikit-build-core metadata plugin: pin the runtime torch to the one we build against.

A torch extension is ABI-bound to the torch release it was compiled with, so the wheel
requires exactly that release (local tags such as +cu130 dropped, so either the CPU or
the CUDA build of it satisfies the pin).
"""

from __future__ import annotations

from typing import Any


def dynamic_metadata(field: str, settings: dict[str, Any] | None = None) -> list[str]:
    if field != "dependencies":
        raise ValueError(f"torch_pin only provides 'dependencies', not {field!r}")
    import torch

    version = torch.__version__.split("+")[0]
    extra = list((settings or {}).get("extra", []))
    return [f"torch=={version}", *extra]
