"""Evaluation of linmix LMs: held-out perplexity and the recall-intensive tasks of the BASED paper.

Perplexity: the held-out tokens are cut into non-overlapping windows of ``seq_len`` (the tail is
scored as a shorter window), every token after the first of a window is scored, and
``perplexity = exp(total NLL / scored tokens)``. Bits per byte (``total NLL / ln 2 / UTF-8 bytes``)
is reported too: unlike perplexity it compares models with different tokenizers.

Recall tasks (SWDE, FDA, SQuAD-completion as the BASED paper runs them): records with a prompt
``text`` and a gold ``value``; zero-shot greedy decoding of at most 48 new tokens, cut at the first
newline; the prompt is left-truncated so prompt + generation fit 2048 tokens (as lm-eval's
Hugging Face model does with ``max_length=2048``); the score is "contains": the gold value occurs
in the generation, case-insensitively.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

RECALL_MAX_NEW_TOKENS = 48
RECALL_MAX_LENGTH = 2048
RECALL_STOP = "\n"


def load_model(directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A model folder: ``save_pretrained`` output or a training checkpoint folder (whose
    model.safetensors stores tied embedding weights under both names); eval mode."""
    from linmix.lm.model import BasedForCausalLM

    return BasedForCausalLM.from_pretrained(directory, device=device, dtype=dtype)


@dataclass
class PerplexityResult:
    perplexity: float
    loss: float  # mean NLL per scored token (nats)
    scored_tokens: int
    bits_per_byte: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@torch.no_grad()
def evaluate_perplexity(model, tokens: np.ndarray | torch.Tensor, *, seq_len: int = 512, batch_size: int = 8,
                        n_bytes: int | None = None, max_tokens: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on a flat token array ``tokens [N]`` (windows of ``seq_len``)."""
    tokens = torch.as_tensor(np.asarray(tokens[: max_tokens] if max_tokens else tokens, dtype=np.int64))
    if tokens.dim() != 1 or tokens.numel() < 2:
        raise ValueError(f"need a flat array of at least 2 tokens, got shape {tuple(tokens.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_scored = 0.0, 0
    full = tokens.numel() // seq_len
    windows = [tokens[i * seq_len : (i + 1) * seq_len] for i in range(full)]
    if tokens.numel() - full * seq_len >= 2:
        windows.append(tokens[full * seq_len :])
    try:
        for start in range(0, len(windows), batch_size):
            group = windows[start : start + batch_size]
            for length in sorted({w.numel() for w in group}):  # only the tail window is shorter
                batch = torch.stack([w for w in group if w.numel() == length]).to(device)
                logits = model(batch).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        batch[:, 1:].reshape(-1), reduction="sum")
                total_nll += float(nll)
                total_scored += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    loss = total_nll / total_scored
    bits_per_byte = None
    if n_bytes:
        bits_per_byte = total_nll / math.log(2) / n_bytes
    return PerplexityResult(perplexity=math.exp(loss), loss=loss, scored_tokens=total_scored, bits_per_byte=bits_per_byte)


# ---------------------------------------------------------------------------------- recall tasks
def load_recall_records(path: str | Path, *, text_field: str = "text", value_field: str = "value",
                        limit: int | None = None) -> list[dict]:
    """Records ``{"text", "value"}`` of a recall task from a .jsonl or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recall task file at {path} (expected .jsonl or .parquet with fields "
                                f"{text_field!r}, {value_field!r})")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not valid JSON: {error}") from error
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"unsupported recall task file {path}: expected .jsonl or .parquet")
    records = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or text_field not in row or value_field not in row:
            raise ValueError(f"{path} record {index} lacks the field {text_field!r} or {value_field!r}")
        records.append({"text": str(row[text_field]), "value": row[value_field]})
    if not records:
        raise ValueError(f"{path} holds no records")
    return records[:limit] if limit else records


def contains_score(generation: str, gold) -> float:
    """1.0 if the gold value (or any of a list of them) occurs in ``generation``, ignoring case."""
    golds = gold if isinstance(gold, (list, tuple)) else [gold]
    lowered = generation.lower()
    return float(any(str(value).lower().strip() in lowered for value in golds if str(value).strip()))


def truncate_at_stop(text: str, stop: str = RECALL_STOP) -> str:
    index = text.find(stop)
    return text if index < 0 else text[:index]


@torch.no_grad()
def greedy_generate_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int = RECALL_MAX_NEW_TOKENS,
                          max_length: int = RECALL_MAX_LENGTH, stop: str | None = RECALL_STOP,
                          batch_size: int = 8) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at the first ``stop``. Each prompt is
    left-truncated to its last ``max_length - max_new_tokens`` tokens; prompts are batched with
    left padding (every row generates what it would alone)."""
    if max_new_tokens < 1 or max_length <= max_new_tokens:
        raise ValueError(f"need 1 <= max_new_tokens < max_length, got {max_new_tokens} and {max_length}")
    device = next(model.parameters()).device
    context_limit = max_length - max_new_tokens
    encoded = [tokenizer.encode(prompt)[-context_limit:] or [tokenizer.eos_token_id] for prompt in prompts]
    outputs: list[str] = [""] * len(prompts)
    # Similar lengths together: less padding per batch.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), tokenizer.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]) :] = 1
        generated = model.generate(ids.to(device), max_new_tokens, temperature=0.0, attention_mask=mask.to(device))
        for r, i in enumerate(rows):
            text = tokenizer.decode(generated[r, width:].tolist())
            outputs[i] = truncate_at_stop(text, stop) if stop else text
    return outputs


def evaluate_recall(model, tokenizer, records: Iterable[dict], *, max_new_tokens: int = RECALL_MAX_NEW_TOKENS,
                    max_length: int = RECALL_MAX_LENGTH, batch_size: int = 8) -> dict:
    """Run a recall task; returns ``{"contains": fraction in [0, 1], "correct": count, "n": records,
    "generations": [...]}``."""
    records = list(records)
    generations = greedy_generate_texts(model, tokenizer, [r["text"] for r in records], max_new_tokens=max_new_tokens,
                                        max_length=max_length, batch_size=batch_size)
    scores = [contains_score(g, r["value"]) for g, r in zip(generations, records)]
    return {"contains": float(np.mean(scores)), "correct": int(sum(scores)), "n": len(records),
            "generations": generations}
