"""A toy regression run on the shared Trainer, importable by tests and runnable as a script
(``python toy_training.py OUT --max-steps N ...``, also under torchrun)."""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from linmix.training import TrainConfig, Trainer


class ToyBatches:
    """Batches addressed by (step, micro-step, rank): the global sample block is a pure function of them."""

    def __init__(self, *, grad_accum: int, batch_size: int = 8, seed: int = 0):
        self.grad_accum = grad_accum
        self.batch_size = batch_size
        self.seed = seed
        generator = torch.Generator().manual_seed(1234)
        self.true_weight = torch.randn(6, 3, generator=generator)

    def get(self, step: int, micro_step: int, rank: int, world_size: int):
        block = (step * self.grad_accum + micro_step) * world_size + rank
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
        x = torch.randn(self.batch_size, 6, generator=generator)
        y = torch.tanh(x @ self.true_weight) + 0.01 * torch.randn(self.batch_size, 3, generator=generator)
        return {"x": x, "y": y}


def build_toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 3))


def toy_loss(model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float], int]:
    sleep = float(os.environ.get("TOY_STEP_SLEEP", "0"))
    if sleep:
        time.sleep(sleep)  # lets a test kill the process between checkpoints
    prediction = model(batch["x"])
    loss = nn.functional.mse_loss(prediction, batch["y"])
    return loss, {"abs_error": (prediction - batch["y"]).abs().mean().item()}, batch["x"].shape[0]


def run_toy(out_dir, *, max_steps: int, save_every: int, grad_accum: int = 1, distributed: str = "ddp",
            log_every: int = 1, model_seed: int = 0, progress: bool = False) -> dict:
    config = TrainConfig(out_dir=str(out_dir), max_steps=max_steps, lr=3e-2, warmup_steps=2, save_every=save_every,
                         log_every=log_every, grad_accum=grad_accum, distributed=distributed, progress=progress)
    trainer = Trainer(build_toy_model(model_seed), config, loss_fn=toy_loss,
                      batches=ToyBatches(grad_accum=grad_accum), items_name="samples")
    return trainer.fit()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--distributed", default="ddp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_toy(args.out_dir, max_steps=args.max_steps, save_every=args.save_every, grad_accum=args.grad_accum,
            distributed=args.distributed)
    from linmix.training import cleanup_distributed

    cleanup_distributed()
