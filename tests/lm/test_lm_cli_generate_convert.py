"""`linmix lm generate` and `linmix lm convert` end to end, and loading trainer checkpoints."""
import json

import torch
from safetensors.torch import save_file

from linmix.cli import main
from linmix.lm.config import preset
from linmix.lm.convert import convert_official
from linmix.lm.generation import generate
from linmix.lm.model import BasedForCausalLM
from linmix.lm.tokenizers import ByteTokenizer
from test_convert import official_state_dict, write_checkpoint


def _tiny_model_dir(tmp_path):
    torch.manual_seed(0)
    model = BasedForCausalLM(preset("based-tiny", vocab_size=257)).eval()
    directory = model.save_pretrained(tmp_path / "model")
    ByteTokenizer().save(directory)
    return model, directory


def test_generate_greedy_batch_equals_each_prompt_alone(tmp_path, capsys):
    model, directory = _tiny_model_dir(tmp_path)
    prompts = ["ab", "hello there"]
    code = main(["lm", "generate", str(directory), "-p", prompts[0], "-p", prompts[1], "--max-new-tokens", "6",
                 "--no-stop-at-eos", "--json"])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokenizer = ByteTokenizer()
    for prompt, record in zip(prompts, records):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            expected = generate(model, ids, 6)[0, ids.shape[1]:].tolist()
        assert record["prompt"] == prompt and record["new_tokens"] == 6
        assert record["completion"] == tokenizer.decode(expected)


def test_generate_errors_are_one_line(tmp_path, capsys):
    _, directory = _tiny_model_dir(tmp_path)
    assert main(["lm", "generate", str(directory), "-p", "x", "--temperature", "-1"]) == 1
    assert "--temperature must be >= 0" in capsys.readouterr().err
    assert main(["lm", "generate", str(tmp_path / "missing"), "-p", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_convert_writes_a_loadable_model_equal_to_the_official_one(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "official", official_state_dict(), fmt="safetensors", model_prefix=True,
                                  with_lm_head=False)
    assert main(["lm", "convert", str(checkpoint), str(tmp_path / "converted")]) == 0
    assert "wrote" in capsys.readouterr().out
    ids = torch.randint(0, 64, (1, 12))
    converted = BasedForCausalLM.from_pretrained(tmp_path / "converted")
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, convert_official(checkpoint)(ids).logits)
    assert main(["lm", "convert", str(checkpoint), str(tmp_path / "x"), "--dtype", "int8"]) == 1
    assert "--dtype must be one of" in capsys.readouterr().err
    assert main(["lm", "convert", str(tmp_path / "nope"), str(tmp_path / "y")]) == 1


def test_from_pretrained_accepts_a_training_checkpoint_with_the_tied_head_stored_twice(tmp_path):
    model, directory = _tiny_model_dir(tmp_path)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert "lm_head.weight" in state  # both names, as linmix.training's checkpoints store them
    save_file(state, str(directory / "model.safetensors"))
    reloaded = BasedForCausalLM.from_pretrained(directory)
    ids = torch.randint(0, 257, (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
