"""`mmfree eval` (mmfree_ext.eval): sliding-window perplexity against a direct computation,
each target scored once, latent vs packed, the command line and its argument errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmfree_ext.cli import main
from mmfree_ext.eval import evaluate_checkpoint, sliding_window_perplexity
from mmfree_ext.models import MMfreeLMConfig, MMfreeLMForCausalLM

# Byte-level vocab (258 = 256 bytes + bos + eos) so the folder needs no tokenizer.json.
TINY = {"vocab_size": 258, "hidden_size": 64, "num_hidden_layers": 2, "bos_token_id": 256, "eos_token_id": 257}
TEXT = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture(scope="module")
def model() -> MMfreeLMForCausalLM:
    return MMfreeLMForCausalLM(MMfreeLMConfig(**TINY)).init_weights(5).eval()


def _direct_nll(model: MMfreeLMForCausalLM, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """The window recipe written out: position t (t >= 1) is scored in the first window that holds
    it and does not start at it, predicted from that window's tokens before t."""
    n = ids.numel()
    total, count, done = 0.0, 0, set()
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + window, n)
            logp = F.log_softmax(model(ids[None, begin:end]).logits[0].double(), -1)
            for t in range(begin + 1, end):
                if t not in done:
                    total -= float(logp[t - begin - 1, ids[t]])
                    count += 1
                    done.add(t)
            if end == n:
                break
    return total, count


@pytest.mark.parametrize(("window", "stride"), [(32, 32), (32, 8), (50, 17), (400, 100)])
def test_sliding_window_matches_direct(model, window: int, stride: int) -> None:
    ids = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    res = sliding_window_perplexity(model, ids, window, stride)
    total, count = _direct_nll(model, ids, window, stride)
    assert res.scored_tokens == count
    # overlapping windows score every token after the first exactly once; back-to-back windows
    # leave each window's first token as context only
    assert count == ids.numel() - 1 if stride < window else count == ids.numel() - res.windows
    assert res.nll_sum == pytest.approx(total, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert res.forward_tokens >= ids.numel() and res.tokens_per_second > 0
    batched = sliding_window_perplexity(model, ids, window, stride, batch_size=3)
    assert batched.scored_tokens == res.scored_tokens and batched.windows == res.windows
    assert batched.nll_sum == pytest.approx(res.nll_sum, rel=1e-6)  # rows are independent


def test_sliding_window_argument_errors(model) -> None:
    ids = torch.arange(10)
    with pytest.raises(ValueError, match="window"):
        sliding_window_perplexity(model, ids, 1, 1)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(model, ids, 8, 9)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(model, ids, 8, 0)
    with pytest.raises(ValueError, match="at least 2"):
        sliding_window_perplexity(model, ids[:1], 8, 4)
    with pytest.raises(ValueError, match="batch_size"):
        sliding_window_perplexity(model, ids, 8, 4, batch_size=0)
    with pytest.raises(ValueError, match="1-D int64"):
        sliding_window_perplexity(model, ids.float(), 8, 4)


def test_latent_and_packed_reported(tmp_path, model) -> None:
    folder = str(tmp_path / "latent")
    model.save_pretrained(folder, progress=False)
    report = evaluate_checkpoint(folder, TEXT, window=64, stride=32)
    assert set(report.results) == {"latent", "packed"}
    ids = torch.tensor([256, *TEXT.encode()], dtype=torch.long)  # the byte tokenizer adds <bos>
    assert report.results["latent"].nll_sum == pytest.approx(
        sliding_window_perplexity(model, ids, 64, 32).nll_sum, rel=1e-6
    )
    lat, pk = report.results["latent"].perplexity, report.results["packed"].perplexity
    assert abs(pk / lat - 1) < 0.05  # the packed forward is the same model up to fused-op rounding
    assert "packed - latent" in "\n".join(report.lines())


def test_cli_eval(tmp_path, model, capsys) -> None:
    folder = str(tmp_path / "m")
    model.save_pretrained(folder, progress=False)
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    out_json = tmp_path / "r.json"
    args = ["eval", "--model", folder, "--text", str(text), "--window", "64", "--device", "cpu", "--batch-size", "2"]
    assert main([*args, "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "latent" in printed and "packed" in printed and "tok/s" in printed
    data = json.loads(out_json.read_text())
    assert data["stride"] == 32 and data["results"]["packed"]["scored_tokens"] == len(TEXT.encode())
    # a packed folder has no latent weights: one line, and the note
    packed = str(tmp_path / "p")
    MMfreeLMForCausalLM(MMfreeLMConfig(**TINY)).init_weights(5).pack().save_pretrained(packed, progress=False)
    assert main(["eval", "--model", packed, "--text", str(text), "--window", "64", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "no latent weights" in printed
    with pytest.raises(SystemExit, match="stride"):
        main([*args, "--stride", "65"])
    with pytest.raises(SystemExit, match="--text"):
        main(["eval", "--model", folder, "--text", str(tmp_path / "missing.txt")])
