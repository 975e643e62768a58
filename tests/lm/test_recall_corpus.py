"""The recall corpus generator: answers in context, held-out entities unseen, determinism, lengths, eval format."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from linmix.cli import main
from linmix.lm.evaluate import contains_score, load_recall_records
from linmix.lm.recall_corpus import (
    LAYOUTS, RecallCorpusConfig, generate_document, heldout_eval_records, heldout_value_index, is_heldout_value, load_recall_eval,
    recall_breakdown, write_recall_corpus,
)

SMALL = dict(train_tokens=60_000, eval_docs=30, min_tokens=256, max_tokens=2000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    meta = write_recall_corpus(out, seed=0, **SMALL)
    return out, meta


def _train_documents(out) -> list[str]:
    documents = []
    for path in sorted((out / "train").glob("*.jsonl")):
        documents += [json.loads(line)["text"] for line in path.read_text().splitlines()]
    return documents


def test_every_answer_occurs_in_its_document_before_its_question(corpus):
    out, _ = corpus
    for record in load_recall_eval(out / "eval" / "recall_heldout.jsonl"):
        prompt, answer = record["text"], record["value"]
        assert prompt.endswith("A:")
        last_question = prompt.rindex("\nQ: ")
        assert answer in prompt[:last_question]
        assert prompt.count(answer) == 1  # once: the document's values are distinct, earlier shots ask others
        assert record["answer_distance_tokens"] == len(prompt.encode()) - len(prompt[: prompt.index(answer)].encode())
    for text in _train_documents(out)[:200]:
        body, _, questions = text.partition("\nQ: ")
        assert questions, "every training document asks questions"
        answers = [line[3:] for line in ("Q: " + questions).splitlines() if line.startswith("A: ")]
        assert answers and all(answer in body for answer in answers)


def test_heldout_values_never_occur_in_the_training_text(corpus):
    out, meta = corpus
    training = "\n".join(_train_documents(out)).lower()
    records = heldout_eval_records(RecallCorpusConfig(seed=0, **SMALL))
    assert [r["text"] for r in records] == [r["text"] for r in load_recall_eval(out / "eval" / "recall_heldout.jsonl")]
    # every value of every held-out document, asked or not
    values = {value for r in records for value in r["all_values"]}
    assert {r["value"] for r in records} <= values and len(values) == meta["eval"]["heldout_values"]
    assert len(values) >= 5 * len(records)  # several records of several values each
    for value in values:
        assert value.lower() not in training
    # the guard itself finds a value inside longer text, case-insensitively
    index = heldout_value_index(["Brelaford", "QX-4821-T"])
    assert index.find("... born in BRELAFORDSHIRE ...") == "brelaford"
    assert index.find("code qx-4821-t.") == "qx-4821-t" and index.find("QX-4822-T") is None


def test_heldout_documents_extend_their_prompts_and_share_no_value_with_training(corpus):
    out, meta = corpus
    prompts = load_recall_eval(out / "eval" / "recall_heldout.jsonl")
    documents = [json.loads(line) for line in (out / "eval" / "heldout_docs.jsonl").read_text().splitlines()]
    assert [d["doc_id"] for d in documents] == [p["doc_id"] for p in prompts]
    assert meta["eval"]["heldout_docs"] == str(out / "eval" / "heldout_docs.jsonl")
    assert meta["eval"]["heldout_doc_tokens"] == sum(len(d["text"].encode()) for d in documents)
    for prompt, document in zip(prompts, documents):
        text = document["text"]
        # the prompt is the document cut right before its asked answer, which follows in training format
        assert text.startswith(prompt["text"])
        assert text[len(prompt["text"]):].startswith(f" {prompt['value']}\n")
        questions = [line for line in text.splitlines() if line.startswith("Q: ")]
        answers = [line for line in text.splitlines() if line.startswith("A: ")]
        assert len(questions) == len(answers) == prompt["shots"] + 1 and text.endswith(answers[-1] + "\n")
    training = "\n".join(_train_documents(out)).lower()
    records = heldout_eval_records(RecallCorpusConfig(seed=0, **SMALL))
    assert [r["document"] for r in records] == [d["text"] for d in documents]
    for record in records:
        for value in record["all_values"]:
            assert value in record["document"] and value.lower() not in training


def test_files_written_before_heldout_docs_existed_are_unchanged(tmp_path):
    # sha256 of the files as written before eval/heldout_docs.jsonl was added (same seed and settings)
    expected = {
        "train/recall_docs.jsonl": "432e86816a798461b227334c0fbc3fc8638d135c966ac207957057eb79c03815",
        "eval/recall_heldout.jsonl": "d7fcf6e3334311dfa10dc72a55d61a93fbd7de59f33ba093ff383d0553c56e09",
        "eval/recall_heldout_256-511.jsonl": "39df8dfb8588bb0c39548640800dca56baca67511bca8ebd65ca921f436a7e75",
        "eval/recall_heldout_512-1023.jsonl": "f457e1131c2358139023dd9b759911ae833989cffdc48c1e9f39a0e7bd97474a",
        "eval/recall_heldout_1024-2047.jsonl": "84ef9fef397dee533417c72998298bdcd4479faf84100fb6a42605a43457eaa4",
    }
    write_recall_corpus(tmp_path, seed=5, train_tokens=20_000, eval_docs=8)
    assert {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in expected} == expected


def test_heldout_and_training_vocabularies_are_disjoint_by_hash(corpus):
    out, _ = corpus
    for record in load_recall_eval(out / "eval" / "recall_heldout.jsonl"):
        kind = {"hometown": "city", "factory": "city", "birth_date": "date", "release_date": "date", "employer": "company",
                "maker": "company", "employee_number": "number", "code": "code", "price": "price"}[record["attribute"]]
        assert is_heldout_value(kind, record["value"])
    rng = random.Random(1)
    document = generate_document(rng, heldout=False, target_tokens=800, num_questions=3, min_tokens=256, max_tokens=2000)
    kinds = {"person": ["person", "city", "date", "company", "number"], "product": ["product", "code", "company", "price", "date", "city"]}
    for record in document.records:
        for kind, value in zip(kinds[document.schema], record.values()):
            assert not is_heldout_value(kind, value)


def test_same_seed_same_files_other_seed_other_files(corpus, tmp_path):
    out, _ = corpus
    write_recall_corpus(tmp_path / "again", seed=0, **SMALL)
    write_recall_corpus(tmp_path / "other", seed=1, **SMALL)
    for name in ("train/recall_docs.jsonl", "eval/recall_heldout.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
        mine, theirs = (out / name).read_text().splitlines(), (tmp_path / "other" / name).read_text().splitlines()
        assert not set(mine) & set(theirs)


def test_lengths_cover_the_requested_range_and_layouts_mix(corpus):
    out, meta = corpus
    records = load_recall_eval(out / "eval" / "recall_heldout.jsonl")
    lengths = [r["context_tokens"] for r in records]
    assert all(r["context_tokens"] == len(r["text"].encode()) for r in records)
    assert min(lengths) >= 256 and max(lengths) <= 2000
    assert min(lengths) < 400 and max(lengths) > 1400  # spread over the range, not bunched
    assert set(meta["eval"]["by_length_bucket"]) == {"256-511", "512-1023", "1024-2047"}
    assert {r["layout"] for r in records} == set(LAYOUTS)
    assert len({r["num_records"] for r in records}) >= 5
    train_lengths = [len(t.encode()) for t in _train_documents(out)]
    assert min(train_lengths) >= 256 and max(train_lengths) <= 2000 and max(train_lengths) > 1400
    assert sum(train_lengths) >= SMALL["train_tokens"] and meta["train"]["recall_tokens"] == sum(train_lengths)
    assert set(meta["train"]["layouts"]) == set(LAYOUTS) and min(meta["train"]["layouts"].values()) > 0


def test_eval_files_load_with_the_recall_reader_and_break_down_by_metadata(corpus):
    out, meta = corpus
    everything = load_recall_records(out / "eval" / "recall_heldout.jsonl")
    assert len(everything) == SMALL["eval_docs"] and set(everything[0]) == {"text", "value"}
    per_bucket = sum(len(load_recall_records(path)) for key, path in meta["eval"]["files"].items() if key != "all")
    assert per_bucket == len(everything)
    records = load_recall_eval(out / "eval" / "recall_heldout.jsonl")
    generations = [" " + r["value"] if i % 2 == 0 else " nothing" for i, r in enumerate(records)]
    assert [contains_score(g, r["value"]) for g, r in zip(generations[:2], records)] == [1.0, 0.0]
    table = recall_breakdown(records, generations, by="layout")
    assert sum(group["n"] for group in table.values()) == len(records)
    assert sum(group["correct"] for group in table.values()) == (len(records) + 1) // 2
    with pytest.raises(ValueError, match="no field"):
        recall_breakdown(records, generations, by="colour")


def test_mixed_in_text_at_the_stated_ratio_without_heldout_values(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    lines = [f"Line {i} of a play, with words enough to read like verse, and nothing else." for i in range(400)]
    (plain / "play.txt").write_text("\n".join(lines))
    meta = write_recall_corpus(tmp_path / "out", seed=0, train_tokens=40_000, eval_docs=10, mix_text=str(plain), mix_ratio=0.25)
    mixed = [json.loads(line)["text"] for line in (tmp_path / "out" / "train" / "mix_text.jsonl").read_text().splitlines()]
    assert all(text.startswith("Line ") for text in mixed)
    assert meta["train"]["mix_tokens"] == sum(len(t.encode()) for t in mixed)
    assert meta["train"]["mix_share"] == pytest.approx(0.25, abs=0.03)


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="mix_ratio > 0 needs mix_text"):
        RecallCorpusConfig(mix_ratio=0.5)
    with pytest.raises(ValueError, match="min_tokens"):
        RecallCorpusConfig(min_tokens=300, max_tokens=320)
    with pytest.raises(ValueError, match="train_tokens"):
        RecallCorpusConfig(train_tokens=0)


def test_cli_writes_the_corpus(tmp_path, capsys):
    code = main(["lm", "recall-corpus", "--out", str(tmp_path), "--seed", "3", "--train-tokens", "20000", "--eval-docs", "6"])
    assert code == 0
    output = capsys.readouterr().out
    assert "held-out prompts" in output and (tmp_path / "meta.json").exists()
    assert "held-out documents" in output and (tmp_path / "eval" / "heldout_docs.jsonl").exists()
    assert len(load_recall_records(tmp_path / "eval" / "recall_heldout.jsonl")) == 6
    assert main(["lm", "recall-corpus", "--out", str(tmp_path), "--mix-ratio", "0.5"]) == 1
    assert "mix_text" in capsys.readouterr().err
