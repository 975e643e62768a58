"""RWKV-SAM data: dataset formats on disk, a procedural high-quality dataset, prompt sampling and
augmentation, and the step-addressed batch sources the shared Trainer consumes.

- :mod:`~linmix.sam.data.formats`: DIS5K / ThinObject5K / COIFT / HRSOD folders, SA-1B, COCO
  instances, :class:`SegmentationSample`, :class:`DatasetError`, image and mask reading.
- :mod:`~linmix.sam.data.procedural`: :class:`ProceduralHQDataset`.
- :mod:`~linmix.sam.data.prompts`: box / point prompts, augmentation, the model frame.
- :mod:`~linmix.sam.data.sources`: :class:`PromptBatchSource`, :class:`TeacherFeatureBatchSource`.

:func:`load_dataset` builds any of them from a command-line spec ``KIND:ARGUMENTS``; each kind is one
entry of :data:`DATASET_KINDS` (a usage line and a builder), so a new kind is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from linmix.sam.data.formats import (
    HQ_DATASET_LAYOUTS,
    IMAGE_EXTENSIONS,
    CocoInstancesDataset,
    DatasetError,
    ImageMaskFolderDataset,
    SA1BDataset,
    SegmentationSample,
    load_hq_dataset,
    read_mask,
    read_rgb,
)
from linmix.sam.data.copypaste import COPYPASTE_USAGE, CopyPasteDataset
from linmix.sam.data.copypaste import from_spec as copypaste_from_spec
from linmix.sam.data.procedural import ProceduralHQDataset
from linmix.sam.data.prompts import (
    PIXEL_MEAN,
    PIXEL_STD,
    _resize,  # noqa: F401  (linmix.sam.train resizes teacher inputs with it)
    augment_sample,
    default_box_noise_cap,
    prepare_image,
    sample_box_prompt,
    sample_point_prompt,
    tight_box,
)
from linmix.sam.data.sources import PromptBatchSource, TeacherFeatureBatchSource
from linmix.sam.data.unseen_shapes import UnseenShapesDataset
from linmix.sam.data.unseen_shapes import from_spec as unseen_from_spec

__all__ = [
    "DATASET_KINDS",
    "CopyPasteDataset",
    "UnseenShapesDataset",
    "HQ_DATASET_LAYOUTS",
    "IMAGE_EXTENSIONS",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "CocoInstancesDataset",
    "DatasetError",
    "DatasetKind",
    "ImageMaskFolderDataset",
    "PromptBatchSource",
    "ProceduralHQDataset",
    "SA1BDataset",
    "SegmentationSample",
    "TeacherFeatureBatchSource",
    "augment_sample",
    "default_box_noise_cap",
    "load_dataset",
    "load_hq_dataset",
    "prepare_image",
    "read_mask",
    "read_rgb",
    "sample_box_prompt",
    "sample_point_prompt",
    "tight_box",
]


@dataclass(frozen=True)
class DatasetKind:
    """One kind of :func:`load_dataset` spec.

    usage: the spec's form, shown in error messages (``"sa1b:FOLDER"``).
    build: ``build(arguments, spec)`` -> the dataset, where ``arguments`` is the text after
        ``KIND:`` and ``spec`` the whole spec (for error messages). Raises ValueError on bad arguments.
    """

    usage: str
    build: Callable[[str, str], Any]


def _split_paths(kind: str, arguments: str, spec: str) -> tuple[str, str]:
    # The last colon splits, so a first path may itself hold colons.
    first, separator, second = arguments.rpartition(":")
    if not separator:
        raise ValueError(f"{kind} dataset spec must be {kind}:FIRST_PATH:SECOND_PATH, got {spec!r}")
    return first, second


PROCEDURAL_USAGE = "procedural:SEED[:LENGTH][:objects=MIN-MAX]"


def _procedural(arguments: str, spec: str) -> ProceduralHQDataset:
    usage = f"procedural dataset spec must be {PROCEDURAL_USAGE}, got {spec!r}"
    parts = arguments.split(":")
    objects: dict[str, int] = {}  # empty: the generator's default count
    if parts[-1].startswith("objects="):
        low, _, high = parts.pop()[len("objects="):].partition("-")
        try:
            objects = {"min_objects": int(low), "max_objects": int(high or low)}
        except ValueError as error:
            raise ValueError(usage) from error
        if not 1 <= objects["min_objects"] <= objects["max_objects"]:
            raise ValueError(f"objects=MIN-MAX needs 1 <= MIN <= MAX, got {spec!r}")
    if not 1 <= len(parts) <= 2:
        raise ValueError(usage)
    try:
        seed = int(parts[0])
        length = int(parts[1]) if len(parts) > 1 else 1_000_000
    except ValueError as error:
        raise ValueError(usage) from error
    return ProceduralHQDataset(seed, length, **objects)


def _hq_folder(kind: str) -> DatasetKind:
    return DatasetKind(f"{kind}:FOLDER", lambda arguments, spec: load_hq_dataset(kind, arguments))


# Spec kind -> how to build it. Kinds are matched case-insensitively, ignoring "-" and "_".
DATASET_KINDS: dict[str, DatasetKind] = {
    **{kind: _hq_folder(kind) for kind in HQ_DATASET_LAYOUTS},
    "sa1b": DatasetKind("sa1b:FOLDER", lambda arguments, spec: SA1BDataset(arguments)),
    "coco": DatasetKind(
        "coco:ANNOTATIONS.json:IMAGE_DIR", lambda arguments, spec: CocoInstancesDataset(*_split_paths("coco", arguments, spec))
    ),
    "folder": DatasetKind(
        "folder:IMAGE_DIR:MASK_DIR", lambda arguments, spec: ImageMaskFolderDataset(*_split_paths("folder", arguments, spec))
    ),
    "procedural": DatasetKind(PROCEDURAL_USAGE, _procedural),
    "copypaste": DatasetKind(COPYPASTE_USAGE, lambda arguments, spec: copypaste_from_spec(arguments)),
    "unseen": DatasetKind("unseen:SEED[:LENGTH]", lambda arguments, spec: unseen_from_spec(arguments)),
}


def load_dataset(spec: str) -> Any:
    """A dataset from a command-line spec ``KIND:ARGUMENTS`` (the kinds: :data:`DATASET_KINDS`).

    dis5k, thinobject5k, coift, hrsod and sa1b take a folder (``dis5k:data/DIS5K/DIS-VD``); coco takes
    ``coco:ANNOTATIONS.json:IMAGE_DIR``; folder takes ``folder:IMAGE_DIR:MASK_DIR``; procedural takes
    ``procedural:SEED[:LENGTH][:objects=MIN-MAX]`` (``objects=2-4`` or ``objects=3`` sets how many
    objects each image has, default 1-3; LENGTH defaults to 1,000,000); copypaste takes
    ``copypaste:SEED[:LENGTH][:key=value...]`` (photographs with pasted cut-outs,
    :mod:`linmix.sam.data.copypaste`); unseen takes ``unseen:SEED[:LENGTH]`` (the evaluation-only
    generator, :mod:`linmix.sam.data.unseen_shapes`).
    """
    kind, _, arguments = spec.partition(":")
    if not arguments:
        raise ValueError(f"dataset spec {spec!r} must be KIND:PATH (e.g. dis5k:data/DIS5K/DIS-VD, procedural:1)")
    key = kind.lower().replace("-", "").replace("_", "")
    if key not in DATASET_KINDS:
        usages = ", ".join(entry.usage for entry in DATASET_KINDS.values())
        raise ValueError(f"unknown dataset kind {kind!r} in {spec!r}; expected one of: {usages}")
    return DATASET_KINDS[key].build(arguments, spec)
