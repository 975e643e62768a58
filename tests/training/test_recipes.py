"""Training recipes: TOML files <-> the recipe dataclasses, the command line over a file, one set of
defaults for Python and the CLI, and the committed recipes under recipes/ against the commands
documented under docs/ (the shipped SAM model's phases, the docs/lm.md runs), parsed by the CLI's
own parser, so neither can drift from the other."""
from __future__ import annotations

import sys
import warnings

import pytest
from documented_commands import (LM_RECALL_DATA, LM_SHAKESPEARE_DATA, REPO, lm_documented_data, lm_recall_run_arguments,
                                 lm_run_arguments, sam_phase_arguments)

from linmix.cli import main
from linmix.cli.lm import lm_recipe_from_command_line
from linmix.cli.sam_train import sam_recipe_from_command_line
from linmix.lm.train import LMRecipe, LMScheduleConfig, LMTrainConfig
from linmix.sam.train import SamRecipe, SamScheduleConfig, SamTrainConfig, _as_recipe
from linmix.training import TrainConfig, read_toml

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SAM_RECIPES = sorted((REPO / "recipes" / "rwkv_sam_tiny").glob("*.toml"))
LM_RECIPES = sorted((REPO / "recipes" / "lm_shakespeare").glob("*.toml"))
LM_RECALL_RECIPES = sorted((REPO / "recipes" / "lm_recall").glob("*.toml"))


# ---------------------------------------------------------------------------------------------
# the committed recipes are the documented commands


def test_every_documented_sam_phase_has_its_recipe_file():
    documented = sam_phase_arguments()
    assert "runs/tiny-rwkv-10" in documented  # the shipped phase
    committed = {read_toml(path)["train"]["out_dir"]: path for path in SAM_RECIPES}
    assert sorted(committed) == sorted(documented)
    assert committed["runs/tiny-rwkv-10"].name == "phase10.toml"


@pytest.mark.parametrize("path", SAM_RECIPES, ids=lambda p: p.stem)
def test_sam_recipe_file_equals_its_documented_command(path):
    from_file = SamRecipe.from_file(path)
    arguments = sam_phase_arguments()[from_file.train.out_dir]
    assert from_file == sam_recipe_from_command_line(arguments)
    # and --config FILE alone runs exactly the file
    assert sam_recipe_from_command_line(["--config", str(path)]) == from_file


def test_the_shipped_phase_recipe_values():
    recipe = SamRecipe.from_file(REPO / "recipes" / "rwkv_sam_tiny" / "phase10.toml")
    assert recipe.sam.init_checkpoint == "tiny-rwkv-8-fp16.safetensors"  # phase 8's exported file
    assert (recipe.sam.image_size, recipe.sam.dataset, recipe.train.max_steps, recipe.train.lr) == (384, "procedural:14", 1200, 2e-4)
    assert recipe.train.betas == (0.9, 0.999) and recipe.train.weight_decay == 0.05 and recipe.sam.position_in_embedding is True
    assert recipe.sam.box_noise_cap is None  # the size-scaled default, as documented
    # each phase starts from the previous phase's output
    phase8 = SamRecipe.from_file(REPO / "recipes" / "rwkv_sam_tiny" / "phase08.toml")
    assert phase8.train.out_dir == "runs/tiny-rwkv-8"


@pytest.mark.parametrize("path", LM_RECIPES, ids=lambda p: p.stem)
def test_lm_recipe_file_equals_its_documented_command(path):
    documented = lm_run_arguments()
    assert sorted(documented) == sorted(p.stem for p in LM_RECIPES)
    from_file = LMRecipe.from_file(path)
    assert from_file == lm_recipe_from_command_line(documented[path.stem])
    assert lm_recipe_from_command_line(["--config", str(path)]) == from_file
    assert (from_file.lm.model, from_file.train.max_steps, from_file.train.lr, from_file.train.betas) == (path.stem, 64, 1e-3, (0.9, 0.95))


def test_every_documented_lm_data_set_has_its_recipes():
    # a documented run on a data set without a recipe folder would not be checked at all
    assert lm_documented_data() == {LM_SHAKESPEARE_DATA, LM_RECALL_DATA}


@pytest.mark.parametrize("path", LM_RECALL_RECIPES, ids=lambda p: p.stem)
def test_lm_recall_recipe_file_equals_its_documented_command(path):
    documented = lm_recall_run_arguments()
    assert sorted(documented) == sorted(p.stem for p in LM_RECALL_RECIPES) == sorted(
        ["transformer-pp-small", "based-small", "mamba-small", "sliding-window-small"])
    from_file = LMRecipe.from_file(path)
    assert from_file == lm_recipe_from_command_line(documented[path.stem])
    assert lm_recipe_from_command_line(["--config", str(path)]) == from_file
    lm, train = from_file.lm, from_file.train
    assert (lm.model, lm.data, lm.tokenizer, lm.seq_len, lm.batch_size) == (
        path.stem, LM_RECALL_DATA, "data/recall-bpe/tokenizer.json", 1024, 2)
    assert (train.max_steps, train.lr, train.warmup_steps, train.seed, train.threads, train.out_dir) == (
        1000, 1e-3, 50, 0, 1, f"runs/lm-recall/{path.stem}")


# ---------------------------------------------------------------------------------------------
# one set of defaults


def test_python_and_cli_defaults_are_the_same():
    assert sam_recipe_from_command_line(["--out", "x"]) == SamRecipe(train=SamScheduleConfig(out_dir="x"), sam=SamTrainConfig())
    # the SAM recipe's AdamW betas are the dataclass default now, not a CLI-only value
    assert SamScheduleConfig().betas == (0.9, 0.999) and SamScheduleConfig().weight_decay == 0.05
    lm = lm_recipe_from_command_line(["--out-dir", "x", "--data", "corpus"])
    assert lm == LMRecipe(train=LMScheduleConfig(out_dir="x"), lm=LMTrainConfig(data="corpus"))
    assert lm.train.lr == 8e-4 and lm.train.betas == (0.9, 0.95)


def test_train_sam_with_a_plain_train_config_warns_about_the_generic_defaults():
    with pytest.warns(UserWarning, match=r"lr, min_lr_ratio, warmup_steps, weight_decay, betas, save_every"):
        recipe = _as_recipe(SamTrainConfig(), TrainConfig(out_dir="x"))
    assert recipe.train.betas == (0.9, 0.95)  # what the caller asked for, kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _as_recipe(SamTrainConfig(), None).train == SamScheduleConfig()
        assert _as_recipe(SamTrainConfig(), SamScheduleConfig(out_dir="y")).train.out_dir == "y"
    with pytest.raises(TypeError, match="takes no train_config"):
        _as_recipe(SamRecipe(), TrainConfig())


# ---------------------------------------------------------------------------------------------
# files, round trips and errors


def test_recipes_round_trip_through_toml(tmp_path):
    sam = SamRecipe(train=SamScheduleConfig(out_dir="run", betas=(0.8, 0.99), eps=1e-6, threads=3),
                    sam=SamTrainConfig(freeze=["backbone", "neck"], scale_range=(0.75, 1.33), box_noise_cap=2.5,
                                       init_checkpoint="a b/\"quoted\".safetensors", position_in_embedding=False))
    assert SamRecipe.from_file(sam.save(tmp_path / "sam.toml")) == sam
    lm = LMRecipe(train=LMScheduleConfig(out_dir="r", max_steps=7), lm=LMTrainConfig(data="d", tokenizer=None, eval_data="e"))
    assert LMRecipe.from_file(lm.save(tmp_path / "lm.toml")) == lm
    assert tomllib.loads(lm.to_toml())["lm"]["eval_data"] == "e" and "tokenizer" not in tomllib.loads(lm.to_toml())["lm"]


def test_a_file_holds_only_what_it_changes(tmp_path):
    path = tmp_path / "short.toml"
    path.write_text('[train]\nout_dir = "x"\nlr = 1\n\n[sam]\nscale_range = [1, 2]\n')
    recipe = SamRecipe.from_file(path)
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)  # a TOML integer is a number too
    assert recipe.sam.scale_range == (1.0, 2.0)
    assert recipe.train.betas == (0.9, 0.999) and recipe.sam.loss_points == SamTrainConfig().loss_points


@pytest.mark.parametrize("text, fragments", [
    ('[train]\nlearning_rate = 1e-3\n', ["'learning_rate'", "[train]", "unknown key", "known keys: out_dir"]),
    ('[sam]\nimage_size = "384"\n', ["'image_size'", "[sam]", "must be an integer", "'384'"]),
    ('[sam]\nposition_in_embedding = 1\n', ["'position_in_embedding'", "true or false"]),
    ('[train]\nbetas = [0.9]\n', ["'betas'", "a list of 2 numbers"]),
    ('[train]\nmax_steps = 1.5\n', ["'max_steps'", "an integer"]),
    ('[sam]\nfreeze = "backbone"\n', ["'freeze'", "a list of strings"]),
    ('[model]\nvariant = "tiny"\n', ["unknown table [model]", "[train], [sam]"]),
    ('[sam]\nstage = "pretrain"\n', ["[sam]", "stage must be one of"]),
    ('[train]\nlr = \n', ["not valid TOML"]),
])
def test_bad_files_name_the_key_and_the_file(tmp_path, text, fragments):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        SamRecipe.from_file(path)
    message = str(error.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file_and_missing_required_lm_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        SamRecipe.from_file(tmp_path / "nope.toml")
    (tmp_path / "lm.toml").write_text('[train]\nout_dir = "x"\n')
    with pytest.raises(ValueError, match=r"lm.toml \[lm\]: data must name"):
        LMRecipe.from_file(tmp_path / "lm.toml")


# ---------------------------------------------------------------------------------------------
# the command line over a file


def test_only_the_options_given_override_the_file(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[train]\nout_dir = "from-file"\nlr = 1e-4\nprogress = false\n\n'
                    '[sam]\nloss_points = 4096\nfreeze = ["backbone"]\nposition_in_embedding = false\nscale_range = [0.75, 1.33]\n')
    plain = sam_recipe_from_command_line(["--config", str(path)])
    assert (plain.train.lr, plain.train.progress, plain.sam.loss_points, plain.sam.freeze) == (1e-4, False, 4096, ["backbone"])
    assert plain.sam.position_in_embedding is False and plain.sam.scale_range == (0.75, 1.33)
    changed = sam_recipe_from_command_line(["--config", str(path), "--lr", "5e-4", "--out", "elsewhere", "--progress",
                                            "--freeze", "neck", "--position-in-embedding", "--scale-range", "0.5,1.5",
                                            "--betas", "0.8,0.9"])
    assert (changed.train.lr, changed.train.out_dir, changed.train.progress) == (5e-4, "elsewhere", True)
    assert changed.sam.freeze == ["neck"] and changed.sam.position_in_embedding is True
    assert changed.sam.scale_range == (0.5, 1.5) and changed.train.betas == (0.8, 0.9)
    assert changed.sam.loss_points == 4096  # untouched by the command line
    # the LM command too, --max-tokens from the file's batch and sequence length
    lm_path = tmp_path / "lm.toml"
    lm_path.write_text('[train]\nout_dir = "o"\nmax_steps = 50\n\n[lm]\ndata = "d"\nseq_len = 64\nbatch_size = 4\n')
    assert lm_recipe_from_command_line(["--config", str(lm_path)]).train.max_steps == 50
    budget = lm_recipe_from_command_line(["--config", str(lm_path), "--max-tokens", "2560", "--data", "other"])
    assert budget.train.max_steps == 10 and budget.lm.data == "other" and budget.lm.seq_len == 64


def test_print_config_writes_the_resolved_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    phase10 = REPO / "recipes" / "rwkv_sam_tiny" / "phase10.toml"
    assert main(["sam", "train", "--config", str(phase10), "--steps", "1300", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.toml").write_text(printed)
    expected = SamRecipe.from_file(phase10).with_overrides({"train": {"max_steps": 1300}})
    assert SamRecipe.from_file(tmp_path / "printed.toml") == expected
    assert not (tmp_path / "runs").exists()  # --print-config trains nothing
    assert main(["lm", "train", "--data", "d", "--out-dir", "o", "--betas", "0.9,0.99", "--print-config"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["train"]["betas"] == [0.9, 0.99]


def test_command_line_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nsteps = 3\n')
    assert main(["sam", "train", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "'steps'" in err and str(bad) in err and "\n" not in err
    assert main(["sam", "train", "--steps", "2"]) == 1
    assert "--out" in capsys.readouterr().err
    assert main(["lm", "train", "--data", "d"]) == 1
    assert "--out-dir" in capsys.readouterr().err
    assert main(["sam", "train", "--out", "x", "--betas", "0.9"]) == 1
    assert "--betas must be two numbers" in capsys.readouterr().err
    assert main(["lm", "train", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "missing.toml not found" in capsys.readouterr().err


MAMBA_OR_RWKV = REPO / "recipes" / "mamba_or_rwkv" / "tiny_192px_400_steps.toml"


@pytest.mark.parametrize("mixer", ["rwkv", "mamba", "attention"])
def test_mamba_or_rwkv_recipe_is_the_measured_command(mixer):
    # The command line the equal-budget models of docs/sam.md ("Mamba or RWKV") were trained with.
    measured = (
        f"--out runs/mixer-{mixer} --dataset procedural:20 --variant tiny --token-mixer {mixer} --image-size 192 "
        "--batch-size 8 --prompts-per-image 4 --loss-points 2048 --steps 400 --lr 8e-4 --warmup-steps 30 "
        "--scale-range 0.75,1.33 --position-in-embedding --prompt-warmup-steps 100 --seed 0 --save-every 25 "
        "--log-every 5 --threads 1 --no-progress"
    ).split()
    from_recipe = sam_recipe_from_command_line(
        ["--config", str(MAMBA_OR_RWKV), "--token-mixer", mixer, "--out", f"runs/mixer-{mixer}"])
    assert from_recipe == sam_recipe_from_command_line(measured)
