"""mmfree::decode_step (the whole T=1 step of the packed model as one op) against the model's
op-by-op packed path: the logits and the new state must be bit-identical on each device, and
on CUDA on both of its paths (MMFREE_DECODE_CUDA=fused: the persistent kernel; =ops: the
step op by op)."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import DEVICES
from mmfree_ext.models import MMfreeLMForCausalLM
from mmfree_ext.models.decode_plan import DecodeWeights, decode_weights

#: (device, MMFREE_DECODE_CUDA) pairs the bitwise tests run on: CPU has one path.
DEVICE_PATHS = [
    pytest.param("cpu", None, id="cpu"),
    pytest.param("cuda", "fused", marks=pytest.mark.cuda, id="cuda-fused"),
    pytest.param("cuda", "ops", marks=pytest.mark.cuda, id="cuda-ops"),
]

#: The CUDA paths, for the CUDA-only bitwise tests.
CUDA_PATHS = ["fused", "ops"]

# h = 96 and I = 200 are not multiples of the 128-weight pack block.
TINY = {
    "model_type": "hgrn_bit",
    "vocab_size": 300,
    "hidden_size": 96,
    "num_hidden_layers": 3,
    "intermediate_size": 200,
}


def _packed_model(device: str, dtype: torch.dtype, seed: int = 0, **over) -> MMfreeLMForCausalLM:
    """A packed model with random weights, non-trivial norm weights and lower bounds."""
    model = MMfreeLMForCausalLM({**TINY, **over}, init_seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        model.model.lower_bounds.copy_(torch.randn(model.model.lower_bounds.shape, generator=gen))
    return model.pack().to(device=device, dtype=dtype).eval()


def _op_by_op(model: MMfreeLMForCausalLM, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = model(tokens.view(-1, 1), state)
    return out.logits[:, 0], out.state


def _check_steps(model: MMfreeLMForCausalLM, batch: int, steps: int = 3, seed: int = 0) -> None:
    dev = model.device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, 5), generator=gen).to(dev)
    with torch.no_grad():
        state = model(prompt).state.contiguous()  # a non-trivial starting state
        weights = decode_weights(model)
        fused_state = state.clone()
        for _ in range(steps):
            tokens = torch.randint(0, vocab, (batch,), generator=gen).to(dev)
            ref_logits, state = _op_by_op(model, tokens, state)
            logits = weights.step(tokens, fused_state)
            assert logits.dtype == model.dtype and logits.shape == (batch, vocab)
            assert torch.equal(logits.float(), ref_logits), "decode_step logits differ from the op-by-op path"
            assert torch.equal(fused_state, state), "decode_step state differs from the op-by-op path"


def _use_path(monkeypatch: pytest.MonkeyPatch, path: str | None) -> None:
    """Force the CUDA implementation's path (None: leave the environment as it is)."""
    if path is not None:
        monkeypatch.setenv("MMFREE_DECODE_CUDA", path)


@pytest.mark.parametrize(("device", "path"), DEVICE_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_decode_step_matches_op_by_op(
    monkeypatch: pytest.MonkeyPatch, device: str, path: str | None, dtype: torch.dtype, batch: int
) -> None:
    _use_path(monkeypatch, path)
    _check_steps(_packed_model(device, dtype), batch)


@pytest.mark.parametrize(("device", "path"), DEVICE_PATHS)
@pytest.mark.parametrize("batch", [1, 3])  # 1: the v3 kernel on CUDA, 3: v1
def test_decode_step_odd_hidden(monkeypatch: pytest.MonkeyPatch, device: str, path: str | None, batch: int) -> None:
    _use_path(monkeypatch, path)
    model = _packed_model(device, torch.bfloat16, hidden_size=200, intermediate_size=520, num_hidden_layers=2)
    _check_steps(model, batch)


@functools.cache
def _real_shape_model(hidden: int, inter: int) -> MMfreeLMForCausalLM:
    """Two layers of a real size, built once for every batch and path (building dominates)."""
    return _packed_model(
        "cuda", torch.bfloat16, vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2
    )


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize(("hidden", "inter"), [(2048, 5632), (2560, 6912)])
@pytest.mark.parametrize("batch", [1, 3, 8, 64])
def test_decode_step_real_shapes_cuda(
    monkeypatch: pytest.MonkeyPatch, path: str, hidden: int, inter: int, batch: int
) -> None:
    _use_path(monkeypatch, path)
    _check_steps(_real_shape_model(hidden, inter), batch, steps=2)


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_float16_cuda(monkeypatch: pytest.MonkeyPatch, path: str, batch: int) -> None:
    _use_path(monkeypatch, path)
    _check_steps(_packed_model("cuda", torch.float16), batch)


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
def test_decode_step_fallback_shapes_cuda(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """h and I that are not multiples of 8 bf16 elements, a batch over one launch's 64 rows:
    the op-by-op fallback and the batch slicing must match the op-by-op path too."""
    _use_path(monkeypatch, path)
    _check_steps(_packed_model("cuda", torch.bfloat16, hidden_size=100, intermediate_size=260), 3)
    _check_steps(_packed_model("cuda", torch.bfloat16), 70, steps=2)


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("batch", [1, 4])  # the fused v3 (batch 1) and v1 kernels
def test_decode_step_cuda_graph(monkeypatch: pytest.MonkeyPatch, path: str, batch: int) -> None:
    _use_path(monkeypatch, path)
    model = _packed_model("cuda", torch.bfloat16)
    weights = decode_weights(model)
    tokens = torch.randint(0, 300, (batch,), device="cuda")
    state = torch.randn(model.config.num_hidden_layers, batch, 96, device="cuda")
    eager_state = state.clone()
    eager = weights.step(tokens, eager_state)
    graph_state = state.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        weights.step(tokens, graph_state.clone())  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = weights.step(tokens, graph_state)
    graph_state.copy_(state)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(logits, eager) and torch.equal(graph_state, eager_state)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_step_opcheck(device: str) -> None:
    model = _packed_model(device, torch.float32)
    w = decode_weights(model)
    tokens = torch.tensor([1, 7], device=device)
    state = torch.randn(3, 2, 96, device=device)
    args = (
        tokens,
        state,
        w.embeddings,
        w.lower_bounds,
        w.norms,
        w.down_norms,
        w.packed,
        w.w_scales,
        w.final_norms,
        w.eps,
    )
    torch.library.opcheck(torch.ops.mmfree.decode_step.default, args)


def test_decode_step_compile() -> None:
    model = _packed_model("cpu", torch.float32)
    w = decode_weights(model)
    tokens = torch.tensor([3, 5, 8])
    state = torch.randn(3, 3, 96)
    expected_state = state.clone()
    expected = w.step(tokens, expected_state)
    step = torch.compile(lambda t, s: w.step(t, s), fullgraph=True, backend="aot_eager")
    got = step(tokens, state)
    assert torch.equal(got, expected) and torch.equal(state, expected_state)


def test_decode_weights_refresh_after_load() -> None:
    model = _packed_model("cpu", torch.float32)
    first = decode_weights(model)
    assert decode_weights(model) is first
    sd = _packed_model("cpu", torch.float32, seed=5).state_dict()
    model.load_state_dict(sd)
    second = decode_weights(model)
    assert second is not first
    assert torch.equal(second.norms[0, 0], model.model.layers[0].attn_norm.weight)


def test_decode_step_bad_input() -> None:
    model = _packed_model("cpu", torch.float32)
    w = decode_weights(model)
    state = torch.zeros(3, 2, 96)
    with pytest.raises(RuntimeError, match="'tokens' must be in"):
        w.step(torch.tensor([0, 300]), state)
    with pytest.raises(RuntimeError, match="'tokens' must be int64"):
        w.step(torch.tensor([0, 1], dtype=torch.int32), state)
    with pytest.raises(RuntimeError, match="'state' must be float32"):
        w.step(torch.tensor([0, 1]), torch.zeros(3, 3, 96))
    with pytest.raises(RuntimeError, match="'packed' must hold"):
        torch.ops.mmfree.decode_step(
            torch.tensor([0, 1]),
            state,
            w.embeddings,
            w.lower_bounds,
            w.norms,
            w.down_norms,
            w.packed[:-1],
            w.w_scales,
            w.final_norms,
            w.eps,
        )
    bad = list(w.packed)
    bad[4] = bad[5]
    with pytest.raises(RuntimeError, match=r"'packed\[4\]' must be uint8"):
        torch.ops.mmfree.decode_step(
            torch.tensor([0, 1]),
            state,
            w.embeddings,
            w.lower_bounds,
            w.norms,
            w.down_norms,
            bad,
            w.w_scales,
            w.final_norms,
            w.eps,
        )
    with pytest.raises(ValueError, match="packed model"):
        DecodeWeights.from_model(MMfreeLMForCausalLM(TINY))


@pytest.mark.cuda
def test_decode_step_bad_input_cuda() -> None:
    """The CUDA implementation's checks name the argument, as check_decode_args does."""
    model = _packed_model("cuda", torch.float32)
    w = decode_weights(model)
    state = torch.zeros(3, 2, 96, device="cuda")
    tokens = torch.tensor([0, 1], device="cuda")
    args = [w.embeddings, w.lower_bounds, w.norms, w.down_norms, w.packed, w.w_scales, w.final_norms, w.eps]
    op = torch.ops.mmfree.decode_step
    with pytest.raises(RuntimeError, match=r"'tokens' must be int64 \[B\], got torch.int32 of shape \(2,\)"):
        op(tokens.int(), state, *args)
    with pytest.raises(RuntimeError, match=r"'state' must be float32 \[L, B=2, h=96\]"):
        op(tokens, torch.zeros(3, 3, 96, device="cuda"), *args)
    with pytest.raises(RuntimeError, match="'packed' must hold"):
        op(tokens, state, *args[:4], w.packed[:-1], *args[5:])
    bad = list(w.packed)
    bad[4] = bad[5]
    with pytest.raises(RuntimeError, match=r"'packed\[4\]' must be uint8"):
        op(tokens, state, *args[:4], bad, *args[5:])
    with pytest.raises(RuntimeError, match="'lower_bounds' must be on"):
        op(tokens, state, w.embeddings, w.lower_bounds.cpu(), *args[2:])


@pytest.mark.cuda
def test_decode_step_bad_path_env_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad MMFREE_DECODE_CUDA names the variable and the values it takes."""
    model = _packed_model("cuda", torch.float32)
    w = decode_weights(model)
    state = torch.zeros(3, 2, 96, device="cuda")
    tokens = torch.tensor([0, 1], device="cuda")
    monkeypatch.setenv("MMFREE_DECODE_CUDA", "fast")
    with pytest.raises(RuntimeError, match=r"MMFREE_DECODE_CUDA must be 'auto', 'fused' or 'ops', got 'fast'"):
        w.step(tokens, state)
    monkeypatch.setenv("MMFREE_DECODE_CUDA", "auto")
    w.step(tokens, state)  # the default rule runs
