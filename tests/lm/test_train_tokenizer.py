"""`linmix lm train-tokenizer` and `train_bpe_tokenizer`: the same bytes as the plain `tokenizers`
recipe, deterministic, lossless on any UTF-8 text, usable by `linmix lm train --tokenizer`."""
import json
import random

import pytest

from linmix.cli import main
from linmix.lm.evaluate import load_model
from linmix.lm.tokenizers import (EOS_TOKEN, MIN_BPE_VOCAB_SIZE, HFTokenizer, bytes_per_token, load_tokenizer,
                                  train_bpe_tokenizer)

SYLLABLES = "ka lo mi ren sa tu vel dor an ix qu be no".split()
VOCAB_SIZE = 300
ODD_TEXT = "Zoë's café — naïve façade, 東京 🎉👩‍🔬 tab\there\r\n  spaces  <|endof text|> ĠĊ \x00 end"


def _document(rng: random.Random) -> str:
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(20, 60))]
    return " ".join(words) + f"\nQ: code? A: {rng.randint(0, 10**7):07d}\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of two .jsonl files (like recall-corpus's train/), plus the texts in file order."""
    root = tmp_path_factory.mktemp("tok-corpus") / "train"
    root.mkdir()
    rng = random.Random(0)
    texts = {}
    for name in ["recall_docs.jsonl", "mix_text.jsonl"]:
        texts[name] = [_document(rng) for _ in range(40)]
        (root / name).write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[name])))
    return root, texts


def _reference_file(texts: list[str], vocab_size: int, path) -> bytes:
    """The plain `tokenizers` recipe the LM recall comparison's tokenizer was first made with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter(texts), trainer)
    tok.save(str(path))
    return path.read_bytes()


def test_function_matches_the_reference_recipe_byte_for_byte(corpus, tmp_path):
    _, texts = corpus
    in_file_order = texts["recall_docs.jsonl"] + texts["mix_text.jsonl"]
    reference = _reference_file(in_file_order, VOCAB_SIZE, tmp_path / "reference.json")
    trained = train_bpe_tokenizer(reversed(in_file_order), VOCAB_SIZE)  # any order gives the same file
    written = trained.save_file(tmp_path / "a" / "b" / "tokenizer.json")
    assert written.read_bytes() == reference
    assert isinstance(trained, HFTokenizer) and trained.vocab_size == VOCAB_SIZE
    assert trained.eos_token_id == json.loads(reference)["added_tokens"][0]["id"] == 0


def test_cli_end_to_end_is_deterministic_and_equals_the_reference(corpus, tmp_path, capsys):
    root, texts = corpus
    outs = [tmp_path / "one" / "tok.json", tmp_path / "two" / "nested" / "tok.json"]
    for out in outs:
        assert main(["lm", "train-tokenizer", "--data", str(root), "--vocab-size", str(VOCAB_SIZE), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert outs[0].read_bytes() == outs[1].read_bytes()
    reference = _reference_file(texts["recall_docs.jsonl"] + texts["mix_text.jsonl"], VOCAB_SIZE, tmp_path / "ref.json")
    assert outs[0].read_bytes() == reference

    tokenizer = load_tokenizer(outs[0])
    every_text = texts["mix_text.jsonl"] + texts["recall_docs.jsonl"]
    expected_ratio = bytes_per_token(tokenizer, every_text)  # the whole corpus is under the sample size
    assert expected_ratio > 1.5  # merges were learned: well above one byte per token
    assert f"vocab size {VOCAB_SIZE}" in printed and f"{expected_ratio:.3f} bytes per token on 80 documents" in printed
    assert tokenizer.vocab_size == VOCAB_SIZE and tokenizer.eos_token_id == tokenizer._tokenizer.token_to_id(EOS_TOKEN)


def test_round_trip_of_arbitrary_utf8_and_the_eos_token(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "tok.json"
    assert main(["lm", "train-tokenizer", "--data", str(root / "mix_text.jsonl"), "--vocab-size", "270", "--out", str(out)]) == 0
    tokenizer = load_tokenizer(out)
    rng = random.Random(1)
    samples = [ODD_TEXT, "", " ", "\n\n", "ka lo mi", "".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(200))]
    samples = [s.encode("utf-8", errors="replace").decode("utf-8", errors="replace") for s in samples]  # drop lone surrogates
    for text in samples:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.eos_token_id not in tokenizer.encode(ODD_TEXT)
    assert tokenizer.decode(tokenizer.encode("ab") + [tokenizer.eos_token_id]) == "ab"  # decoding skips it
    # Text that spells the end-of-text token exactly becomes that token (the tokenizers library splits
    # added tokens out of any text, as Hugging Face's GPT-2 does), so it is the one string that does not round-trip.
    assert tokenizer.encode("a<|endoftext|>b") == tokenizer.encode("a") + [tokenizer.eos_token_id] + tokenizer.encode("b")


def test_lm_train_uses_the_trained_tokenizer(corpus, tmp_path, capsys):
    root, _ = corpus
    tok_file = tmp_path / "bpe" / "tokenizer.json"
    assert main(["lm", "train-tokenizer", "--data", str(root), "--vocab-size", str(VOCAB_SIZE), "--out", str(tok_file)]) == 0
    out = tmp_path / "run"
    assert main(["lm", "train", "--data", str(root), "--tokenizer", str(tok_file), "--out-dir", str(out), "--model", "based-tiny",
                 "--seq-len", "16", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--threads", "1",
                 "--no-progress"]) == 0
    model = load_model(out / "model")
    assert model.config.vocab_size == VOCAB_SIZE
    assert (out / "model" / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    assert load_tokenizer(out / "model").eos_token_id == load_tokenizer(tok_file).eos_token_id


def test_errors_name_what_was_expected(corpus, tmp_path, capsys):
    root, _ = corpus
    with pytest.raises(ValueError, match=f"at least {MIN_BPE_VOCAB_SIZE}"):
        train_bpe_tokenizer(["some text"], MIN_BPE_VOCAB_SIZE - 1)
    with pytest.raises(ValueError, match="no text"):
        train_bpe_tokenizer(["", ""], 300)
    train_bpe_tokenizer(["ab ab ab"], MIN_BPE_VOCAB_SIZE)  # the smallest size is accepted

    def cli(*argv):
        code = main(["lm", "train-tokenizer", *argv])
        return code, capsys.readouterr().err

    out = str(tmp_path / "t.json")
    code, err = cli("--data", str(root), "--vocab-size", "257", "--out", out)
    assert code == 1 and "vocab_size must be at least 258" in err and "Traceback" not in err
    code, err = cli("--data", str(tmp_path / "missing"), "--vocab-size", "300", "--out", out)
    assert code == 1 and "no text data at" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    code, err = cli("--data", str(empty), "--vocab-size", "300", "--out", out)
    assert code == 1 and "no text to train a tokenizer on" in err
    code, err = cli("--data", str(root), "--vocab-size", "300", "--out", out, "--text-field", "body")
    assert code == 1 and "has no field 'body'" in err
    assert not (tmp_path / "t.json").exists()
    code, err = cli("--data", str(root), "--out", out)
    assert code == 2 and "--vocab-size" in err
