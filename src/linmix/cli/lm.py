"""`linmix lm train | eval | lm-eval-task | install-lm-eval-hook | generate | convert | recall-corpus | train-tokenizer`: LMs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from linmix.cli.app import CliError, lm_app


# Every `lm train` option that sets a recipe value: parameter name -> (recipe section, key).
# (--max-tokens is not a recipe value: it sets max_steps from the resolved batch and sequence length.)
LM_TRAIN_OPTIONS = {
    "out_dir": ("train", "out_dir"), "max_steps": ("train", "max_steps"), "lr": ("train", "lr"),
    "min_lr_ratio": ("train", "min_lr_ratio"), "warmup_steps": ("train", "warmup_steps"),
    "weight_decay": ("train", "weight_decay"), "betas": ("train", "betas"), "eps": ("train", "eps"),
    "grad_clip": ("train", "grad_clip"), "grad_accum": ("train", "grad_accum"), "precision": ("train", "precision"),
    "compile": ("train", "compile"), "log_every": ("train", "log_every"), "save_every": ("train", "save_every"),
    "keep_checkpoints": ("train", "keep_checkpoints"), "eval_every": ("train", "eval_every"), "seed": ("train", "seed"),
    "distributed": ("train", "distributed"), "progress": ("train", "progress"), "resume": ("train", "resume"),
    "threads": ("train", "threads"),
    "data": ("lm", "data"), "model": ("lm", "model"), "tokenizer": ("lm", "tokenizer"), "seq_len": ("lm", "seq_len"),
    "batch_size": ("lm", "batch_size"), "text_field": ("lm", "text_field"), "eval_data": ("lm", "eval_data"),
    "eval_tokens": ("lm", "eval_tokens"),
}


def _parse_betas(text: str) -> tuple[float, float]:
    try:
        first, second = (float(v) for v in text.split(","))
    except ValueError as error:
        raise CliError(f"--betas must be two numbers B1,B2 (e.g. 0.9,0.95), got {text!r}") from error
    return first, second


def lm_recipe_from_params(params: dict):
    """The :class:`linmix.lm.train.LMRecipe` of one `lm train` invocation: the ``--config`` file (or the
    dataclass defaults), then every option given on the command line on top, then ``--max-tokens``."""
    from linmix.lm.train import LMRecipe
    from linmix.training.config import option_overrides

    if params.get("max_steps") is not None and params.get("max_tokens") is not None:
        raise CliError("give --max-steps or --max-tokens, not both")
    config_file = params.get("config")
    overrides = option_overrides(params, LM_TRAIN_OPTIONS, convert={"betas": _parse_betas})
    if config_file is None:
        recipe = LMRecipe.from_dict(overrides, source="command line")
        source = "command line"
    else:
        source = f"{config_file} with the command-line options"
        recipe = LMRecipe.from_file(config_file).with_overrides(overrides, source=source)
    max_tokens = params.get("max_tokens")
    if max_tokens is not None:
        steps = max(1, max_tokens // (recipe.lm.batch_size * recipe.lm.seq_len))
        recipe = recipe.with_overrides({"train": {"max_steps": steps}}, source=source)
    return recipe


def lm_recipe_from_command_line(argv: list[str]):
    """The recipe ``linmix lm train ARGV`` would run, parsed by the command's own parser (no training)."""
    import typer.main

    command = typer.main.get_command(lm_app).commands["train"]
    with command.make_context("train", list(argv)) as context:
        return lm_recipe_from_params(dict(context.params))


@lm_app.command(
    "train",
    epilog=(
        "Examples:\n\n"
        "  linmix lm train --data corpus/train --out-dir runs/based --model based-small --max-steps 64\n\n"
        "  linmix lm train --config recipes/lm_shakespeare/based-small.toml --out-dir runs/again   (the docs/lm.md run)\n\n"
        "  linmix lm train --config recipe.toml --lr 1e-3 --print-config   (show the resolved recipe, train nothing)\n\n"
        "Writes OUT_DIR/recipe.toml (the resolved recipe), metrics.jsonl, checkpoints/ (resumed when re-run with "
        "the same settings) and model/."
    ),
)
def train(
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe TOML (\\[train] and \\[lm] tables); options given here override its values."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved recipe as TOML and exit without training."),
    data: Optional[Path] = typer.Option(None, help="Training text: .txt / .jsonl / .parquet file, a folder of them, or a datasets folder (required unless the recipe sets it)."),
    out_dir: Optional[Path] = typer.Option(None, help="Run folder: checkpoints, metrics.jsonl, the final model (resumes if it holds a run); required unless the recipe sets it."),
    model: Optional[str] = typer.Option(None, help="Preset name (based-small, the default; transformer-pp-small, ...) or a config.json path."),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer.json, a folder with vocab.json + merges.txt, or 'byte' (default)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per packed training sequence."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per optimizer step, over all processes and accumulation micro-steps."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (may grow on resume)."),
    max_tokens: Optional[int] = typer.Option(None, help="Token budget: max_steps = max_tokens / (batch_size x seq_len)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW)."),
    min_lr_ratio: Optional[float] = typer.Option(None, help="Cosine floor as a fraction of --lr."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warm-up steps (capped at the run's steps)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW decay (never on norms, biases, embeddings)."),
    betas: Optional[str] = typer.Option(None, help="AdamW betas B1,B2."),
    eps: Optional[float] = typer.Option(None, help="AdamW epsilon."),
    grad_clip: Optional[float] = typer.Option(None, help="Gradient-norm clip (0 disables)."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-steps accumulated per optimizer step."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 autocast where supported) | fp32 | bf16."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    log_every: Optional[int] = typer.Option(None, help="Optimizer steps per log line / metrics record."),
    save_every: Optional[int] = typer.Option(None, help="Optimizer steps per checkpoint."),
    keep_checkpoints: Optional[int] = typer.Option(None, help="Checkpoints kept on disk."),
    eval_data: Optional[Path] = typer.Option(None, help="Held-out text: perplexity every --eval-every steps and at the end."),
    eval_every: Optional[int] = typer.Option(None, help="Steps between held-out evaluations (0: only at the end)."),
    eval_tokens: Optional[int] = typer.Option(None, help="Held-out tokens scored by each in-training evaluation."),
    seed: Optional[int] = typer.Option(None, help="Seed of the initial weights and the data order."),
    distributed: Optional[str] = typer.Option(None, help="Under torchrun: ddp | fsdp."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads per process (0: torch's default)."),
    text_field: Optional[str] = typer.Option(None, help="Field / column holding the text in .jsonl / .parquet / datasets."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show a progress bar."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from OUT_DIR's latest checkpoint if there is one (the default)."),
) -> None:
    """Train a BASED (or baseline) LM on local text; a killed run resumes exactly from its last checkpoint.

    Defaults: the LMRecipe dataclasses of linmix.lm.train (the same from Python); --print-config shows them.
    Multi-process: torchrun --nproc-per-node N -m linmix lm train ... (gloo on CPU, nccl on GPUs).
    """
    recipe = lm_recipe_from_params(dict(locals()))
    if print_config:
        typer.echo(recipe.to_toml(header="linmix lm train recipe"), nl=False)
        return
    if not recipe.train.out_dir:
        raise CliError("name the run folder: --out-dir, or out_dir in the recipe's [train] table")
    from linmix.lm.train import train_lm

    try:
        train_lm(recipe)
    finally:
        from linmix.training import cleanup_distributed

        cleanup_distributed()


@lm_app.command("eval")
def evaluate(
    model_dir: Path = typer.Argument(..., help="A model folder (out_dir/model of `linmix lm train`, or a checkpoint folder)."),
    data: Optional[Path] = typer.Option(None, help="Held-out text for perplexity (.txt / .jsonl / .parquet / folder)."),
    recall: list[Path] = typer.Option([], help="Recall task file (.jsonl / .parquet with text, value); repeatable."),
    tokenizer: Optional[str] = typer.Option(None, help="Override the tokenizer stored in MODEL_DIR."),
    seq_len: int = typer.Option(512, help="Window length for perplexity."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N records of each recall task."),
    max_length: int = typer.Option(2048, help="Recall: prompt + generation are left-truncated to this many tokens."),
    max_new_tokens: int = typer.Option(48, help="Recall: new tokens generated (greedy, cut at the first newline)."),
    text_field: str = typer.Option("text", help="Field / column holding the text of --data."),
    json_out: Optional[Path] = typer.Option(None, help="Also write the results (and recall generations) as JSON."),
) -> None:
    """Held-out perplexity and/or recall-task accuracy ("contains") of a trained model."""
    import tempfile

    from linmix.lm.data import load_tokens, tokenize_to_file
    from linmix.lm.evaluate import evaluate_perplexity, evaluate_recall, load_model, load_recall_records
    from linmix.lm.tokenizers import load_tokenizer

    if data is None and not recall:
        raise CliError("nothing to evaluate: give --data (perplexity) and/or --recall FILE")
    model = load_model(model_dir)
    tok = _model_tokenizer(model_dir, tokenizer, load_tokenizer)
    results: dict = {"model": str(model_dir)}
    if data is not None:
        with tempfile.TemporaryDirectory() as tmp:
            meta = tokenize_to_file(data, tok, Path(tmp) / "eval.bin", text_field=text_field)
            result = evaluate_perplexity(model, load_tokens(Path(tmp) / "eval.bin"), seq_len=seq_len,
                                         batch_size=batch_size, n_bytes=meta["n_bytes"])
        results["perplexity"] = {"data": str(data), **result.to_dict()}
        typer.echo(f"perplexity {result.perplexity:.3f} | loss {result.loss:.4f} | bits/byte {result.bits_per_byte:.4f} "
                   f"| {result.scored_tokens:,} tokens of {data}")
    for task_file in recall:
        records = load_recall_records(task_file, limit=limit)
        scores = evaluate_recall(model, tok, records, max_new_tokens=max_new_tokens, max_length=max_length,
                                 batch_size=batch_size)
        results.setdefault("recall", {})[task_file.stem] = scores
        typer.echo(f"recall {task_file.stem}: contains {100 * scores['contains']:.2f}% "
                   f"({scores['correct']}/{scores['n']} records)")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2) + "\n")


def _model_tokenizer(model_dir: Path, override: Optional[str], load_tokenizer):
    from linmix.lm.tokenizers import BYTE_TOKENIZER_FILE

    if override is not None:
        return load_tokenizer(override)
    if any((model_dir / name).is_file() for name in ("tokenizer.json", "vocab.json", BYTE_TOKENIZER_FILE)):
        return load_tokenizer(model_dir)
    raise CliError(f"{model_dir} holds no tokenizer (tokenizer.json, vocab.json + merges.txt, byte_tokenizer.json): "
                   "pass --tokenizer")


@lm_app.command("lm-eval-task")
def lm_eval_task(
    data_file: Path = typer.Argument(..., help="Recall task file (.jsonl / .parquet with fields text, value)."),
    name: str = typer.Option(..., help="Task name for lm_eval --tasks."),
    out_dir: Path = typer.Option(..., help="Folder for the task YAML (pass it to lm_eval --include_path)."),
) -> None:
    """Write an lm-eval task running a local recall file the BASED paper's way (greedy, newline, 48 tokens, contains)."""
    from linmix.lm.lm_eval_adapter import write_recall_task

    path = write_recall_task(data_file, name, out_dir)
    typer.echo(f"wrote {path}; run: lm_eval --model linmix --model_args pretrained=DIR --include_path {out_dir} --tasks {name}")


@lm_app.command("install-lm-eval-hook")
def install_lm_eval_hook(
    site_dir: Optional[Path] = typer.Option(None, help="site-packages folder (default: this environment's)."),
) -> None:
    """Make `lm_eval --model linmix` work in this environment (writes linmix_lm_eval.pth)."""
    from linmix.lm.lm_eval_adapter import install_hook

    typer.echo(f"wrote {install_hook(site_dir)}")


@lm_app.command("generate")
def generate_text(
    model_dir: Path = typer.Argument(..., help="A model folder (config.json + model.safetensors) or a training checkpoint folder."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt text; repeat for a batch (left-padded)."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate after each prompt."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_k: Optional[int] = typer.Option(None, help="Sample only among the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling: smallest set with probability >= p."),
    seed: int = typer.Option(0, help="Sampling seed."),
    tokenizer: Optional[str] = typer.Option(None, help="Override the tokenizer stored in MODEL_DIR."),
    stop_at_eos: bool = typer.Option(True, "--stop-at-eos/--no-stop-at-eos", help="Stop a row at the end-of-text token."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON records (prompt, completion, tokens/s) instead of text."),
) -> None:
    """Generate text with constant memory per sequence (parallel prefill, then recurrent decoding).

    Example: linmix lm generate runs/based/model -p "ROMEO:" --max-new-tokens 100 --temperature 0.8 --top-k 40
    """
    import time

    import torch

    from linmix.lm.evaluate import load_model
    from linmix.lm.generation import generate
    from linmix.lm.tokenizers import load_tokenizer

    if max_new_tokens < 0:
        raise CliError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise CliError(f"--temperature must be >= 0, got {temperature}")
    model = load_model(model_dir)
    tok = _model_tokenizer(model_dir, tokenizer, load_tokenizer)
    encoded = [tok.encode(text) for text in prompt]
    if any(len(ids) == 0 for ids in encoded):
        raise CliError("every --prompt must be non-empty text")
    width = max(len(ids) for ids in encoded)
    pad_id = tok.eos_token_id if tok.eos_token_id is not None else 0
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    with torch.no_grad():
        output = generate(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_token_id=tok.eos_token_id if stop_at_eos else None, pad_token_id=pad_id,
                          attention_mask=attention_mask if width != min(len(ids) for ids in encoded) else None,
                          generator=generator)
    seconds = time.perf_counter() - started
    for text, row in zip(prompt, output[:, width:].tolist()):
        if stop_at_eos and tok.eos_token_id is not None and tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        completion = tok.decode(row)
        if json_out:
            print(json.dumps({"prompt": text, "completion": completion, "new_tokens": len(row),
                              "tokens_per_s": round(len(row) / max(seconds, 1e-9), 2)}))
        else:
            print(text + completion)


@lm_app.command("convert")
def convert(
    source: Path = typer.Argument(..., help="Official BASED checkpoint folder: config.json + model.safetensors / pytorch_model.bin (or shards)."),
    out_dir: Path = typer.Argument(..., help="Where to write the linmix model (config.json + model.safetensors)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: the checkpoint's own dtype)."),
) -> None:
    """Convert an official BASED checkpoint (hazyresearch layout) into a linmix model folder.

    Every official key must be consumed and every linmix weight filled; mismatches are reported by name.
    .bin files are read with torch.load(weights_only=True): nothing unsafe is unpickled.

    Example: linmix lm convert ~/ckpt/based-360m ./based-360m --dtype bfloat16
    """
    import torch

    from linmix.lm.convert import save_as_linmix

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        raise CliError(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (expected an official checkpoint folder)")
    path = save_as_linmix(source, out_dir, dtype=dtypes.get(dtype) if dtype else None)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------- recall corpus
@lm_app.command("recall-corpus")
def recall_corpus(
    out: Path = typer.Option(..., "--out", help="Output folder: train/*.jsonl, eval/recall_heldout*.jsonl, eval/heldout_docs.jsonl, meta.json."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same files."),
    train_tokens: int = typer.Option(2_000_000, help="Training tokens (UTF-8 bytes) in all, mixed-in text included."),
    eval_docs: int = typer.Option(600, help="Held-out evaluation prompts (one per held-out document)."),
    min_tokens: int = typer.Option(256, help="Shortest document / prompt, in tokens (bytes)."),
    max_tokens: int = typer.Option(2000, help="Longest document / prompt (2000 fits `lm eval`'s 2048 window less 48 new tokens)."),
    mix_text: Optional[Path] = typer.Option(None, help="Plain text to mix in (.txt / .jsonl file or folder), e.g. the Shakespeare train/ split."),
    mix_ratio: float = typer.Option(0.0, help="Share of --train-tokens taken from --mix-text (0 = none, 0.5 = half)."),
) -> None:
    """Write a recall-intensive corpus: semi-structured documents (people, products as prose, key-value
    lists and tables) with questions answered from earlier in the same document.

    Training documents carry their answers inline; held-out prompts (entities never seen in training)
    go to eval/recall_heldout.jsonl, and per context-length bucket to eval/recall_heldout_<lo>-<hi>.jsonl,
    for `linmix lm eval MODEL --recall FILE`; the whole held-out documents, answers inline, go to
    eval/heldout_docs.jsonl for the corpus's held-out perplexity (`linmix lm eval MODEL --data FILE`).

    Example: linmix lm recall-corpus --out data/recall --seed 0 --train-tokens 2000000 --eval-docs 600
    """
    from linmix.lm.recall_corpus import RecallCorpusConfig, write_recall_corpus

    if mix_text is not None and not mix_text.exists():
        raise FileNotFoundError(f"--mix-text {mix_text} does not exist (expected a .txt / .jsonl file or a folder)")
    try:
        config = RecallCorpusConfig(seed=seed, train_tokens=train_tokens, eval_docs=eval_docs, min_tokens=min_tokens,
                                    max_tokens=max_tokens, mix_text=str(mix_text) if mix_text else None, mix_ratio=mix_ratio)
    except ValueError as error:
        raise CliError(str(error)) from error
    meta = write_recall_corpus(out, config)
    train, evaluation = meta["train"], meta["eval"]
    typer.echo(f"train: {train['recall_docs']:,} documents, {train['recall_tokens']:,} tokens"
               + (f" + {train['mix_passages']:,} mixed-in passages, {train['mix_tokens']:,} tokens" if train["mix_passages"] else "")
               + f" -> {out / 'train'}")
    buckets = ", ".join(f"{bucket}: {count}" for bucket, count in evaluation["by_length_bucket"].items())
    typer.echo(f"eval: {evaluation['records']:,} held-out prompts ({buckets} by context tokens) -> {evaluation['files']['all']}")
    typer.echo(f"eval: {evaluation['records']:,} held-out documents, {evaluation['heldout_doc_tokens']:,} tokens "
               f"(for perplexity) -> {evaluation['heldout_docs']}")


# ------------------------------------------------------------------------------ train a tokenizer
# Bytes per token is measured on the first this-many UTF-8 bytes of the data (whole documents).
TOKENIZER_SAMPLE_BYTES = 1_000_000


@lm_app.command("train-tokenizer")
def train_tokenizer(
    data: Path = typer.Option(..., "--data", help="Training text, as `lm train --data` takes it: a .txt/.jsonl/.parquet file or a folder of them."),
    vocab_size: int = typer.Option(..., "--vocab-size", help="Vocabulary size: 256 bytes + <|endoftext|> + the learned merges (at least 258)."),
    out: Path = typer.Option(..., "--out", help="The tokenizer.json to write (parent folders are created)."),
    text_field: str = typer.Option("text", help="Field (.jsonl) or column (.parquet) holding the text."),
) -> None:
    """Train a byte-level BPE tokenizer (GPT-2 style, end-of-text token <|endoftext|>) on local text.

    Any UTF-8 text round-trips exactly (except the literal string <|endoftext|>, which becomes that token).
    The file works with `linmix lm train --tokenizer FILE`; the same data and vocabulary size write the same bytes.

    Example: linmix lm train-tokenizer --data data/recall/train --vocab-size 2048 --out data/recall-bpe/tokenizer.json
    """
    from linmix.lm.data import iter_documents, list_sources
    from linmix.lm.tokenizers import bytes_per_token, train_bpe_tokenizer

    list_sources(data)  # a missing or unreadable --data fails before training starts
    tokenizer = train_bpe_tokenizer(iter_documents(data, text_field=text_field), vocab_size)
    path = tokenizer.save_file(out)
    sample, sample_bytes = [], 0
    for document in iter_documents(data, text_field=text_field):
        sample.append(document)
        sample_bytes += len(document.encode("utf-8"))
        if sample_bytes >= TOKENIZER_SAMPLE_BYTES:
            break
    typer.echo(f"vocab size {tokenizer.vocab_size:,} (end-of-text id {tokenizer.eos_token_id}); "
               f"{bytes_per_token(tokenizer, sample):.3f} bytes per token on {len(sample):,} documents "
               f"({sample_bytes:,} bytes) -> {path}")
