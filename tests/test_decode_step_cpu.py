"""The CPU implementation of mmfree::decode_step (csrc/bindings/ops_decode_cpu.cpp): bit-identical
to the op-by-op packed path on every CPU kernel path (ISA x extension caps), with teams of one
and two threads, at the GEMV (B < 4) and GEMM (B >= 4) batch sizes, at a real MMfreeLM width."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import mmfree_ext
from test_decode_step import _check_steps, _packed_model

_FEATURES = mmfree_ext.cpu_features()
_ISA_ORDER = ["scalar", "avx2", "avx512"]


def _supported(path: str) -> bool:
    isa, ext = path.split(":")
    if _ISA_ORDER.index(isa) > _ISA_ORDER.index(_FEATURES["best_isa"]):
        return False
    if ext == "vnni":
        return _FEATURES["avx512_vnni"] if isa == "avx512" else _FEATURES["avx_vnni"]
    return True


PATHS = [
    pytest.param(p, marks=pytest.mark.skipif(not _supported(p), reason="CPU lacks it"))
    for p in ["scalar:none", "avx2:none", "avx2:vnni", "avx512:none", "avx512:vnni"]
]


@pytest.fixture
def cpu_path(request: pytest.FixtureRequest) -> Iterator[str]:
    isa, ext = request.param.split(":")
    mmfree_ext.set_cpu_isa(isa)
    mmfree_ext.set_cpu_ext(ext)
    yield request.param
    mmfree_ext.set_cpu_isa(_FEATURES["best_isa"])
    mmfree_ext.set_cpu_ext("amx")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_cpu_impl_is_registered() -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mmfree::decode_step", "CPU")


@pytest.mark.parametrize("cpu_path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5])
def test_decode_step_cpu_paths(cpu_path: str, threads: int, dtype: torch.dtype, batch: int) -> None:
    _check_steps(_packed_model("cpu", dtype), batch, steps=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_cpu_real_width(threads: int, dtype: torch.dtype, batch: int) -> None:
    """370M's h = 1024 and I = 2816 (K multiples of 128, the GEMV's even and odd block counts)."""
    model = _packed_model("cpu", dtype, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, vocab_size=517)
    _check_steps(model, batch, steps=2)


def test_decode_step_cpu_noncontiguous_norms() -> None:
    """Non-contiguous weights are copied, not misread; bf16 norms are converted again when changed."""
    model = _packed_model("cpu", torch.bfloat16)
    from mmfree_ext.models.decode_plan import decode_weights

    w = decode_weights(model)
    state = torch.zeros(3, 1, 96)
    tok = torch.tensor([7])
    args = (w.lower_bounds, w.norms, w.down_norms, w.packed, w.w_scales, w.final_norms, w.eps)
    ref = torch.ops.mmfree.decode_step(tok, state.clone(), w.embeddings, *args)
    wide = torch.stack([w.norms, w.norms], dim=-1)[..., 0]  # same values, strided
    assert not wide.is_contiguous()
    got = torch.ops.mmfree.decode_step(tok, state.clone(), w.embeddings, w.lower_bounds, wide, *args[2:])
    assert torch.equal(got, ref)
    norms = w.norms.clone()
    before = torch.ops.mmfree.decode_step(tok, state.clone(), w.embeddings, w.lower_bounds, norms, *args[2:])
    norms.mul_(1.5)  # in place: same pointer, new version
    after = torch.ops.mmfree.decode_step(tok, state.clone(), w.embeddings, w.lower_bounds, norms, *args[2:])
    fresh = torch.ops.mmfree.decode_step(tok, state.clone(), w.embeddings, w.lower_bounds, norms.clone(), *args[2:])
    assert torch.equal(before, ref) and torch.equal(after, fresh) and not torch.equal(after, before)


@pytest.mark.parametrize("batch", [1, 5])
def test_decode_step_cpu_fp16(threads: int, batch: int) -> None:
    _check_steps(_packed_model("cpu", torch.float16), batch, steps=2)
