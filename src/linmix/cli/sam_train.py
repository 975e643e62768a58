"""`linmix sam train | eval | dump-teacher | export`: RWKV-SAM training and evaluation from the shell.

Heavy imports stay inside the command bodies so ``linmix --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from linmix.cli.app import CliError, sam_app

DATASET_HELP = (
    "KIND:PATH, KIND one of dis5k, thinobject5k, coift, hrsod (a folder), sa1b (a folder), "
    "coco (coco:ANNOTATIONS.json:IMAGE_DIR), folder (folder:IMAGE_DIR:MASK_DIR) or procedural (procedural:SEED[:LENGTH][:objects=MIN-MAX], default 1-3 objects per image)."
)


def _parse_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as error:
        raise CliError(f"--scale-range must be LOW,HIGH (e.g. 0.5,2.0), got {text!r}") from error
    if not 0 < low <= high:
        raise CliError(f"--scale-range needs 0 < LOW <= HIGH, got {text!r}")
    return low, high


@sam_app.command(
    "train",
    epilog=(
        "Examples:\n\n"
        "  linmix sam train --out runs/sam-tiny --dataset procedural:0 --variant tiny --image-size 256 --steps 320\n\n"
        "  linmix sam dump-teacher sam_vit_h_4b8939.pth --dataset sa1b:data/sa1b --out teacher/ ; "
        "linmix sam train --stage distill --teacher-features teacher/ --out runs/distill\n\n"
        "  torchrun --nproc_per_node 2 -m linmix.cli sam train ...   (DDP; gloo on CPU)\n\n"
        "Writes OUT/metrics.jsonl, OUT/checkpoints/ (resumed automatically when re-run) and OUT/final.safetensors."
    ),
)
def train_command(
    out: Path = typer.Option(..., "--out", help="Output folder (checkpoints, metrics.jsonl, final.safetensors)."),
    stage: str = typer.Option("finetune", "--stage", help="distill (stage 1: student encoder regresses the teacher embedding) or finetune (stage 2: masks)."),
    dataset: str = typer.Option("procedural:0", "--dataset", help=DATASET_HELP),
    variant: str = typer.Option("tiny", "--variant", help="Backbone variant: tiny, small, base, large."),
    token_mixer: str = typer.Option("rwkv", "--token-mixer", help="rwkv, or attention (the same-scale transformer baseline)."),
    image_size: int = typer.Option(256, "--image-size", help="Model input side (multiple of 16; SAM uses 1024)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per step and process."),
    prompts_per_image: int = typer.Option(2, "--prompts-per-image", help="Objects prompted per image (stage 2)."),
    steps: int = typer.Option(1000, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(8e-4, "--lr", help="Peak AdamW learning rate."),
    min_lr_ratio: float = typer.Option(0.05, "--min-lr-ratio", help="Cosine floor as a fraction of --lr."),
    warmup_steps: int = typer.Option(20, "--warmup-steps"),
    weight_decay: float = typer.Option(0.05, "--weight-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Gradient-norm clip (0: off)."),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA when supported), fp32 or bf16."),
    scale_range: str = typer.Option("0.5,2.0", "--scale-range", help="Large-scale jitter range LOW,HIGH."),
    box_noise: float = typer.Option(0.1, "--box-noise", help="Box prompts: each edge moves by N(0, this x the box side)."),
    box_noise_cap: Optional[float] = typer.Option(
        None, "--box-noise-cap",
        help="Box prompts: largest edge move in frame pixels (default: SAM's 20 px at 1024, scaled to --image-size)."),
    loss_points: int = typer.Option(12544, "--loss-points", help="Uncertainty-sampled points per mask for dice + BCE."),
    freeze: Optional[list[str]] = typer.Option(None, "--freeze", help="Keep fixed (repeatable): backbone, neck, image_encoder, prompt_encoder, mask_decoder, hq_fusion."),
    init_checkpoint: Optional[Path] = typer.Option(None, "--init", help="Start from this linmix safetensors (e.g. the stage-1 result)."),
    sam_checkpoint: Optional[Path] = typer.Option(None, "--sam-checkpoint", help="Official SAM .pth to initialise the prompt encoder and mask decoder."),
    teacher_checkpoint: Optional[Path] = typer.Option(None, "--teacher", help="Stage 1: official SAM .pth whose ViT encoder is the teacher (run on the fly)."),
    teacher_features: Optional[Path] = typer.Option(None, "--teacher-features", help="Stage 1: a `linmix sam dump-teacher` folder."),
    position_in_embedding: Optional[bool] = typer.Option(
        None, "--position-in-embedding/--no-position-in-embedding",
        help="Add the prompt encoder's positional encoding to the image embedding (default: the --init "
             "checkpoint's setting, else on for fine-tuning from scratch, off for --stage distill or with "
             "--sam-checkpoint; a model trained from scratch needs it to place masks at the prompt)."),
    prompt_warmup_steps: int = typer.Option(
        0, "--prompt-warmup-steps",
        help="Stage 2: for the first N steps every prompt is a box and its target is the filled box, so the "
             "decoder learns to follow the prompt before it learns object masks (see docs/sam.md)."),
    save_every: int = typer.Option(50, "--save-every"),
    log_every: int = typer.Option(10, "--log-every"),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints"),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads per process (0: torch's default)."),
    distributed: str = typer.Option("ddp", "--distributed", help="ddp or fsdp (under torchrun)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT's latest checkpoint if there is one."),
) -> None:
    """Train RWKV-SAM (stage 1 distillation or stage 2 fine-tuning) on the shared linmix Trainer."""
    import json

    from linmix.sam.train import SamTrainConfig, train_sam
    from linmix.training import TrainConfig

    config = SamTrainConfig(
        stage=stage, variant=variant, token_mixer=token_mixer, image_size=image_size, dataset=dataset,
        batch_size=batch_size, prompts_per_image=prompts_per_image, scale_range=_parse_range(scale_range),
        box_noise=box_noise, box_noise_cap=box_noise_cap, loss_points=loss_points, freeze=list(freeze or []),
        init_checkpoint=str(init_checkpoint) if init_checkpoint else None,
        sam_checkpoint=str(sam_checkpoint) if sam_checkpoint else None,
        teacher_checkpoint=str(teacher_checkpoint) if teacher_checkpoint else None,
        teacher_features=str(teacher_features) if teacher_features else None,
        position_in_embedding=position_in_embedding, prompt_warmup_steps=prompt_warmup_steps, threads=threads,
    )
    train_config = TrainConfig(
        out_dir=str(out), max_steps=steps, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, grad_accum=grad_accum, precision=precision,
        log_every=log_every, save_every=save_every, keep_checkpoints=keep_checkpoints, seed=seed,
        distributed=distributed, progress=progress, resume=resume, betas=(0.9, 0.999),
    )
    summary = train_sam(config, train_config)
    if "final" in summary:
        typer.echo(json.dumps({k: summary[k] for k in ("step", "resumed_from", "wall_s", "final")}))


@sam_app.command("export")
def export_command(
    run: Path = typer.Argument(..., help="A `linmix sam train` output folder."),
    out: Path = typer.Option(..., "--out", help="Destination safetensors file."),
    fp16: bool = typer.Option(False, "--fp16", help="Store floating tensors as float16 (half the size)."),
) -> None:
    """Write the newest checkpoint of a training run as one loadable linmix safetensors file."""
    import torch

    from linmix.sam.train import export_checkpoint

    path = export_checkpoint(run, out, dtype=torch.float16 if fp16 else None)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@sam_app.command("dump-teacher")
def dump_teacher_command(
    teacher: Path = typer.Argument(..., help="Official SAM checkpoint (sam_vit_{b,l,h}_*.pth)."),
    dataset: str = typer.Option(..., "--dataset", help=DATASET_HELP),
    out: Path = typer.Option(..., "--out", help="Folder for images/, features/ and index.json."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images."),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Run SAM's ViT image encoder over a dataset and store each 256 x g x g embedding (stage-1 targets)."""
    from linmix.sam.data import load_dataset
    from linmix.sam.train import dump_teacher_features

    index = dump_teacher_features(teacher, load_dataset(dataset), out, limit=limit, device=device)
    typer.echo(f"wrote {index}")


@sam_app.command("eval")
def eval_command(
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help=DATASET_HELP + " Repeatable; default procedural:1:100 (the held-out split of docs/sam.md)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A linmix RWKV-SAM safetensors; default: the shipped model."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Variant of --checkpoint when its metadata does not say."),
    prompts: str = typer.Option("box,point", "--prompts", help="Comma-separated prompt kinds: box, point."),
    points: int = typer.Option(3, "--points", help="Positive points per object for the point prompt (the first at the mask's innermost pixel)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images of each dataset."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write OUT.json and OUT.md (the table)."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)."),
    label: Optional[str] = typer.Option(None, "--label", help="Model name in the table."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Run the model at this input side (a multiple of 16) instead of the one stored in its checkpoint."),
) -> None:
    """mIoU and boundary IoU (HQ-SAM protocol, at the original resolution) per dataset and prompt kind."""
    import json

    import torch

    from linmix.sam.data import load_dataset
    from linmix.sam.evaluate import evaluate_datasets, results_to_markdown
    from linmix.sam.model import build_rwkv_sam, checkpoint_metadata, load_default

    if threads:
        torch.set_num_threads(threads)
    kinds = [k.strip() for k in prompts.split(",") if k.strip()]
    if checkpoint is None:
        model = load_default(image_size=image_size)
    else:
        metadata = checkpoint_metadata(checkpoint)
        chosen = variant or metadata.get("variant")
        if chosen is None:
            raise CliError(f"{checkpoint} does not record its variant: pass --variant")
        model = build_rwkv_sam(chosen, checkpoint=checkpoint, image_size=image_size)
    datasets = [load_dataset(spec) for spec in (dataset or ["procedural:1:100"])]
    results = evaluate_datasets(model, datasets, prompt_kinds=kinds, points=points, limit=limit)
    name = label or (checkpoint.name if checkpoint else "shipped")
    table = results_to_markdown(results, model_name=name)
    typer.echo(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps({"model": name, "image_size": model.image_size, "results": results}, indent=2) + "\n")
        Path(f"{out}.md").write_text(table + "\n")
