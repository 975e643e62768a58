#!/usr/bin/env python
"""The best mIoU / boundary IoU a SAM-style decoder can reach on the procedural held-out split at a
given model input size, from the resolution of its masks alone (no network involved).

SAM's decoder predicts mask logits at a quarter of the model input (48 x 48 at 192 px); the predictor
upsamples them bilinearly to the input frame, crops the padding and resizes to the original image,
then thresholds at 0. For each image and object this script fits the quarter-resolution logits
directly (Adam on BCE through exactly that upsampling path, starting from the area-averaged true
mask) and scores the result with linmix.sam.metrics, the numbers `linmix sam eval` reports. A model
at that input size cannot beat these scores on this split; thin wires narrower than 4 input pixels
are what it loses.

    python benchmarks/sam_mask_ceiling.py                       # 192, 256, 320, 384 px; every 4th image
    python benchmarks/sam_mask_ceiling.py --sizes 256 --stride 1
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from linmix.sam.data import ProceduralHQDataset
from linmix.sam.metrics import boundary_iou, mask_iou


def fitted_ceiling(sample, size: int, iterations: int = 150) -> tuple[float, float]:
    """(mIoU, boundary IoU) over the objects of one sample with logits fitted at size // 4."""
    height, width = sample.masks.shape[1:]
    scale = size / max(height, width)
    h, w = int(height * scale + 0.5), int(width * scale + 0.5)
    truth = torch.from_numpy(sample.masks).float()[None]
    framed = F.pad(F.interpolate(truth, size=(h, w), mode="bilinear", antialias=True, align_corners=False), (0, size - w, 0, size - h))
    start = F.interpolate(framed, size=(size // 4, size // 4), mode="area")
    logits = torch.logit(start.clamp(1e-3, 1 - 1e-3)).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.3)

    def to_original(low):  # the predictor's postprocessing: to the frame, crop the padding, to the image
        framed_logits = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[..., :h, :w]
        return F.interpolate(framed_logits, size=(height, width), mode="bilinear", align_corners=False)[0]

    for _ in range(iterations):
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(to_original(logits) * 4, truth[0]).backward()
        optimizer.step()
    with torch.no_grad():
        predicted = (to_original(logits) > 0).numpy()
    objects = range(len(sample.masks))
    return (float(np.mean([mask_iou(predicted[k], sample.masks[k]) for k in objects])),
            float(np.mean([boundary_iou(predicted[k], sample.masks[k]) for k in objects])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 256, 320, 384])
    parser.add_argument("--images", type=int, default=100, help="procedural:1:N, the held-out split")
    parser.add_argument("--stride", type=int, default=4, help="score every STRIDE-th image")
    args = parser.parse_args(argv)
    dataset = ProceduralHQDataset(seed=1, length=args.images)
    indices = range(0, args.images, args.stride)
    print(f"procedural:1:{args.images}, images {len(indices)} (every {args.stride}th), logits fitted at input / 4")
    print("| model input | mIoU ceiling | boundary IoU ceiling |\n|---|---|---|")
    for size in args.sizes:
        scores = np.array([fitted_ceiling(dataset[i], size) for i in indices])
        print(f"| {size} px | {scores[:, 0].mean():.3f} | {scores[:, 1].mean():.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
