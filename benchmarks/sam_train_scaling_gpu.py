#!/usr/bin/env python
"""How far more steps of the shipped RWKV-SAM recipe take its held-out scores: a GPU experiment.

The shipped model is trained on the 2-core CPU (docs/sam.md), where 2-5 s per step caps a session at
one to two thousand steps. This script continues a checkpoint with the same recipe (the checkpoint's input size, 8 images x 4
prompted objects per step, 4096 loss points, box-noise cap 20 px x size / 1024 (5 px at 256), AdamW lr 2e-4
after a 20-step warmup, weight decay 0.05, clipping at 1.0, jitter 0.75-1.33, fp32) for as many steps as a time budget allows on a
GPU, and scores the model on the held-out split (`procedural:1:100`, box and 3-point prompts,
exactly what `linmix sam eval` reports) at doubling step counts. The learning rate stays constant
after the warmup, so every evaluation point is the same run, not a separately annealed one.
Batches are made by a pool of CPU processes ahead of the GPU (each batch is a pure function of
its step, as in `linmix sam train`).

    python3 benchmarks/sam_train_scaling_gpu.py --init src/linmix/sam/weights/rwkv_sam_tiny_procedural.safetensors \
        --budget-s 330 --json scaling.json

Results are not shipped weights: they say how many steps the recipe needs, nothing more.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import sys
import time
from types import SimpleNamespace

import torch

from linmix.sam.data import PromptBatchSource, ProceduralHQDataset
from linmix.sam.evaluate import evaluate_model
from linmix.sam.model import checkpoint_metadata
from linmix.sam.train import SamTrainConfig, build_training
from linmix.training.optim import parameter_groups

_SOURCE: PromptBatchSource | None = None


def _make_batch(step: int) -> dict[str, torch.Tensor]:
    return _SOURCE.get(step, 0, 0, 1)


def _worker_init() -> None:
    torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    global _SOURCE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", required=True, help="linmix RWKV-SAM safetensors to continue")
    parser.add_argument("--dataset-seed", type=int, default=6, help="procedural seed of the training images (held-out is 1)")
    parser.add_argument("--objects", default="1-3",
                        help="objects per training image, MIN-MAX (1-3 as the held-out split; 2-4 emphasises crowded boxes)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="training wall time, evaluations excluded")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="batch-making processes (0: CPU count - 2)")
    parser.add_argument("--eval-at", type=int, nargs="+", default=[0, 250, 500, 1000, 2000, 4000, 8000, 16000])
    parser.add_argument("--eval-images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=4,
                        help="torch threads of this process (more, next to the batch makers, oversubscribes the CPU: "
                             "a first run with torch's default took 5 minutes per evaluation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    metadata = checkpoint_metadata(args.init)
    config = SamTrainConfig(variant=metadata.get("variant", "tiny"), token_mixer=metadata.get("token_mixer", "rwkv"),
                            image_size=int(metadata.get("image_size", 256)), dataset=f"procedural:{args.dataset_seed}:objects={args.objects}",
                            batch_size=args.batch_size, prompts_per_image=4, loss_points=4096, scale_range=(0.75, 1.33),
                            position_in_embedding=True, init_checkpoint=args.init)
    # The model is still on the CPU here: fork the batch makers before CUDA starts in this process.
    module, _SOURCE = build_training(config, SimpleNamespace(seed=0, grad_accum=1))
    workers = args.workers or max(1, (mp.cpu_count() or 4) - 2)
    pool = mp.get_context("fork").Pool(workers, initializer=_worker_init)
    pending: collections.deque = collections.deque(pool.apply_async(_make_batch, (k,)) for k in range(4 * workers))
    issued = len(pending)

    def next_batch() -> dict[str, torch.Tensor]:
        # A bounded queue of batches in flight, in step order (an unbounded imap would fill memory).
        nonlocal issued
        batch = pending.popleft().get()
        pending.append(pool.apply_async(_make_batch, (issued,)))
        issued += 1
        return batch

    module = module.to(args.device).train()
    optimizer = torch.optim.AdamW(parameter_groups(module, 0.05), lr=args.lr, betas=(0.9, 0.999))
    held_out = [ProceduralHQDataset(seed=1, length=args.eval_images)[i] for i in range(args.eval_images)]
    results: list[dict] = []

    def evaluate(step: int, train_s: float) -> None:
        module.sam.eval()
        with torch.no_grad():
            scores = evaluate_model(module.sam, held_out, prompt_kinds=("box", "point"), points=3)
        module.sam.train()
        row = {"step": step, "images_seen": step * args.batch_size, "train_s": round(train_s, 1),
               "box_miou": scores["box"]["miou"], "box_boundary_iou": scores["box"]["boundary_iou"],
               "point_miou": scores["point"]["miou"], "point_boundary_iou": scores["point"]["boundary_iou"],
               "eval_s": round(scores["seconds"], 1)}
        results.append(row)
        print(json.dumps(row), flush=True)

    eval_at = sorted(set(args.eval_at))
    train_s, step, window = 0.0, 0, []
    if eval_at and eval_at[0] == 0:
        evaluate(0, 0.0)
    while train_s < args.budget_s:
        started = time.perf_counter()
        batch = {k: v.to(args.device, non_blocking=True) for k, v in next_batch().items()}
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 20)
        loss, metrics = module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        window.append(float(metrics["train_iou"]))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        train_s += time.perf_counter() - started
        step += 1
        if step % 250 == 0:
            print(f"step {step} train_s {train_s:.0f} train_iou(last 250) {sum(window) / len(window):.3f}", flush=True)
            window = []
        if step in eval_at:
            evaluate(step, train_s)
    if not results or results[-1]["step"] != step:
        evaluate(step, train_s)
    pool.terminate()
    summary = {"init": args.init, "token_mixer": config.token_mixer, "lr": args.lr, "batch_size": args.batch_size,
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "results": results}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
