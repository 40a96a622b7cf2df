"""Perplexity of a checkpoint on a text file (``mmfree eval``): a sliding window with a stride,
tokens/s, latent and packed weights compared on the same tokens.

The window recipe is the usual one for fixed-context evaluation: windows of ``window`` tokens
start every ``stride`` tokens; each window scores only the targets the previous window did not,
so with ``stride < window`` every token after the first is scored exactly once, with at least
``window - stride`` tokens of context (with ``stride == window`` each window's first token is
context only). Each window starts from a zero recurrent state, as a
fixed-context model would.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import MMfreeLMForCausalLM

__all__ = ["EvalReport", "PerplexityResult", "evaluate_checkpoint", "sliding_window_perplexity"]


@dataclass
class PerplexityResult:
    """Summed negative log-likelihood (nats) over ``scored_tokens`` targets, and the time the
    forwards took over ``forward_tokens`` input tokens (windows overlap, so these differ)."""

    nll_sum: float
    scored_tokens: int
    forward_tokens: int
    windows: int
    seconds: float

    @property
    def nll_per_token(self) -> float:
        return self.nll_sum / self.scored_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def tokens_per_second(self) -> float:
        """Forward throughput: input tokens through the model per second."""
        return self.forward_tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "nll_per_token": self.nll_per_token,
            "perplexity": self.perplexity,
            "tokens_per_second": self.tokens_per_second,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` per window: tokens ``[begin, end)``, scoring the targets from
    index ``first`` of the window's ``end - begin - 1`` next-token predictions on."""
    out = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        # Targets are the tokens at absolute positions begin+1 .. end-1; score those >= prev_end.
        out.append((begin, end, max(prev_end, begin + 1) - (begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def sliding_window_perplexity(
    model: MMfreeLMForCausalLM, ids: Tensor, window: int, stride: int, batch_size: int = 1
) -> PerplexityResult:
    """Perplexity of ``model`` on the token ids ``ids`` (1-D int64), windows of ``window`` tokens
    every ``stride`` tokens (``1 <= stride <= window``), ``batch_size`` windows per forward (each
    starts from a zero state, so batching does not change the result). Raises ``ValueError``
    naming a bad argument."""
    if ids.dim() != 1 or ids.dtype != torch.long:
        raise ValueError(f"ids must be a 1-D int64 tensor, got {ids.dim()}-D {ids.dtype}")
    if ids.numel() < 2:
        raise ValueError(f"ids must hold at least 2 tokens to score one, got {ids.numel()}")
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.device
    ids = ids.to(device)
    spans = _windows(ids.numel(), window, stride)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    scored = forward_tokens = 0
    _sync(device)
    t0 = time.perf_counter()
    i = 0
    while i < len(spans):
        # Windows of one length go together (all but possibly the last are `window` long).
        length = spans[i][1] - spans[i][0]
        group = [spans[i]]
        while len(group) < batch_size and i + len(group) < len(spans):
            nxt = spans[i + len(group)]
            if nxt[1] - nxt[0] != length:
                break
            group.append(nxt)
        batch = torch.stack([ids[b:e] for b, e, _ in group])
        logits = model(batch).logits  # [G, L, V] fp32
        for row, (_, _, first) in enumerate(group):
            targets = batch[row, 1:][first:]
            if targets.numel():
                nll += F.cross_entropy(logits[row, :-1][first:], targets, reduction="sum").double()
            scored += targets.numel()
        forward_tokens += batch.numel()
        i += len(group)
    _sync(device)
    seconds = time.perf_counter() - t0
    return PerplexityResult(float(nll), scored, forward_tokens, len(spans), seconds)


@dataclass
class EvalReport:
    """What ``mmfree eval`` measured: one :class:`PerplexityResult` per weight form evaluated."""

    model_dir: str
    stored_packed: bool
    device: str
    dtype: str
    text_tokens: int
    window: int
    stride: int
    batch_size: int
    results: dict[str, PerplexityResult]

    def lines(self) -> list[str]:
        """The human-readable report (the ``mmfree eval`` output)."""
        form = "packed" if self.stored_packed else "latent"
        out = [
            f"{self.model_dir} ({form} checkpoint) on {self.device} {self.dtype}: {self.text_tokens} tokens, "
            f"window {self.window}, stride {self.stride}, {self.batch_size} windows per forward"
        ]
        for name, r in self.results.items():
            out.append(
                f"  {name:6s}: perplexity {r.perplexity:10.4f}  nll/token {r.nll_per_token:.5f}  "
                f"[{r.scored_tokens} scored, {r.windows} windows, {r.forward_tokens} tokens in {r.seconds:.2f} s: "
                f"{r.tokens_per_second:.0f} tok/s]"
            )
        if "latent" in self.results and "packed" in self.results:
            lat, pk = self.results["latent"], self.results["packed"]
            rel = (pk.perplexity / lat.perplexity - 1) * 100
            out.append(
                f"  packed - latent: perplexity {pk.perplexity - lat.perplexity:+.6f} ({rel:+.5f}%), "
                f"nll/token {pk.nll_per_token - lat.nll_per_token:+.6f}"
            )
        else:
            out.append("  (packed checkpoint: no latent weights to compare against)")
        return out

    def to_dict(self) -> dict[str, object]:
        data = {k: v for k, v in asdict(self).items() if k != "results"}
        data["results"] = {k: v.to_dict() for k, v in self.results.items()}
        return data


def evaluate_checkpoint(
    model_dir: str,
    text: str,
    *,
    window: int = 1024,
    stride: int = 512,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
) -> EvalReport:
    """Tokenize ``text`` with the folder's tokenizer (``tokenizer.json``, else bytes) and measure
    the perplexity of the latent weights (latent checkpoints) and of the packed ones."""
    from .models import load_model, load_tokenizer

    model = load_model(model_dir, device=device, dtype=dtype, progress=False)
    cfg = model.config
    tok = load_tokenizer(model_dir, cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if int(ids.max()) >= cfg.vocab_size:
        raise ValueError(f"the tokenizer gives id {int(ids.max())} but the model's vocab_size is {cfg.vocab_size}")
    stored_packed = model.is_packed
    results: dict[str, PerplexityResult] = {}
    if not stored_packed:
        results["latent"] = sliding_window_perplexity(model, ids, window, stride, batch_size)
        model.pack()
    results["packed"] = sliding_window_perplexity(model, ids, window, stride, batch_size)
    return EvalReport(
        model_dir=model_dir,
        stored_packed=stored_packed,
        device=str(model.device),
        dtype=str(model.dtype).replace("torch.", ""),
        text_tokens=ids.numel(),
        window=window,
        stride=stride,
        batch_size=batch_size,
        results=results,
    )
