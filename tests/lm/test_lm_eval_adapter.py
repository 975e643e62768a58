"""The lm-eval adapter: scores against direct model computations, the registry hook, a real lm_eval run."""
import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from linmix.lm import BasedForCausalLM  # noqa: E402
from linmix.lm.evaluate import evaluate_recall  # noqa: E402
from linmix.lm.lm_eval_adapter import LinmixLM, install_hook, write_recall_task  # noqa: E402
from linmix.lm.tokenizers import ByteTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(3)
    model = BasedForCausalLM.from_preset("based-tiny", vocab_size=257)
    with torch.no_grad():  # sharper than the init so greedy choices are not ties
        model.transformer.embeddings.word_embeddings.weight.mul_(20)
    model.save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory


def _request(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _log_probs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_loglikelihood_is_the_sum_of_continuation_log_probs(model_dir):
    lm = LinmixLM(pretrained=str(model_dir), device="cpu", batch_size=2)
    model = BasedForCausalLM.from_pretrained(model_dir)
    pairs = [("The king", " is dead"), ("A", "b"), ("Long live the", " queen!")]
    results = lm.loglikelihood([_request("loglikelihood", pair) for pair in pairs])
    for (context, continuation), (value, greedy) in zip(pairs, results):
        ids = list((context + continuation).encode())
        n = len(continuation.encode())
        log_probs = _log_probs(model, ids)
        expected = sum(float(log_probs[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-5)
        argmax_ok = all(int(log_probs[t - 1].argmax()) == ids[t] for t in range(len(ids) - n, len(ids)))
        assert greedy == argmax_ok


def test_rolling_loglikelihood_scores_every_token_after_an_eos_prefix(model_dir):
    lm = LinmixLM(pretrained=str(model_dir), device="cpu", max_length=16)
    model = BasedForCausalLM.from_pretrained(model_dir)
    text = "Now is the winter of our discontent"  # 35 bytes: three windows of at most 16
    [value] = lm.loglikelihood_rolling([_request("loglikelihood_rolling", (text,))])
    ids = list(text.encode())
    # windows of the harness: each predicts up to 16 new tokens with up to 16 tokens of context
    expected, done = 0.0, 0
    while done < len(ids):
        end = min(done + 16, len(ids))
        window = ([256] + ids)[max(0, end - 16) : end]  # inputs: prefix token + text, shifted by one
        targets = ids[max(0, end - 16) : end]
        log_probs = _log_probs(model, window)
        scored = range(done - max(0, end - 16), len(targets))
        expected += sum(float(log_probs[i, targets[i]]) for i in scored)
        done = end
    assert value == pytest.approx(expected, rel=1e-5)


def test_generate_until_is_greedy_and_cut_at_the_stop_string(model_dir):
    lm = LinmixLM(pretrained=str(model_dir), device="cpu")
    model = BasedForCausalLM.from_pretrained(model_dir)
    context = "To be, or not to be"
    full = model.generate(torch.tensor([list(context.encode())]), 12, temperature=0.0, eos_token_id=256)
    expected = ByteTokenizer().decode(full[0, len(context):].tolist())
    stop = expected[3]  # a character the greedy output really produces
    [text] = lm.generate_until([_request("generate_until", (context, {"until": [stop], "max_gen_toks": 12}))])
    assert text == expected[: expected.index(stop)]
    [text] = lm.generate_until([_request("generate_until", (context, {"until": ["\u2603"], "max_gen_toks": 12}))])
    assert text == expected
    # batched with other prompts of other lengths (left padding): the same text
    others = ["Alas, poor Yorick", "O"]
    texts = lm.generate_until([_request("generate_until", (c, {"until": ["\u2603"], "max_gen_toks": 12}))
                               for c in [others[0], context, others[1]]])
    assert texts[1] == expected
    alone = lm.generate_until([_request("generate_until", (others[0], {"until": ["\u2603"], "max_gen_toks": 12}))])
    assert texts[0] == alone[0]


def test_cuda_default_falls_back_to_cpu_and_bad_dtype_is_named(model_dir):
    with pytest.warns(UserWarning, match="CUDA is not available") if not torch.cuda.is_available() else _nothing():
        lm = LinmixLM(pretrained=str(model_dir), device="cuda:0")  # lm-eval's default device
    assert lm.device.type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="dtype must be one of"):
        LinmixLM(pretrained=str(model_dir), device="cpu", dtype="float8")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_pth_hook_registers_linmix_in_lm_evals_registry(tmp_path):
    install_hook(tmp_path)
    assert (tmp_path / "linmix_lm_eval.pth").read_text() == "import linmix._lm_eval_hook\n"
    import sysconfig
    from pathlib import Path

    import linmix

    # -S: no site processing, so only the .pth under test (not an installed one) can register linmix;
    # the packages and linmix's source folder are put on the path by hand.
    paths = [sysconfig.get_paths()["purelib"], str(Path(linmix.__file__).parents[1])]
    code = ("import site, sys; sys.path += sys.argv[2:]; site.addsitedir(sys.argv[1]); "
            "assert 'torch' not in sys.modules and 'lm_eval' not in sys.modules; "  # the hook itself is light
            "from lm_eval.api.registry import get_model; print(get_model('linmix').__module__, get_model('dummy').__name__)")
    result = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path), *paths], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["linmix.lm.lm_eval_adapter", "DummyLM"]


@pytest.mark.slow
def test_lm_eval_cli_runs_a_recall_task_with_model_linmix(model_dir, tmp_path):
    records = [{"text": "Who is there?\nBer.\nNay, answer me", "value": "Bernardo"},
               {"text": "Long live the", "value": "king"}]
    data = tmp_path / "recall.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_recall_task(data, "tiny_recall", tmp_path / "tasks")
    (tmp_path / "site").mkdir()
    install_hook(tmp_path / "site")
    code = ("import site, sys; site.addsitedir(sys.argv[1]); from lm_eval.__main__ import cli_evaluate; "
            "sys.argv = ['lm_eval'] + sys.argv[2:]; cli_evaluate()")
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "site"), "--model", "linmix", "--model_args",
         f"pretrained={model_dir}", "--include_path", str(tmp_path / "tasks"), "--tasks", "tiny_recall",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = list((tmp_path / "out").rglob("results_*.json"))
    reported = json.loads(results_file.read_text())["results"]["tiny_recall"]["contains,none"]
    [samples_file] = list((tmp_path / "out").rglob("samples_tiny_recall_*.jsonl"))
    generations = [json.loads(line)["filtered_resps"][0] for line in samples_file.read_text().splitlines()]
    ours = evaluate_recall(BasedForCausalLM.from_pretrained(model_dir), ByteTokenizer(), records, batch_size=1)
    # the harness path (prompt built from the YAML, stop at newline, 48 tokens) equals ours
    assert sorted(generations) == sorted(ours["generations"])
    assert reported == pytest.approx(ours["contains"])
    assert not math.isnan(reported)


def test_recall_task_yaml_has_the_papers_protocol_and_a_contains_metric(tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval 0.4.13 reads task files with

    data = tmp_path / "odd: name.jsonl"  # a path YAML would misread unquoted
    data.write_text(json.dumps({"text": "Q", "value": "A"}) + "\n")
    config = load_yaml(write_recall_task(data, "my_recall", tmp_path / "tasks"))
    assert config["dataset_kwargs"]["data_files"]["validation"] == str(data.resolve())
    assert config["output_type"] == "generate_until"
    assert config["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 48, "do_sample": False}
    contains = config["metric_list"][0]["metric"]
    assert contains(references=["Paris"], predictions=[" in PARIS today"]) == 1.0
    assert contains(references=["Paris"], predictions=["Lyon"]) == 0.0
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        write_recall_task(data, "bad name", tmp_path / "tasks")
