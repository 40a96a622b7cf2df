"""The data pipeline: local files -> documents -> token ids -> packed T-token rows.

* **Sources:** text files (a file is one document, or blocks split on blank lines), jsonl (one
  record per line, its ``text_field``), parquet (a column, when ``pyarrow`` is installed); or
  the demo's docstring corpus; or random tokens (throughput runs).
* **Tokens:** bytes (:class:`~mmfree_ext.models.ByteTokenizer`) or a local ``tokenizer.json``;
  every document is ``[bos] + ids + [eos]``, and all documents form one stream.
* **Rows:** row ``r`` is ``stream[r*T : r*T+T]`` with targets shifted by one. A target that is the
  first token of the next document is ignored (label -100), and the document starts inside a
  row become ``cu_seqlens`` offsets, so the MLGRU state restarts at every document.
* **Order and sharding:** the rows are visited in a seeded permutation per epoch; step ``s``
  takes the global positions ``[s*G, (s+1)*G)`` of that sequence (G = global batch rows) and
  rank ``k`` of ``W`` takes the k-th contiguous ``G/W`` of them. The position (rows consumed)
  is all the state there is, and it does not depend on the world size: a run resumed at
  another world size reads the same rows in the same steps.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError, DataSection

__all__ = ["Batch", "PackedRows", "TokenCorpus", "build_corpus", "cached_corpus", "load_tokenizer_for", "resolve_files"]

IGNORE = -100
_EXT_FORMAT = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
               ".parquet": "parquet"}  # fmt: skip


def resolve_files(paths: list[str], fmt: str = "auto") -> list[tuple[str, str]]:
    """``(path, format)`` of every file named by ``paths`` (files, folders, globs), sorted within
    each entry; raises :class:`ConfigError` naming a path that matches nothing."""
    out: list[tuple[str, str]] = []
    for entry in paths:
        if os.path.isdir(entry):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(entry)
                for name in names
                if os.path.splitext(name)[1].lower() in _EXT_FORMAT or fmt != "auto"
            )
        elif any(ch in entry for ch in "*?["):
            found = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(entry):
            found = [entry]
        else:
            raise ConfigError(f"data.paths: {entry!r} does not exist")
        if not found:
            raise ConfigError(f"data.paths: {entry!r} matches no data files")
        for path in found:
            kind = fmt if fmt != "auto" else _EXT_FORMAT.get(os.path.splitext(path)[1].lower())
            if kind is None:
                raise ConfigError(f"data.paths: cannot tell the format of {path!r} from its extension; set data.format")
            if kind == "parquet":
                try:
                    import pyarrow.parquet  # noqa: F401
                except ImportError:
                    msg = f"data.paths: {path!r} is parquet, which needs 'pyarrow': pip install pyarrow"
                    raise ConfigError(msg) from None
            out.append((path, kind))
    return out


def iter_documents(files: list[tuple[str, str]], text_field: str, text_split: str) -> Iterator[str]:
    """The documents of the files, in order."""
    for path, kind in files:
        if kind == "text":
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
            if text_split == "file":
                if text:
                    yield text
            else:
                for block in text.split("\n\n"):
                    if block.strip():
                        yield block.strip("\n")
        elif kind == "jsonl":
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{n}: not a JSON record ({exc.msg})") from None
                    text = record.get(text_field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{n}: no string field {text_field!r} (set data.text_field)")
                    if text:
                        yield text
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
            for text in table.column(text_field).to_pylist():
                if isinstance(text, str) and text:
                    yield text


class _Bytes:
    def __init__(self) -> None:
        from ..models import ByteTokenizer

        self.tok = ByteTokenizer()
        self.vocab_size, self.bos, self.eos = self.tok.vocab_size, self.tok.BOS, self.tok.EOS

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]


class _HF:
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(path)
        self.vocab_size = self.tok.get_vocab_size()
        self.bos = next(
            (i for s in ("<s>", "<bos>", "<|begin_of_text|>") if (i := self.tok.token_to_id(s)) is not None), None
        )
        self.eos = next((i for s in ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>")
                         if (i := self.tok.token_to_id(s)) is not None), None)  # fmt: skip

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


def load_tokenizer_for(spec: str) -> _Bytes | _HF:
    """``bytes`` or a tokenizer.json path -> an object with ``encode_batch``, ``vocab_size``, ``bos``, ``eos``."""
    return _Bytes() if spec == "bytes" else _HF(spec)


@dataclass
class TokenCorpus:
    """One token stream: ``tokens`` int32 ``[N]`` and ``doc_start`` bool ``[N]`` (True at each
    document's first token)."""

    tokens: np.ndarray
    doc_start: np.ndarray
    vocab_size: int
    bos: int | None
    eos: int | None

    @property
    def num_documents(self) -> int:
        return int(self.doc_start.sum())


def _from_docs(docs: list[list[int]], tok: _Bytes | _HF) -> TokenCorpus:
    pieces, starts = [], []
    for ids in docs:
        doc = ([tok.bos] if tok.bos is not None else []) + ids + ([tok.eos] if tok.eos is not None else [])
        if not doc:
            continue
        flag = np.zeros(len(doc), dtype=bool)
        flag[0] = True
        pieces.append(np.asarray(doc, dtype=np.int32))
        starts.append(flag)
    if not pieces:
        raise ValueError("the data holds no documents")
    return TokenCorpus(np.concatenate(pieces), np.concatenate(starts), tok.vocab_size, tok.bos, tok.eos)


def build_corpus(d: DataSection, seed: int = 0, vocab_size: int | None = None) -> TokenCorpus:
    """Read and tokenize the configured source (every rank builds the same stream)."""
    if d.source == "synthetic":
        vocab = vocab_size or 258
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, vocab, d.synthetic_tokens, dtype=np.int32)
        doc_start = np.zeros(d.synthetic_tokens, dtype=bool)
        doc_start[0] = True
        if d.synthetic_doc_len > 0:
            gaps = rng.geometric(1.0 / d.synthetic_doc_len, size=d.synthetic_tokens // d.synthetic_doc_len + 1)
            cuts = np.cumsum(gaps)
            doc_start[cuts[cuts < d.synthetic_tokens]] = True
        return TokenCorpus(tokens, doc_start, vocab, None, None)
    tok = load_tokenizer_for(d.tokenizer)
    if d.source == "stdlib":
        from .._corpus import stdlib_docstrings

        # The demo's corpus: one document of plain bytes (no bos/eos), as the demo always trained.
        ids = tok.encode_batch([stdlib_docstrings()])[0]
        tokens = np.asarray(ids, dtype=np.int32)
        doc_start = np.zeros(len(tokens), dtype=bool)
        doc_start[0] = True
        return TokenCorpus(tokens, doc_start, tok.vocab_size, tok.bos, tok.eos)
    files = resolve_files(d.paths, d.format)
    docs: list[list[int]] = []
    chunk: list[str] = []
    for text in iter_documents(files, d.text_field, d.text_split):
        chunk.append(text)
        if len(chunk) >= 1024:
            docs.extend(tok.encode_batch(chunk))
            chunk = []
    if chunk:
        docs.extend(tok.encode_batch(chunk))
    return _from_docs(docs, tok)


def _cache_key(d: DataSection) -> str:
    """What the token stream depends on: the files (path, size, mtime), the tokenizer, the options."""
    import hashlib

    files = resolve_files(d.paths, d.format)
    parts = [d.tokenizer, d.text_field, d.text_split, d.format]
    if d.tokenizer != "bytes":
        st = os.stat(d.tokenizer)
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    for path, kind in files:
        st = os.stat(path)
        parts.append(f"{os.path.abspath(path)}:{kind}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cached_corpus(d: DataSection, cache_root: str, is_main: bool, barrier) -> TokenCorpus:
    """:func:`build_corpus` of local files, tokenized once: rank 0 writes the stream to
    ``cache_root/<key>/`` (``tokens.npy``, ``doc_start.npy``, ``meta.json``) and every rank maps
    it read-only (one copy in the page cache for all ranks; a restarted run skips tokenizing).
    The key changes with any file's size or mtime, the tokenizer or the text options."""
    folder = os.path.join(cache_root, _cache_key(d))
    meta_path = os.path.join(folder, "meta.json")
    if is_main and not os.path.isfile(meta_path):
        corpus = build_corpus(d)
        os.makedirs(folder, exist_ok=True)
        np.save(os.path.join(folder, "tokens.npy"), corpus.tokens)
        np.save(os.path.join(folder, "doc_start.npy"), corpus.doc_start)
        with open(meta_path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump({"vocab_size": corpus.vocab_size, "bos": corpus.bos, "eos": corpus.eos}, fh)
        os.replace(meta_path + ".tmp", meta_path)  # written last: a folder with it is complete
    barrier()
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    tokens = np.load(os.path.join(folder, "tokens.npy"), mmap_mode="r")
    doc_start = np.load(os.path.join(folder, "doc_start.npy"), mmap_mode="r")
    return TokenCorpus(tokens, doc_start, meta["vocab_size"], meta["bos"], meta["eos"])


@dataclass
class Batch:
    """One micro-batch on its device: ``input_ids``/``labels`` int64 ``[b, T]``; ``cu_seqlens``
    int64 ``[S+1]`` over the b*T tokens (None when no document starts inside a row)."""

    input_ids: Tensor
    labels: Tensor
    cu_seqlens: Tensor | None

    def with_bucketed_cu_seqlens(self) -> Batch:
        """The same batch with ``cu_seqlens`` always present and its sequence count rounded up to
        a power of two by trailing empty sequences (offsets repeating the total, which the scan
        skips), so that a CUDA-graph step sees a few shapes (one recorded graph each) instead of
        one per batch; the loss and gradients are those of the batch."""
        rows, t = self.input_ids.shape
        total = rows * t
        cu = self.cu_seqlens if self.cu_seqlens is not None else torch.arange(0, total + 1, t, dtype=torch.int64)
        seqs = cu.numel() - 1
        cap = 1 << max(seqs - 1, 0).bit_length()
        if cap > seqs:
            cu = torch.cat([cu, cu.new_full((cap - seqs,), total)])
        return Batch(self.input_ids, self.labels, cu)

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device``. To CUDA through pinned memory: a copy from pageable memory
        would wait for the queued kernels and block the host (no overlap of steps)."""
        if device.type != "cuda":
            return self

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory().to(device, non_blocking=True)

        return Batch(move(self.input_ids), move(self.labels), move(self.cu_seqlens))


class PackedRows:
    """The corpus cut into T-token rows, served as global batches split over ranks (see module doc)."""

    def __init__(self, corpus: TokenCorpus, seq_len: int, seed: int) -> None:
        n = corpus.tokens.shape[0]
        self.seq_len = seq_len
        self.num_rows = (n - 1) // seq_len
        if self.num_rows < 1:
            raise ValueError(f"the corpus has {n} tokens, fewer than one row of data.seq_len + 1 = {seq_len + 1}")
        self.corpus = corpus
        self.seed = seed
        used = self.num_rows * seq_len + 1
        # The stream stays as it came (int32, possibly a read-only memory map); rows are cut from it.
        self._tokens = corpus.tokens[:used]
        self._starts = corpus.doc_start[:used]
        # Targets that open the next document carry no signal from the finished one: ignored.
        tgt_start = np.asarray(self._starts[1:]).reshape(self.num_rows, seq_len)
        self._valid = seq_len - tgt_start.sum(1)
        self._perm_epoch = -1
        self._perm = np.arange(self.num_rows)

    def _row_at(self, position: int) -> int:
        epoch, idx = divmod(position, self.num_rows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        return int(self._perm[idx])

    def global_rows(self, step: int, global_batch: int) -> list[int]:
        """Row ids of step ``step``'s global batch (world-size independent)."""
        return [self._row_at(step * global_batch + j) for j in range(global_batch)]

    def target_tokens(self, rows: list[int]) -> int:
        """Number of scored (non-ignored) targets in ``rows``."""
        return int(self._valid[rows].sum())

    def make_batch(self, rows: list[int]) -> Batch:
        """Inputs, labels and cu_seqlens of ``rows`` (CPU tensors)."""
        t = self.seq_len
        win = np.stack([self._tokens[r * t : r * t + t + 1] for r in rows]).astype(np.int64)
        opens = torch.from_numpy(np.stack([self._starts[r * t : r * t + t + 1] for r in rows]))
        inputs = torch.from_numpy(win[:, :-1].copy())
        labels = torch.from_numpy(win[:, 1:].copy()).masked_fill(opens[:, 1:], IGNORE)
        starts = opens[:, :-1].clone()
        starts[:, 0] = False  # a row start is always a segment start
        cu = None
        if bool(starts.any()):
            flat = starts.reshape(-1)
            flat[torch.arange(len(rows)) * t] = True
            offsets = torch.nonzero(flat).flatten()
            cu = torch.cat([offsets, torch.tensor([len(rows) * t])])  # int64: what the scan reads
        return Batch(inputs, labels, cu)

    def rank_micro_batches(self, step: int, global_batch: int, rank: int, world: int, micro: int) -> list[list[int]]:
        """Rank ``rank``'s rows of step ``step``, split into micro-batches of ``micro`` rows."""
        rows = self.global_rows(step, global_batch)
        per = global_batch // world
        mine = rows[rank * per : (rank + 1) * per]
        return [mine[i : i + micro] for i in range(0, per, micro)]
