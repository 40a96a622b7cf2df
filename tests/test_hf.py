"""transformers integration (mmfree_ext.hf): Auto classes on a folder in the paper's layout,
logits and greedy generate() equal to the native model, beam search / sampling / padding /
stop strings / streaming through GenerationMixin, packed and latent round trips, Trainer and
PEFT smoke tests, and the config errors that name the field. Skipped without transformers.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextStreamer  # noqa: E402

import mmfree_ext.hf as mh  # noqa: E402
from mmfree_ext.models import MMfreeLMConfig, MMfreeLMForCausalLM, generate, load_model  # noqa: E402

# K=96 and I=200 are not multiples of the 128-weight pack block (tail paths); vocab 300 > 259
# byte-level BPE symbols, so the tokenizer below has real merges.
TINY = {"vocab_size": 300, "hidden_size": 96, "num_hidden_layers": 3, "intermediate_size": 200}
UNK, BOS, EOS = 0, 1, 2

# Every field of the paper's config.json (the released MMfreeLM folders), values as they write them.
PAPER_CONFIG = {
    "architectures": ["HGRNBitForCausalLM"],
    "attn_mode": "fused_recurrent",
    "bos_token_id": BOS,
    "conv_size": 4,
    "eos_token_id": EOS,
    "expand_ratio": 1,
    "fuse_cross_entropy": True,
    "hidden_act": "swish",
    "hidden_ratio": 4,
    "initializer_range": 0.02,
    "max_position_embeddings": 2048,
    "model_type": "hgrn_bit",
    "num_heads": 1,
    "rms_norm_eps": 1e-6,
    "share_conv_kernel": True,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.39.3",
    "use_cache": True,
    "use_lower_bound": True,
    "use_short_conv": False,
    **TINY,
}

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a matmul-free language model keeps one state per layer",
    "ternary weights are packed at two bits each",
    "once upon a time there was a small recurrent model",
] * 4


def _native_model(seed: int = 3) -> MMfreeLMForCausalLM:
    """Random weights with non-trivial norms and lower bounds (so every parameter matters)."""
    model = MMfreeLMForCausalLM(MMfreeLMConfig(**TINY)).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        model.model.lower_bounds.copy_(torch.randn(model.model.lower_bounds.shape, generator=gen))
        # Larger logits than N(0, 0.02) gives: greedy and beam choices are not near-ties.
        model.lm_head.norm.weight.mul_(4.0)
    return model.eval()


def _write_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer.json (ids 0/1/2 = <unk>/<s>/</s>, as the paper's Llama one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY["vocab_size"],
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= TINY["vocab_size"]
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_input_names": ["input_ids", "attention_mask"],
            },
            fh,
        )


def _write_paper_folder(folder: str, model: MMfreeLMForCausalLM, weights: str = "safetensors", **config) -> str:
    """config.json (the paper's fields) + model.safetensors or pytorch_model.bin + tokenizer files."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump({**PAPER_CONFIG, **config}, fh, indent=2)
    _write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def native() -> MMfreeLMForCausalLM:
    return _native_model()


@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory: pytest.TempPathFactory, native: MMfreeLMForCausalLM) -> str:
    return _write_paper_folder(str(tmp_path_factory.mktemp("paper")), native)


@pytest.fixture(scope="module")
def hf_model(paper_dir: str) -> mh.HGRNBitForCausalLM:
    return AutoModelForCausalLM.from_pretrained(paper_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(paper_dir: str):
    tok = AutoTokenizer.from_pretrained(paper_dir)
    tok.padding_side = "left"
    tok.pad_token = tok.unk_token
    return tok


def _ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------
# Config and loading
# ----------------------------------------------------------------------------------------


def test_auto_config_keeps_every_paper_field(paper_dir: str) -> None:
    cfg = AutoConfig.from_pretrained(paper_dir)
    assert isinstance(cfg, mh.HGRNBitConfig)
    for key, value in PAPER_CONFIG.items():
        if key in ("torch_dtype", "transformers_version"):
            continue
        assert getattr(cfg, key) == value, key
    assert cfg.to_mmfree_config().intermediate_size == TINY["intermediate_size"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_short_conv", True),
        ("num_heads", 2),
        ("expand_ratio", 2),
        ("use_lower_bound", False),
        ("tie_word_embeddings", True),
        ("hidden_act", "gelu"),
        ("attn_mode", "parallel"),
        ("hidden_size", 0),
    ],
)
def test_unsupported_config_field_is_named(tmp_path, native, field: str, value) -> None:
    folder = _write_paper_folder(str(tmp_path / "bad"), native, **{field: value})
    with pytest.raises(ValueError, match=f"'{field}'"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=f"'{field}'"):
        mh.HGRNBitConfig(**{field: value})


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_auto_model_logits_equal_native(tmp_path, native, weights: str) -> None:
    folder = _write_paper_folder(str(tmp_path / weights), native, weights=weights)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, mh.HGRNBitForCausalLM)
    assert not model.training and model.can_generate()
    ids = torch.randint(3, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        got = model(ids)
        want = native(ids)
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.past_key_values.state if hasattr(got, "past_key_values") else got.cache.state, want.state)


@pytest.mark.parametrize("dtype_kwarg", ["dtype", "torch_dtype"])
def test_dtype_and_device_map(paper_dir: str, dtype_kwarg: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(paper_dir, device_map="cpu", **{dtype_kwarg: torch.bfloat16})
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    want = load_model(paper_dir, dtype=torch.bfloat16, progress=False)
    ids = torch.randint(3, TINY["vocab_size"], (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want(ids).logits)


def test_cache_errors_and_batch_ops() -> None:
    cache = mh.MMfreeCache(2)
    assert cache.get_seq_length() == 0 and not cache.is_initialized and len(cache) == 0
    state = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    cache.update_state(state, 5)
    assert cache.get_seq_length() == 5 and cache.batch_size == 3 and all(cache.is_linear)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.state, state[:, [2, 2, 0]])
    cache.batch_repeat_interleave(2)
    assert cache.state.shape == (2, 6, 4)
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(cache.state, state[:, [2, 0]])
    with pytest.raises(ValueError, match="state must be"):
        cache.update_state(torch.zeros(3, 1, 4), 1)
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        cache.crop(2)
    with pytest.raises(ValueError, match="num_layers"):
        mh.MMfreeCache(0)


def test_forward_errors_name_the_argument(hf_model) -> None:
    ids = _ids([5, 6, 7])
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf_model(inputs_embeds=torch.zeros(1, 3, TINY["hidden_size"]))
    with pytest.raises(ValueError, match="attention_mask"):
        hf_model(ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="output_hidden_states"):
        hf_model(ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="past_key_values"):
        hf_model(ids, past_key_values=transformers.DynamicCache())
    two = hf_model(_ids([5, 6], [7, 8]), use_cache=True)
    state = two.past_key_values if hasattr(two, "past_key_values") else two.cache
    with pytest.raises(ValueError, match="cache holds 2 sequences"):
        hf_model(ids, past_key_values=state)
    with pytest.raises(ValueError, match="logits_to_keep"):
        hf_model(ids, labels=ids, logits_to_keep=1)


# ----------------------------------------------------------------------------------------
# Loss, cache continuation
# ----------------------------------------------------------------------------------------


def test_labels_give_shifted_cross_entropy(hf_model) -> None:
    ids = torch.randint(3, TINY["vocab_size"], (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    out = hf_model(ids, labels=labels)
    logits = out.logits
    keep = labels[:, 1:] != -100
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(out.loss, manual)
    summed = hf_model(ids, labels=labels, num_items_in_batch=4).loss
    torch.testing.assert_close(summed, manual * keep.sum() / 4)


def test_cache_continues_the_sequence(hf_model) -> None:
    ids = torch.randint(3, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        full = hf_model(ids).logits
        first = hf_model(ids[:, :6], use_cache=True)
        cache = first.past_key_values if hasattr(first, "past_key_values") else first.cache
        assert cache.get_seq_length() == 6
        rest = hf_model(ids[:, 6:], past_key_values=cache).logits
    assert cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# generate()
# ----------------------------------------------------------------------------------------


def _strip_after_eos(row: list[int]) -> list[int]:
    return row[: row.index(EOS)] if EOS in row else row


def test_greedy_generate_equals_native_with_left_padding(hf_model, native, tokenizer) -> None:
    prompts = ["the quick brown", "a matmul-free language model keeps"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    assert enc.attention_mask[0, 0] == 0  # the shorter prompt is left-padded
    out = hf_model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc.input_ids.shape[1] :].tolist()
    want = generate(
        native, [tokenizer(p).input_ids for p in prompts], 12, stop_tokens=[EOS], pad_token_id=tokenizer.pad_token_id
    )
    for got_row, want_row in zip(new, want.tokens, strict=True):
        assert _strip_after_eos(got_row) == want_row
    # each padded row gets what it gets alone
    alone = hf_model.generate(**tokenizer(prompts[:1], return_tensors="pt"), max_new_tokens=12, do_sample=False)
    assert _strip_after_eos(alone[0, -12:].tolist()) == _strip_after_eos(new[0])


def test_beam_search_is_deterministic_and_reorders_the_state(hf_model, tokenizer) -> None:
    enc = tokenizer(["the quick brown", "ternary weights are"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    a = hf_model.generate(**enc, **kw)
    b = hf_model.generate(**enc, **kw)
    assert torch.equal(a, b)
    # Without a cache every step recomputes the whole prefix: no reorder_cache involved.
    c = hf_model.generate(**enc, **kw, use_cache=False)
    assert torch.equal(a, c)


def test_seeded_sampling_is_deterministic(hf_model, tokenizer) -> None:
    enc = tokenizer(["once upon a time"], return_tensors="pt")
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, pad_token_id=tokenizer.pad_token_id)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(hf_model.generate(**enc, **kw))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    torch.manual_seed(0)
    assert torch.equal(hf_model.generate(**enc, **kw, use_cache=False), runs[0])


def test_repetition_penalty_stop_strings_and_streamer(hf_model, tokenizer, capsys) -> None:
    enc = tokenizer(["the lazy dog"], return_tensors="pt")
    prompt_len = enc.input_ids.shape[1]
    plain = hf_model.generate(**enc, max_new_tokens=10, do_sample=False)
    penalized = hf_model.generate(**enc, max_new_tokens=10, do_sample=False, repetition_penalty=5.0)
    new = penalized[0, prompt_len:].tolist()
    assert len(set(new)) == len(new)  # a strong penalty forbids repeating a generated token
    assert not torch.equal(plain, penalized) or len(set(plain[0, prompt_len:].tolist())) == 10
    # stop strings: stop at the first generated token that decodes to a clean word piece
    # (a random-weight model also emits partial UTF-8 bytes)
    generated = plain[0, prompt_len:].tolist()
    k = next(i for i, t in enumerate(generated) if tokenizer.decode([t]).strip().isalpha())
    text = tokenizer.decode([generated[k]])
    stopped = hf_model.generate(**enc, max_new_tokens=10, do_sample=False, stop_strings=[text], tokenizer=tokenizer)
    assert stopped[0, prompt_len:].tolist() == generated[: k + 1]
    capsys.readouterr()
    streamed = hf_model.generate(**enc, max_new_tokens=10, do_sample=False, streamer=TextStreamer(tokenizer))
    printed = capsys.readouterr().out
    assert torch.equal(streamed, plain)
    assert printed.strip() == tokenizer.decode(plain[0]).strip()


# ----------------------------------------------------------------------------------------
# Packed model, round trips
# ----------------------------------------------------------------------------------------


def test_packed_generate_and_round_trip(tmp_path, paper_dir, native) -> None:
    model = AutoModelForCausalLM.from_pretrained(paper_dir).pack()
    ref_packed = load_model(paper_dir, pack=True, progress=False)
    ids = torch.randint(3, TINY["vocab_size"], (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_packed(ids).logits)
    out = model.generate(ids[:1], max_new_tokens=10, do_sample=False)
    want = generate(ref_packed, [ids[0].tolist()], 10, stop_tokens=[EOS])
    assert _strip_after_eos(out[0, 8:].tolist()) == want.tokens[0]
    # decode steps through the native decoder ("auto") and through the plain forward agree
    beams = model.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False)
    model.decode_mode = "eager"
    assert torch.equal(model.generate(ids[:1], max_new_tokens=10, do_sample=False), out)
    assert torch.equal(model.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False), beams)
    model.decode_mode = "auto"

    folder = str(tmp_path / "packed")
    model.save_pretrained(folder)
    saved = json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))
    assert saved["mmfree"]["packed"] is True
    again = AutoModelForCausalLM.from_pretrained(folder)
    assert again.is_packed
    native_again = load_model(folder, progress=False)
    assert native_again.is_packed
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref_packed(ids).logits)
        assert torch.equal(native_again(ids).logits, ref_packed(ids).logits)
    bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    scales = [m.w_scale for m in bf16.modules() if hasattr(m, "w_scale")]
    assert scales and all(s.dtype == torch.float32 for s in scales)
    bf16_native = load_model(folder, dtype=torch.bfloat16, progress=False)
    with torch.no_grad():
        assert torch.equal(bf16(ids).logits, bf16_native(ids).logits)


def test_to_dtype_keeps_packed_scales_fp32(paper_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(paper_dir).pack().to(torch.bfloat16)
    want = load_model(paper_dir, pack=True, progress=False).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(m.w_scale.dtype == torch.float32 for m in model.modules() if hasattr(m, "w_scale"))
    ids = torch.randint(3, TINY["vocab_size"], (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want(ids).logits)


@pytest.mark.parametrize("packed", [False, True])
def test_from_native_shares_the_weights(packed: bool) -> None:
    native = _native_model(seed=7)
    if packed:
        native.pack()
    model = mh.HGRNBitForCausalLM.from_native(native)
    assert model.is_packed == packed and model.config.packed == packed
    ours = dict(model.state_dict(keep_vars=True))
    for key, value in native.state_dict(keep_vars=True).items():
        assert ours[key] is value, key  # the same tensors: no copy
    ids = torch.randint(3, TINY["vocab_size"], (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, native(ids).logits)
    with pytest.raises(ValueError, match="MMfreeLMForCausalLM"):
        mh.HGRNBitForCausalLM.from_native(torch.nn.Linear(2, 2))


def test_from_config_and_register_again() -> None:
    mh.register()  # idempotent, and replaces an earlier registration of hgrn_bit
    config = AutoConfig.for_model("hgrn_bit", **TINY)
    assert isinstance(config, mh.HGRNBitConfig)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, mh.HGRNBitForCausalLM)
    assert set(model.state_dict()) == set(MMfreeLMForCausalLM(MMfreeLMConfig(**TINY), init_seed=None).state_dict())
    emb = model.get_input_embeddings().weight.detach()
    assert torch.isfinite(emb).all() and 0.01 < float(emb.std()) < 0.03  # initializer_range 0.02


def test_latent_save_pretrained_has_the_paper_layout(tmp_path, hf_model, native, paper_dir) -> None:
    folder = str(tmp_path / "latent")
    hf_model.save_pretrained(folder)
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert keys == set(native.state_dict())
    saved = json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))
    for key, value in PAPER_CONFIG.items():
        if key != "transformers_version":
            assert saved.get(key) == value, key
    assert "mmfree" not in saved
    reloaded = load_model(folder, progress=False)  # the native loader (strict keys) reads it
    ids = torch.randint(3, TINY["vocab_size"], (1, 6))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, native(ids).logits)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(ids).logits, native(ids).logits)
    sharded = str(tmp_path / "sharded")
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    with torch.no_grad():
        assert torch.equal(load_model(sharded, progress=False)(ids).logits, native(ids).logits)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(sharded)(ids).logits, native(ids).logits)


# ----------------------------------------------------------------------------------------
# Trainer and PEFT
# ----------------------------------------------------------------------------------------


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train_windows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, 40, (16, 16), generator=gen)  # a small alphabet: learnable in a few steps


def test_trainer_smoke(tmp_path) -> None:
    pytest.importorskip("accelerate")  # transformers' Trainer needs it (make env installs it)
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = mh.HGRNBitForCausalLM(mh.HGRNBitConfig(**{**TINY, "num_hidden_layers": 2}))
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Windows(_train_windows()))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_peft_lora_smoke() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = mh.HGRNBitForCausalLM(mh.HGRNBitConfig(**{**TINY, "num_hidden_layers": 2}))
    frozen = {k: v.detach().clone() for k, v in base.state_dict().items()}
    # LoRA on the token embeddings (the nn.Embedding the model calls as a module).
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["embeddings"]))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    opt = torch.optim.AdamW([p for _, p in trainable], lr=2e-2)
    ids = _train_windows()[:8]
    losses = []
    for _ in range(5):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    # LoRA on the BitLinear projections is refused loudly (the fused paths read their weights
    # directly, so an adapter there would be skipped), not silently ignored.
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(
            mh.HGRNBitForCausalLM(mh.HGRNBitConfig(**TINY)), peft.LoraConfig(r=4, target_modules=["i_proj"])
        )
    merged = model.merge_and_unload()
    for key, value in merged.state_dict().items():
        if key != "model.embeddings.weight":
            assert torch.equal(value, frozen[key]), key  # only the adapted weight changed
    out = merged.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


# ----------------------------------------------------------------------------------------
# CUDA graph decode (packed model)
# ----------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_graph_decode_matches_eager(paper_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(paper_dir, device_map="cuda", dtype=torch.bfloat16).pack()
    ids = torch.randint(3, TINY["vocab_size"], (3, 9), device="cuda")
    from mmfree_ext.models.generation import _GRAPHS

    graph = model.generate(ids, max_new_tokens=16, do_sample=False)
    beams = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    assert model.core in _GRAPHS  # the decode steps replayed the core's CUDA graph
    model.decode_mode = "eager"
    eager = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(graph, eager)
    assert torch.equal(beams, model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False))
    native = load_model(paper_dir, device="cuda", dtype=torch.bfloat16, pack=True, progress=False)
    want = generate(native, ids.tolist(), 16, stop_tokens=[EOS])
    for row, want_row in zip(graph[:, 9:].tolist(), want.tokens, strict=True):
        assert _strip_after_eos(row) == want_row
