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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fuzz tests' case counts per op and device (tests/_fuzz.py), if any ran."""
    import sys

    fuzz = sys.modules.get("_fuzz")
    if fuzz is None or not fuzz.CASES:
        return
    terminalreporter.section(f"fuzz cases run (profile {fuzz.PROFILE})")
    for (op, device), n in sorted(fuzz.CASES.items()):
        terminalreporter.write_line(f"{op:34s} {device:5s} {n:6d}")
