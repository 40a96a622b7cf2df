"""generate() on CUDA runs each decode step and its sampling as one CUDA-graph replay, reading
the new tokens every ``read_every`` steps: its tokens must equal the step-by-step eager loop's
for greedy decoding, for seeded sampling, with stop tokens and while streaming."""

from __future__ import annotations

import pytest
import torch

from mmfree_ext.models import MMfreeLMForCausalLM
from mmfree_ext.models.generation import generate

TINY = {
    "model_type": "hgrn_bit",
    "vocab_size": 300,
    "hidden_size": 96,
    "num_hidden_layers": 3,
    "intermediate_size": 200,
}
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def _model() -> MMfreeLMForCausalLM:
    model = MMfreeLMForCausalLM(TINY, init_seed=0)
    with torch.no_grad():
        model.model.lower_bounds.normal_(generator=torch.Generator().manual_seed(1))
    return model.pack().to(device="cuda", dtype=torch.bfloat16).eval()


@pytest.mark.cuda
@pytest.mark.parametrize("read_every", [1, 5, 16])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 7}])
def test_graph_generate_equals_eager(read_every: int, sampling: dict) -> None:
    model = _model()
    eager = generate(model, PROMPTS, 20, decode_mode="eager", **sampling)
    graph = generate(model, PROMPTS, 20, decode_mode="cuda_graph", read_every=read_every, **sampling)
    assert graph.tokens == eager.tokens and graph.decode_steps == eager.decode_steps
    again = generate(model, PROMPTS, 20, decode_mode="cuda_graph", read_every=read_every, **sampling)
    assert again.tokens == eager.tokens  # a cached (greedy) or re-captured (sampling) graph


@pytest.mark.cuda
def test_graph_generate_stops_and_streams() -> None:
    model = _model()
    free = generate(model, PROMPTS, 12, decode_mode="eager").tokens
    stop = free[0][4]
    eager = generate(model, PROMPTS, 12, decode_mode="eager", stop_tokens=[stop])
    graph = generate(model, PROMPTS, 12, decode_mode="cuda_graph", stop_tokens=[stop], read_every=8)
    assert graph.tokens == eager.tokens and graph.stopped == eager.stopped
    assert graph.decode_steps == eager.decode_steps
    seen: list[tuple[int, int]] = []
    streamed = generate(model, PROMPTS, 12, on_token=lambda b, t: seen.append((b, t)))
    assert streamed.tokens == free
    assert sorted(seen) == sorted((b, t) for b, seq in enumerate(free) for t in seq)


def test_read_every_must_be_positive() -> None:
    model = MMfreeLMForCausalLM(TINY, init_seed=0)
    with pytest.raises(ValueError, match="read_every"):
        generate(model, [[1, 2]], 4, read_every=0)
