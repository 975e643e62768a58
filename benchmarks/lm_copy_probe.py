"""Does a language model copy from its context yet? The answer-copy probe over a run's checkpoints.

    python benchmarks/lm_copy_probe.py --run runs/lm-recall/transformer-pp-small \
        --docs data/recall/eval/heldout_docs.jsonl --records data/recall/eval/recall_heldout.jsonl \
        --limit 100 --out runs/lm-recall/transformer-pp-small/copy_probe.jsonl

Recall accuracy stays at 0 until a model has learned to copy from its context (the induction
phase change), so it cannot tell a run that is about to learn the task from one that never will.
The probe can: for each held-out document it compares the loss of the answer's tokens (after its
first) where the value is stated in a record, which nothing earlier predicts, with their loss where
the value is given as the answer, which copying predicts (`linmix.lm.recall_corpus.answer_copy_probe`).
Their difference, the copy gain in nats per token, is about 0 before the phase change and rises to
the record loss when copying is perfect. One JSON line per checkpoint (``step``, the losses, the
gain), in step order, also printed as a table.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from linmix.lm.evaluate import load_model
from linmix.lm.recall_corpus import answer_copy_probe, load_recall_eval
from linmix.lm.tokenizers import load_tokenizer
from linmix.training.checkpoint import MODEL_FILE, checkpoint_root


def checkpoints_of(run: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint under ``run/checkpoints`` (``step-00001000`` folders with
    model weights), in step order; a folder holding such ``step-*`` folders itself (checkpoints copied
    aside) works too."""
    found = []
    parent = checkpoint_root(run) if checkpoint_root(run).is_dir() else run
    for folder in sorted(parent.glob("step-*")):
        match = re.fullmatch(r"step-(\d+)", folder.name)
        if match and (folder / MODEL_FILE).is_file():
            found.append((int(match.group(1)), folder))
    if not found:
        raise FileNotFoundError(f"no checkpoints (checkpoints/step-NNNNNNNN/model.safetensors) under {run}")
    return found


def load_documents(docs: Path, records: Path, limit: int | None) -> tuple[list[str], list[str]]:
    """The whole held-out documents and their final answers, matched by ``doc_id``."""
    rows = [json.loads(line) for line in docs.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = {row["doc_id"]: row["value"] for row in load_recall_eval(records) if "doc_id" in row}
    missing = [row.get("doc_id") for row in rows if row.get("doc_id") not in answers]
    if missing:
        raise ValueError(f"{len(missing)} documents of {docs} have no record in {records} (e.g. {missing[:3]})")
    rows = rows[:limit] if limit else rows
    return [row["text"] for row in rows], [answers[row["doc_id"]] for row in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a `linmix lm train` run folder (its checkpoints/ are probed), or a folder of step-* checkpoints")
    parser.add_argument("--docs", type=Path, required=True, help="eval/heldout_docs.jsonl of `linmix lm recall-corpus`")
    parser.add_argument("--records", type=Path, required=True, help="eval/recall_heldout.jsonl of the same corpus")
    parser.add_argument("--limit", type=int, default=100, help="documents probed (0 = all)")
    parser.add_argument("--every", type=int, default=1, help="probe every n-th checkpoint (the last always)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON lines, one per checkpoint")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error("--every must be >= 1")

    torch.set_num_threads(args.threads)
    documents, values = load_documents(args.docs, args.records, args.limit or None)
    checkpoints = checkpoints_of(args.run)
    checkpoints = [c for i, c in enumerate(checkpoints) if i % args.every == 0 or i == len(checkpoints) - 1]
    rows = []
    print(f"{'step':>7} {'record':>8} {'answer':>8} {'gain':>7} {'first':>7}  (nats per token, {len(documents)} documents)")
    for step, folder in checkpoints:
        model = load_model(folder).eval()
        result = answer_copy_probe(model, load_tokenizer(folder), documents, values)
        rows.append({"step": step, "checkpoint": str(folder), **result})
        print(f"{step:>7} {result['record_continuation']:8.3f} {result['answer_continuation']:8.3f} "
              f"{result['copy_gain']:7.3f} {result['answer_first']:7.3f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
