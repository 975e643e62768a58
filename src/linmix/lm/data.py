"""Local text -> one memory-mapped token file -> fixed-length sequences in a reproducible order.

Sources (a file, or a folder searched recursively in sorted order):
- ``.txt``: one document per file;
- ``.jsonl``: one document per line, in the field ``text`` (``text_field``);
- ``.parquet``: one document per row of the column ``text``;
- a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: its ``train`` split).

:func:`tokenize_to_file` writes every document followed by the end-of-text token into a flat
``.bin`` file (uint16 when the vocabulary fits, else uint32) with a ``.json`` description beside
it. :class:`PackedSequences` reads it as non-overlapping windows of ``seq_len`` tokens, and
:class:`PackedBatches` serves them to the trainer: sample ``k`` of the run is window
``permutation(seed, epoch)[k mod n]`` with ``epoch = k // n``, so a batch is a pure function of
``(step, micro_step, rank, world_size)`` and a resumed run sees exactly the same data.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKENS_META_SUFFIX = ".json"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def list_sources(path: str | Path) -> list[Path]:
    """The text sources under ``path`` (itself if it is a file or a saved ``datasets`` folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no text data at {path} (expected a .txt/.jsonl/.parquet file, a folder of them, "
                                f"or a datasets folder from save_to_disk)")
    if path.is_file() or _is_saved_dataset(path):
        if path.is_file() and path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"unsupported text file {path}: expected one of {list(TEXT_SUFFIXES)}")
        return [path]
    sources = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        root_path = Path(root)
        for saved in [d for d in dirs if _is_saved_dataset(root_path / d)]:
            sources.append(root_path / saved)
            dirs.remove(saved)
        sources.extend(root_path / name for name in sorted(files) if Path(name).suffix in TEXT_SUFFIXES)
    if not sources:
        raise FileNotFoundError(f"no .txt, .jsonl or .parquet files (or saved datasets) under {path}")
    return sorted(sources)


def iter_documents(path: str | Path, *, text_field: str = "text") -> Iterator[str]:
    """Every document of every source under ``path``, in a fixed order."""
    for source in list_sources(path):
        yield from _documents_of(source, text_field)


def _documents_of(source: Path, text_field: str) -> Iterator[str]:
    if source.is_dir():
        import datasets

        data = datasets.load_from_disk(str(source))
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise ValueError(f"{source} is a DatasetDict without a 'train' split (splits: {list(data)}); "
                                 "point at the split's folder instead")
            data = data["train"]
        if text_field not in data.column_names:
            raise ValueError(f"{source} has no column {text_field!r} (columns: {data.column_names})")
        for batch in data.iter(batch_size=1000):
            yield from batch[text_field]
    elif source.suffix == ".txt":
        yield source.read_text(encoding="utf-8", errors="replace")
    elif source.suffix == ".jsonl":
        with source.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{source}:{number} is not valid JSON: {error}") from error
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{source}:{number} has no field {text_field!r}")
                yield str(record[text_field])
    elif source.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(source)
        if text_field not in table.schema_arrow.names:
            raise ValueError(f"{source} has no column {text_field!r} (columns: {table.schema_arrow.names})")
        for batch in table.iter_batches(columns=[text_field], batch_size=1000):
            yield from (str(value) for value in batch.column(0).to_pylist())


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _sources_signature(path: Path) -> list[list]:
    signature = []
    for source in list_sources(path):
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        signature.extend([str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files)
    return signature


def tokenize_to_file(path: str | Path, tokenizer, out_path: str | Path, *, text_field: str = "text") -> dict:
    """Tokenize every document under ``path`` into ``out_path`` (.bin) and describe it in a .json
    beside it. An existing file made from the same sources and tokenizer is reused as is.
    Returns the description: ``n_tokens``, ``n_documents``, ``n_bytes`` (UTF-8 bytes of the text),
    ``dtype``, ``vocab_size``."""
    path, out_path = Path(path), Path(out_path)
    meta_path = out_path.with_suffix(TOKENS_META_SUFFIX)
    signature = {"sources": _sources_signature(path), "tokenizer": tokenizer.fingerprint(), "text_field": text_field}
    if out_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("signature") == signature:
            return meta
    dtype = token_dtype(tokenizer.vocab_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
    n_tokens = n_documents = n_bytes = 0
    with tmp.open("wb") as handle:
        for document in iter_documents(path, text_field=text_field):
            ids = tokenizer.encode(document)
            ids.append(tokenizer.eos_token_id)
            handle.write(np.asarray(ids, dtype=dtype).tobytes())
            n_tokens += len(ids)
            n_documents += 1
            n_bytes += len(document.encode("utf-8"))
    if n_tokens == 0:
        tmp.unlink()
        raise ValueError(f"no documents found in {path}")
    os.replace(tmp, out_path)  # under torchrun every rank may tokenize; the rename keeps the file whole
    meta = {"n_tokens": n_tokens, "n_documents": n_documents, "n_bytes": n_bytes, "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_token_id, "signature": signature}
    meta_tmp = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
    meta_tmp.write_text(json.dumps(meta) + "\n")
    os.replace(meta_tmp, meta_path)
    return meta


def load_tokens(bin_path: str | Path) -> np.memmap:
    """The token file written by :func:`tokenize_to_file`, memory-mapped read-only."""
    bin_path = Path(bin_path)
    meta_path = bin_path.with_suffix(TOKENS_META_SUFFIX)
    if not bin_path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no token file {bin_path} with {meta_path.name} beside it (run tokenize_to_file)")
    meta = json.loads(meta_path.read_text())
    return np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["n_tokens"],))


class PackedSequences:
    """Non-overlapping windows of ``seq_len`` tokens of a flat token array (the tail is dropped).

    ``sequence(i)`` -> int64 array ``[seq_len]``; documents run into each other across their
    end-of-text tokens (packing)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_sequences = len(tokens) // seq_len
        if self.num_sequences == 0:
            raise ValueError(f"the data holds {len(tokens)} tokens, fewer than one sequence of seq_len = {seq_len}")

    def __len__(self) -> int:
        return self.num_sequences

    def sequence(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len], dtype=np.int64)


@lru_cache(maxsize=4)
def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the sequences in ``epoch``: a pure function of (num_sequences, seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_sequences)


class PackedBatches:
    """Batches for :class:`linmix.training.Trainer`: ``get(step, micro_step, rank, world_size)``.

    ``batch_size`` is the global number of sequences per optimizer step; each (micro-step, rank)
    gets ``batch_size // (grad_accum * world_size)`` of them. Sample ``k`` of the run (counted over
    steps, then micro-steps, then ranks) is the same sequence whatever the world size or
    accumulation, so a 2-process run sees exactly the data of a 1-process run.
    Returns ``{"input_ids": LongTensor [b, seq_len]}``.
    """

    def __init__(self, sequences: PackedSequences, *, batch_size: int, grad_accum: int = 1, seed: int = 0):
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size} and {grad_accum}")
        self.sequences = sequences
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed

    def micro_batch_size(self, world_size: int) -> int:
        parts = self.grad_accum * world_size
        if self.batch_size % parts:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum x processes = "
                             f"{self.grad_accum} x {world_size}")
        return self.batch_size // parts

    def sample_indices(self, step: int, micro_step: int, rank: int, world_size: int) -> list[int]:
        micro = self.micro_batch_size(world_size)
        first = step * self.batch_size + (micro_step * world_size + rank) * micro
        n = len(self.sequences)
        return [int(epoch_permutation(n, self.seed, k // n)[k % n]) for k in range(first, first + micro)]

    def get(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        rows = [self.sequences.sequence(i) for i in self.sample_indices(step, micro_step, rank, world_size)]
        return {"input_ids": torch.from_numpy(np.stack(rows))}
