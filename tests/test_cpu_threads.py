"""The CPU kernels run on several threads: their parallel backend is torch's own
parallel_for, reached through the stable ABI (compiled inside libtorch with its OpenMP), and
the fused decode step's thread team is built on it where torch's backend is OpenMP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mmfree_ext import _C

OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_for_runs_on_torch_threads(torch_threads: None, threads: int) -> None:
    torch.set_num_threads(threads)
    assert _C._parallel_for_threads(8) == threads


@pytest.mark.parametrize("threads", [1, 2])
def test_team_has_torch_thread_count(torch_threads: None, threads: int) -> None:
    torch.set_num_threads(threads)
    assert _C._team_threads() == (threads if OPENMP else 1)
