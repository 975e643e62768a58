"""RWKV-SAM training on the shared :class:`linmix.training.Trainer`: distillation and fine-tuning.

Stage 1, distillation (spec section 4): the student image encoder (backbone + neck) regresses the
teacher's ``[256, g, g]`` image embedding with MSE. The teacher is SAM's ViT image encoder loaded
from an official checkpoint (``teacher_checkpoint=``, run on the fly) or its embeddings dumped to
disk first by :func:`dump_teacher_features` (``linmix sam dump-teacher``), as the paper does.

Stage 2, fine-tuning: dice + sigmoid BCE on uncertainty-sampled points (Mask2Former: sample
``oversample x`` random points, keep the ``importance`` fraction with the least certain logits, add
random ones), plus an MSE loss of the IoU head against the true IoU of each predicted mask. Box and
point prompts are decoded in one step; the single-mask token learns every prompt, the three
multimask tokens learn point prompts with SAM's minimum-over-masks loss.

Both stages go through :class:`SamTrainingModule`, whose ``forward(batch)`` returns the loss, so the
Trainer's DDP wrapper sees every parameter used (no ``find_unused_parameters``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linmix.sam.model import RwkvSam, build_rwkv_sam, save_rwkv_sam
from linmix.training.config import Recipe
from linmix.training.trainer import TrainConfig, adopt_schedule

__all__ = [
    "FREEZABLE_PARTS",
    "PromptWarmup",
    "SamRecipe",
    "SamScheduleConfig",
    "SamTrainConfig",
    "SamTrainingModule",
    "box_rectangles",
    "dice_loss",
    "dump_teacher_features",
    "export_checkpoint",
    "point_sample",
    "resolve_position_in_embedding",
    "sample_uncertain_points",
    "train_sam",
]

FREEZABLE_PARTS = ("backbone", "neck", "image_encoder", "prompt_encoder", "mask_decoder", "hq_fusion")
STAGES = ("distill", "finetune")


# --------------------------------------------------------------------------------------------------
# losses


def point_sample(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``values [N, C, H, W]`` at ``coords [N, P, 2]`` ((x, y) in [0, 1] of the
    whole map, pixel-area convention) -> ``[N, C, P]``.

    Border padding: within half a pixel of the edge the edge value is used (zero padding would make
    every border point look uncertain, and blur masks that touch the image edge)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(values.dtype)  # [N, P, 1, 2]
    return F.grid_sample(values, grid, mode="bilinear", padding_mode="border", align_corners=False).squeeze(3)


@torch.no_grad()
def sample_uncertain_points(
    logits: torch.Tensor, num_points: int, oversample: float = 3.0, importance: float = 0.75
) -> torch.Tensor:
    """Mask2Former's training points for mask logits ``[N, 1, H, W]`` -> coords ``[N, num_points, 2]``.

    ``oversample * num_points`` uniform candidates; the ``importance * num_points`` whose logits are
    closest to 0 are kept, and the rest of the points are fresh uniform ones.
    """
    if num_points < 1 or oversample < 1 or not 0 <= importance <= 1:
        raise ValueError(f"need num_points >= 1, oversample >= 1, 0 <= importance <= 1; got {num_points}, {oversample}, {importance}")
    batch = logits.shape[0]
    candidates = torch.rand(batch, int(num_points * oversample), 2, device=logits.device)
    uncertainty = -point_sample(logits.float(), candidates)[:, 0].abs()  # [N, candidates]
    num_uncertain = int(importance * num_points)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    uncertain = torch.gather(candidates, 1, chosen.unsqueeze(-1).expand(-1, -1, 2))
    random = torch.rand(batch, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([uncertain, random], dim=1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask dice loss ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)``, p = sigmoid(logits): [N, P] -> [N]."""
    probabilities = logits.sigmoid()
    numerator = 2 * (probabilities * targets).sum(-1)
    denominator = probabilities.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def _mask_losses(logits: torch.Tensor, targets: torch.Tensor, num_points: int, oversample: float, importance: float) -> torch.Tensor:
    """Dice + BCE per mask on uncertainty-sampled points: logits ``[N, h, w]``, targets ``[N, S, S]`` -> ``[N]``."""
    logits = logits.float().unsqueeze(1)
    coords = sample_uncertain_points(logits, num_points, oversample, importance)
    point_logits = point_sample(logits, coords)[:, 0]
    point_targets = point_sample(targets.float().unsqueeze(1), coords)[:, 0]
    bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none").mean(-1)
    return dice_loss(point_logits, point_targets) + bce


def _mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) upsampled to the target frame with (targets > 0.5): ``[N, T, h, w]``, ``[N, S, S]`` -> ``[N, T]``."""
    upsampled = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False) > 0
    truth = (targets > 0.5).unsqueeze(1)
    intersection = (upsampled & truth).flatten(2).sum(-1).float()
    union = (upsampled | truth).flatten(2).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


# --------------------------------------------------------------------------------------------------
# the module the Trainer optimises


class SamTrainingModule(nn.Module):
    """Wraps an :class:`RwkvSam` so ``forward(batch)`` returns ``(loss, metrics)`` for one stage.

    ``stage="finetune"``: batches of :class:`linmix.sam.data.PromptBatchSource`. ``stage="distill"``:
    batches with ``images`` and ``teacher`` embeddings (:class:`linmix.sam.data.TeacherFeatureBatchSource`),
    or only ``images`` when a ``teacher`` module is given (kept outside the state dict, frozen).
    """

    def __init__(
        self,
        sam: RwkvSam,
        *,
        stage: str = "finetune",
        teacher: nn.Module | None = None,
        teacher_image_size: int = 1024,
        loss_points: int = 12544,
        oversample: float = 3.0,
        importance: float = 0.75,
        iou_loss_weight: float = 1.0,
    ):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.sam = sam
        self.stage = stage
        self._teacher = [teacher] if teacher is not None else []  # a list hides it from state_dict / DDP
        self.teacher_image_size = teacher_image_size
        self.loss_points, self.oversample, self.importance = loss_points, oversample, importance
        self.iou_loss_weight = iou_loss_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.stage == "distill":
            return self._distill(batch)
        return self._finetune(batch)

    # -- stage 1 -----------------------------------------------------------------------------------

    def _distill(self, batch):
        images = batch["images"]
        student = self.sam.get_image_features(images).embedding
        if "teacher" in batch:
            teacher = batch["teacher"]
        elif self._teacher:
            teacher = self._teacher_embedding(images)
        else:
            raise ValueError("distillation needs teacher embeddings in the batch or a teacher module")
        if teacher.shape[-2:] != student.shape[-2:]:
            # A student at a reduced input size has a coarser grid: compare with the pooled teacher.
            teacher = F.adaptive_avg_pool2d(teacher.float(), student.shape[-2:])
        if teacher.shape[1] != student.shape[1]:
            raise ValueError(f"teacher embedding has {teacher.shape[1]} channels, the student {student.shape[1]}")
        loss = F.mse_loss(student.float(), teacher.float())
        return loss + self._zero_touch(), {"distill_mse": loss.detach()}

    def _zero_touch(self) -> torch.Tensor:
        """0 x every trainable parameter: parts a batch does not use (the mask-prompt path, a prompt kind
        absent on this rank) get a zero gradient instead of none, as DDP's reducer requires."""
        terms = [p.sum() for p in self.parameters() if p.requires_grad]
        return 0.0 * torch.stack(terms).sum() if terms else torch.zeros(())

    @torch.no_grad()
    def _teacher_embedding(self, images: torch.Tensor) -> torch.Tensor:
        teacher = self._teacher[0].to(images.device)
        size = self.teacher_image_size
        if images.shape[-1] != size:
            # The student frame holds a normalised, bottom/right-padded image; scale it to the teacher's.
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return teacher(images)

    # -- stage 2 -----------------------------------------------------------------------------------

    def _decode_group(self, features, image_index, batch, use_boxes: bool):
        sam = self.sam
        k = batch["masks"].shape[1]
        if use_boxes:
            sparse, dense = sam.prompt_encoder(points=None, boxes=batch["boxes"][image_index].flatten(0, 1), masks=None)
        else:
            coords = batch["point_coords"][image_index].flatten(0, 1)
            labels = batch["point_labels"][image_index].flatten(0, 1)
            used = int((labels != -1).sum(-1).max())  # drop all-padding columns
            sparse, dense = sam.prompt_encoder(points=(coords[:, :used], labels[:, :used]), boxes=None, masks=None)
        embedding = features.embedding[image_index]
        hq = tuple(t[image_index] for t in features.hq_features) if features.hq_features is not None else None
        masks, iou_predictions = sam.mask_decoder.predict_masks(
            embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, hq_features=hq
        )  # [n * k, 4, 4g, 4g], [n * k, 4]
        targets = batch["masks"][image_index].flatten(0, 1)
        assert masks.shape[0] == targets.shape[0] == image_index.numel() * k
        return masks, iou_predictions, targets

    def _finetune(self, batch):
        images = batch["images"]
        features = self.sam.get_image_features(images)
        is_box = batch["is_box"].bool()
        total = images.new_zeros(())
        mask_terms, iou_terms, single_ious = [], [], []
        for use_boxes in (True, False):
            image_index = torch.nonzero(is_box == use_boxes).flatten()
            if image_index.numel() == 0:
                continue
            masks, iou_predictions, targets = self._decode_group(features, image_index, batch, use_boxes)
            num_tokens = masks.shape[1]
            per_mask = _mask_losses(masks.flatten(0, 1), targets.repeat_interleave(num_tokens, 0),
                                    self.loss_points, self.oversample, self.importance).view(-1, num_tokens)
            if use_boxes:
                # Boxes are unambiguous: the single-mask token. The multimask tokens only enter through
                # a zero-weight term so every parameter has a gradient (DDP needs that).
                mask_loss = per_mask[:, 0] + 0.0 * per_mask[:, 1:].sum(-1)
            else:
                # Points may be ambiguous: SAM's minimum over the three multimask outputs, plus token 0.
                mask_loss = per_mask[:, 0] + per_mask[:, 1:].min(-1).values
            with torch.no_grad():
                true_iou = _mask_iou(masks.detach(), targets)
            iou_loss = F.mse_loss(iou_predictions.float(), true_iou, reduction="none").mean(-1)
            mask_terms.append(mask_loss)
            iou_terms.append(iou_loss)
            single_ious.append(true_iou[:, 0])
        mask_loss = torch.cat(mask_terms).mean()
        iou_loss = torch.cat(iou_terms).mean()
        total = mask_loss + self.iou_loss_weight * iou_loss + self._zero_touch()
        return total, {"mask_loss": mask_loss.detach(), "iou_loss": iou_loss.detach(), "train_iou": torch.cat(single_ious).mean()}


def _loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]):
    loss, metrics = model(batch)
    return loss, {key: float(value) for key, value in metrics.items()}, int(batch["images"].shape[0])


# --------------------------------------------------------------------------------------------------
# configuration and entry points


@dataclass
class SamScheduleConfig(TrainConfig):
    """The shared schedule and optimiser section (:class:`linmix.training.TrainConfig`) with the SAM
    recipe's defaults: AdamW betas (0.9, 0.999) and weight decay 0.05 as SAM, a short warm-up, cosine to
    5 % of the peak. ``out_dir`` has no default: every run names its folder."""

    out_dir: str = ""
    lr: float = 8e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    save_every: int = 50


@dataclass
class SamTrainConfig:
    """Everything ``linmix sam train`` needs besides the shared schedule (:class:`SamScheduleConfig`).

    ``freeze``: parts kept fixed (any of :data:`FREEZABLE_PARTS`); stage 1 always trains only the
    image encoder. ``init_checkpoint``: a linmix safetensors (e.g. the stage-1 result) to start from;
    ``sam_checkpoint``: an official SAM ``.pth`` whose prompt encoder and mask decoder initialise ours.
    """

    stage: str = "finetune"
    variant: str = "tiny"
    token_mixer: str = "rwkv"
    image_size: int = 256
    dataset: str = "procedural:0"
    batch_size: int = 8
    prompts_per_image: int = 2
    scale_range: tuple[float, float] = (0.5, 2.0)
    # Box prompts: each edge moves by N(0, box_noise * side), capped at box_noise_cap frame pixels
    # (None: SAM's 20 px at 1024, scaled to image_size; runs before this option used 20 at any size).
    box_noise: float = 0.1
    box_noise_cap: float | None = None
    loss_points: int = 12544
    iou_loss_weight: float = 1.0
    freeze: list[str] = field(default_factory=list)
    init_checkpoint: str | None = None
    sam_checkpoint: str | None = None
    teacher_checkpoint: str | None = None
    teacher_features: str | None = None
    # None: see resolve_position_in_embedding (on when fine-tuning from scratch: without a SAM
    # teacher the encoder has no other source of position, see RwkvSam).
    position_in_embedding: bool | None = None
    # Stage 2: the first N steps teach the decoder to follow the prompt (see PromptWarmup).
    prompt_warmup_steps: int = 0

    def __post_init__(self) -> None:
        self.scale_range = tuple(self.scale_range)
        self.freeze = list(self.freeze)
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        unknown = sorted(set(self.freeze) - set(FREEZABLE_PARTS))
        if unknown:
            raise ValueError(f"cannot freeze {unknown}; choose from {list(FREEZABLE_PARTS)}")
        if self.stage == "distill" and (self.teacher_checkpoint is None) == (self.teacher_features is None):
            raise ValueError("stage 'distill' needs exactly one of teacher_checkpoint (SAM .pth) or teacher_features (a dump-teacher folder)")
        if self.batch_size < 1 or self.prompts_per_image < 1:
            raise ValueError("batch_size and prompts_per_image must be >= 1")
        if self.box_noise < 0 or (self.box_noise_cap is not None and self.box_noise_cap < 0):
            raise ValueError(f"box_noise and box_noise_cap must be >= 0, got {self.box_noise} and {self.box_noise_cap}")
        if isinstance(self.prompt_warmup_steps, bool) or not isinstance(self.prompt_warmup_steps, int) or self.prompt_warmup_steps < 0:
            raise ValueError(f"prompt_warmup_steps must be an int >= 0, got {self.prompt_warmup_steps!r}")
        if self.prompt_warmup_steps and self.stage != "finetune":
            raise ValueError("prompt_warmup_steps applies to stage 'finetune' only")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scale_range"] = list(self.scale_range)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamTrainConfig:
        # Run folders written before the recipe format kept the thread count here (now train.threads).
        return cls(**{key: value for key, value in data.items() if key != "threads"})


@dataclass
class SamRecipe(Recipe):
    """The whole ``linmix sam train`` recipe: ``[train]`` (schedule, optimiser, run folder) and ``[sam]``
    (model, data, losses). ``SamRecipe.from_file("recipes/rwkv_sam_tiny/phase10.toml")`` is the recipe of
    the shipped model's last phase; ``train_sam(recipe)`` runs it as ``linmix sam train --config`` does."""

    train: SamScheduleConfig = field(default_factory=SamScheduleConfig)
    sam: SamTrainConfig = field(default_factory=SamTrainConfig)


def resolve_position_in_embedding(config: SamTrainConfig) -> bool:
    """``config.position_in_embedding``, or when None: the init checkpoint's metadata if it says, else
    True for fine-tuning from scratch, False for distillation (the teacher's embedding carries
    position) or when SAM's prompt encoder / decoder initialise the model (they expect SAM's embedding)."""
    if config.position_in_embedding is not None:
        return bool(config.position_in_embedding)
    if config.init_checkpoint is not None:
        from linmix.sam.model import checkpoint_metadata

        stored = checkpoint_metadata(config.init_checkpoint).get("position_in_embedding")
        if stored is not None:
            return stored == "true"
    return config.sam_checkpoint is None and config.stage != "distill"


def _freeze(sam: RwkvSam, parts: list[str]) -> None:
    modules = {
        "backbone": [sam.image_encoder.backbone],
        "neck": [sam.image_encoder.neck],
        "image_encoder": [sam.image_encoder],
        "prompt_encoder": [sam.prompt_encoder],
        "mask_decoder": [sam.mask_decoder],
        "hq_fusion": [getattr(sam.mask_decoder, name) for name in ("hq_high_res", "hq_mid_res", "hq_mix") if hasattr(sam.mask_decoder, name)],
    }
    for part in parts:
        for module in modules[part]:
            module.requires_grad_(False)


def build_training(config: SamTrainConfig, train_config):
    """(module, batch source) for a stage; the module is built with the Trainer's seed."""
    from linmix.sam.data import PromptBatchSource, TeacherFeatureBatchSource, load_dataset

    torch.manual_seed(train_config.seed)
    sam = build_rwkv_sam(config.variant, token_mixer=config.token_mixer, image_size=config.image_size,
                         sam_checkpoint=config.sam_checkpoint, position_in_embedding=resolve_position_in_embedding(config))
    if config.init_checkpoint is not None:
        from linmix.sam.model import load_rwkv_sam_weights

        load_rwkv_sam_weights(sam, config.init_checkpoint)
    teacher = None
    if config.stage == "distill":
        _freeze(sam, ["prompt_encoder", "mask_decoder"])
        if config.teacher_checkpoint is not None:
            from linmix.sam.convert import build_sam_vit_teacher

            teacher = build_sam_vit_teacher(config.teacher_checkpoint)
            dataset = load_dataset(config.dataset)
            dataset.validate()
            batches = PromptBatchSource(dataset, batch_size=config.batch_size, image_size=config.image_size,
                                        grad_accum=train_config.grad_accum, seed=train_config.seed, augment=False)
            batches = _ImagesOnly(batches)
        else:
            batches = TeacherFeatureBatchSource(config.teacher_features, batch_size=config.batch_size,
                                                image_size=config.image_size, grad_accum=train_config.grad_accum,
                                                seed=train_config.seed)
    else:
        dataset = load_dataset(config.dataset)
        dataset.validate()
        batches = PromptBatchSource(dataset, batch_size=config.batch_size, image_size=config.image_size,
                                    prompts_per_image=config.prompts_per_image, grad_accum=train_config.grad_accum,
                                    seed=train_config.seed, scale_range=config.scale_range,
                                    box_noise=config.box_noise, box_noise_cap=config.box_noise_cap)
        if config.prompt_warmup_steps:
            batches = PromptWarmup(batches, config.prompt_warmup_steps)
    _freeze(sam, config.freeze)
    teacher_size = getattr(teacher, "img_size", 1024) if teacher is not None else 1024
    module = SamTrainingModule(sam, stage=config.stage, teacher=teacher, teacher_image_size=teacher_size,
                               loss_points=config.loss_points, iou_loss_weight=config.iou_loss_weight)
    return module, batches


def box_rectangles(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Filled XYXY boxes ``[..., 4]`` (frame pixels, inclusive) -> float masks ``[..., size, size]``."""
    coords = torch.arange(size, dtype=boxes.dtype, device=boxes.device)
    inside_x = (coords >= boxes[..., 0, None]) & (coords <= boxes[..., 2, None])  # [..., size] over x
    inside_y = (coords >= boxes[..., 1, None]) & (coords <= boxes[..., 3, None])
    return (inside_y[..., :, None] & inside_x[..., None, :]).float()


class PromptWarmup:
    """Stage-2 batches whose first ``steps`` steps teach the decoder to follow the prompt.

    A decoder trained from scratch on object masks settles within tens of steps on one
    prompt-independent mask per image (the union of the drawn objects: IoU ~0.4), and the pathway
    from prompt to mask never forms from there (docs/experiments/rwkv-sam-tiny-procedural.md). So for ``step < steps`` every prompt
    is a box and its target is that box, filled: a box-prompted object keeps its (noisy) box, a
    point-prompted one gets the tight box of its mask. Later steps are the wrapped source's batches
    unchanged. Like the source, a batch is a pure function of (step, micro-step, rank, world size).
    """

    def __init__(self, source, steps: int):
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.source, self.steps = source, int(steps)

    def get(self, step, micro_step, rank, world_size):
        batch = self.source.get(step, micro_step, rank, world_size)
        if step >= self.steps:
            return batch
        from linmix.sam.data import tight_box

        masks = batch["masks"]
        boxes = batch["boxes"].clone()
        points = ~batch["is_box"].bool()
        for image in torch.nonzero(points).flatten().tolist():
            for k in range(masks.shape[1]):
                boxes[image, k] = torch.from_numpy(tight_box((masks[image, k] > 0.5).numpy())).to(boxes.dtype)
        return {**batch, "boxes": boxes, "masks": box_rectangles(boxes, masks.shape[-1]),
                "is_box": torch.ones_like(batch["is_box"])}


class _ImagesOnly:
    """A prompt batch source reduced to its images (online distillation needs nothing else)."""

    def __init__(self, source):
        self.source = source

    def get(self, step, micro_step, rank, world_size):
        return {"images": self.source.get(step, micro_step, rank, world_size)["images"]}


def _as_recipe(config: SamRecipe | SamTrainConfig, train_config: TrainConfig | None) -> SamRecipe:
    if isinstance(config, SamRecipe):
        if train_config is not None:
            raise TypeError("train_sam(recipe) takes no train_config: the recipe's [train] section is that")
        return config
    if not isinstance(config, SamTrainConfig):
        raise TypeError(f"train_sam needs a SamRecipe or a SamTrainConfig, got {type(config).__name__}")
    train_config = adopt_schedule(train_config, SamScheduleConfig, "train_sam")
    return SamRecipe(train=train_config, sam=config)


def train_sam(config: SamRecipe | SamTrainConfig, train_config: TrainConfig | None = None) -> dict[str, Any]:
    """Run one stage with the shared Trainer; writes ``out_dir/recipe.toml`` (the resolved recipe),
    ``out_dir/sam_config.json``, checkpoints (each a loadable ``rwkv_sam.safetensors`` too) and
    ``out_dir/final.safetensors``. Returns the Trainer's summary.

    ``config`` is a :class:`SamRecipe` (what ``linmix sam train`` runs), or, as before, a
    :class:`SamTrainConfig` with the schedule as ``train_config`` (default: :class:`SamScheduleConfig`).
    Re-running into a folder that holds checkpoints resumes it, and refuses if any setting differs
    except those of :data:`linmix.training.RESUMABLE_TRAIN_KEYS`.
    """
    from linmix.training import Trainer

    recipe = _as_recipe(config, train_config)
    config, train_config = recipe.sam, recipe.train
    if not train_config.out_dir:
        raise ValueError("out_dir is empty: name the run folder ([train] out_dir, or --out)")
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    # Record the resolved setting so export and resume never re-derive it from files that may move.
    config = replace(config, position_in_embedding=resolve_position_in_embedding(config))
    recipe = replace(recipe, sam=config)
    trainer_settings = {"sam": config.to_dict()}
    out_dir = Path(train_config.out_dir)
    rank = int(__import__("os").environ.get("RANK", "0"))
    from linmix.training import check_resume_settings

    if train_config.resume:  # before the (slow) data and model set-up
        check_resume_settings(out_dir, {"train": train_config.to_dict(), **trainer_settings})
    module, batches = build_training(config, train_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out_dir / "sam_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        recipe.save(out_dir / "recipe.toml", header="linmix sam train: the resolved recipe of this run")

    def save_extra(folder: Path) -> None:
        (folder / "sam_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    trainer = Trainer(module, train_config, loss_fn=_loss_fn, batches=batches, save_extra=save_extra, items_name="images",
                      settings=trainer_settings)
    started = time.perf_counter()
    summary = trainer.fit()
    summary["wall_s"] = time.perf_counter() - started
    if rank == 0:
        final = out_dir / "final.safetensors"
        export_checkpoint(out_dir, final, config=config)
        summary["final"] = str(final)
    return summary


def export_checkpoint(
    run_dir: str | PathLike[str], destination: str | PathLike[str], *, config: SamTrainConfig | None = None, dtype: torch.dtype | None = None
) -> Path:
    """The newest checkpoint of a ``sam train`` run -> one linmix safetensors loadable by
    ``build_rwkv_sam(variant, checkpoint=destination)`` (``dtype=torch.float16`` halves it)."""
    from linmix.training import latest_checkpoint, load_checkpoint

    run_dir = Path(run_dir)
    if config is None:
        config_path = run_dir / "sam_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: is {run_dir} a `linmix sam train` output folder?")
        config = SamTrainConfig.from_dict(json.loads(config_path.read_text()))
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir / 'checkpoints'}")
    model_state, trainer_state = load_checkpoint(folder)
    # A run config without the setting predates it: those models were trained without position.
    sam = build_rwkv_sam(config.variant, token_mixer=config.token_mixer, image_size=config.image_size,
                         position_in_embedding=bool(config.position_in_embedding))
    prefix = "sam."
    state = {key[len(prefix):]: value for key, value in model_state.items() if key.startswith(prefix)}
    sam.load_state_dict(state, strict=True)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    save_rwkv_sam(sam, destination, dtype=dtype, extra_metadata={"train_step": str(trainer_state["step"]), "stage": config.stage})
    return destination


# --------------------------------------------------------------------------------------------------
# stage 1 teacher features


@torch.no_grad()
def dump_teacher_features(
    teacher_checkpoint: str | PathLike[str],
    dataset,
    out_dir: str | PathLike[str],
    *,
    limit: int | None = None,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Run SAM's ViT image encoder over a dataset and write each image's embedding.

    Writes ``out_dir/images/<i>.png`` (the image, so stage 1 needs no other copy), ``out_dir/features/<i>.safetensors``
    (``embedding [256, g, g]`` in ``dtype``) and ``out_dir/index.json``. Images are resized (longest side)
    and padded to the teacher's input size with SAM's normalisation.
    """
    from PIL import Image
    from tqdm.auto import tqdm
    from safetensors.torch import save_file

    from linmix.sam.convert import build_sam_vit_teacher
    from linmix.sam.data import _resize, prepare_image

    teacher = build_sam_vit_teacher(teacher_checkpoint).to(device)
    size = int(getattr(teacher, "img_size", 1024))
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "features").mkdir(parents=True, exist_ok=True)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    items = []
    for index in tqdm(range(count), desc="teacher features", disable=not progress):
        sample = dataset[index]
        image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1).float()
        height, width = image.shape[-2:]
        scale = size / max(height, width)
        frame = prepare_image(_resize(image, (int(height * scale + 0.5), int(width * scale + 0.5))), size)
        embedding = teacher(frame[None].to(device))[0].to(dtype).cpu().contiguous()
        image_name, feature_name = f"images/{index:07d}.png", f"features/{index:07d}.safetensors"
        Image.fromarray(sample.image).save(out_dir / image_name)
        save_file({"embedding": embedding}, str(out_dir / feature_name))
        items.append({"name": sample.name, "image": image_name, "features": feature_name})
    index_path = out_dir / "index.json"
    index_path.write_text(json.dumps({"teacher": str(teacher_checkpoint), "teacher_image_size": size,
                                      "teacher_variant": getattr(teacher, "variant", "custom"), "items": items}, indent=1) + "\n")
    return index_path
