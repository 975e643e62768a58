"""benchmarks/lm_recall_report.py on two hand-made runs: every table cell, results.json and the figures."""
from __future__ import annotations

import json
import math

import pytest
from helpers import load_benchmark

from linmix.lm.config import preset
from linmix.lm.model import BasedForCausalLM

# Six records; run "based" gets r0 r1 r3 r5 right, run "attention" was evaluated with --limit 4 and gets r0 right.
RECORDS = [
    {"text": "Brelaford is here.\nQ: Where?\nA:", "value": "Brelaford", "length_bucket": "256-511", "num_records": 2, "layout": "prose", "answer_distance_tokens": 40},
    {"text": "| 1234567 |\nQ: Number?\nA:", "value": "1234567", "length_bucket": "256-511", "num_records": 3, "layout": "table", "answer_distance_tokens": 200},
    {"text": "Code: QX-1\nQ: Code?\nA:", "value": "QX-1", "length_bucket": "256-511", "num_records": 2, "layout": "key_value", "answer_distance_tokens": 300},
    {"text": "Zedford grew.\nQ: Town?\nA:", "value": "Zedford", "length_bucket": "512-1023", "num_records": 3, "layout": "prose", "answer_distance_tokens": 700},
    {"text": "| Alpha Works |\nQ: Maker?\nA:", "value": "Alpha Works", "length_bucket": "512-1023", "num_records": 10, "layout": "table", "answer_distance_tokens": 1500},
    {"text": "Omega Labs made it.\nQ: Who?\nA:", "value": "Omega Labs", "length_bucket": "1024-2047", "num_records": 2, "layout": "prose", "answer_distance_tokens": 130},
]
BASED_GENERATIONS = [" brelaford", " 1234567", " QX-2", " Zedford", " Beta Works", " Omega Labs"]
ATTENTION_GENERATIONS = [" Brelaford", " 7654321", " QX-9", " Nowhere"]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _run(root, name, config, generations, *, tokens_per_step=None, metrics=(), shakespeare_ppl=None, corpus_ppl=None):
    run = root / name
    BasedForCausalLM(config).save_pretrained(run / "model")
    _write_jsonl(run / "metrics.jsonl", list(metrics))
    if tokens_per_step:
        (run / "lm_train_config.json").write_text(json.dumps({"batch_size": 2, "seq_len": tokens_per_step // 2}))
    evaluation = {"model": str(run / "model"),
                  "recall": {"recall_heldout": {"contains": 0.0, "correct": 0, "n": len(generations), "generations": generations}}}
    if shakespeare_ppl:
        evaluation["perplexity"] = {"perplexity": shakespeare_ppl, "loss": math.log(shakespeare_ppl), "bits_per_byte": 3.5,
                                    "scored_tokens": 100, "data": "data/shakespeare/heldout"}
    (run / "eval.json").write_text(json.dumps(evaluation))
    if corpus_ppl:
        (run / "eval_recall_ppl.json").write_text(json.dumps({"perplexity": {"perplexity": corpus_ppl, "loss": 1.0}}))
    return run


def _probe_row(step, gain, record_loss=3.0):
    return {"step": step, "checkpoint": f"ckpt/step-{step:08d}", "record_continuation": record_loss,
            "answer_continuation": record_loss - gain, "answer_first": 2.5, "copy_gain": gain, "documents": 4,
            "continuation_tokens": 9}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    module = load_benchmark("lm_recall_report")
    root = tmp_path_factory.mktemp("report")
    records = root / "recall_heldout.jsonl"
    _write_jsonl(records, RECORDS)
    based_config = preset("based-tiny")
    attention_config = preset("based-tiny", layer_types=["attention"] * 4)
    metrics = [
        {"step": 10, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 16.0},  # 10 steps x 16 tokens at 16/s: 10 s
        {"step": 10, "eval_loss": 3.2, "eval_perplexity": 24.5},
        {"step": 20, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 32.0},  # 5 s
    ]
    based = _run(root, "based", based_config, BASED_GENERATIONS, tokens_per_step=16, metrics=metrics,
                 shakespeare_ppl=12.5, corpus_ppl=4.25)
    _write_jsonl(based / "copy_probe.jsonl", [_probe_row(20, 0.5), _probe_row(10, 0.0)])  # read by default, sorted by step
    attention = _run(root, "attention", attention_config, ATTENTION_GENERATIONS,
                     metrics=[{"step": 5, "loss": 4.0, "lr": 1e-3, "tokens_per_s": 100.0}], shakespeare_ppl=20.0)
    # lm_eval --limit 3 --log_samples on the based run: its third generation differs from linmix's (and is right)
    samples = [{"doc_id": i, "doc": RECORDS[i], "target": RECORDS[i]["value"], "arguments": [[RECORDS[i]["text"], {}]],
                "resps": [[generation]], "filtered_resps": [generation], "filter": "none", "metrics": ["contains"],
                "contains": float(RECORDS[i]["value"].lower() in generation.lower())}
               for i, generation in enumerate([" brelaford", " 1234567", " QX-1"])]
    _write_jsonl(root / "lmeval-based" / "runs__based__model" / "samples_recall_heldout_2026-12-06T06-00-00.jsonl", samples[::-1])
    out = root / "out"
    code = module.main(["--records", str(records), "--run", f"based={based}", "--run", f"attention={attention}",
                        "--lm-eval", f"based={root / 'lmeval-based'}", "--out", str(out)])
    assert code == 0
    return module, root, out, based_config, attention_config


def _table(markdown: str, first_header: str) -> dict[str, list[str]]:
    lines = markdown[markdown.index("| " + first_header) :].split("\n\n")[0].splitlines()
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_main_table_numbers(report):
    _, _, out, based_config, attention_config = report
    table = _table((out / "results.md").read_text(), "model")
    based_parameters = BasedForCausalLM(based_config).num_parameters()
    # 19,048 state bytes; 20 steps x 16 tokens; 10 s + 5 s of log windows
    assert table["based"][:4] == [f"{based_parameters:,}", "18.60 KiB", "320", "15.0 s"]
    assert table["based"][4:] == ["12.500", "3.5000", "4.250", "66.7% (4/6)", "100.0% (3) / 2 of 3"]
    # attention: keys and values of 2048 tokens, d 64, 4 layers, fp32 = 4 MiB; no tokens per step, no corpus ppl
    assert table["attention"] == [f"{BasedForCausalLM(attention_config).num_parameters():,}", "4.00 MiB", "n/a", "n/a",
                                  "20.000", "3.5000", "n/a", "25.0% (1/4)", "-"]


def test_breakdown_tables_by_hand(report):
    _, _, out, _, _ = report
    markdown = (out / "results.md").read_text()
    assert _table(markdown, "context length") == {
        "256-511": ["66.7% (2/3)", "33.3% (1/3)"], "512-1023": ["50.0% (1/2)", "0.0% (0/1)"], "1024-2047": ["100.0% (1/1)", "-"]}
    by_records = _table(markdown, "records in the document")
    assert list(by_records) == ["2", "3", "10"]  # numeric order
    assert by_records == {"2": ["66.7% (2/3)", "50.0% (1/2)"], "3": ["100.0% (2/2)", "0.0% (0/2)"], "10": ["0.0% (0/1)", "-"]}
    assert _table(markdown, "layout") == {"key_value": ["0.0% (0/1)", "0.0% (0/1)"], "prose": ["100.0% (3/3)", "50.0% (1/2)"],
                                          "table": ["50.0% (1/2)", "0.0% (0/1)"]}
    # bytes from the stated value to the question: r0 40, r5 130, r1 200, r2 300, r3 700, r4 1500
    by_distance = _table(markdown, "distance from where the record states the value")
    assert list(by_distance) == ["0-127", "128-255", "256-511", "512-1023", "1024-2047"]  # numeric order
    assert by_distance == {"0-127": ["100.0% (1/1)", "100.0% (1/1)"], "128-255": ["100.0% (2/2)", "0.0% (0/1)"],
                           "256-511": ["0.0% (0/1)", "0.0% (0/1)"], "512-1023": ["100.0% (1/1)", "0.0% (0/1)"],
                           "1024-2047": ["0.0% (0/1)", "-"]}


def test_records_without_answer_distances_leave_out_that_table(report, tmp_path):
    module, root, _, _, _ = report
    records = tmp_path / "old_records.jsonl"
    _write_jsonl(records, [{k: v for k, v in r.items() if k != "answer_distance_tokens"} for r in RECORDS])
    results = module.build_report({"based": root / "based"}, records, tmp_path / "out")
    assert "by_answer_distance" not in results["based"] and "by_layout" in results["based"]
    assert "distance from where" not in (tmp_path / "out" / "results.md").read_text()


def test_results_json_and_figures(report):
    _, _, out, based_config, _ = report
    results = json.loads((out / "results.json").read_text())["runs"]
    based = results["based"]
    assert based["state_bytes"] == BasedForCausalLM(based_config).state_size_bytes(2048)
    assert based["train"]["tokens"] == 320 and based["train"]["wall_s"] == pytest.approx(15.0)
    assert based["train"]["final_loss"] == 2.0 and [p["tokens"] for p in based["train"]["curve"]] == [160, 320]
    assert based["train"]["eval_curve"] == [{"step": 10, "tokens": 160, "loss": 3.2}]
    assert based["recall"] == {"contains": pytest.approx(4 / 6), "correct": 4, "n": 6}
    assert based["by_length_bucket"]["256-511"] == {"contains": pytest.approx(2 / 3), "correct": 2, "n": 3}
    assert based["lm_eval"] == {"n": 3, "contains": 1.0, "generations_equal": 2}
    assert based["shakespeare"]["perplexity"] == 12.5 and based["recall_corpus"]["perplexity"] == 4.25
    assert results["attention"]["recall"]["n"] == 4 and results["attention"]["recall_corpus"] is None
    assert results["attention"]["state_bytes"] == 4 * 2 * 64 * 2048 * 4
    assert based["copy_probe"] == [
        {"step": 10, "tokens": 160, "record_continuation": 3.0, "answer_continuation": 3.0, "copy_gain": 0.0, "documents": 4},
        {"step": 20, "tokens": 320, "record_continuation": 3.0, "answer_continuation": 2.5, "copy_gain": 0.5, "documents": 4}]
    assert "copy_probe" not in results["attention"]
    assert _table((out / "results.md").read_text(), "step") == {"10": ["0.000"], "20": ["0.500"]}
    for name in ("recall_vs_state.png", "recall_vs_length.png", "learning_curves.png", "copy_gain.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_clear_errors(report, capsys):
    module, root, out, _, _ = report
    records = str(root / "recall_heldout.jsonl")
    assert module.main(["--records", records, "--run", "based", "--out", str(out)]) == 1
    assert "NAME=PATH" in capsys.readouterr().err
    assert module.main(["--records", records, "--run", f"based={root / 'based'}", "--lm-eval", f"other={root}",
                        "--out", str(out)]) == 1
    assert "no --run names" in capsys.readouterr().err
    assert module.main(["--records", records, "--run", f"x={root / 'missing'}", "--out", str(out)]) == 1
    assert "no model/ folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="another prompt"):
        module.compare_lm_eval([{"doc_id": 0, "doc": {"text": "other"}, "filtered_resps": ["x"]}], RECORDS, BASED_GENERATIONS)


def test_probe_files_of_a_continued_run_are_merged(report, tmp_path):
    """A run continued in a second folder: --probe twice for one name, the later file wins a shared step."""
    module, root, _, _, _ = report
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    _write_jsonl(first, [_probe_row(10, 0.0), _probe_row(20, 0.25)])
    _write_jsonl(second, [_probe_row(20, 0.5), _probe_row(40, 1.5)])
    out = tmp_path / "out"
    assert module.main(["--records", str(root / "recall_heldout.jsonl"), "--run", f"based={root / 'based'}",
                        "--run", f"attention={root / 'attention'}", "--probe", f"based={first}", "--probe", f"based={second}",
                        "--probe", f"attention={first}", "--out", str(out)]) == 0
    table = _table((out / "results.md").read_text(), "step")
    assert table == {"10": ["0.000", "0.000"], "20": ["0.500", "0.250"], "40": ["1.500", "-"]}
    results = json.loads((out / "results.json").read_text())["runs"]
    assert [row["tokens"] for row in results["based"]["copy_probe"]] == [160, 320, 640]
    assert [row["tokens"] for row in results["attention"]["copy_probe"]] == [None, None]  # no lm_train_config.json


def test_bad_probe_arguments_are_clear_errors(report, capsys, tmp_path):
    module, root, _, _, _ = report
    base = ["--records", str(root / "recall_heldout.jsonl"), "--run", f"based={root / 'based'}", "--out", str(tmp_path / "o")]
    assert module.main(base + ["--probe", "based"]) == 1
    assert "NAME=FILE" in capsys.readouterr().err
    assert module.main(base + ["--probe", f"other={root / 'based' / 'copy_probe.jsonl'}"]) == 1
    assert "which no --run names" in capsys.readouterr().err
    assert module.main(base + ["--probe", f"based={tmp_path / 'missing.jsonl'}"]) == 1
    assert "lm_copy_probe.py --out" in capsys.readouterr().err
    not_a_probe = tmp_path / "metrics.jsonl"
    _write_jsonl(not_a_probe, [{"step": 10, "loss": 3.0}])
    assert module.main(base + ["--probe", f"based={not_a_probe}"]) == 1
    assert "not a copy-probe file" in capsys.readouterr().err


def test_recall_axis_zooms_on_small_scores_and_keeps_full_scale_past_half():
    module = load_benchmark("lm_recall_report")
    assert module._percent_axis_top([]) == 5.0
    assert module._percent_axis_top([0.0, 0.0]) == 5.0
    assert module._percent_axis_top([10.3, 4.2, 0.0]) == 15.0  # 10.3 * 1.25 = 12.9 -> next multiple of 5
    assert module._percent_axis_top([40.0]) == 50.0
    assert module._percent_axis_top([50.1, 2.0]) == 100.0
