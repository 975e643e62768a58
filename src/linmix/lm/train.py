"""`linmix lm train`: a BASED (or baseline) LM trained on local text with the shared Trainer.

The text is tokenized once into ``out_dir/data/train.bin`` (memory-mapped, reused on resume),
packed into windows of ``seq_len`` tokens and served by :class:`linmix.lm.data.PackedBatches` in an
order that is a pure function of (seed, epoch, index). Everything else (AdamW without decay on
norms / biases / embeddings, warmup + cosine, clipping, accumulation, bf16 autocast, compile,
atomic checkpoints with exact resume, torchrun DDP / FSDP, JSONL metrics) is
:class:`linmix.training.Trainer`.

Output folder::

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

LM_TRAIN_CONFIG = "lm_train_config.json"
FINAL_MODEL_DIR = "model"


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


def _check_resumable(out_dir: Path, config: LMTrainConfig) -> None:
    """A resumed run must train the same model on the same data: refuse a silent mix."""
    saved = out_dir / LM_TRAIN_CONFIG
    if saved.is_file() and (out_dir / "checkpoints").is_dir():
        previous = json.loads(saved.read_text())
        changed = {k: (previous.get(k), v) for k, v in config.to_dict().items()
                   if k not in ("eval_data", "eval_tokens") and previous.get(k) != v}
        if changed:
            raise ValueError(f"{out_dir} holds a run with different settings {changed} (old, new); "
                             "use a new --out-dir or the original settings to resume")


def train_lm(config: LMTrainConfig, train_config) -> dict[str, Any]:
    """Train (or resume) and return the Trainer's summary plus the final held-out evaluation."""
    import os

    from linmix.lm.evaluate import evaluate_perplexity, load_model
    from linmix.lm.model import BasedForCausalLM
    from linmix.training import Trainer

    out_dir = Path(train_config.out_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    _check_resumable(out_dir, config)
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

    trainer = Trainer(model, train_config, loss_fn=lm_loss, batches=batches, eval_fn=eval_fn, save_extra=save_extra)
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
