"""Load official Segment Anything checkpoints (``sam_vit_{b,l,h}_*.pth``) into linmix modules.

An official checkpoint is one flat, pickled state dict with three prefixes (ViT-B: 314 keys):
``image_encoder.`` (177 keys for ViT-B), ``prompt_encoder.`` (17) and ``mask_decoder.`` (120). linmix
uses SAM's parameter names, so loading is a strict, checked copy:

- :func:`load_sam_checkpoint`: path -> flat state dict, read with ``weights_only=True`` on the CPU
  (the original loader unpickles arbitrary objects and crashes on CUDA-less machines).
- :func:`infer_vit_config`: the encoder's constructor arguments read off the tensor shapes.
- :func:`build_sam_vit_teacher`: checkpoint -> frozen :class:`ImageEncoderViT` (the distillation teacher).
- :func:`load_sam_image_encoder`, :func:`load_sam_prompt_decoder`: copy into existing modules.

Every checkpoint key under the loaded prefixes is consumed and every module parameter is filled,
except the decoder's RWKV-SAM high-quality fusion (``hq_*``), which SAM does not have and which keeps
its initialisation; otherwise a ValueError names each offending key with both shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linmix.sam.image_encoder_vit import VIT_CONFIGS, ImageEncoderViT

__all__ = [
    "SAM_PREFIXES",
    "LoadReport",
    "build_sam_vit_teacher",
    "infer_vit_config",
    "load_sam_checkpoint",
    "load_sam_image_encoder",
    "load_sam_prompt_decoder",
    "vit_variant_name",
]

SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
# Parameters of linmix's decoder that have no SAM counterpart and stay at their initialisation.
HQ_PREFIXES = ("hq_high_res.", "hq_mid_res.", "hq_mix.")

StateDict = Mapping[str, torch.Tensor]


@dataclass
class LoadReport:
    """What a load did, in full checkpoint-style names (``mask_decoder.hq_mix.0.weight``):
    the checkpoint keys copied, and the module entries that no checkpoint key fills (left at init)."""

    consumed: list[str] = field(default_factory=list)
    kept_at_init: list[str] = field(default_factory=list)


def load_sam_checkpoint(
    path: str | PathLike[str], *, require: tuple[str, ...] = SAM_PREFIXES
) -> dict[str, torch.Tensor]:
    """Read an official SAM ``.pth`` file: -> flat ``{name: tensor}`` on the CPU.

    Args:
        path: the checkpoint file.
        require: prefixes that must each have at least one key (all three by default).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a tensor-only pickle (``weights_only=True`` refuses it), is not a
            flat ``{str: Tensor}`` mapping, has keys outside SAM's three prefixes, or lacks a
            required prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a tensor-only checkpoint"
        raise ValueError(
            f"{path} is not a tensor-only PyTorch checkpoint (torch.load with weights_only=True failed: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from error
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} must hold a flat state dict {{name: tensor}}, got {type(loaded).__name__}")
    not_tensors = [
        str(key) for key, value in loaded.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
    if not_tensors:
        raise ValueError(
            f"{path} must hold a flat state dict {{name: tensor}}; entries that are not tensors: {not_tensors[:5]}"
        )
    state_dict = dict(loaded)
    foreign = [key for key in state_dict if not key.startswith(SAM_PREFIXES)]
    if foreign:
        raise ValueError(
            f"{path} has keys outside SAM's prefixes {SAM_PREFIXES}: {foreign[:5]}"
            + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        )
    for prefix in require:
        if not any(key.startswith(prefix) for key in state_dict):
            raise ValueError(f"{path} has no '{prefix}*' keys; is it a Segment Anything checkpoint?")
    return state_dict


def _as_state_dict(checkpoint_or_state_dict: str | PathLike[str] | StateDict, require: tuple[str, ...]) -> StateDict:
    if isinstance(checkpoint_or_state_dict, (str, PathLike)):
        return load_sam_checkpoint(checkpoint_or_state_dict, require=require)
    if not isinstance(checkpoint_or_state_dict, Mapping):
        raise ValueError(
            f"expected a checkpoint path or a state dict, got {type(checkpoint_or_state_dict).__name__}"
        )
    return checkpoint_or_state_dict


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check_prefixed(
    module: nn.Module, state_dict: StateDict, prefix: str, keep_at_init: tuple[str, ...] = ()
) -> list[str]:
    """Everything wrong with loading ``state_dict[prefix + name]`` into ``module``: one line per key."""
    targets = module.state_dict()
    provided = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    problems: list[str] = []
    for name, target in targets.items():
        if keep_at_init and name.startswith(keep_at_init):
            continue
        if name not in provided:
            problems.append(f"missing key '{prefix}{name}' (model expects shape {_shape(target)})")
        elif not isinstance(provided[name], torch.Tensor):
            problems.append(f"key '{prefix}{name}' is a {type(provided[name]).__name__}, not a tensor")
        elif _shape(provided[name]) != _shape(target):
            problems.append(
                f"key '{prefix}{name}': checkpoint shape {_shape(provided[name])} != model shape {_shape(target)}"
            )
    for name, value in provided.items():
        if name not in targets or (keep_at_init and name.startswith(keep_at_init)):
            shown = _shape(value) if isinstance(value, torch.Tensor) else type(value).__name__
            problems.append(f"unexpected key '{prefix}{name}' (checkpoint shape {shown}) has no place in the model")
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        return [f"cannot load '{prefix}*' into {type(module).__name__}:\n  {listed}{more}"]
    return []


def _copy_prefixed(
    module: nn.Module, state_dict: StateDict, prefix: str, keep_at_init: tuple[str, ...] = ()
) -> LoadReport:
    """Copy ``state_dict[prefix + name]`` into every parameter and buffer ``name`` (checked beforehand)."""
    report = LoadReport()
    with torch.no_grad():
        for name, target in module.state_dict().items():
            if keep_at_init and name.startswith(keep_at_init):
                report.kept_at_init.append(prefix + name)
                continue
            target.copy_(state_dict[prefix + name])
            report.consumed.append(prefix + name)
    return report


def _load_prefixed(
    module: nn.Module, state_dict: StateDict, prefix: str, keep_at_init: tuple[str, ...] = ()
) -> LoadReport:
    """Strict load of one prefix; all checks run before anything is copied."""
    problems = _check_prefixed(module, state_dict, prefix, keep_at_init)
    if problems:
        raise ValueError(problems[0])
    return _copy_prefixed(module, state_dict, prefix, keep_at_init)


_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def infer_vit_config(state_dict: StateDict) -> dict[str, Any]:
    """Constructor arguments of :class:`ImageEncoderViT` read off an ``image_encoder.*`` state dict.

    width and patch from ``patch_embed.proj.weight`` [C, in, p, p]; grid from ``pos_embed`` [1, S, S, C];
    depth from the block indices; head_dim from ``rel_pos_h`` [2 * size - 1, C / heads]; a block whose
    table spans the whole grid is global, the others give the window size.
    """
    def get(name: str) -> torch.Tensor:
        key = "image_encoder." + name
        if key not in state_dict:
            raise ValueError(f"missing key '{key}', needed to infer the ViT size")
        return state_dict[key]

    patch_weight = get("patch_embed.proj.weight")
    if patch_weight.dim() != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise ValueError(f"'image_encoder.patch_embed.proj.weight' must be [C, in, p, p], got {_shape(patch_weight)}")
    embed_dim, in_chans, patch_size = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    pos_embed = get("pos_embed")
    if pos_embed.dim() != 4 or pos_embed.shape[1] != pos_embed.shape[2]:
        raise ValueError(f"'image_encoder.pos_embed' must be [1, S, S, C], got {_shape(pos_embed)}")
    grid = pos_embed.shape[1]

    indices = sorted({int(match.group(1)) for key in state_dict if (match := _BLOCK_KEY.match(key))})
    if not indices:
        raise ValueError("no 'image_encoder.blocks.{i}.*' keys in the state dict")
    depth = indices[-1] + 1
    absent = sorted(set(range(depth)) - set(indices))
    if absent:
        raise ValueError(f"image encoder blocks {absent} are missing (found blocks up to {depth - 1})")

    head_dim = get("blocks.0.attn.rel_pos_h").shape[1]
    if head_dim == 0 or embed_dim % head_dim != 0:
        raise ValueError(f"rel_pos head dim {head_dim} does not divide the width {embed_dim}")
    global_attn_indexes: list[int] = []
    window_sizes: set[int] = set()
    for index in range(depth):
        rows = get(f"blocks.{index}.attn.rel_pos_h").shape[0]
        if rows == 2 * grid - 1:
            global_attn_indexes.append(index)
        elif rows % 2 == 1:
            window_sizes.add((rows + 1) // 2)
        else:
            raise ValueError(f"'image_encoder.blocks.{index}.attn.rel_pos_h' has an even number of rows ({rows})")
    if len(window_sizes) > 1:
        raise ValueError(f"windowed blocks disagree on the window size: {sorted(window_sizes)}")
    # When every table spans the grid, windows (if any) equal the grid: global attention is the same thing.
    window_size = window_sizes.pop() if window_sizes else 0

    return {
        "img_size": grid * patch_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": embed_dim // head_dim,
        "mlp_ratio": get("blocks.0.mlp.lin1.weight").shape[0] / embed_dim,
        "out_chans": get("neck.0.weight").shape[0],
        "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in state_dict,
        "window_size": window_size,
        "global_attn_indexes": tuple(global_attn_indexes),
    }


def vit_variant_name(config: Mapping[str, Any]) -> str:
    """``"vit_b"`` / ``"vit_l"`` / ``"vit_h"`` when width, depth and heads match a released SAM size,
    else ``"custom"``."""
    for name, reference in VIT_CONFIGS.items():
        if all(config.get(key) == reference[key] for key in ("embed_dim", "depth", "num_heads")):
            return name
    return "custom"


def load_sam_image_encoder(
    encoder: ImageEncoderViT, checkpoint_or_state_dict: str | PathLike[str] | StateDict
) -> LoadReport:
    """Strictly copy every ``image_encoder.*`` tensor into ``encoder``."""
    state_dict = _as_state_dict(checkpoint_or_state_dict, require=("image_encoder.",))
    return _load_prefixed(encoder, state_dict, "image_encoder.")


def build_sam_vit_teacher(
    checkpoint_or_state_dict: str | PathLike[str] | StateDict, *, freeze: bool = True
) -> ImageEncoderViT:
    """Build SAM's image encoder at the size the checkpoint has and load it strictly.

    Args:
        checkpoint_or_state_dict: path of an official ``sam_vit_*.pth`` or its state dict (other
            prefixes are ignored here).
        freeze: eval mode and ``requires_grad=False`` (the distillation teacher never trains).

    The returned module has ``variant`` ("vit_b", "vit_l", "vit_h" or "custom") and ``load_report``.
    """
    state_dict = _as_state_dict(checkpoint_or_state_dict, require=("image_encoder.",))
    config = infer_vit_config(state_dict)
    encoder = ImageEncoderViT(**config)
    report = _load_prefixed(encoder, state_dict, "image_encoder.")
    encoder.variant = vit_variant_name(config)
    encoder.load_report = report
    if freeze:
        encoder.eval()
        encoder.requires_grad_(False)
    return encoder


def load_sam_prompt_decoder(
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    checkpoint_or_state_dict: str | PathLike[str] | StateDict,
) -> LoadReport:
    """Strictly copy ``prompt_encoder.*`` and ``mask_decoder.*`` into linmix's modules.

    The decoder's high-quality fusion (``hq_high_res``, ``hq_mid_res``, ``hq_mix``) is RWKV-SAM's own
    and stays at its initialisation; it is listed in ``kept_at_init``. Nothing is copied unless both
    parts check out.
    """
    state_dict = _as_state_dict(checkpoint_or_state_dict, require=("prompt_encoder.", "mask_decoder."))
    parts = ((prompt_encoder, "prompt_encoder.", ()), (mask_decoder, "mask_decoder.", HQ_PREFIXES))
    # Check both before copying either, so a bad decoder leaves the prompt encoder untouched too.
    problems = [line for module, prefix, keep in parts for line in _check_prefixed(module, state_dict, prefix, keep)]
    if problems:
        raise ValueError("\n".join(problems))
    report = LoadReport()
    for module, prefix, keep in parts:
        part = _copy_prefixed(module, state_dict, prefix, keep)
        report.consumed += part.consumed
        report.kept_at_init += part.kept_at_init
    return report
