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


def _parse_pair(text: str, option: str, example: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as error:
        raise CliError(f"{option} must be two numbers A,B (e.g. {example}), got {text!r}") from error
    return low, high


def _parse_range(text: str) -> tuple[float, float]:
    low, high = _parse_pair(text, "--scale-range", "0.5,2.0")
    if not 0 < low <= high:
        raise CliError(f"--scale-range needs 0 < LOW <= HIGH, got {text!r}")
    return low, high


# Every `sam train` option that sets a recipe value: parameter name -> (recipe section, key).
SAM_TRAIN_OPTIONS = {
    "out": ("train", "out_dir"), "steps": ("train", "max_steps"), "lr": ("train", "lr"),
    "min_lr_ratio": ("train", "min_lr_ratio"), "warmup_steps": ("train", "warmup_steps"),
    "weight_decay": ("train", "weight_decay"), "betas": ("train", "betas"), "eps": ("train", "eps"),
    "grad_clip": ("train", "grad_clip"), "grad_accum": ("train", "grad_accum"), "precision": ("train", "precision"),
    "compile": ("train", "compile"), "save_every": ("train", "save_every"), "log_every": ("train", "log_every"),
    "keep_checkpoints": ("train", "keep_checkpoints"), "seed": ("train", "seed"), "threads": ("train", "threads"),
    "distributed": ("train", "distributed"), "progress": ("train", "progress"), "resume": ("train", "resume"),
    "stage": ("sam", "stage"), "dataset": ("sam", "dataset"), "variant": ("sam", "variant"),
    "token_mixer": ("sam", "token_mixer"), "image_size": ("sam", "image_size"), "batch_size": ("sam", "batch_size"),
    "prompts_per_image": ("sam", "prompts_per_image"), "scale_range": ("sam", "scale_range"),
    "box_noise": ("sam", "box_noise"), "box_noise_cap": ("sam", "box_noise_cap"), "loss_points": ("sam", "loss_points"),
    "iou_loss_weight": ("sam", "iou_loss_weight"), "freeze": ("sam", "freeze"),
    "init_checkpoint": ("sam", "init_checkpoint"), "sam_checkpoint": ("sam", "sam_checkpoint"),
    "teacher_checkpoint": ("sam", "teacher_checkpoint"), "teacher_features": ("sam", "teacher_features"),
    "position_in_embedding": ("sam", "position_in_embedding"), "prompt_warmup_steps": ("sam", "prompt_warmup_steps"),
}


def _parse_betas(text: str) -> tuple[float, float]:
    return _parse_pair(text, "--betas", "0.9,0.999")


def sam_recipe_from_params(params: dict):
    """The :class:`linmix.sam.train.SamRecipe` of one `sam train` invocation: the ``--config`` file (or
    the dataclass defaults), then every option given on the command line on top."""
    from linmix.sam.train import SamRecipe
    from linmix.training.config import option_overrides

    config_file = params.get("config")
    overrides = option_overrides(params, SAM_TRAIN_OPTIONS,
                                 convert={"scale_range": _parse_range, "betas": _parse_betas, "freeze": list})
    if config_file is None:
        return SamRecipe.from_dict(overrides, source="command line")
    recipe = SamRecipe.from_file(config_file)
    return recipe.with_overrides(overrides, source=f"{config_file} with the command-line options")


def sam_recipe_from_command_line(argv: list[str]):
    """The recipe ``linmix sam train ARGV`` would run, parsed by the command's own parser (no training)."""
    import typer.main

    command = typer.main.get_command(sam_app).commands["train"]
    with command.make_context("train", list(argv)) as context:
        return sam_recipe_from_params(dict(context.params))


@sam_app.command(
    "train",
    epilog=(
        "Examples:\n\n"
        "  linmix sam train --out runs/sam-tiny --dataset procedural:0 --variant tiny --image-size 256 --steps 320\n\n"
        "  linmix sam train --config recipes/rwkv_sam_tiny/phase10.toml --out runs/again   (the shipped model's last phase)\n\n"
        "  linmix sam train --config recipe.toml --lr 1e-4 --print-config   (show the resolved recipe, train nothing)\n\n"
        "  linmix sam dump-teacher sam_vit_h_4b8939.pth --dataset sa1b:data/sa1b --out teacher/ ; "
        "linmix sam train --stage distill --teacher-features teacher/ --out runs/distill\n\n"
        "  torchrun --nproc_per_node 2 -m linmix.cli sam train ...   (DDP; gloo on CPU)\n\n"
        "Writes OUT/recipe.toml (the resolved recipe), OUT/metrics.jsonl, OUT/checkpoints/ (resumed automatically "
        "when re-run with the same settings) and OUT/final.safetensors."
    ),
)
def train_command(
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe TOML (\\[train] and \\[sam] tables); options given here override its values."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved recipe as TOML and exit without training."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (checkpoints, metrics.jsonl, final.safetensors); required unless the recipe sets out_dir."),
    stage: Optional[str] = typer.Option(None, "--stage", help="distill (stage 1: student encoder regresses the teacher embedding) or finetune (stage 2: masks; the default)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help=DATASET_HELP),
    variant: Optional[str] = typer.Option(None, "--variant", help="Backbone variant: tiny, small, base, large."),
    token_mixer: Optional[str] = typer.Option(None, "--token-mixer", help="rwkv (the paper's), attention (the same-scale transformer baseline), mamba (VMamba's SS2D) or mamba_bi (Vim-style bidirectional scan)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Model input side (multiple of 16; SAM uses 1024)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step and process."),
    prompts_per_image: Optional[int] = typer.Option(None, "--prompts-per-image", help="Objects prompted per image (stage 2)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (may grow on resume)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate."),
    min_lr_ratio: Optional[float] = typer.Option(None, "--min-lr-ratio", help="Cosine floor as a fraction of --lr."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    betas: Optional[str] = typer.Option(None, "--betas", help="AdamW betas B1,B2."),
    eps: Optional[float] = typer.Option(None, "--eps", help="AdamW epsilon."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Gradient-norm clip (0: off)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (bf16 autocast on CUDA when supported), fp32 or bf16."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    scale_range: Optional[str] = typer.Option(None, "--scale-range", help="Large-scale jitter range LOW,HIGH."),
    box_noise: Optional[float] = typer.Option(None, "--box-noise", help="Box prompts: each edge moves by N(0, this x the box side)."),
    box_noise_cap: Optional[float] = typer.Option(
        None, "--box-noise-cap",
        help="Box prompts: largest edge move in frame pixels (default: SAM's 20 px at 1024, scaled to --image-size)."),
    loss_points: Optional[int] = typer.Option(None, "--loss-points", help="Uncertainty-sampled points per mask for dice + BCE."),
    iou_loss_weight: Optional[float] = typer.Option(None, "--iou-loss-weight", help="Weight of the IoU-head MSE loss."),
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
    prompt_warmup_steps: Optional[int] = typer.Option(
        None, "--prompt-warmup-steps",
        help="Stage 2: for the first N steps every prompt is a box and its target is the filled box, so the "
             "decoder learns to follow the prompt before it learns object masks (see docs/experiments/rwkv-sam-tiny-procedural.md)."),
    save_every: Optional[int] = typer.Option(None, "--save-every"),
    log_every: Optional[int] = typer.Option(None, "--log-every"),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads per process (0: torch's default)."),
    distributed: Optional[str] = typer.Option(None, "--distributed", help="ddp or fsdp (under torchrun)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from OUT's latest checkpoint if there is one (the default)."),
) -> None:
    """Train RWKV-SAM (stage 1 distillation or stage 2 fine-tuning) on the shared linmix Trainer.

    Defaults: the SamRecipe dataclasses of linmix.sam.train (the same from Python); --print-config shows them.
    """
    recipe = sam_recipe_from_params(dict(locals()))
    if print_config:
        typer.echo(recipe.to_toml(header="linmix sam train recipe"), nl=False)
        return
    if not recipe.train.out_dir:
        raise CliError("name the output folder: --out, or out_dir in the recipe's [train] table")
    from linmix.sam.train import train_sam

    summary = train_sam(recipe)
    if "final" in summary:
        import json

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
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help=DATASET_HELP + " Repeatable; default procedural:1:100 (the procedural generator's held-out split)."),
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
