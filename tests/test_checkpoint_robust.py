"""Checkpoints that are broken in the ways files get broken, and saves that get killed.

Every broken folder raises CheckpointError naming the file or key (never a parser's own
error, never a half-loaded model); a save killed at any point leaves the previous checkpoint
loadable (models/checkpoint.py: temp file + fsync + os.replace).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmfree_ext.models import CheckpointError, MMfreeLMForCausalLM
from mmfree_ext.models.config import MMfreeLMConfig

TINY = {"vocab_size": 300, "hidden_size": 96, "num_hidden_layers": 2, "intermediate_size": 200}
PYTHONPATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")


def _model(seed: int = 1, **over) -> MMfreeLMForCausalLM:
    return MMfreeLMForCausalLM(MMfreeLMConfig(**{**TINY, **over}), init_seed=seed)


def _saved(tmp_path, seed: int = 1) -> tuple[str, MMfreeLMForCausalLM]:
    model = _model(seed)
    model.save_pretrained(str(tmp_path), progress=False)
    return str(tmp_path), model


def _load(path: str) -> MMfreeLMForCausalLM:
    return MMfreeLMForCausalLM.from_pretrained(path, progress=False)


def _assert_same_weights(a: MMfreeLMForCausalLM, b: MMfreeLMForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---- broken files ---------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 7, 100, "half", "last_byte"])
def test_truncated_safetensors_names_the_file(tmp_path, cut) -> None:
    path, _ = _saved(tmp_path)
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    keep = {"half": size // 2, "last_byte": size - 1}.get(cut, cut)
    with open(f, "rb+") as fh:
        fh.truncate(keep)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        _load(path)


@pytest.mark.parametrize("where", ["header_len", "header_json"])
def test_corrupt_safetensors_header_names_the_file(tmp_path, where) -> None:
    path, _ = _saved(tmp_path)
    f = os.path.join(path, "model.safetensors")
    with open(f, "rb+") as fh:
        if where == "header_len":
            fh.write((2**62).to_bytes(8, "little"))
        else:
            fh.seek(8)
            fh.write(b"{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        _load(path)


def test_pickle_where_safetensors_is_promised(tmp_path) -> None:
    path, model = _saved(tmp_path)
    torch.save(model.state_dict(), os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a readable safetensors"):
        _load(path)


def test_corrupt_bin_and_non_state_dict(tmp_path) -> None:
    path, _ = _saved(tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    binf = os.path.join(path, "pytorch_model.bin")
    with open(binf, "wb") as fh:
        fh.write(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        _load(path)
    torch.save([1, 2, 3], binf)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        _load(path)


def test_truncated_shard_names_the_shard(tmp_path) -> None:
    path, model = _saved(tmp_path)
    state = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    keys = sorted(state)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, ks in zip(names, (keys[::2], keys[1::2]), strict=True):
        save_file({k: state[k] for k in ks}, os.path.join(path, name))
        weight_map.update(dict.fromkeys(ks, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"weight_map": weight_map}, fh)
    _assert_same_weights(_load(path), model)
    with open(os.path.join(path, names[1]), "rb+") as fh:
        fh.truncate(os.path.getsize(os.path.join(path, names[1])) - 10)
    with pytest.raises(CheckpointError, match=names[1]):
        _load(path)


def _rewrite(path: str, edit) -> None:
    f = os.path.join(path, "model.safetensors")
    state = load_file(f)
    edit(state)
    save_file(state, f)


KEY = "model.layers.1.attn.g_proj.weight"


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("int32", lambda s: s.__setitem__(KEY, s[KEY].to(torch.int32))),
        ("uint8", lambda s: s.__setitem__(KEY, s[KEY].to(torch.uint8))),
        ("bool", lambda s: s.__setitem__(KEY, s[KEY] > 0)),
        ("nan", lambda s: s[KEY].view(-1).__setitem__(5, float("nan"))),
        ("inf", lambda s: s[KEY].view(-1).__setitem__(0, float("-inf"))),
        ("shape", lambda s: s.__setitem__(KEY, s[KEY][:, :-1].contiguous())),
    ],
)
def test_bad_tensor_names_the_key(tmp_path, name, edit) -> None:
    path, _ = _saved(tmp_path)
    _rewrite(path, edit)
    with pytest.raises(CheckpointError, match=KEY.replace(".", r"\.")):
        _load(path)


def test_config_that_does_not_match_the_tensors(tmp_path) -> None:
    path, _ = _saved(tmp_path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    with open(cfg_path, "w") as fh:
        json.dump({**cfg, "num_hidden_layers": 3}, fh)
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.2"):
        _load(path)
    with open(cfg_path, "w") as fh:
        json.dump({**cfg, "hidden_size": 64}, fh)
    with pytest.raises(CheckpointError, match="shape"):
        _load(path)
    with open(cfg_path, "w") as fh:
        fh.write('{"model_type": "hgrn_bit", "hidden_size": 9')
    with pytest.raises(CheckpointError, match=r"config\.json"):
        _load(path)


def test_save_refuses_a_folder_with_another_layout(tmp_path) -> None:
    """An old index would shadow the new model.safetensors: refused, nothing overwritten."""
    path, _ = _saved(tmp_path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"weight_map": {}}, fh)
    before = os.path.getmtime(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        _model(seed=2).save_pretrained(path, progress=False)
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == before


# ---- killed saves ---------------------------------------------------------------------------

_SAVER = textwrap.dedent(
    """
    import os, sys, time
    import safetensors.torch as st
    from mmfree_ext.models import MMfreeLMForCausalLM
    from mmfree_ext.models.config import MMfreeLMConfig

    path, mode, marker = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = dict(vocab_size=300, hidden_size=96, num_hidden_layers=2, intermediate_size=200)
    if mode == "large":
        cfg.update(vocab_size=32000, hidden_size=1024, num_hidden_layers=2, intermediate_size=2816)
    model = MMfreeLMForCausalLM(MMfreeLMConfig(**cfg), init_seed=2)
    real_save = st.save_file

    def stalled_save(tensors, filename, metadata=None):
        if mode == "mid_write":  # half a file on disk, then stuck
            real_save(tensors, filename, metadata=metadata)
            with open(filename, "rb+") as fh:
                fh.truncate(os.path.getsize(filename) // 2)
        elif mode == "before_rename":  # the whole temp file written, not yet renamed
            real_save(tensors, filename, metadata=metadata)
        else:
            open(marker, "w").close()
            return real_save(tensors, filename, metadata=metadata)
        open(marker, "w").close()
        time.sleep(600)

    st.save_file = stalled_save
    model.save_pretrained(path, progress=False)
    """
)


def _run_and_kill(path: str, mode: str, tmp_path) -> None:
    marker = str(tmp_path / f"marker-{mode}")
    env = {**os.environ, "PYTHONPATH": PYTHONPATH + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, path, mode, marker], env=env)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(marker):
            assert proc.poll() is None or mode == "large", f"saver exited early ({proc.returncode})"
            assert time.monotonic() < deadline, "saver never reached the write"
            time.sleep(0.01)
        if mode == "large":
            time.sleep(0.05)  # somewhere inside the real write of ~100 MB
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("mode", ["mid_write", "before_rename", "large"])
def test_killed_save_leaves_the_old_checkpoint(tmp_path, mode) -> None:
    path, old = _saved(tmp_path / "ckpt")
    _run_and_kill(path, mode, tmp_path)
    loaded = _load(path)
    if mode == "large" and loaded.config.vocab_size != old.config.vocab_size:
        return  # the save finished before the kill: the new checkpoint, complete, is fine too
    _assert_same_weights(loaded, old)
    # Saving again over the leftovers works and loads back.
    new = _model(seed=3)
    new.save_pretrained(path, progress=False)
    _assert_same_weights(_load(path), new)
