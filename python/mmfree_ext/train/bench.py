"""The model-level training benchmark (``mmfree bench --train``, ``benchmarks/bench_train_model.py``).

Times :func:`~mmfree_ext.train.step.train_step`, the step ``mmfree train`` runs, on random
tokens: bf16 parameters, AdamW (fused on CUDA), batch ``B x T``, eager or with the loss
function compiled (fullgraph for ours). The same harness times a transformers
``LlamaForCausalLM`` of the same width and depth as the baseline.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MMfreeLMForCausalLM, named_config
from .data import IGNORE, Batch
from .step import build_optimizer, lm_loss_sum, train_step

__all__ = ["bench_train_step", "llama_like", "random_latent_model"]


@torch.no_grad()
def random_latent_model(size: str, device: torch.device, dtype: torch.dtype) -> MMfreeLMForCausalLM:
    """A trainable (latent) model of a named size, N(0, 0.02) weights drawn on ``device``."""
    with torch.device("meta"):
        model = MMfreeLMForCausalLM(named_config(size), init_seed=None)
    model.to_empty(device=device)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name == "model.lower_bounds":
            p.normal_(0.0, 1.0)
        else:
            p.normal_(0.0, 0.02)
    return model.to(dtype)


def llama_like(size: str, device: torch.device, dtype: torch.dtype, seq_len: int) -> nn.Module:
    """transformers ``LlamaForCausalLM`` with our size's h and L, intermediate 8/3*h rounded up to
    256, h/128 heads, SDPA attention (raises ImportError without transformers)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise ImportError("the Llama baseline needs transformers: pip install transformers") from exc
    mc = named_config(size)
    h = mc.hidden_size
    inter = 256 * -(-int(h * 8 / 3) // 256)
    cfg = LlamaConfig(
        vocab_size=mc.vocab_size,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=mc.num_hidden_layers,
        num_attention_heads=max(1, h // 128),
        num_key_value_heads=max(1, h // 128),
        max_position_embeddings=max(seq_len, 2048),
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def llama_loss_sum(model: nn.Module, input_ids: Tensor, labels: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """The summed cross entropy of a transformers causal LM (same reduction as ours)."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train_step(
    size: str,
    device: torch.device | str,
    *,
    model_kind: str = "mmfree",
    batch: int = 4,
    seq_len: int = 2048,
    steps: int = 10,
    warmup: int = 3,
    compile: bool = False,
    compile_mode: str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Tokens/s and peak memory of ``steps`` training steps (after ``warmup``) of ``model_kind``
    (``mmfree`` or ``llama``) at ``size``; bf16 parameters on CUDA (fp32 on CPU) unless ``dtype``.
    ``compile_mode`` is ``torch.compile``'s ``mode`` (``"reduce-overhead"``: the forward and
    backward graphs replayed as CUDA graphs; each step then starts a new graph generation)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if compile_mode is not None and not compile:
        raise ValueError("compile_mode needs compile=True")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if model_kind == "mmfree":
        model = random_latent_model(size, device, dtype)
        loss_fn = lm_loss_sum
        vocab = model.config.vocab_size
    elif model_kind == "llama":
        model = llama_like(size, device, dtype, seq_len)
        loss_fn = llama_loss_sum
        vocab = model.config.vocab_size
    else:
        raise ValueError(f"model_kind must be 'mmfree' or 'llama', got {model_kind!r}")
    if compile:
        loss_fn = torch.compile(loss_fn, fullgraph=model_kind == "mmfree", mode=compile_mode)
    graphs = compile_mode in ("reduce-overhead", "max-autotune")
    model.train()
    opt = build_optimizer(model, 1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
    mb = Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), None).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":  # peak of the training steps, not of building the model
        torch.cuda.reset_peak_memory_stats(device)
    t_first = t0 = time.perf_counter()
    warm_s = 0.0
    for k in range(warmup + steps):
        if k == warmup:
            _sync(device)
            warm_s = time.perf_counter() - t_first
            t0 = time.perf_counter()
        if graphs:  # the previous step's graph outputs (loss, gradients) are consumed
            torch.compiler.cudagraph_mark_step_begin()
        last = train_step(model, opt, [mb], batch * seq_len, loss_fn=loss_fn)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None  # CUDA only
    result = {
        "model": model_kind,
        "size": size,
        "params": n_params,
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": compile,
        "compile_mode": compile_mode,
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "step_ms": 1e3 * seconds / steps,
        "tokens_per_s": steps * batch * seq_len / seconds,
        "peak_memory_gib": peak,
        "warmup_s": warm_s,
        "final_loss": float(last.loss) if last is not None else None,
    }
    del model, opt, mb
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
