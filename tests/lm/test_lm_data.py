"""Local text sources, the memory-mapped token file, packing and the reproducible batch order."""
import json

import numpy as np
import pytest

from linmix.lm.data import (
    PackedBatches,
    PackedSequences,
    epoch_permutation,
    iter_documents,
    load_tokens,
    tokenize_to_file,
)
from linmix.lm.tokenizers import ByteTokenizer


def test_every_source_format_yields_its_documents_in_a_fixed_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "j1"}) + "\n\n" + json.dumps({"text": "j2", "x": 1}) + "\n")
    pq.write_table(pa.table({"text": ["p1", "p2"], "other": [1, 2]}), tmp_path / "sub" / "d.parquet")
    (tmp_path / "notes.md").write_text("ignored: not a text source suffix")
    assert list(iter_documents(tmp_path)) == ["first file", "second file", "j1", "j2", "p1", "p2"]
    assert list(iter_documents(tmp_path / "sub" / "c.jsonl")) == ["j1", "j2"]


def test_saved_datasets_folder_is_read_by_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["one", "two", "three"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(tmp_path / "ds", text_field="body")) == ["one", "two", "three"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]})}).save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents(tmp_path / "dd")) == ["t"]
    with pytest.raises(ValueError, match="no column 'text'"):
        list(iter_documents(tmp_path / "ds"))


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text data"):
        list(iter_documents(tmp_path / "nothing"))
    (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1 has no field 'text'"):
        list(iter_documents(tmp_path / "x.jsonl"))
    (tmp_path / "y.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported text file"):
        list(iter_documents(tmp_path / "y.csv"))


def test_token_file_holds_documents_separated_by_eos_and_is_reused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("ab")
    (tmp_path / "data" / "b.txt").write_text("é")
    tokenizer = ByteTokenizer()
    meta = tokenize_to_file(tmp_path / "data", tokenizer, tmp_path / "tok" / "train.bin")
    tokens = load_tokens(tmp_path / "tok" / "train.bin")
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [97, 98, 256, 0xC3, 0xA9, 256]
    assert (meta["n_tokens"], meta["n_documents"], meta["n_bytes"]) == (6, 2, 4)
    stamp = (tmp_path / "tok" / "train.bin").stat().st_mtime_ns
    tokenize_to_file(tmp_path / "data", tokenizer, tmp_path / "tok" / "train.bin")
    assert (tmp_path / "tok" / "train.bin").stat().st_mtime_ns == stamp  # same sources: reused
    (tmp_path / "data" / "b.txt").write_text("éé")
    assert tokenize_to_file(tmp_path / "data", tokenizer, tmp_path / "tok" / "train.bin")["n_tokens"] == 8


def test_packing_cuts_non_overlapping_windows():
    sequences = PackedSequences(np.arange(23, dtype=np.uint16), seq_len=5)
    assert len(sequences) == 4  # the 3-token tail is dropped
    assert sequences.sequence(2).tolist() == [10, 11, 12, 13, 14]
    assert sequences.sequence(2).dtype == np.int64
    with pytest.raises(ValueError, match="fewer than one sequence"):
        PackedSequences(np.arange(4), seq_len=5)


def test_epoch_order_is_a_pure_permutation_of_seed_and_epoch():
    first = epoch_permutation(50, 3, 0)
    assert sorted(first.tolist()) == list(range(50))
    np.testing.assert_array_equal(first, np.random.default_rng([3, 0]).permutation(50))
    assert not np.array_equal(first, epoch_permutation(50, 3, 1))
    assert not np.array_equal(first, epoch_permutation(50, 4, 0))


def test_batches_are_the_same_samples_for_any_world_size_or_accumulation():
    sequences = PackedSequences(np.arange(10 * 4, dtype=np.uint16), seq_len=4)  # 10 sequences
    single = PackedBatches(sequences, batch_size=4, seed=1)
    split = PackedBatches(sequences, batch_size=4, grad_accum=2, seed=1)
    for step in range(5):  # 20 samples: crosses into epoch 1
        whole = single.get(step, 0, 0, 1)["input_ids"]
        parts = [split.get(step, micro, rank, 2)["input_ids"] for micro in range(2) for rank in range(2)]
        assert whole.shape == (4, 4)
        assert all(p.shape == (1, 4) for p in parts)
        assert sorted(map(tuple, whole.tolist())) == sorted(tuple(p[0].tolist()) for p in parts)
    # sample k is window permutation(seed, k // n)[k % n]
    expected = [epoch_permutation(10, 1, 1)[k - 10] for k in range(12, 16)]
    assert single.sample_indices(3, 0, 0, 1) == [int(i) for i in expected]
    with pytest.raises(ValueError, match="divisible"):
        PackedBatches(sequences, batch_size=3, grad_accum=2).get(0, 0, 0, 1)
