"""Step-addressed batch sources for :class:`linmix.training.Trainer`: a batch is a pure function of
``(step, micro_step, rank, world_size)``, so a resumed or re-sharded run sees the same data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from linmix.sam.data.formats import DatasetError, SegmentationSample, read_rgb
from linmix.sam.data.prompts import (
    _resize,
    augment_sample,
    default_box_noise_cap,
    prepare_image,
    sample_box_prompt,
    sample_point_prompt,
)

__all__ = ["PromptBatchSource", "TeacherFeatureBatchSource"]


class PromptBatchSource:
    """Stage-2 batches addressed by ``(step, micro_step, rank, world_size)``, as the Trainer needs.

    Sample position ``p = ((step * grad_accum + micro_step) * world_size + rank) * batch_size + j`` is
    item ``p % n`` of a generated dataset (one whose ``is_generated`` is true, such as
    :class:`~linmix.sam.data.ProceduralHQDataset`), or item ``permutation_e[p % n]`` of a file-backed one
    (a fresh seeded permutation each epoch ``e = p // n``). All randomness of a sample (augmentation,
    which objects, prompts) comes from a generator seeded with ``(seed, p)``, so a batch is a pure
    function of its indices and a resumed run sees the same data.

    Images at even positions get box prompts, odd ones point prompts (both kinds in every batch of
    an even size). A batch is a dict:

    - ``images`` ``[B, 3, S, S]`` normalised and padded; ``masks`` ``[B, K, S, S]`` float targets;
    - ``boxes`` ``[B, K, 4]`` XYXY in the frame; ``point_coords`` ``[B, K, P, 2]``, ``point_labels``
      ``[B, K, P]`` (1 / 0, -1 = padding); ``is_box`` ``[B]`` bool.
    """

    def __init__(
        self,
        dataset: Sequence[SegmentationSample],
        *,
        batch_size: int,
        image_size: int,
        prompts_per_image: int = 2,
        grad_accum: int = 1,
        seed: int = 0,
        augment: bool = True,
        scale_range: tuple[float, float] = (0.5, 2.0),
        max_positive: int = 5,
        max_negative: int = 2,
        box_noise: float = 0.1,
        box_noise_cap: float | None = None,
    ):
        if batch_size < 1 or prompts_per_image < 1 or grad_accum < 1:
            raise ValueError("batch_size, prompts_per_image and grad_accum must be >= 1")
        if box_noise < 0 or (box_noise_cap is not None and box_noise_cap < 0):
            raise ValueError(f"box_noise and box_noise_cap must be >= 0, got {box_noise} and {box_noise_cap}")
        self.dataset = dataset
        self.batch_size, self.image_size = int(batch_size), int(image_size)
        self.prompts_per_image, self.grad_accum, self.seed = int(prompts_per_image), int(grad_accum), int(seed)
        self.augment, self.scale_range = augment, tuple(scale_range)
        self.max_positive, self.max_negative = int(max_positive), int(max_negative)
        self.max_points = self.max_positive + self.max_negative
        # SAM caps the box-edge noise at 20 px in its 1024 px frame; the same fraction of our frame
        # keeps a box as informative at 256 px (a 20 px cap there blurs which object the box bounds).
        self.box_noise = float(box_noise)
        self.box_noise_cap = default_box_noise_cap(self.image_size) if box_noise_cap is None else float(box_noise_cap)

    def _item(self, position: int) -> SegmentationSample:
        n = len(self.dataset)
        if getattr(self.dataset, "is_generated", False):  # items are independent draws: no shuffling needed
            return self.dataset[position % n]
        epoch, offset = divmod(position, n)
        permutation = np.random.default_rng([self.seed, epoch, 0x9E3]).permutation(n)
        return self.dataset[int(permutation[offset])]

    def sample(self, position: int, is_box: bool) -> dict[str, torch.Tensor]:
        """One image's training record at sample position ``position``.

        An item whose objects all vanish at this frame size (thin wires in a tiny frame) is replaced
        by the item a fixed stride further on, so the batch stays a pure function of its indices.
        """
        scale_range = self.scale_range if self.augment else (1.0, 1.0)
        for attempt in range(20):
            lookup = position + attempt * 1_000_003
            rng = np.random.default_rng([self.seed, lookup, 0x71])
            sample = self._item(lookup)
            if sample.masks.shape[0] == 0 or not sample.masks.any():
                raise DatasetError(f"{sample.name} has no non-empty mask to prompt")
            try:
                image, masks = augment_sample(
                    sample, rng, frame=self.image_size, scale_range=scale_range, flip_probability=0.5 if self.augment else 0.0
                )
                break
            except DatasetError:
                continue
        else:
            raise DatasetError(f"no object stays visible in a {self.image_size} px frame (20 items tried from position {position})")
        k = self.prompts_per_image
        chosen = rng.choice(masks.shape[0], size=k, replace=masks.shape[0] < k)
        targets = masks[torch.from_numpy(chosen)]
        boxes = torch.zeros(k, 4)
        coords = torch.zeros(k, self.max_points, 2)
        labels = torch.full((k, self.max_points), -1, dtype=torch.int64)
        for i in range(k):
            binary = (targets[i] > 0.5).numpy()
            if is_box:
                boxes[i] = torch.from_numpy(sample_box_prompt(binary, rng, noise=self.box_noise, max_noise=self.box_noise_cap))
            else:
                point_xy, point_labels = sample_point_prompt(
                    binary, rng, max_positive=self.max_positive, max_negative=self.max_negative
                )
                coords[i, : len(point_xy)] = torch.from_numpy(point_xy)
                labels[i, : len(point_labels)] = torch.from_numpy(point_labels)
        return {"images": image, "masks": targets, "boxes": boxes, "point_coords": coords, "point_labels": labels}

    def get(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        first = ((step * self.grad_accum + micro_step) * world_size + rank) * self.batch_size
        is_box = [(first + j) % 2 == 0 for j in range(self.batch_size)]
        records = [self.sample(first + j, is_box=is_box[j]) for j in range(self.batch_size)]
        batch = {key: torch.stack([r[key] for r in records]) for key in records[0]}
        batch["is_box"] = torch.tensor(is_box)
        return batch


class TeacherFeatureBatchSource:
    """Stage-1 (distillation) batches: images and the teacher's embeddings written by
    ``linmix sam dump-teacher`` (:func:`linmix.sam.train.dump_teacher_features`).

    ``folder/index.json`` lists ``{"name", "image", "features"}`` records; each ``features`` file is a
    safetensors with ``embedding`` ``[256, g, g]`` of the image resized (longest side) and padded to the
    teacher's input size. Batches: ``images`` ``[B, 3, S, S]`` (the same resize-and-pad at the student's
    size S) and ``teacher`` ``[B, 256, g, g]``. Positions map to items as in :class:`PromptBatchSource`.
    """

    def __init__(self, folder: str | PathLike[str], *, batch_size: int, image_size: int, grad_accum: int = 1, seed: int = 0):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(
                f"teacher feature index not found: {index_path} (write it with `linmix sam dump-teacher`)"
            )
        self.records = json.loads(index_path.read_text())["items"]
        if not self.records:
            raise ValueError(f"{index_path} lists no items")
        missing = [r["features"] for r in self.records if not (self.folder / r["features"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} teacher feature file(s) missing in {self.folder}, e.g. {missing[0]}")
        self.batch_size, self.image_size, self.grad_accum, self.seed = int(batch_size), int(image_size), int(grad_accum), int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def item(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        record = self.records[index]
        image = read_rgb(self.folder / record["image"]) if not Path(record["image"]).is_absolute() else read_rgb(record["image"])
        tensor = torch.from_numpy(image).permute(2, 0, 1).float()
        height, width = tensor.shape[-2:]
        scale = self.image_size / max(height, width)
        tensor = _resize(tensor, (int(height * scale + 0.5), int(width * scale + 0.5)))
        teacher = load_file(str(self.folder / record["features"]))["embedding"].float()
        return {"images": prepare_image(tensor, self.image_size), "teacher": teacher}

    def get(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        first = ((step * self.grad_accum + micro_step) * world_size + rank) * self.batch_size
        n = len(self.records)
        items = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, n)
            permutation = np.random.default_rng([self.seed, epoch, 0x9E3]).permutation(n)
            items.append(self.item(int(permutation[offset])))
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
