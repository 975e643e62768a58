"""A tiny random RWKV-SAM at a small input size, for the CLI, web demo and tour tests (fast on a CPU).

Random weights: tests check that masks, files and pages are produced and well formed, not their quality.
"""

from __future__ import annotations

import torch

from linmix.sam.model import RwkvSam, build_rwkv_sam, save_rwkv_sam

TINY_IMAGE_SIZE = 64


def tiny_sam(seed: int = 0, image_size: int = TINY_IMAGE_SIZE) -> RwkvSam:
    torch.manual_seed(seed)
    return build_rwkv_sam("tiny", image_size=image_size)


def save_tiny_sam(path, seed: int = 0) -> RwkvSam:
    model = tiny_sam(seed)
    save_rwkv_sam(model, path)
    return model
