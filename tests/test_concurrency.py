"""Ops called from several Python threads at once (CPU), on several CUDA streams at once,
and generate() on two models in two threads: each gives the serial result, bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mmfree_ext
from mmfree_ext.models import MMfreeLMForCausalLM, generate
from mmfree_ext.models.config import MMfreeLMConfig

THREADS = 4
ROUNDS = 6


def _workload(seed: int, device: str) -> list[Callable[[], tuple[torch.Tensor, ...]]]:
    """One call of every op family on inputs of their own (a different shape per seed)."""
    g = torch.Generator().manual_seed(seed)
    m, k, n = 17 + seed, 300 + 7 * seed, 96 + seed

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    x, w, nw = r(m, k), r(n, k), r(k) + 1
    packed, w_scale = mmfree_ext.quantize_ternary(w)
    x_q, x_scale = mmfree_ext.rms_norm_quant(x, nw)
    i, f = r(2, 40, 64), r(2, 40, 64)
    dy = r(m, n)

    def bitlinear_backward() -> tuple[torch.Tensor, ...]:
        leaves = [t.clone().requires_grad_(True) for t in (x, w, nw)]
        mmfree_ext.ternary_linear(*leaves).backward(dy)
        return tuple(t.grad for t in leaves)

    return [
        lambda: mmfree_ext.quantize_ternary(w),
        lambda: mmfree_ext.rms_norm_quant(x, nw),
        lambda: mmfree_ext.rms_norm_quant_multi(x, torch.stack([nw, 2 * nw])),
        lambda: mmfree_ext.rms_norm(x, nw, 1e-6, x),
        lambda: (mmfree_ext.rms_norm_swish_gate(x, x, nw),),
        lambda: (mmfree_ext.ternary_matmul(x_q, x_scale, packed, w_scale, torch.bfloat16),),
        lambda: (mmfree_ext.ternary_matmul_t(dy, packed, w_scale, k),),
        lambda: (mmfree_ext.ternary_linear_packed(x, packed, w_scale, nw),),
        lambda: mmfree_ext.mlgru_scan(i, f),
        bitlinear_backward,
    ]


def _run_all(calls: list[Callable[[], tuple[torch.Tensor, ...]]]) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.detach().clone() for t in c()) for c in calls]


def _assert_equal(got: list[tuple[torch.Tensor, ...]], want: list[tuple[torch.Tensor, ...]]) -> None:
    for j, (a, b) in enumerate(zip(got, want, strict=True)):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y), f"call {j} differs from its serial result"


def test_ops_from_several_python_threads_cpu() -> None:
    work = [_workload(s, "cpu") for s in range(THREADS)]
    serial = [_run_all(w) for w in work]

    def worker(idx: int) -> None:
        for _ in range(ROUNDS):
            _assert_equal(_run_all(work[idx]), serial[idx])

    with ThreadPoolExecutor(THREADS) as pool:
        for fut in [pool.submit(worker, t) for t in range(THREADS)]:
            fut.result()


@pytest.mark.cuda
def test_ops_on_several_cuda_streams() -> None:
    """Every op family launched on its own stream at once (each stream's inputs made on it)."""
    streams = [torch.cuda.Stream() for _ in range(THREADS)]
    work = []
    for s, stream in enumerate(streams):
        with torch.cuda.stream(stream):
            work.append(_workload(s, "cuda"))
    torch.cuda.synchronize()
    serial = [_run_all(w) for w in work]
    torch.cuda.synchronize()
    for _ in range(ROUNDS):
        outs = []
        for w, stream in zip(work, streams, strict=True):
            with torch.cuda.stream(stream):
                outs.append(_run_all(w))
        torch.cuda.synchronize()
        for got, want in zip(outs, serial, strict=True):
            _assert_equal(got, want)


@pytest.mark.cuda
def test_ops_from_threads_on_their_own_cuda_streams() -> None:
    work = [_workload(s, "cuda") for s in range(THREADS)]
    torch.cuda.synchronize()
    serial = [_run_all(w) for w in work]

    def worker(idx: int) -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(ROUNDS):
                got = _run_all(work[idx])
                stream.synchronize()
                _assert_equal(got, serial[idx])

    with ThreadPoolExecutor(THREADS) as pool:
        for fut in [pool.submit(worker, t) for t in range(THREADS)]:
            fut.result()


@pytest.mark.parametrize("packed", [False, True])
def test_generate_on_two_models_in_two_threads(packed: bool) -> None:
    cfg = {"vocab_size": 300, "hidden_size": 96, "num_hidden_layers": 2, "intermediate_size": 200}
    models = [MMfreeLMForCausalLM(MMfreeLMConfig(**cfg), init_seed=s).eval() for s in (1, 2)]
    if packed:
        for m in models:
            m.pack()
    prompts = [[[5, 17, 3], [9]], [[1, 2, 3, 4], [250, 7]]]

    def run(idx: int) -> list[list[int]]:
        out = generate(models[idx], prompts[idx], 12, temperature=0.0)
        return [list(t) for t in out.tokens]

    serial = [run(0), run(1)]
    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(run, [0, 1]))
        assert results == serial


def test_generate_on_one_model_from_two_threads() -> None:
    """Inference on a shared, unchanging model: each thread's decode state is its own."""
    cfg = {"vocab_size": 300, "hidden_size": 96, "num_hidden_layers": 2, "intermediate_size": 200}
    model = MMfreeLMForCausalLM(MMfreeLMConfig(**cfg), init_seed=4).eval()
    model.pack()
    prompts = [[[5, 17, 3]], [[1, 2, 3, 4], [250, 7]]]

    def run(idx: int) -> list[list[int]]:
        return [list(t) for t in generate(model, prompts[idx], 10, temperature=0.0).tokens]

    serial = [run(0), run(1)]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(run, [0, 1, 0, 1])) == serial * 2
