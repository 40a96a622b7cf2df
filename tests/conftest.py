"""Shared test fixtures: devices to run on, CUDA skipping, and deterministic seeds."""

from __future__ import annotations

import pytest
import torch

import mmfree_ext

HAS_CUDA = mmfree_ext.cuda_available()

#: Devices every op test runs on; CUDA appears (marked) only where it exists.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `cuda` cleanly when this build or machine has no CUDA device."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device (or the extension was built without CUDA)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
