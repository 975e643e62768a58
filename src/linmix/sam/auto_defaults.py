"""Automatic-mask thresholds stored with a checkpoint, and the measurement that picks them.

Segment Anything's automatic mask generator keeps a candidate mask when its predicted IoU exceeds
``pred_iou_thresh`` (0.88) and its stability score reaches ``stability_score_thresh`` (0.95). Those
numbers are calibrated for SAM's own checkpoints; a small model trained elsewhere predicts lower
IoUs for its good masks and gives every mask away. So a checkpoint may carry its own thresholds in a
sidecar file beside it, ``<checkpoint stem>.auto_masks.json``::

    {"pred_iou_thresh": 0.62, "stability_score_thresh": 0.80, "measured": {...how they were chosen...}}

:func:`read_automatic_mask_defaults` returns the sidecar's thresholds, or SAM's when there is no
sidecar (a converted SAM checkpoint keeps SAM's behaviour). ``linmix sam auto`` uses them unless the
user passes ``--pred-iou-thresh`` / ``--stability-thresh``.

Calibration lives in :mod:`linmix.sam.auto_calibration` (:func:`candidate_scores`,
:func:`generator_outcome`, :func:`choose_thresholds`): every grid-point candidate of the automatic generator (before any threshold or NMS) is computed once with
its predicted IoU, stability score, box and IoU with each true mask; the generator's filters and box
NMS are then replayed for each threshold pair, which is judged by the share of true objects found by
a returned mask (IoU >= ``good_iou``, recall) and the share of returned masks that are good
(precision). The pair with the best F1 of the two wins: few masks, most of them right. Rerun it with
``python benchmarks/sam_auto_calibration.py --write`` after training a new shipped model.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = [
    "AUTO_MASK_SIDECAR_SUFFIX",
    "SAM_AUTOMATIC_MASK_DEFAULTS",
    "automatic_mask_defaults_for",
    "automatic_mask_sidecar_path",
    "read_automatic_mask_defaults",
    "write_automatic_mask_defaults",
]

SAM_AUTOMATIC_MASK_DEFAULTS: dict[str, float] = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
AUTO_MASK_SIDECAR_SUFFIX = ".auto_masks.json"
_THRESHOLD_KEYS = tuple(SAM_AUTOMATIC_MASK_DEFAULTS)


def automatic_mask_sidecar_path(checkpoint: str | PathLike[str]) -> Path:
    """``weights/model.safetensors`` -> ``weights/model.auto_masks.json``."""
    path = Path(checkpoint)
    return path.with_name(path.stem + AUTO_MASK_SIDECAR_SUFFIX)


def read_automatic_mask_defaults(checkpoint: str | PathLike[str] | None) -> dict[str, float]:
    """The automatic-mask thresholds stored beside ``checkpoint``, or SAM's when it has none.

    A sidecar that is not a JSON object with both thresholds in [0, 1] raises ValueError naming it.
    """
    if checkpoint is None:
        return dict(SAM_AUTOMATIC_MASK_DEFAULTS)
    sidecar = automatic_mask_sidecar_path(checkpoint)
    if not sidecar.is_file():
        return dict(SAM_AUTOMATIC_MASK_DEFAULTS)
    try:
        record = json.loads(sidecar.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"automatic-mask defaults {sidecar} are not valid JSON: {error}") from error
    if not isinstance(record, dict):
        raise ValueError(f"automatic-mask defaults {sidecar} must be a JSON object with {list(_THRESHOLD_KEYS)}")
    values = {}
    for key in _THRESHOLD_KEYS:
        value = record.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"automatic-mask defaults {sidecar}: {key} must be a number in [0, 1], got {value!r}")
        values[key] = float(value)
    return values


def write_automatic_mask_defaults(
    checkpoint: str | PathLike[str], thresholds: dict[str, float], measured: dict[str, Any] | None = None
) -> Path:
    """Write the sidecar of ``checkpoint`` (thresholds plus how they were measured); returns its path."""
    record: dict[str, Any] = {key: round(float(thresholds[key]), 4) for key in _THRESHOLD_KEYS}
    if measured:
        record["measured"] = measured
    path = automatic_mask_sidecar_path(checkpoint)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def automatic_mask_defaults_for(model: Any = None, checkpoint: str | PathLike[str] | None = None) -> dict[str, float]:
    """Thresholds for ``model``: the ones :func:`linmix.sam.load_default` attached to it
    (``model.automatic_mask_defaults``), else those stored beside ``checkpoint``, else SAM's."""
    attached = getattr(model, "automatic_mask_defaults", None)
    if attached:
        return {key: float(attached[key]) for key in _THRESHOLD_KEYS}
    return read_automatic_mask_defaults(checkpoint)


# --------------------------------------------------------------------------------------------------
# calibration
