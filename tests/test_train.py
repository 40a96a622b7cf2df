"""`mmfree train`: data pipeline, varlen resets, config errors, exact resume, 2 ranks vs 1 (gloo,
FSDP2 on CPU), a world-size-2 checkpoint loaded at world size 1, exports, plots, the CLI."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmfree_ext.models import MMfreeLMForCausalLM, generate, named_config
from mmfree_ext.train import ConfigError, TrainConfig, load_config, run_training
from mmfree_ext.train.data import IGNORE, PackedRows, build_corpus, resolve_files

# Measured on this CPU (fp32, gloo, lr 1e-2): 2 FSDP ranks vs 1 plain process, same global batch:
# loss differences 0, 6.7e-6, 3.4e-5, 1.5e-4, 1.6e-4, 1.7e-3 at steps 1-6 (4e-4 relative at step 6).
# They start at the reduction order of the gradient sums and grow because ternarization is
# discontinuous: a weight that crosses a rounding threshold on one side only flips a code. The
# bound is relative, 2.5x the largest measured. A loss right after loading a checkpoint depends
# on the loaded weights only (no update in between): that one matches to the reduction order.
RANKS_RTOL = 1e-3
LOAD_ATOL = 1e-5

TEXT = (
    "The quick brown fox jumps over the lazy dog.\n\nPack my box with five dozen liquor jugs.\n\n"
    "How vexingly quick daft zebras jump!\n\nSphinx of black quartz, judge my vow.\n\n"
) * 12


def _tiny_cfg(tmp_path, name: str = "run", **over) -> TrainConfig:
    data = tmp_path / "corpus.txt"
    if not data.exists():
        data.write_text(TEXT)
    cfg = TrainConfig()
    values = {
        "model.size": "tiny",
        "model.hidden_size": 64,
        "model.num_layers": 2,
        "data.paths": [str(data)],
        "data.text_split": "blank_line",
        "data.seq_len": 32,
        "train.out_dir": str(tmp_path / name),
        "train.steps": 6,
        "train.global_batch": 4,
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.threads": 1,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 2,
        "log.progress": False,
        "log.summary": False,
        **over,
    }
    for k, v in values.items():
        cfg.set(k, v)
    return cfg


# ----------------------------------------------------------------------------------------
# Data: formats, packing, document boundaries
# ----------------------------------------------------------------------------------------


def test_formats_text_jsonl_parquet_and_tokenizer_json(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "three"}) + "\n\n" + json.dumps({"text": "four"}) + "\n")
    cfg = TrainConfig()
    cfg.set("data.paths", [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    cfg.set("data.text_split", "blank_line")
    corpus = build_corpus(cfg.data)
    # bytes: [bos] + utf-8 + [eos] per document, four documents
    assert corpus.num_documents == 4
    want = []
    for word in ("one", "two", "three", "four"):
        want += [256, *word.encode(), 257]
    assert corpus.tokens.tolist() == want

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["alpha", "beta"]}), tmp_path / "c.parquet")
    cfg.set("data.paths", [str(tmp_path / "c.parquet")])
    cfg.set("data.text_field", "body")
    assert build_corpus(cfg.data).num_documents == 2

    (tmp_path / "bad.jsonl").write_text('{"body": "ok"}\n{"text": "x"}\n')
    cfg.set("data.paths", [str(tmp_path / "bad.jsonl")])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no string field 'body'"):
        build_corpus(cfg.data)
    cfg.set("data.paths", [str(tmp_path / "c.parquet")])

    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "alpha": 3, "beta": 4}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg.set("data.tokenizer", str(tmp_path / "tokenizer.json"))
    corpus = build_corpus(cfg.data)
    assert corpus.tokens.tolist() == [0, 3, 1, 0, 4, 1] and corpus.vocab_size == 5


def test_rows_labels_and_cu_seqlens_follow_documents(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    corpus = build_corpus(cfg.data)
    rows = PackedRows(corpus, 32, seed=0)
    batch = rows.make_batch([0, 1])
    stream = torch.from_numpy(corpus.tokens.astype("int64"))
    starts = torch.from_numpy(corpus.doc_start)
    assert torch.equal(batch.input_ids.flatten(), stream[:64])
    # targets that open a document are ignored, every other target is the next token
    tgt = stream[1:65]
    assert torch.equal(batch.labels.flatten(), tgt.masked_fill(starts[1:65], IGNORE))
    # cu_seqlens: every row start and every document start inside a row
    want = [*sorted({0, 32} | {int(p) for p in torch.nonzero(starts[:64]).flatten()}), 64]
    assert batch.cu_seqlens.tolist() == want
    assert rows.target_tokens([0, 1]) == int((batch.labels != IGNORE).sum())


def test_bucketed_cu_seqlens_keep_the_loss_and_gradients(tmp_path):
    """The CUDA-graph step's batches: cu_seqlens always present, padded with empty sequences
    to a power-of-two count; the loss and every gradient are those of the original batch."""
    from mmfree_ext.train.data import Batch
    from mmfree_ext.train.step import lm_loss_sum

    cfg = _tiny_cfg(tmp_path)
    corpus = build_corpus(cfg.data)
    rows = PackedRows(corpus, 32, seed=0)
    batch = rows.make_batch([0, 1, 2])
    padded = batch.with_bucketed_cu_seqlens()
    seqs = batch.cu_seqlens.numel() - 1
    assert padded.cu_seqlens.numel() - 1 == 1 << (seqs - 1).bit_length()
    assert torch.equal(padded.cu_seqlens[: seqs + 1], batch.cu_seqlens)
    assert (padded.cu_seqlens[seqs:] == 3 * 32).all()
    # no document start inside the rows: the row starts, as a tensor
    plain = Batch(batch.input_ids, batch.labels, None).with_bucketed_cu_seqlens()
    assert plain.cu_seqlens.tolist() == [0, 32, 64, 96, 96]
    torch.manual_seed(0)
    model = MMfreeLMForCausalLM(named_config("tiny", hidden_size=64, num_hidden_layers=2, vocab_size=258))
    grads = []
    for b in (batch, padded):
        model.zero_grad(set_to_none=True)
        loss = lm_loss_sum(model, b.input_ids, b.labels, b.cu_seqlens)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b_ in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)


def test_token_cache_is_reused_and_follows_the_files(tmp_path):
    from mmfree_ext.train.data import cached_corpus

    cfg = _tiny_cfg(tmp_path)
    root = str(tmp_path / "cache")
    first = cached_corpus(cfg.data, root, True, lambda: None)
    direct = build_corpus(cfg.data)
    assert first.tokens.tolist() == direct.tokens.tolist() and first.doc_start.tolist() == direct.doc_start.tolist()
    assert (first.vocab_size, first.bos, first.eos) == (258, 256, 257)
    assert len(os.listdir(root)) == 1
    again = cached_corpus(cfg.data, root, False, lambda: None)  # a non-main rank only reads
    assert again.tokens.tolist() == first.tokens.tolist()
    (tmp_path / "corpus.txt").write_text(TEXT + "one more document\n")
    changed = cached_corpus(cfg.data, root, True, lambda: None)
    assert len(os.listdir(root)) == 2 and changed.tokens.shape[0] > first.tokens.shape[0]


def test_varlen_packed_rows_do_not_leak_across_documents():
    """The loss and gradients of a packed row equal those of its documents run one by one."""
    model = MMfreeLMForCausalLM(named_config("tiny", vocab_size=258, hidden_size=64), init_seed=0)
    docs = [torch.randint(0, 256, (1, n)) for n in (7, 12, 13)]
    row = torch.cat(docs, 1)  # [1, 32]
    cu = torch.tensor([0, 7, 19, 32], dtype=torch.int32)
    packed = model(row, cu_seqlens=cu).logits
    alone = torch.cat([model(d).logits for d in docs], 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=0)
    # without the boundaries the second and third documents see the first one's state
    assert (model(row).logits[:, 7:] - alone[:, 7:]).abs().max() > 1e-3

    def grads(fn):
        model.zero_grad()
        fn().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g_packed = grads(lambda: model(row, cu_seqlens=cu).logits.square().mean())
    g_alone = grads(lambda: torch.cat([model(d).logits for d in docs], 1).square().mean())
    for n in g_packed:
        torch.testing.assert_close(g_packed[n], g_alone[n], rtol=1e-5, atol=1e-7, msg=n)
    # the same through a two-row batch: row boundaries are segment boundaries too
    two = torch.cat([row, row.flip(1)], 0)
    cu2 = torch.tensor([0, 7, 19, 32, 32 + 13, 32 + 25, 64], dtype=torch.int32)  # the flipped row: 13, 12, 7
    out2 = model(two, cu_seqlens=cu2).logits
    torch.testing.assert_close(out2[:1], alone, rtol=0, atol=0)


def test_packed_rows_loss_matches_per_document_loss(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    rows = PackedRows(build_corpus(cfg.data), 32, seed=0)
    batch = rows.make_batch([1])
    model = MMfreeLMForCausalLM(named_config("tiny", vocab_size=258, hidden_size=64), init_seed=0)
    logits = model(batch.input_ids, cu_seqlens=batch.cu_seqlens).logits[0]
    packed = F.cross_entropy(logits, batch.labels[0], ignore_index=IGNORE, reduction="sum")
    total = 0.0
    cu = batch.cu_seqlens.tolist()
    for a, b in itertools.pairwise(cu):
        seg = model(batch.input_ids[:, a:b]).logits[0]
        total = total + F.cross_entropy(seg, batch.labels[0, a:b], ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(packed, total, rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Config: clear errors before any work
# ----------------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path):
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        cfg.set("train.stepz", 3)
    with pytest.raises(ConfigError, match=r"train\.steps = 'many': expected int"):
        cfg.set("train.steps", "many")
    with pytest.raises(ConfigError, match=r"train\.precision = 'fp8': expected one of"):
        cfg.set("train.precision", "fp8")
    bad = tmp_path / "bad.toml"
    bad.write_text("[trian]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]"):
        load_config(str(bad))
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"data\.paths: .*missing\.jsonl.* does not exist"):
        resolve_files([str(tmp_path / "missing.jsonl")])
    c = _tiny_cfg(tmp_path, **{"train.global_batch": 5})
    with pytest.raises(ConfigError, match="not divisible by the world size 2"):
        c.validate(world_size=2)
    c = _tiny_cfg(tmp_path, **{"train.micro_batch": 3})
    with pytest.raises(ConfigError, match=r"micro_batch = 3 does not divide"):
        c.validate()
    c = _tiny_cfg(tmp_path, **{"model.size": "9B"})
    with pytest.raises(ConfigError, match=r"model\.size = '9B'"):
        c.validate()
    c = _tiny_cfg(tmp_path, **{"data.tokenizer": str(tmp_path / "tok.json")})
    with pytest.raises(ConfigError, match=r"data\.tokenizer"):
        c.validate()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    c = _tiny_cfg(tmp_path, **{"model.config": str(tmp_path / "config.json")})
    with pytest.raises(ConfigError, match=r"model\.config = .*'model_type' = 'llama'"):
        c.validate()
    c = _tiny_cfg(tmp_path, **{"train.steps": 0})
    with pytest.raises(ConfigError, match=r"train\.steps = 0"):
        c.validate()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        c = _tiny_cfg(tmp_path, **{"log.tensorboard": True})
        with pytest.raises(ConfigError, match=r"log\.tensorboard = true needs the 'tensorboard' package"):
            c.validate()


def test_cli_missing_data_fails_before_any_work(tmp_path, capsys):
    from mmfree_ext.cli import main

    cfg_file = tmp_path / "run.toml"
    out = tmp_path / "out"
    cfg_file.write_text(f'[data]\npaths = ["missing/*.jsonl"]\n[train]\nout_dir = "{out}"\ndevice = "cpu"\n')
    with pytest.raises(SystemExit, match=r"data\.paths: .*matches no data files"):
        main(["train", str(cfg_file)])
    assert not out.exists()
    # relative paths in a config file are relative to the file; flags override the file
    (tmp_path / "d.txt").write_text("x")
    cfg_file.write_text('[data]\npaths = ["d.txt"]\n[train]\nsteps = 3\n')
    assert main(["train", str(cfg_file), "--train.steps", "7", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"]["paths"] == [str(tmp_path / "d.txt")] and printed["train"]["steps"] == 7


def test_help_documents_every_key():
    from mmfree_ext.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    text = sub.format_help()
    for sec_name, section in TrainConfig().to_dict().items():
        for key in section:
            assert f"--{sec_name}.{key}" in text


# ----------------------------------------------------------------------------------------
# Training, resume, world sizes
# ----------------------------------------------------------------------------------------


def test_training_reduces_loss_and_accumulation_matches(tmp_path):
    res = run_training(_tiny_cfg(tmp_path, "a", **{"train.steps": 20}))
    first, last = res.smoothed(4)
    assert res.steps == 20 and len(res.losses) == 20 and last < first - 0.5
    # 2 micro-batches of 2 rows give the step of one batch of 4 (the global mean loss)
    a = run_training(_tiny_cfg(tmp_path, "b", **{"train.steps": 3}))
    b = run_training(_tiny_cfg(tmp_path, "c", **{"train.steps": 3, "train.micro_batch": 2}))
    torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), rtol=1e-5, atol=1e-5)
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "memory_gib"} <= set(records[0])


def test_stop_and_resume_is_exact(tmp_path):
    full = run_training(_tiny_cfg(tmp_path, "full", **{"checkpoint.at_end": False}))
    part = run_training(_tiny_cfg(tmp_path, "part", **{"train.stop_after": 3}))
    assert part.steps == 3 and part.checkpoint.endswith("step_00000003")
    rest = run_training(_tiny_cfg(tmp_path, "part"))  # checkpoint.resume = auto
    assert rest.start_step == 3 and rest.steps == 3
    assert part.losses + rest.losses == full.losses  # exact on CPU
    records = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    res = run_training(TrainConfig.from_dict(cfg_dict))
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(res.losses, fh)


def _cfg_dict(cfg: TrainConfig) -> dict:
    return {k: {kk: vv for kk, vv in v.items()} for k, v in cfg.to_dict().items()}


def test_two_ranks_match_one_and_checkpoint_loads_at_world_size_one(tmp_path):
    one = run_training(_tiny_cfg(tmp_path, "one", **{"checkpoint.at_end": False}))
    # 2 ranks, 1 row per micro-batch: 2 accumulation steps per rank for the same global batch of 4
    two_cfg = _tiny_cfg(
        tmp_path,
        "two",
        **{"train.micro_batch": 1, "checkpoint.every": 3, "checkpoint.keep": 0, "checkpoint.export": True},
    )
    out = str(tmp_path / "two_losses.json")
    mp.start_processes(_rank_main, args=(2, _free_port(), _cfg_dict(two_cfg), out), nprocs=2, start_method="spawn")
    two = json.load(open(out))
    assert len(two) == 6
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one.losses), rtol=RANKS_RTOL, atol=0)
    assert abs(two[0] - one.losses[0]) <= LOAD_ATOL  # same init, same first batch
    # the export gathers the FSDP shards: the full weights of the last step
    exported = MMfreeLMForCausalLM.from_pretrained(str(tmp_path / "two" / "export" / "latent"), progress=False)
    assert exported.config.hidden_size == 64
    ckpt = tmp_path / "two" / "checkpoints" / "step_00000003"
    assert json.loads((ckpt / "train_state.json").read_text())["world_size"] == 2
    # the world-size-2 (FSDP-sharded) checkpoint continues at world size 1, without FSDP
    cfg = _tiny_cfg(tmp_path, "resumed", **{"checkpoint.resume": str(ckpt), "train.fsdp": "off"})
    rest = run_training(cfg)
    assert rest.start_step == 3 and len(rest.losses) == 3
    assert abs(rest.losses[0] - two[3]) <= LOAD_ATOL  # the loaded weights are the saved ones
    torch.testing.assert_close(torch.tensor(rest.losses), torch.tensor(two[3:]), rtol=RANKS_RTOL, atol=0)
    # the resumed run's final weights match the world-size-2 run's export to the same tolerance
    for name, p in rest.model.state_dict().items():
        torch.testing.assert_close(p, exported.state_dict()[name], rtol=0.05, atol=1e-3, msg=name)
    # a checkpoint of another model is refused with a clear message, before loading
    with pytest.raises(ValueError, match=r"was trained with \[model\]"):
        run_training(_tiny_cfg(tmp_path, "x", **{"checkpoint.resume": str(ckpt), "model.hidden_size": 128}))


_TORCHRUN_TOML = """
[model]
size = "tiny"
hidden_size = 64
num_layers = 2

[data]
source = "synthetic"
synthetic_tokens = 20000
seq_len = 32

[train]
steps = 5
global_batch = 4
device = "cpu"
precision = "fp32"
threads = 1

[optim]
lr = 1e-2
warmup_steps = 2

[checkpoint]
every = 0
at_end = false
export = false

[log]
every = 1
progress = false
"""


def _run_cli(cmd: list[str], out_dir) -> list[float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line)["loss"] for line in open(out_dir / "metrics.jsonl")]


def test_torchrun_two_processes_match_one_process(tmp_path):
    """The launcher users run: `torchrun --nproc_per_node=2 -m mmfree_ext train CONFIG` (gloo,
    FSDP, 1 row per micro-batch) gives the loss curve of one plain process, same global batch."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(_TORCHRUN_TOML)
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    train = [sys.executable, "-m", "mmfree_ext", "train", str(cfg)]
    one = _run_cli([*train, "--train.out_dir", str(one_dir)], one_dir)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = _run_cli(
        [*torchrun, "-m", "mmfree_ext", "train", str(cfg), "--train.out_dir", str(two_dir), "--train.micro_batch", "1"],
        two_dir,
    )
    assert len(one) == len(two) == 5
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=RANKS_RTOL, atol=0)


def test_export_latent_and_packed_load_for_generation(tmp_path):
    res = run_training(_tiny_cfg(tmp_path, "ex", **{"train.steps": 2, "checkpoint.export": True}))
    latent = MMfreeLMForCausalLM.from_pretrained(res.exports["latent"], progress=False)
    for name, p in res.model.state_dict().items():
        torch.testing.assert_close(latent.state_dict()[name], p, rtol=0, atol=0, msg=name)
    packed = MMfreeLMForCausalLM.from_pretrained(res.exports["packed"], progress=False)
    assert packed.is_packed and packed.config.vocab_size == 258 and packed.config.eos_token_id == 257
    out = generate(packed, [[256, 84, 104]], 5)
    assert len(out.tokens[0]) == 5
    # the exported config.json describes the architecture of a new run (model.config)
    again = run_training(
        _tiny_cfg(
            tmp_path, "cfg", **{"train.steps": 1, "model.config": os.path.join(res.exports["latent"], "config.json")}
        )
    )
    assert again.config.hidden_size == 64 and again.config.num_hidden_layers == 2 and again.config.vocab_size == 258
    from mmfree_ext.cli import main

    assert main(["generate", "--model", res.exports["packed"], "--prompt", "Th", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0  # fmt: skip


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from mmfree_ext.cli import main

    run = tmp_path / "p"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as fh:
        for s in range(1, 31):
            fh.write(json.dumps({"step": s, "loss": 5.0 / s, "tokens_per_s": 1000.0 + s}) + "\n")
    assert main(["plot", str(run)]) == 0
    for name in ("loss.png", "throughput.png"):
        data = (run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(SystemExit, match=r"metrics\.jsonl"):
        main(["plot", str(tmp_path / "nothing")])


def test_activation_checkpointing_gives_the_same_steps(tmp_path):
    plain = run_training(_tiny_cfg(tmp_path, "plain", **{"train.steps": 2, "checkpoint.at_end": False}))
    ac = run_training(
        _tiny_cfg(
            tmp_path, "ac", **{"train.steps": 2, "checkpoint.at_end": False, "train.activation_checkpointing": True}
        )
    )
    assert ac.losses == plain.losses


def test_bf16_mixed_runs_fsdp_in_one_process(tmp_path):
    """bf16-mixed: FSDP2's MixedPrecisionPolicy on a one-process gloo group; fp32 master weights."""
    fp32 = run_training(_tiny_cfg(tmp_path, "f", **{"train.steps": 2, "checkpoint.at_end": False}))
    mixed = run_training(_tiny_cfg(tmp_path, "m", **{"train.steps": 2, "train.precision": "bf16-mixed"}))
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    # bf16 compute: the first loss (same init, same batch) within bf16 rounding of the fp32 one
    assert abs(mixed.losses[0] - fp32.losses[0]) < 0.05 * fp32.losses[0]
    assert torch.distributed.is_initialized() is False  # the one-process group is torn down
    ckpt = mixed.checkpoint
    assert ckpt is not None and json.loads(open(os.path.join(ckpt, "train_state.json")).read())["step"] == 2


def test_bench_train_step_times_the_training_step():
    from mmfree_ext.cli import build_parser
    from mmfree_ext.train.bench import bench_train_step

    torch.set_num_threads(1)
    r = bench_train_step("tiny", "cpu", batch=1, seq_len=32, steps=1, warmup=1)
    assert r["model"] == "mmfree" and r["tokens_per_s"] > 0 and r["params"] > 0 and r["final_loss"] > 0
    with pytest.raises(ValueError, match="model_kind"):
        bench_train_step("tiny", "cpu", model_kind="gpt")
    args = build_parser().parse_args(["bench", "--train", "--config", "1.3B", "--compile"])
    assert args.train and args.compile and (args.train_batch, args.train_seq) == (4, 2048)
    assert args.compile_mode == "default"
    args = build_parser().parse_args(["bench", "--train", "--compile", "--compile-mode", "reduce-overhead"])
    assert args.compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match=r"steps must be >= 1"):
        bench_train_step("tiny", "cpu", steps=0)
    with pytest.raises(ValueError, match="compile_mode needs compile=True"):
        bench_train_step("tiny", "cpu", steps=1, compile_mode="reduce-overhead")


def test_compile_mode_reduce_overhead_says_what_it_needs(tmp_path):
    """train.compile_mode = reduce-overhead (CUDA graphs) is refused, before training, where it
    cannot work: without train.compile, on the CPU, with gradient accumulation; an unknown mode
    is a config error."""
    with pytest.raises(ValueError, match=r"needs train\.compile = true"):
        run_training(_tiny_cfg(tmp_path, "a", **{"train.compile_mode": "reduce-overhead"}))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        run_training(_tiny_cfg(tmp_path, "b", **{"train.compile": True, "train.compile_mode": "reduce-overhead"}))
    with pytest.raises(ConfigError, match="expected one of default, reduce-overhead"):
        _tiny_cfg(tmp_path, "c", **{"train.compile_mode": "max-autotune"})


@pytest.mark.cuda
def test_compile_mode_reduce_overhead_trains_on_cuda(tmp_path):
    """The CUDA-graph step trains like the default compiled one (same data, same seed), and
    gradient accumulation is refused."""
    from torch._dynamo.utils import counters

    over = {"train.device": "cuda", "train.compile": True, "train.precision": "fp32"}
    base = run_training(_tiny_cfg(tmp_path, "default", **over))
    counters.clear()
    graphs = run_training(_tiny_cfg(tmp_path, "graphs", **over, **{"train.compile_mode": "reduce-overhead"}))
    assert counters["inductor"]["cudagraph_skips"] == 0, "Inductor ran the step without CUDA graphs"
    assert len(graphs.losses) == len(base.losses) == 6
    torch.testing.assert_close(torch.tensor(graphs.losses), torch.tensor(base.losses), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="one micro-batch per step"):
        acc = {"train.compile_mode": "reduce-overhead", "train.micro_batch": 2}
        run_training(_tiny_cfg(tmp_path, "acc", **over, **acc))


def test_nccl_ranks_run_with_nvlink_multicast_off(monkeypatch):
    from mmfree_ext.train.parallel import NVLS_OFF_ENV, disable_nvlink_multicast

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # a user's setting does not turn it back on
    for key in ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "MMFREE_ALLOW_NVLS"):
        monkeypatch.delenv(key, raising=False)
    assert disable_nvlink_multicast() == NVLS_OFF_ENV
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    monkeypatch.setenv("MMFREE_ALLOW_NVLS", "1")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    assert disable_nvlink_multicast()["NCCL_NVLS_ENABLE"] == "1"
