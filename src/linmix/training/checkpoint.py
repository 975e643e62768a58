"""Atomic training checkpoints: model weights as safetensors, the rest as a weights-only torch file.

Layout of ``out_dir/checkpoints/``::

    step-00000100/model.safetensors    full (unsharded) model state
    step-00000100/trainer_state.pt     step, optimizer, RNG states, config (loaded with weights_only=True)
    step-00000100/...                  anything the caller's ``save_extra`` writes (e.g. config.json)
    latest                             the name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and ``latest`` is replaced
atomically after that, so a run killed at any instant leaves either the old or the new checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    save_extra: Callable[[Path], None] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` checkpoints."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses tensors that share memory (tied embeddings): store independent copies.
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model_state.items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
    torch.save(trainer_state, tmp / STATE_FILE)
    if save_extra is not None:
        save_extra(tmp)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic_text(root / LATEST_FILE, final.name + "\n")
    _prune(root, keep=keep, newest=final.name)
    return final


def _prune(root: Path, *, keep: int, newest: str) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - max(1, keep))]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-step-*"):  # from runs killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)


def _is_complete(directory: Path) -> bool:
    return (directory / MODEL_FILE).is_file() and (directory / STATE_FILE).is_file()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out_dir``, or None."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _is_complete(candidate):
            return candidate
    complete = [p for p in sorted(root.glob("step-*")) if p.is_dir() and _is_complete(p)]
    return complete[-1] if complete else None


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, trainer state) of one checkpoint folder; nothing is unpickled unsafely."""
    directory = Path(directory)
    if not _is_complete(directory):
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (needs {MODEL_FILE} and {STATE_FILE})")
    model_state = load_file(str(directory / MODEL_FILE))
    trainer_state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    return model_state, trainer_state
