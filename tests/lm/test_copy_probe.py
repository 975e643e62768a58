"""The answer-copy probe (linmix.lm.recall_corpus.answer_copy_probe, benchmarks/lm_copy_probe.py):
which tokens it scores, that its losses are the model's, and that it tells a copying model from one
that does not copy."""
from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import load_benchmark

from linmix.lm.config import preset
from linmix.lm.model import BasedForCausalLM, CausalLMOutput
from linmix.lm.recall_corpus import answer_copy_probe, answer_token_positions
from linmix.lm.tokenizers import ByteTokenizer, train_bpe_tokenizer

DOCUMENT = "Ledger 4\n\nThe Qvixy Jet is made in Brelaford.\n\nQ: Where is the Qvixy Jet made?\nA: Brelaford\n"
VALUE = "Brelaford"


def test_positions_are_the_value_tokens_after_its_first_at_both_occurrences_byte_tokens():
    found = answer_token_positions(ByteTokenizer(), DOCUMENT, VALUE)
    first, last = DOCUMENT.find(VALUE), DOCUMENT.rfind(VALUE)
    assert found["record_continuation"] == list(range(first + 1, first + len(VALUE)))
    assert found["answer_continuation"] == list(range(last + 1, last + len(VALUE)))
    assert found["answer_first"] == last  # the 'B' of the answer
    assert bytes(found["ids"]).decode() == DOCUMENT


def test_positions_with_bpe_tokens_lie_inside_the_value():
    tokenizer = train_bpe_tokenizer([DOCUMENT * 3, "Brelaford Brelaford Qvixy made in"], 264)
    found = answer_token_positions(tokenizer, DOCUMENT, VALUE)
    _, offsets = tokenizer.encode_with_offsets(DOCUMENT)
    first, last = DOCUMENT.find(VALUE), DOCUMENT.rfind(VALUE)
    for key, start in (("record_continuation", first), ("answer_continuation", last)):
        assert found[key], key
        for index in found[key]:
            a, b = offsets[index]
            assert start < a and b <= start + len(VALUE)
    a, b = offsets[found["answer_first"]]
    assert a <= last < b


def test_a_value_stated_once_is_a_clear_error():
    with pytest.raises(ValueError, match="at least twice"):
        answer_token_positions(ByteTokenizer(), "Made in Brelaford.\nQ: Where?\nA: Zedford\n", VALUE)


def test_probe_losses_are_the_models_own_cross_entropy_at_those_tokens():
    torch.manual_seed(0)
    model = BasedForCausalLM(preset("based-tiny", vocab_size=257)).eval()
    tokenizer = ByteTokenizer()
    result = answer_copy_probe(model, tokenizer, [DOCUMENT], [VALUE])
    found = answer_token_positions(tokenizer, DOCUMENT, VALUE)
    ids = torch.tensor([found["ids"]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    def loss(i):  # token i predicted from position i - 1
        return -float(log_probs[i - 1, found["ids"][i]])
    record = sum(map(loss, found["record_continuation"])) / len(found["record_continuation"])
    answer = sum(map(loss, found["answer_continuation"])) / len(found["answer_continuation"])
    assert result["record_continuation"] == pytest.approx(record, rel=1e-5)
    assert result["answer_continuation"] == pytest.approx(answer, rel=1e-5)
    assert result["copy_gain"] == pytest.approx(record - answer, rel=1e-4, abs=1e-6)
    assert result["answer_first"] == pytest.approx(loss(found["answer_first"]), rel=1e-5)
    assert result["continuation_tokens"] == len(VALUE) - 1 and result["documents"] == 1


class _InductionOracle(torch.nn.Module):
    """Predicts the token that followed the last earlier occurrence of the current token (an ideal
    induction head); uniform where the current token has not occurred before. ``copies=False``: always
    uniform."""

    def __init__(self, vocab_size: int, copies: bool):
        super().__init__()
        self.vocab_size, self.copies = vocab_size, copies
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        ids = input_ids[0].tolist()
        logits = torch.zeros(1, len(ids), self.vocab_size)
        for i, token in enumerate(ids):
            earlier = [j for j in range(i) if ids[j] == token]
            if self.copies and earlier:
                logits[0, i, ids[earlier[-1] + 1]] = 30.0
        return CausalLMOutput(logits=logits)


def test_probe_tells_a_copying_model_from_one_that_does_not_copy():
    # every byte of the value after the first is new in the record, so only copying predicts it
    document = "Ledger\n\nThe Qvixy Jet comes from Zwbjpk.\n\nQ: Where does the Qvixy Jet come from?\nA: Zwbjpk\n"
    value = "Zwbjpk"
    uniform = answer_copy_probe(_InductionOracle(257, copies=False), ByteTokenizer(), [document], [value])
    assert uniform["copy_gain"] == pytest.approx(0.0, abs=1e-6)
    assert uniform["record_continuation"] == pytest.approx(math.log(257), rel=1e-6)
    copier = answer_copy_probe(_InductionOracle(257, copies=True), ByteTokenizer(), [document], [value])
    assert copier["answer_continuation"] < 1e-6
    assert copier["copy_gain"] == pytest.approx(math.log(257), rel=1e-4)


def test_script_probes_every_checkpoint_of_a_run_in_step_order(tmp_path, capsys):
    probe = load_benchmark("lm_copy_probe")
    run = tmp_path / "run"
    for step in (20, 10):
        torch.manual_seed(step)
        folder = run / "checkpoints" / f"step-{step:08d}"
        BasedForCausalLM(preset("based-tiny", vocab_size=257)).save_pretrained(folder)
        ByteTokenizer().save(folder)
    (run / "checkpoints" / "latest").write_text("step-00000020")
    docs, records = tmp_path / "docs.jsonl", tmp_path / "records.jsonl"
    docs.write_text("".join(json.dumps({"text": DOCUMENT + str(i), "doc_id": f"heldout-{i}"}) + "\n" for i in range(3)))
    records.write_text("".join(json.dumps({"text": "...A:", "value": VALUE, "doc_id": f"heldout-{i}"}) + "\n" for i in range(3)))
    out = tmp_path / "probe.jsonl"
    probe.main(["--run", str(run), "--docs", str(docs), "--records", str(records), "--limit", "2", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["step"] for row in rows] == [10, 20]
    assert all(row["documents"] == 2 and row["continuation_tokens"] == 2 * (len(VALUE) - 1) for row in rows)
    assert rows[0]["record_continuation"] != rows[1]["record_continuation"]  # two different models
    assert "step" in capsys.readouterr().out
    # checkpoints copied aside (a folder of step-* folders) are found the same way
    assert probe.checkpoints_of(run / "checkpoints") == probe.checkpoints_of(run)


def test_script_refuses_a_folder_without_checkpoints(tmp_path):
    probe = load_benchmark("lm_copy_probe")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        probe.checkpoints_of(tmp_path)
