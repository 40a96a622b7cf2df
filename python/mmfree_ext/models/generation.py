"""Text generation with a constant-size recurrent state.

MMfreeLM keeps one fp32 vector of ``h`` floats per layer and sequence (``[L, B, h]``), so a
decode step costs the same at any context length. Prompts of different lengths are
left-padded and masked: a padded position adds nothing to the state (``c = 0``) and the state
starts at zero, so each sequence gets exactly what it would get alone. The decode step runs
eagerly, under a CUDA graph captured once per batch size (static token / state buffers), or
through ``torch.compile(mode="reduce-overhead")``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .decode_plan import decode_weights
from .modeling import MMfreeLMForCausalLM

__all__ = ["DECODE_MODES", "Decoder", "GenerationResult", "generate", "sample_next"]

DECODE_MODES = ("auto", "eager", "cuda_graph", "compile")


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row of ``logits [B, V]``: argmax when ``temperature <= 0``, else a draw
    from softmax(logits / temperature) restricted to the ``top_k`` largest and to the smallest
    set whose probability reaches ``top_p`` (nucleus). Returns int64 ``[B]``."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
        drop = before >= top_p  # the top token always stays (its "before" is 0)
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------
# Decode step runners
# ----------------------------------------------------------------------------------------


class _CudaGraphStep:
    """One decode step captured as a CUDA graph for a fixed batch size.

    Static buffers: ``ids [B, 1]`` and ``state [L, B, h]``; replay reads both, writes the new
    state back into ``state`` and the logits into ``logits [B, V]``.
    """

    def __init__(self, model: MMfreeLMForCausalLM, batch_size: int) -> None:
        dev = model.device
        self.ids = torch.zeros((batch_size, 1), dtype=torch.long, device=dev)
        self.state = model.empty_state(batch_size)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # warm-up: lazy inits and allocator pools happen outside capture
                _step(model, self.ids, self.state.clone())
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = _step(model, self.ids, self.state)
        self.state.zero_()

    def __call__(self, ids: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        self.ids.copy_(ids.view(-1, 1))
        if state is not None and state.data_ptr() != self.state.data_ptr():
            self.state.copy_(state)
        self.graph.replay()
        return self.logits, self.state


def _step(model: MMfreeLMForCausalLM, ids: Tensor, state: Tensor) -> Tensor:
    """One decode step: ``state [L, B, h]`` is updated in place; returns fp32 logits ``[B, V]``.

    Packed models run the model-level op ``mmfree::decode_step`` (one call for the whole step);
    latent models run their forward."""
    if model.is_packed:
        return decode_weights(model).step(ids.view(-1), state).float()
    out = model(ids.view(-1, 1), state)
    state.copy_(out.state)
    return out.logits[:, 0]


class _CudaGraphGenerate:
    """The decode step AND the sampling of the next tokens captured as one CUDA graph.

    Static buffers: ``ids [B]`` (the tokens fed to the next step), ``state [L, B, h]``,
    ``tokens [chunk, B]`` and the device counter ``pos``. One replay runs the step, samples
    the next tokens (greedy, or temperature / top-k / top-p from ``generator``, whose state
    the graph advances on the device exactly as the eager calls would), writes them into
    ``ids`` and into ``tokens[pos]``, and advances ``pos``: consecutive replays need no host
    work, and the host reads ``tokens`` only when it wants the new tokens.
    """

    def __init__(
        self,
        model: MMfreeLMForCausalLM,
        batch_size: int,
        chunk: int,
        temperature: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator | None,
    ) -> None:
        dev = model.device
        self.chunk = chunk
        # The graph reads the gathered decode weights: keep them alive with it.
        self.weights = decode_weights(model) if model.is_packed else None
        self.ids = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.state = model.empty_state(batch_size)
        self.tokens = torch.zeros((chunk, batch_size), dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        # The warm-up samples from a throwaway generator: the caller's must not advance.
        warm = None
        if generator is not None:
            warm = torch.Generator(device=dev)
            warm.manual_seed(0)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # lazy inits and allocator pools happen outside capture
                logits = _step(model, self.ids, self.state.clone())
                sample_next(logits, temperature, top_k, top_p, warm)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None:
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph), torch.no_grad():
            logits = _step(model, self.ids, self.state)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            self.ids.copy_(nxt)
            self.tokens.index_copy_(0, self.pos, nxt.unsqueeze(0))
            self.pos.add_(1)
        self.state.zero_()
        self.pos.zero_()

    def run(self, steps: int) -> list[list[int]]:
        """``steps`` (<= chunk) replays, then one host read: the new tokens, ``[steps][B]``."""
        self.pos.zero_()
        for _ in range(steps):
            self.graph.replay()
        return self.tokens[:steps].tolist()


# Graphs captured per model and batch size (dropped with the model).
_GRAPHS: weakref.WeakKeyDictionary[MMfreeLMForCausalLM, dict[tuple, _CudaGraphStep]] = weakref.WeakKeyDictionary()
_COMPILED: weakref.WeakKeyDictionary[MMfreeLMForCausalLM, Callable] = weakref.WeakKeyDictionary()
# Greedy step+sampling graphs per model, batch size and chunk (sampling graphs hold the
# call's generator and are captured per generate() call).
_GREEDY: weakref.WeakKeyDictionary[MMfreeLMForCausalLM, dict[tuple, _CudaGraphGenerate]] = weakref.WeakKeyDictionary()


def _resolve_mode(mode: str, device: torch.device) -> str:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    if mode == "auto":
        return "cuda_graph" if device.type == "cuda" else "eager"
    if mode in ("cuda_graph", "compile") and device.type != "cuda":
        raise ValueError(f"decode mode {mode!r} needs a CUDA model (this one is on {device})")
    return mode


class Decoder:
    """Runs prefill and decode steps for one batch, keeping the recurrent state.

    ``prefill(ids, mask)`` returns the last position's logits ``[B, V]``; ``step(tokens [B])``
    feeds one token per sequence and returns the next logits ``[B, V]``.
    """

    def __init__(self, model: MMfreeLMForCausalLM, batch_size: int, mode: str = "auto") -> None:
        self.model = model
        self.batch_size = batch_size
        self.mode = _resolve_mode(mode, model.device)
        self.state: Tensor | None = None
        self._graph: _CudaGraphStep | None = None
        if self.mode == "cuda_graph":
            key = (batch_size, model.dtype, str(model.device))
            graphs = _GRAPHS.setdefault(model, {})
            if key not in graphs:
                graphs[key] = _CudaGraphStep(model, batch_size)
            self._graph = graphs[key]
        elif self.mode == "compile" and model not in _COMPILED:
            _COMPILED[model] = torch.compile(model, mode="reduce-overhead", fullgraph=True)

    @torch.no_grad()
    def prefill(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.model(ids, None, attention_mask, logits_to_keep=1)
        self.state = out.state
        if self._graph is not None:
            self._graph.state.copy_(out.state)
            self.state = self._graph.state
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        if self._graph is not None:
            logits, self.state = self._graph(tokens, self.state)
            return logits
        if self.mode == "compile":
            out = _COMPILED[self.model](tokens.view(-1, 1), self.state)
            # reduce-overhead graphs reuse their output memory on the next call
            self.state = out.state.clone()
            return out.logits[:, 0].clone()
        assert self.state is not None, "prefill() comes before step()"
        self.state = self.state.contiguous()
        return _step(self.model, tokens, self.state)


# ----------------------------------------------------------------------------------------
# The generation loop
# ----------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """New tokens per sequence (stop tokens excluded) and timings (seconds)."""

    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    batch_size: int
    stopped: list[bool] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode throughput: batch_size * steps / decode time (every sequence gets a token per step)."""
        return self.batch_size * self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    t_max = max(lengths)
    ids = torch.full((len(prompts), t_max), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), t_max), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, t_max - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[b, t_max - len(p) :] = True
    if min(lengths) == t_max:
        return ids.to(device), None
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model: MMfreeLMForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
    decode_mode: str = "auto",
    pad_token_id: int = 0,
    read_every: int = 16,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` for each prompt (lists of token ids, any lengths).

    Greedy when ``temperature <= 0``; otherwise sampling with ``top_k`` / ``top_p`` from a
    ``torch.Generator`` seeded with ``seed``. A sequence stops after emitting one of
    ``stop_tokens`` (not included in its output); the loop ends when all have stopped.
    ``on_token(batch_index, token_id)`` is called for every new token as it is produced.

    On CUDA (``decode_mode`` "auto" or "cuda_graph") each decode step and its sampling are
    one CUDA-graph replay and the new tokens stay on the GPU; the host reads them every
    ``read_every`` steps (once per step when ``on_token`` streams them). Trade-off: a host
    read is a device synchronization (a few us plus the launch gap it leaves), so reading
    rarely keeps the GPU busy back to back, but stop tokens are then seen up to
    ``read_every - 1`` steps late: those steps are computed and discarded (the outputs are
    the same, only the time is spent). ``read_every=1`` stops at once. Other modes and the
    CPU keep the step-by-step loop. The tokens equal the step-by-step loop's for the same
    seed.
    """
    if read_every < 1:
        raise ValueError(f"read_every must be >= 1, got {read_every}")
    device = model.device
    batch = len(prompts)
    ids, mask = _left_pad(prompts, pad_token_id, device)
    generator = None
    if temperature > 0.0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    stop = set(int(t) for t in stop_tokens)
    mode = _resolve_mode(decode_mode, device)
    # The CUDA-graph loop runs its own step+sampling graph; the decoder only prefills.
    decoder = Decoder(model, batch, "eager" if mode == "cuda_graph" else mode)
    out_tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch

    def accept(next_ids: list[int]) -> None:
        for b, tok in enumerate(next_ids):
            if done[b]:
                continue
            if tok in stop:
                done[b] = True
                continue
            out_tokens[b].append(tok)
            if on_token is not None:
                on_token(b, tok)

    runner = None
    if mode == "cuda_graph" and max_new_tokens > 1:  # captured before the clock starts
        chunk = 1 if on_token is not None else min(read_every, max_new_tokens - 1)
        runner = _graph_generate(model, batch, chunk, temperature, top_k, top_p, generator)
    _sync(device)
    t0 = time.perf_counter()
    logits = decoder.prefill(ids, mask)
    next_ids = sample_next(logits, temperature, top_k, top_p, generator)
    accept(next_ids.tolist())
    _sync(device)
    t1 = time.perf_counter()
    steps = 0
    if runner is not None and not all(done):
        assert decoder.state is not None
        runner.state.copy_(decoder.state)
        runner.ids.copy_(next_ids)
        while steps + 1 < max_new_tokens and not all(done):
            for row in runner.run(min(runner.chunk, max_new_tokens - 1 - steps)):
                accept(row)
                steps += 1
                if all(done):
                    break
    while steps + 1 < max_new_tokens and not all(done):
        logits = decoder.step(next_ids)
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        accept(next_ids.tolist())
        steps += 1
    _sync(device)
    t2 = time.perf_counter()
    return GenerationResult(out_tokens, t1 - t0, t2 - t1, steps, batch, done)


def _graph_generate(
    model: MMfreeLMForCausalLM,
    batch: int,
    chunk: int,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> _CudaGraphGenerate:
    """The step+sampling graph for this call: cached per model, batch and chunk when greedy."""
    if generator is not None:
        return _CudaGraphGenerate(model, batch, chunk, temperature, top_k, top_p, generator)
    graphs = _GREEDY.setdefault(model, {})
    weights = id(decode_weights(model)) if model.is_packed else None  # re-gathered: capture again
    key = (batch, chunk, model.dtype, str(model.device), weights)
    if key not in graphs:
        graphs[key] = _CudaGraphGenerate(model, batch, chunk, 0.0, 0, 1.0, None)
    return graphs[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
