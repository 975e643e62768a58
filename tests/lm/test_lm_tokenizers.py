"""Tokenizers: byte fallback, Hugging Face tokenizer.json, GPT-2 vocab.json + merges.txt."""
import json

import pytest

from linmix.lm.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe_tokenizer


def test_byte_tokenizer_round_trips_utf8_and_has_its_own_eos(tmp_path):
    tokenizer = load_tokenizer(None)
    text = "Ophelia — «nymph», in thy orisons 🌸"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids + [tokenizer.eos_token_id]) == text
    assert (tokenizer.vocab_size, tokenizer.eos_token_id) == (257, 256)
    tokenizer.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_byte_tokenizer_decodes_a_cut_multibyte_character_without_failing():
    assert ByteTokenizer().decode([0xC3]) == "\ufffd"


def _write_gpt2_files(directory):
    """A hand-made byte-level BPE: 'l'+'o' -> 'lo', 'lo'+'w' -> 'low', 'Ġ'+'low' -> 'Ġlow'."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for merged in ("lo", "low", "Ġlow", "<|endoftext|>"):
        vocab[merged] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\nl o\nlo w\nĠ low\n")
    return vocab


def test_gpt2_vocab_and_merges_apply_the_merges_in_order(tmp_path):
    vocab = _write_gpt2_files(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, HFTokenizer)
    # "low low": 'low' then ' low' (space is the byte-level symbol Ġ); "lox": 'lo' + 'x'
    assert tokenizer.encode("low low") == [vocab["low"], vocab["Ġlow"]]
    assert tokenizer.encode("lox") == [vocab["lo"], vocab["x"]]
    assert tokenizer.decode(tokenizer.encode("low lox!")) == "low lox!"
    assert tokenizer.eos_token_id == vocab["<|endoftext|>"]
    assert tokenizer.vocab_size == len(vocab)
    # the vocab.json path itself works too
    assert load_tokenizer(tmp_path / "vocab.json").encode("low") == [vocab["low"]]


def test_hf_tokenizer_json_round_trip_through_save(tmp_path):
    texts = ["to be or not to be, that is the question"] * 20
    trained = train_bpe_tokenizer(texts, vocab_size=300)
    trained.save(tmp_path)
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.encode("to be or not") == trained.encode("to be or not")
    assert len(loaded.encode("to be or not to be")) < len("to be or not to be")  # merges learned
    assert loaded.decode(loaded.encode("question, to be")) == "question, to be"
    assert loaded.eos_token_id == trained.eos_token_id
    assert load_tokenizer(tmp_path).encode("be") == loaded.encode("be")  # the folder resolves too


def test_tokenizer_errors_name_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path)  # empty folder
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path / "vocab.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(bad)
