"""Tests of the model layer (python/mmfree_ext/models): config, the kernel model against
mmfree_ext.reference, checkpoint loading/saving, packing, generation, compile, CLI.

Model-level logits are compared with a relative tolerance (SPEC section 2: quantization makes
the model discontinuous, so an ulp-level difference in a statistic can move an int8 code by
one); paths that run the *same* ops (prefill vs decode, batched vs single, saved vs loaded)
must agree exactly or to fp32 rounding of the scan.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from conftest import DEVICES
from mmfree_ext import reference as ref
from mmfree_ext.models import (
    ByteTokenizer,
    CheckpointError,
    MMfreeLMConfig,
    MMfreeLMForCausalLM,
    generate,
    load_tokenizer,
    model_memory_bytes,
    named_config,
    sample_next,
    save_packed,
)

# Small but not trivial: K=96 is not a multiple of the 128-weight pack block, I=200 neither.
TINY = {"vocab_size": 300, "hidden_size": 96, "num_hidden_layers": 3, "intermediate_size": 200}

# Relative Frobenius distance allowed between the kernel model and the reference (SPEC sec. 2).
LOGITS_RTOL = 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _reference(seed: int = 1, **over) -> ref.ReferenceMMfreeLM:
    """A reference model with random weights, non-trivial norms and lower bounds."""
    model = ref.ReferenceMMfreeLM({**TINY, **over}).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        model.model.lower_bounds.copy_(torch.randn(model.model.lower_bounds.shape, generator=gen))
    return model.eval()


def _hgrn_config(**over) -> dict:
    """A config.json as the paper's checkpoints write it (with fields we ignore)."""
    cfg = {
        "model_type": "hgrn_bit",
        "architectures": ["HGRNBitForCausalLM"],
        "attn_mode": "fused_recurrent",
        "conv_size": 4,
        "expand_ratio": 1,
        "fuse_cross_entropy": True,
        "hidden_act": "swish",
        "hidden_ratio": 4,
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "num_heads": 1,
        "rms_norm_eps": 1e-6,
        "share_conv_kernel": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_lower_bound": True,
        "use_short_conv": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **TINY,
    }
    cfg.update(over)
    return cfg


def _model_from(reference: ref.ReferenceMMfreeLM, device: str = "cpu") -> MMfreeLMForCausalLM:
    model = MMfreeLMForCausalLM(MMfreeLMConfig.from_dict(_hgrn_config()), init_seed=None)
    model.load_state_dict(reference.state_dict())
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


def test_config_parses_paper_json_and_round_trips():
    cfg = MMfreeLMConfig.from_dict(_hgrn_config(intermediate_size=None))
    assert cfg.intermediate_size == ref.default_intermediate_size(96)  # int(96*4*2/3)=256 -> 256
    assert cfg.extra["attn_mode"] == "fused_recurrent"
    again = MMfreeLMConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(("size", "h", "layers", "inter"), [("370M", 1024, 24, 2816), ("1.3B", 2048, 24, 5632),
                                                            ("2.7B", 2560, 32, 6912)])  # fmt: skip
def test_named_configs_match_the_paper(size, h, layers, inter):
    cfg = named_config(size)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (h, layers, inter, 32000)


@pytest.mark.parametrize(
    ("field", "value"),
    [("model_type", "llama"), ("num_heads", 4), ("use_short_conv", True), ("hidden_act", "gelu"),
     ("tie_word_embeddings", True), ("hidden_size", 0)],
)  # fmt: skip
def test_config_rejects_unsupported_fields_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        MMfreeLMConfig.from_dict(_hgrn_config(**{field: value}))


# ----------------------------------------------------------------------------------------
# Logits against the reference; prefill / decode / full forward agreement
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
def test_logits_match_reference(device, packed):
    reference = _reference()
    model = _model_from(reference, device)
    if packed:
        model.pack()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        want, want_state = reference(ids)
        got, got_state = model(ids.to(device))
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.isnan(got).any()
    assert _rel(got.cpu(), want) < LOGITS_RTOL
    assert _rel(got_state.cpu(), torch.stack(want_state)) < LOGITS_RTOL


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_model_error_is_within_torch_bf16_error(device):
    """flash-attention rule: our bf16 model's distance to the fp32 reference is at most a small
    multiple of the bf16 reference's own distance to it."""
    reference = _reference()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        truth = reference(ids)[0]
        ref_bf16 = ref.ReferenceMMfreeLM(TINY)
        ref_bf16.load_state_dict(reference.state_dict())
        ref_err = _rel(ref_bf16.to(torch.bfloat16)(ids)[0], truth)
        model = _model_from(reference, device).pack().to(torch.bfloat16)
        ours_err = _rel(model(ids.to(device)).logits.cpu(), truth)
    assert ours_err <= 3 * ref_err + 1e-3, (ours_err, ref_err)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_then_decode_equals_full_forward(device):
    model = _model_from(_reference(), device).pack()
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), device=device)
    with torch.no_grad():
        full = model(ids).logits
        # prefill 5 tokens, then three single-token steps from the returned state
        out = model(ids[:, :5])
        pieces, state = [out.logits], out.state
        for t in range(5, 8):
            step = model(ids[:, t : t + 1], state)
            pieces.append(step.logits)
            state = step.state
        stepped = torch.cat(pieces, dim=1)
        last_only = model(ids, logits_to_keep=1).logits
    assert _rel(stepped, full) < 1e-4
    torch.testing.assert_close(last_only, full[:, -1:], rtol=0, atol=0)


def test_latent_and_packed_models_agree():
    model = _model_from(_reference())
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        latent = model(ids).logits
        packed = model.pack()(ids).logits
    assert _rel(packed, latent) < LOGITS_RTOL


def test_bf16_model_keeps_scales_fp32():
    model = _model_from(_reference()).pack()
    scales = [m.w_scale.clone() for m in model.modules() if hasattr(m, "w_scale")]
    model = model.to(torch.bfloat16)
    after = [m.w_scale for m in model.modules() if hasattr(m, "w_scale")]
    assert all(s.dtype == torch.float32 for s in after)
    assert all(torch.equal(a, b) for a, b in zip(scales, after, strict=True))
    ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def _write_checkpoint(path, state: dict, fmt: str, config: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config or _hgrn_config(), fh)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, os.path.join(path, "model.safetensors"))
    elif fmt == "bin":
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    elif fmt == "sharded":
        keys = sorted(state)
        halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        weight_map = {}
        for name, ks in halves.items():
            save_file({k: state[k] for k in ks}, os.path.join(path, name))
            weight_map.update(dict.fromkeys(ks, name))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    else:
        raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_reference_state_dict_loads_without_warnings(tmp_path, fmt):
    reference = _reference()
    _write_checkpoint(tmp_path, reference.state_dict(), fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = MMfreeLMForCausalLM.from_pretrained(str(tmp_path), progress=False)
    assert set(model.state_dict()) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        assert _rel(model(ids).logits, reference(ids)[0]) < LOGITS_RTOL


def test_load_with_pack_and_dtype(tmp_path):
    reference = _reference()
    _write_checkpoint(tmp_path, reference.state_dict(), "safetensors")
    model = MMfreeLMForCausalLM.from_pretrained(str(tmp_path), pack=True, progress=False)
    assert model.is_packed and not any(k.endswith("proj.weight") for k in model.state_dict())
    bf = MMfreeLMForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16, progress=False)
    assert bf.dtype == torch.bfloat16


def _bad_state(kind: str) -> tuple[dict, str]:
    state = dict(_reference().state_dict())
    if kind == "missing":
        del state["model.layers.1.attn.f_proj.norm.weight"]
        return state, "model.layers.1.attn.f_proj.norm.weight"
    if kind == "unexpected":
        state["model.layers.0.attn.q_proj.weight"] = torch.zeros(3)
        return state, "model.layers.0.attn.q_proj.weight"
    if kind == "shape":
        state["model.layers.2.mlp.down_proj.weight"] = torch.zeros(96, 199)
        return state, "model.layers.2.mlp.down_proj.weight"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_bad_checkpoint_names_the_key(tmp_path, kind):
    state, key = _bad_state(kind)
    _write_checkpoint(tmp_path, state, "safetensors")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        MMfreeLMForCausalLM.from_pretrained(str(tmp_path), progress=False)


def test_bad_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        MMfreeLMForCausalLM.from_pretrained(str(tmp_path), progress=False)
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(_hgrn_config(model_type="llama"), fh)
    with pytest.raises(ValueError, match="model_type"):
        MMfreeLMForCausalLM.from_pretrained(str(tmp_path), progress=False)
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(_hgrn_config(), fh)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        MMfreeLMForCausalLM.from_pretrained(str(tmp_path), progress=False)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_save_and_load_round_trip(tmp_path, device):
    model = _model_from(_reference())
    latent_bytes = model_memory_bytes(model)
    save_packed(model, str(tmp_path), progress=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "hgrn_bit" and cfg["mmfree"]["packed"] is True
    loaded = MMfreeLMForCausalLM.from_pretrained(str(tmp_path), device=device, progress=False)
    assert loaded.is_packed and loaded.device.type == device
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key].cpu(), value), key
    # Packed memory: 2 bits per weight (rows padded to 128), fp32 scales, norms (+ the stacked
    # i/f/g norm copy), embeddings, lower_bounds (+ the derived fp32 per-layer bounds).
    cfgm = model.config
    h, inter, v, n_layers = cfgm.hidden_size, cfgm.intermediate_size, cfgm.vocab_size, cfgm.num_hidden_layers
    row = lambda k: -(-k // 128) * 32
    per_layer = 4 * h * row(h) + 2 * inter * row(h) + h * row(inter) + 6 * 4 + (8 * h + inter + 3 * h) * 4
    expected = n_layers * per_layer + v * row(h) + 4 + 4 * h + (v * h + 2 * n_layers * h + h) * 4
    assert model_memory_bytes(loaded) == expected < latent_bytes
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids.to(device)).logits.cpu(), model(ids).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Sampling and generation
# ----------------------------------------------------------------------------------------


def test_sample_next_greedy_top_k_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert sample_next(logits).tolist() == [1]
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {1, 3}
    # probs ~ [.03, .64, .09, .24, .01]: top_p 0.7 keeps {1, 3} (0.64 < 0.7 so 3 is needed)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=gen)) for _ in range(200)}
    assert draws == {1, 3}
    draws = {int(sample_next(logits, 1.0, top_p=0.5, generator=gen)) for _ in range(50)}
    assert draws == {1}


def test_greedy_generation_is_deterministic_and_streams():
    model = _model_from(_reference()).pack()
    seen: list[tuple[int, int]] = []
    a = generate(model, [[5, 6, 7]], 12, on_token=lambda b, t: seen.append((b, t)))
    b = generate(model, [[5, 6, 7]], 12)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 12
    assert seen == [(0, t) for t in a.tokens[0]]
    # it is the argmax of a full forward, token by token
    ids = torch.tensor([[5, 6, 7, *a.tokens[0][:-1]]])
    with torch.no_grad():
        assert model(ids).logits[0, 2:].argmax(-1).tolist() == a.tokens[0]


def test_sampling_is_seeded():
    model = _model_from(_reference()).pack()
    kw = {"temperature": 1.0, "top_k": 50, "top_p": 0.95}
    a = generate(model, [[1, 2]], 16, seed=3, **kw)
    b = generate(model, [[1, 2]], 16, seed=3, **kw)
    c = generate(model, [[1, 2]], 16, seed=4, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_batched_generation_with_different_lengths_equals_one_by_one():
    model = _model_from(_reference()).pack()
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13]]
    batched = generate(model, prompts, 10)
    single = [generate(model, [p], 10).tokens[0] for p in prompts]
    assert batched.tokens == single


def test_stop_tokens_end_each_sequence():
    model = _model_from(_reference()).pack()
    free = generate(model, [[5, 6, 7], [8, 9]], 8).tokens
    stop = free[0][3]
    first_stop = [seq.index(stop) if stop in seq else len(seq) for seq in free]
    res = generate(model, [[5, 6, 7], [8, 9]], 8, stop_tokens=[stop])
    assert res.tokens == [seq[:n] for seq, n in zip(free, first_stop, strict=True)]
    assert res.stopped[0]


def test_byte_tokenizer_and_fallbacks(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == tok.BOS and tok.decode(ids) == "héllo"
    assert isinstance(load_tokenizer(str(tmp_path), 258), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path), 32000)


# ----------------------------------------------------------------------------------------
# torch.compile (no graph breaks): prefill, decode step, training step
# ----------------------------------------------------------------------------------------


def test_compile_fullgraph_prefill_and_decode():
    torch._dynamo.reset()
    model = _model_from(_reference()).pack()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    with torch.no_grad():
        want = model(ids)
        got = compiled(ids)
        torch.testing.assert_close(got.logits, want.logits)
        step_want = model(ids[:, :1], want.state)
        step_got = compiled(ids[:, :1], want.state)
        torch.testing.assert_close(step_got.logits, step_want.logits)
        torch.testing.assert_close(step_got.state, step_want.state)


def test_compile_fullgraph_training_step():
    from mmfree_ext.train import lm_loss_sum

    torch._dynamo.reset()
    model = _model_from(_reference())
    batch = torch.randint(0, TINY["vocab_size"], (2, 9))
    step = torch.compile(lambda b: lm_loss_sum(model, b[:, :-1], b[:, 1:]), fullgraph=True, backend="aot_eager")
    loss = step(batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert float(grads["model.layers.1.attn.i_proj.weight"].abs().sum()) > 0


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def test_cli_parses_every_command():
    from mmfree_ext.cli import build_parser

    p = build_parser()
    g = p.parse_args(["generate", "--model", "d", "--prompt", "hi", "--temperature", "0.8", "--top-k", "5"])
    assert (g.model, g.prompt, g.temperature, g.top_k, g.top_p) == ("d", "hi", 0.8, 5, 1.0)
    assert p.parse_args(["convert", "a", "b"]).out_dir == "b"
    assert p.parse_args(["bench", "--config", "2.7B", "--batch", "1", "8", "64"]).batch == [1, 8, 64]
    assert p.parse_args(["demo", "--seconds", "5"]).seconds == 5.0
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "--prompt", "x"])  # --model is required


def test_cli_info_convert_generate(tmp_path, capsys):
    from mmfree_ext.cli import main

    assert main(["info"]) == 0
    assert "cpu_features" in capsys.readouterr().out
    cfg = _hgrn_config(vocab_size=258, bos_token_id=256, eos_token_id=257)
    reference = _reference(vocab_size=258)
    _write_checkpoint(tmp_path / "latent", reference.state_dict(), "safetensors", cfg)
    assert main(["convert", str(tmp_path / "latent"), str(tmp_path / "packed")]) == 0
    assert "packed" in capsys.readouterr().out
    rc = main(["generate", "--model", str(tmp_path / "packed"), "--prompt", "ab", "--max-new-tokens", "5",
               "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.startswith("ab") and "tok/s" in captured.err


# ----------------------------------------------------------------------------------------
# CUDA: graph-captured decode equals eager decode
# ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype):
    model = _model_from(_reference(), "cuda").pack().to(dtype)
    prompts = [[3, 4, 5, 6], [7], [8, 9]]
    eager = generate(model, prompts, 12, decode_mode="eager")
    graph = generate(model, prompts, 12, decode_mode="cuda_graph")
    again = generate(model, prompts, 12, decode_mode="cuda_graph")  # replays the cached graph
    assert graph.tokens == eager.tokens == again.tokens
    # batch 1 captures its own graph and must give the batched result
    assert generate(model, [prompts[1]], 12, decode_mode="cuda_graph").tokens[0] == graph.tokens[1]


@pytest.mark.cuda
def test_cuda_compile_decode_equals_eager():
    model = _model_from(_reference(), "cuda").pack()
    eager = generate(model, [[3, 4, 5]], 8, decode_mode="eager")
    comp = generate(model, [[3, 4, 5]], 8, decode_mode="compile")
    assert comp.tokens == eager.tokens


@pytest.mark.slow
def test_demo_runs_and_learns(capsys):
    """The README's `make demo` path (python -m mmfree_ext demo), shortened."""
    from mmfree_ext.demo import DemoSettings, run_demo

    # one thread: two threads on a busy 2-core machine spin against each other (10x slower steps)
    res = run_demo(DemoSettings(seconds=4, device="cpu", new_tokens=20, threads=1), log=print)
    out = capsys.readouterr().out
    assert "tok/s" in out and "--- sample" in out
    assert res["loss_last"] < res["loss_first"] and res["logits_rel_diff"] < LOGITS_RTOL
    assert res["packed_bytes"] < res["reference_bytes"]
