"""Perplexity against hand-computed references; the recall-task protocol (truncation, stop, contains)."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from linmix.lm import BasedForCausalLM
from linmix.lm.evaluate import (
    contains_score,
    evaluate_perplexity,
    evaluate_recall,
    load_model,
    load_recall_records,
    truncate_at_stop,
)
from linmix.lm.model import CausalLMOutput
from linmix.lm.tokenizers import ByteTokenizer


class UniformLM(nn.Module):
    """Zero logits: every token has probability 1 / vocab, so the perplexity is exactly vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return CausalLMOutput(logits=torch.zeros(*input_ids.shape, self.vocab) + 0 * self.dummy)


def test_uniform_model_has_perplexity_equal_to_the_vocabulary_and_bits_per_byte_from_it():
    tokens = np.arange(37) % 11
    result = evaluate_perplexity(UniformLM(11), tokens, seq_len=8, batch_size=3, n_bytes=100)
    assert result.perplexity == pytest.approx(11.0, rel=1e-6)
    # 4 full windows of 8 score 7 tokens each; the 5-token tail scores 4
    assert result.scored_tokens == 4 * 7 + 4
    assert result.bits_per_byte == pytest.approx(result.scored_tokens * math.log2(11) / 100, rel=1e-6)


def test_perplexity_equals_the_mean_cross_entropy_of_the_model_over_windows():
    model = BasedForCausalLM.from_preset("based-tiny").eval()
    tokens = torch.randint(0, 256, (50,))
    result = evaluate_perplexity(model, tokens.numpy(), seq_len=16, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 50, 16):
            window = tokens[start : start + 16][None]
            loss = model(window, labels=window).loss  # mean over the window's shifted targets
            nll += float(loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    assert result.scored_tokens == count == 3 * 15 + 1
    assert result.loss == pytest.approx(nll / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_contains_is_a_case_insensitive_substring_of_any_gold_value():
    assert contains_score("The answer is PARIS, France", "paris") == 1.0
    assert contains_score("Lyon", "Paris") == 0.0
    assert contains_score("born in 1879", ["1878", "1879"]) == 1.0
    assert contains_score("anything", "  ") == 0.0  # an empty gold value never counts
    assert truncate_at_stop(" Paris\nand more") == " Paris"
    assert truncate_at_stop("no newline") == "no newline"


class ScriptedLM(nn.Module):
    """Records the prompts it is given and 'generates' a fixed byte string after each."""

    def __init__(self, continuation: bytes):
        super().__init__()
        self.continuation = list(continuation)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.prompts = []

    def generate(self, input_ids, max_new_tokens, *, temperature, attention_mask):
        assert temperature == 0.0
        new = torch.tensor(self.continuation[:max_new_tokens]).expand(input_ids.shape[0], -1)
        for row, mask in zip(input_ids, attention_mask):
            self.prompts.append(bytes(row[mask.bool()].tolist()).decode())
        return torch.cat([input_ids, new], dim=1)


def test_recall_truncates_left_stops_at_newline_and_scores_contains():
    model = ScriptedLM(b" Paris\nLondon" + b"x" * 60)
    records = [{"text": "The capital of France is", "value": "paris"},
               {"text": "Long prompt " * 300 + "capital:", "value": "London"}]
    scores = evaluate_recall(model, ByteTokenizer(), records, max_new_tokens=48, max_length=2048, batch_size=2)
    # London comes after the newline: cut away, so only the first record counts
    assert scores["generations"] == [" Paris", " Paris"]
    assert scores["contains"] == 0.5 and scores["correct"] == 1 and scores["n"] == 2
    long_prompt = [p for p in model.prompts if p.endswith("capital:") and len(p) > 100][0]
    assert len(long_prompt) == 2048 - 48  # left-truncated: the end of the prompt is kept
    assert "The capital of France is" in model.prompts


def test_recall_records_from_jsonl_and_parquet(tmp_path):
    rows = [{"text": "Q1", "value": "A1"}, {"text": "Q2", "value": "A2", "extra": 1}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_recall_records(tmp_path / "t.jsonl") == [{"text": "Q1", "value": "A1"}, {"text": "Q2", "value": "A2"}]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["Q"], "value": ["A"]}), tmp_path / "t.parquet")
    assert load_recall_records(tmp_path / "t.parquet") == [{"text": "Q", "value": "A"}]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "Q"}) + "\n")
    with pytest.raises(ValueError, match="lacks the field 'text' or 'value'"):
        load_recall_records(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="no recall task file"):
        load_recall_records(tmp_path / "none.jsonl")


def test_load_model_reads_a_checkpoint_folder_with_both_tied_names(tmp_path):
    from safetensors.torch import save_file

    model = BasedForCausalLM.from_preset("based-tiny").eval()
    model.config.save(tmp_path)
    # what the Trainer writes: every state-dict name, tied embeddings stored twice
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path)
    ids = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.transformer.embeddings.word_embeddings.weight


def test_lm_eval_command_reports_perplexity_and_recall_of_a_model_folder(tmp_path, capsys):
    from linmix.cli import main

    model = BasedForCausalLM.from_preset("based-tiny", vocab_size=257).eval()
    model.save_pretrained(tmp_path / "model")
    ByteTokenizer().save(tmp_path / "model")
    (tmp_path / "heldout.txt").write_text("Friends to this ground. And liegemen to the Dane.")
    records = [{"text": "Who's there?\nNay, answer me", "value": "stand"}, {"text": "Long live the", "value": "king"}]
    (tmp_path / "swde.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code = main(["lm", "eval", str(tmp_path / "model"), "--data", str(tmp_path / "heldout.txt"), "--seq-len", "16",
                 "--recall", str(tmp_path / "swde.jsonl"), "--json-out", str(tmp_path / "results.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "recall swde: contains" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    text = (tmp_path / "heldout.txt").read_text()
    expected = evaluate_perplexity(model, list(text.encode()) + [256], seq_len=16, n_bytes=len(text))
    assert results["perplexity"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    direct = evaluate_recall(model, ByteTokenizer(), records)
    assert results["recall"]["swde"]["generations"] == direct["generations"]
    assert results["recall"]["swde"]["contains"] == direct["contains"]
    assert all("\n" not in g and len(g.encode("utf-8", "surrogateescape")) <= 48 * 3 for g in direct["generations"])
    # a folder without a tokenizer is refused with the way out
    model.save_pretrained(tmp_path / "bare")
    assert main(["lm", "eval", str(tmp_path / "bare"), "--recall", str(tmp_path / "swde.jsonl")]) == 1
    assert "--tokenizer" in capsys.readouterr().err
