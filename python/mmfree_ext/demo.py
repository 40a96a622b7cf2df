"""The end-to-end demo: train a small byte-level MMfreeLM, pack it, generate, compare.

Needs no download: the text is the docstrings of standard-library modules. Steps:
train for ``--seconds`` with the trainable ops (loss printed as it falls), pack every
BitLinear to 2 bits, generate a sample with the inference kernels, then time decoding of
the packed model against :class:`mmfree_ext.reference.ReferenceMMfreeLM` holding the same
weights, and print tokens/s and model memory for both.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch

from ._corpus import stdlib_docstrings
from ._native import cuda_available
from .models import ByteTokenizer, MMfreeLMConfig, MMfreeLMForCausalLM, generate, model_memory_bytes
from .reference import ReferenceMMfreeLM
from .train import TrainConfig, run_training

__all__ = ["DemoSettings", "run_demo"]


@dataclass
class DemoSettings:
    seconds: float = 60.0
    device: str = "auto"
    hidden_size: int | None = None
    num_layers: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float = 4e-3
    new_tokens: int = 200
    prompt: str = "Return the "
    temperature: float = 0.7
    top_k: int = 20
    seed: int = 0
    threads: int | None = None


# Sizes per device kind: small enough to learn visibly in a minute on 2 CPU cores.
_CPU_DEFAULTS = {"hidden_size": 128, "num_layers": 3, "batch_size": 8, "seq_len": 96}
_GPU_DEFAULTS = {"hidden_size": 768, "num_layers": 8, "batch_size": 32, "seq_len": 256}


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@torch.no_grad()
def _reference_decode_tps(ref: ReferenceMMfreeLM, prompt: list[int], n_tokens: int, device: torch.device) -> float:
    """Greedy decode tokens/s of the reference model (prefill, then one token per step)."""
    ids = torch.tensor([prompt], device=device)
    logits, state = ref(ids)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits, state = ref(tok, state)
        tok = logits[:, -1].argmax(-1, keepdim=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_tokens / (time.perf_counter() - t0)


def demo_train_config(s: DemoSettings, sizes: dict[str, int], device: torch.device, run_dir: str) -> TrainConfig:
    """The demo as a preset of ``mmfree train``: the docstring corpus as bytes, one plain fp32
    process, time-boxed (the cosine is stretched over the steps that fit), no checkpoints."""
    cfg = TrainConfig()
    cfg.model.size = "tiny"
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.init_seed = sizes["hidden_size"], sizes["num_layers"], s.seed
    cfg.data.source, cfg.data.tokenizer, cfg.data.seq_len = "stdlib", "bytes", sizes["seq_len"]
    t = cfg.train
    t.out_dir, t.steps, t.max_seconds, t.global_batch = run_dir, 0, s.seconds, sizes["batch_size"]
    t.seed, t.device, t.precision, t.fsdp = s.seed, device.type, "fp32", "off"
    cfg.optim.lr, cfg.optim.warmup_steps = s.lr, 10
    cfg.checkpoint.at_end, cfg.checkpoint.resume = False, "none"
    cfg.log.summary = False
    return cfg


def run_demo(s: DemoSettings, log=print) -> dict:
    """Run the demo; returns the numbers it printed (for tests and the CLI)."""
    if s.device == "auto":
        device = torch.device("cuda" if cuda_available() else "cpu")
    else:
        device = torch.device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    sizes = dict(_GPU_DEFAULTS if device.type == "cuda" else _CPU_DEFAULTS)
    for key in sizes:
        if getattr(s, key) is not None:
            sizes[key] = getattr(s, key)

    tok = ByteTokenizer()
    log("mmfree-ext demo: a byte-level MatMul-free LM trained on standard-library docstrings")
    t0 = time.perf_counter()
    text = stdlib_docstrings()
    log(f"corpus: {len(text.encode('utf-8')):,} bytes of docstrings ({time.perf_counter() - t0:.1f}s to collect)")

    cfg = MMfreeLMConfig(
        vocab_size=tok.vocab_size,
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_layers"],
        bos_token_id=tok.BOS,
        eos_token_id=tok.EOS,
    )
    n_params = sum(p.numel() for p in MMfreeLMForCausalLM(cfg, init_seed=None).parameters())
    log(
        f"model: h={cfg.hidden_size} L={cfg.num_hidden_layers} I={cfg.intermediate_size} vocab={cfg.vocab_size} "
        f"({n_params / 1e6:.2f}M params) on {device}, torch threads {torch.get_num_threads()}"
    )
    log(f"training for {s.seconds:.0f}s: batch {sizes['batch_size']} x {sizes['seq_len']} bytes, AdamW lr {s.lr}")
    with tempfile.TemporaryDirectory(prefix="mmfree-demo-") as run_dir:
        res = run_training(demo_train_config(s, sizes, device, run_dir), log=log)
    model = res.model
    assert model is not None
    first, last = res.smoothed()
    log(
        f"trained {res.steps} steps ({res.tokens / res.seconds:,.0f} tokens/s): "
        f"loss {first:.3f} -> {last:.3f} (uniform guess: {torch.log(torch.tensor(float(cfg.vocab_size))):.3f})"
    )

    # Same weights in the plain-PyTorch reference, before packing drops the latent weights.
    ref = ReferenceMMfreeLM(cfg.to_dict()).to(device)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    latent_bytes = model_memory_bytes(model)
    model.pack()
    packed_bytes = model_memory_bytes(model)

    prompt = tok.encode(s.prompt)
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)
        ours = model(ids).logits
        theirs = ref(ids)[0]
        rel = float((ours - theirs).norm() / theirs.norm())
    log(f"packed model vs reference logits on the prompt: relative difference {rel:.2e}")

    out = generate(
        model,
        [prompt],
        s.new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        seed=s.seed,
        stop_tokens=[tok.EOS],
    )
    sample = tok.decode(out.tokens[0])
    log(f"\n--- sample (packed 2-bit model, temperature {s.temperature:.2f}, top-k {s.top_k}) ---")
    log(s.prompt + sample)
    log("---")

    n_time = min(s.new_tokens, 100)
    greedy = generate(model, [prompt], n_time + 1, decode_mode="auto")
    ours_tps = greedy.decode_tokens_per_second
    ref_tps = _reference_decode_tps(ref, prompt, n_time, device)
    log(f"decode, batch 1 ({n_time} tokens, {device}):")
    log(f"  mmfree packed 2-bit : {ours_tps:9.1f} tok/s   memory {_fmt_bytes(packed_bytes)}")
    log(f"  reference (fp32)    : {ref_tps:9.1f} tok/s   memory {_fmt_bytes(model_memory_bytes(ref))}")
    log(f"  speedup {ours_tps / ref_tps:.1f}x, memory {model_memory_bytes(ref) / packed_bytes:.1f}x smaller")
    return {
        "loss_first": first,
        "loss_last": last,
        "steps": res.steps,
        "sample": sample,
        "tokens_per_s": ours_tps,
        "reference_tokens_per_s": ref_tps,
        "packed_bytes": packed_bytes,
        "latent_bytes": latent_bytes,
        "reference_bytes": model_memory_bytes(ref),
        "logits_rel_diff": rel,
    }
