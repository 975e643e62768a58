"""`linmix lm train`: a BASED (or baseline) LM trained on local text with the shared Trainer.

The text is tokenized once into ``out_dir/data/train.bin`` (memory-mapped, reused on resume),
packed into windows of ``seq_len`` tokens and served by :class:`linmix.lm.data.PackedBatches` in an
order that is a pure function of (seed, epoch, index). Everything else (AdamW without decay on
norms / biases / embeddings, warmup + cosine, clipping, accumulation, bf16 autocast, compile,
atomic checkpoints with exact resume, torchrun DDP / FSDP, JSONL metrics) is
:class:`linmix.training.Trainer`.

The recipe is an :class:`LMRecipe`: ``[train]`` (the shared schedule, :class:`LMScheduleConfig`) and
``[lm]`` (:class:`LMTrainConfig`), loadable from TOML (``linmix lm train --config recipe.toml``).

Output folder::

    out_dir/recipe.toml               the resolved recipe of the run
    out_dir/lm_train_config.json      this file's LMTrainConfig (data, tokenizer, model, batch)
    out_dir/train_config.json         the Trainer's TrainConfig
    out_dir/metrics.jsonl             one record per log interval (loss, lr, tokens_per_s, grad_norm)
    out_dir/checkpoints/step-N/       model.safetensors + config.json + tokenizer: loadable as a model
    out_dir/model/                    the final model (config.json, model.safetensors, tokenizer)
    out_dir/eval.json                 held-out perplexity of the final model (with --eval-data)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linmix.lm.config import BasedConfig, preset
from linmix.lm.data import PackedBatches, PackedSequences, load_tokens, tokenize_to_file
from linmix.lm.tokenizers import load_tokenizer
from linmix.training.config import Recipe
from linmix.training.trainer import TrainConfig, adopt_schedule

LM_TRAIN_CONFIG = "lm_train_config.json"
FINAL_MODEL_DIR = "model"
# Settings a resumed run may change besides the shared ones (linmix.training.RESUMABLE_TRAIN_KEYS):
# the held-out evaluation does not touch training.
LM_RESUMABLE_KEYS = ("lm.eval_data", "lm.eval_tokens")


@dataclass
class LMScheduleConfig(TrainConfig):
    """The shared schedule and optimiser section (:class:`linmix.training.TrainConfig`) with the LM
    recipe's defaults (peak lr 8e-4; betas (0.9, 0.95), decay 0.1, 100 warm-up steps, cosine to 10 %).
    ``out_dir`` has no default: every run names its folder."""

    out_dir: str = ""
    lr: float = 8e-4


@dataclass
class LMTrainConfig:
    """What to train on and which model; the optimisation schedule is a :class:`TrainConfig`."""

    data: str = ""
    tokenizer: str | None = None  # None: the byte-level fallback
    model: str = "based-small"  # a preset name or a config.json path
    seq_len: int = 512
    batch_size: int = 16  # global sequences per optimizer step (over processes and micro-steps)
    text_field: str = "text"
    eval_data: str | None = None
    eval_tokens: int = 65536  # held-out tokens scored by the periodic in-training evaluation

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data must name a text file or folder")
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {self.seq_len} and {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LMRecipe(Recipe):
    """The whole ``linmix lm train`` recipe: ``[train]`` (schedule, optimiser, run folder) and ``[lm]``
    (data, tokenizer, model, batch). ``[lm] data`` has no default."""

    train: LMScheduleConfig
    lm: LMTrainConfig


def build_model_config(model: str, vocab_size: int) -> BasedConfig:
    """A preset name or a config.json path, with the vocabulary set to the tokenizer's."""
    path = Path(model)
    if path.suffix == ".json" or path.is_dir():
        config = BasedConfig.load(path)
        return dataclasses.replace(config, vocab_size=vocab_size)
    return preset(model, vocab_size=vocab_size)


def weights_digest(model) -> str:
    """sha256 of every parameter's bytes, in name order (equal digests: bit-identical weights)."""
    import hashlib

    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def lm_loss(model, batch: dict[str, torch.Tensor]):
    """Shifted next-token cross-entropy over a packed batch ``input_ids [b, T]``."""
    input_ids = batch["input_ids"]
    out = model(input_ids, labels=input_ids)
    return out.loss, {}, input_ids.numel()


def _tokens_for(path: str, tokenizer, out_path: Path, text_field: str):
    meta = tokenize_to_file(path, tokenizer, out_path, text_field=text_field)
    return load_tokens(out_path), meta


def _as_recipe(config: LMRecipe | LMTrainConfig, train_config: TrainConfig | None) -> LMRecipe:
    if isinstance(config, LMRecipe):
        if train_config is not None:
            raise TypeError("train_lm(recipe) takes no train_config: the recipe's [train] section is that")
        return config
    if not isinstance(config, LMTrainConfig):
        raise TypeError(f"train_lm needs an LMRecipe or an LMTrainConfig, got {type(config).__name__}")
    return LMRecipe(train=adopt_schedule(train_config, LMScheduleConfig, "train_lm"), lm=config)


def train_lm(config: LMRecipe | LMTrainConfig, train_config: TrainConfig | None = None) -> dict[str, Any]:
    """Train (or resume) and return the Trainer's summary plus the final held-out evaluation.

    ``config`` is an :class:`LMRecipe` (what ``linmix lm train`` runs), or, as before, an
    :class:`LMTrainConfig` with the schedule as ``train_config`` (default: :class:`LMScheduleConfig`).
    A folder holding checkpoints is resumed, and refused if a setting differs, except the shared
    ones of :data:`linmix.training.RESUMABLE_TRAIN_KEYS` and :data:`LM_RESUMABLE_KEYS`.
    """
    import os

    from linmix.lm.evaluate import evaluate_perplexity, load_model
    from linmix.lm.model import BasedForCausalLM
    from linmix.training import Trainer, check_resume_settings

    recipe = _as_recipe(config, train_config)
    config, train_config = recipe.lm, recipe.train
    if not train_config.out_dir:
        raise ValueError("out_dir is empty: name the run folder ([train] out_dir, or --out-dir)")
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    out_dir = Path(train_config.out_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    trainer_settings = {"lm": config.to_dict()}
    if train_config.resume:  # before the data of another run is tokenized over this one's
        check_resume_settings(out_dir, {"train": train_config.to_dict(), **trainer_settings}, resumable=LM_RESUMABLE_KEYS)
    tokenizer = load_tokenizer(config.tokenizer)
    tokens, meta = _tokens_for(config.data, tokenizer, out_dir / "data" / "train.bin", config.text_field)
    sequences = PackedSequences(tokens, config.seq_len)
    batches = PackedBatches(sequences, batch_size=config.batch_size, grad_accum=train_config.grad_accum,
                            seed=train_config.seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    batches.micro_batch_size(world_size)  # fail now, not after the model is built
    eval_tokens = eval_meta = None
    if config.eval_data:
        eval_tokens, eval_meta = _tokens_for(config.eval_data, tokenizer, out_dir / "data" / "eval.bin", config.text_field)

    model_config = build_model_config(config.model, tokenizer.vocab_size)
    torch.manual_seed(train_config.seed)  # identical initial weights on every rank (FSDP needs it)
    model = BasedForCausalLM(model_config)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / LM_TRAIN_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        recipe.save(out_dir / "recipe.toml", header="linmix lm train: the resolved recipe of this run")
        print(f"data: {meta['n_tokens']:,} tokens in {meta['n_documents']} documents -> {len(sequences):,} sequences "
              f"of {config.seq_len}; model: {model.num_parameters():,} parameters "
              f"({config.model}, vocab {model_config.vocab_size}); {train_config.max_steps} steps x "
              f"{config.batch_size * config.seq_len:,} tokens")

    def save_extra(folder: Path) -> None:
        model_config.save(folder)
        tokenizer.save(folder)

    eval_fn = None
    if eval_tokens is not None and train_config.eval_every:
        def eval_fn(eval_model):
            result = evaluate_perplexity(eval_model, eval_tokens, seq_len=config.seq_len, max_tokens=config.eval_tokens)
            return {"loss": result.loss, "perplexity": result.perplexity}

    trainer = Trainer(model, train_config, loss_fn=lm_loss, batches=batches, eval_fn=eval_fn, save_extra=save_extra,
                      settings=trainer_settings, resumable=LM_RESUMABLE_KEYS)
    summary = trainer.fit()
    if world_size > 1 and train_config.distributed == "ddp":
        # every rank must end with the same weights; printed so a launcher (and the tests) can check
        print(f"rank {os.environ.get('RANK', '0')}/{world_size}: final weights sha256 {weights_digest(model)}", flush=True)
    if not is_main:
        return summary
    final = out_dir / FINAL_MODEL_DIR
    final_model = load_model(summary["checkpoint"])
    tmp = out_dir / (FINAL_MODEL_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    final_model.save_pretrained(tmp)
    tokenizer.save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    summary["model_dir"] = str(final)
    if eval_tokens is not None:
        result = evaluate_perplexity(final_model, eval_tokens, seq_len=config.seq_len, n_bytes=eval_meta["n_bytes"])
        summary["eval"] = result.to_dict()
        (out_dir / "eval.json").write_text(json.dumps({"data": config.eval_data, **result.to_dict()}, indent=2) + "\n")
        print(f"held-out: perplexity {result.perplexity:.3f} | loss {result.loss:.4f} | "
              f"bits/byte {result.bits_per_byte:.4f} | {result.scored_tokens:,} tokens")
    return summary
