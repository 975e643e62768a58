"""RWKV-SAM training: losses by hand, the stage modules, `linmix sam train` end to end (fine-tuning,
distillation from an on-the-fly SAM ViT teacher and from dumped features), freezing, export,
SIGKILL resume and torchrun DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sam_checkpoint_keys import sam_image_encoder_shapes, sam_mask_decoder_shapes, sam_prompt_encoder_shapes

from linmix.cli import main
from linmix.sam.data import ProceduralHQDataset, PromptBatchSource
from linmix.sam.model import build_rwkv_sam, checkpoint_metadata, save_rwkv_sam
from linmix.sam.train import (
    PromptWarmup,
    SamTrainConfig,
    SamTrainingModule,
    _mask_iou,
    _mask_losses,
    build_training,
    dice_loss,
    point_sample,
    resolve_position_in_embedding,
    sample_uncertain_points,
)
from linmix.training import TrainConfig, read_metrics

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--variant", "tiny", "--image-size", "32", "--batch-size", "2", "--prompts-per-image", "1",
         "--loss-points", "64", "--threads", "1", "--no-progress", "--log-every", "1", "--warmup-steps", "1"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def losses(out_dir):
    return [record["loss"] for record in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in record]


# ---------------------------------------------------------------------------------------------
# losses


def test_dice_loss_by_hand():
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    confident = torch.tensor([[50.0, 50.0, -50.0, -50.0]])
    assert dice_loss(confident, targets).item() == pytest.approx(0.0, abs=1e-6)
    # p = 0.5 everywhere: 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4
    assert dice_loss(torch.zeros(1, 4), targets).item() == pytest.approx(0.4)


def test_point_sample_reads_pixel_centres_and_interpolates():
    values = torch.arange(12.0).view(1, 1, 3, 4)
    centres = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3], [2.0 / 4, 0.5 / 3]]])
    sampled = point_sample(values, centres)[0, 0]
    # (x, y) = pixel (0, 0) -> 0, pixel (3, 2) -> 11, halfway between pixels (1, 0) and (2, 0) -> 1.5
    assert sampled.tolist() == pytest.approx([0.0, 11.0, 1.5], abs=1e-5)


def test_uncertain_points_concentrate_where_logits_are_near_zero():
    logits = torch.full((1, 1, 32, 32), 10.0)
    logits[..., :, 16:] = -10.0
    logits[..., :, 15:17] = 0.0  # the uncertain band around the edge
    torch.manual_seed(0)
    coords = sample_uncertain_points(logits, num_points=200, oversample=3.0, importance=0.25)
    assert coords.shape == (1, 200, 2)
    # ~1/8 of the 600 candidates fall where |logit| < 10 (x in (14, 18)); the 50 most uncertain are among them.
    x_pixels = coords[0, :50, 0] * 32
    assert ((x_pixels > 14) & (x_pixels < 18)).all()
    rest = coords[0, 50:, 0] * 32  # the random remainder spreads over the whole map
    assert rest.min() < 8 and rest.max() > 24


# ---------------------------------------------------------------------------------------------
# the stage modules


def _finetune_module(image_size=32, stage="finetune"):
    torch.manual_seed(0)
    sam = build_rwkv_sam("tiny", image_size=image_size).train()
    return SamTrainingModule(sam, stage=stage, loss_points=64)


def test_finetune_step_is_finite_and_reaches_every_parameter():
    module = _finetune_module()
    source = PromptBatchSource(ProceduralHQDataset(0, min_side=64, max_side=96), batch_size=2, image_size=32, prompts_per_image=2)
    loss, metrics = module(source.get(0, 0, 0, 1))
    assert torch.isfinite(loss) and 0.0 <= float(metrics["train_iou"]) <= 1.0
    # The total is the weighted sum of the reported parts (the DDP zero-touch term adds exactly 0).
    torch.testing.assert_close(loss.detach(), metrics["mask_loss"] + module.iou_loss_weight * metrics["iou_loss"])
    loss.backward()
    missing = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP needs a gradient (possibly zero) for every trainable parameter
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), 1e9)
    assert torch.isfinite(norm)


def test_box_only_batch_still_touches_point_path():
    module = _finetune_module()
    source = PromptBatchSource(ProceduralHQDataset(0, min_side=64, max_side=96), batch_size=1, image_size=32)
    batch = source.get(0, 0, 0, 1)
    assert batch["is_box"].tolist() == [True]
    loss, _ = module(batch)
    loss.backward()
    prompts, decoder = module.sam.prompt_encoder, module.sam.mask_decoder
    # Every parameter has a gradient, and it is exactly zero where a box batch does not reach: the
    # point embeddings, and the multimask tokens' hypernetworks (boxes train the single-mask token).
    for unused in (prompts.point_embeddings[0], prompts.point_embeddings[1], prompts.not_a_point_embed,
                   *decoder.output_hypernetworks_mlps[1:]):
        for parameter in unused.parameters():
            assert parameter.grad is not None and torch.equal(parameter.grad, torch.zeros_like(parameter))
    for used in (prompts.point_embeddings[2], prompts.point_embeddings[3], decoder.output_hypernetworks_mlps[0]):
        assert all(parameter.grad.abs().max() > 0 for parameter in used.parameters())


def test_config_validation():
    with pytest.raises(ValueError, match="cannot freeze"):
        SamTrainConfig(freeze=["everything"])
    with pytest.raises(ValueError, match="exactly one"):
        SamTrainConfig(stage="distill")
    assert SamTrainConfig.from_dict(json.loads(json.dumps(SamTrainConfig(freeze=["backbone"]).to_dict()))).freeze == ["backbone"]


def test_position_in_embedding_defaults(tmp_path):
    assert resolve_position_in_embedding(SamTrainConfig()) is True  # from scratch
    assert resolve_position_in_embedding(SamTrainConfig(sam_checkpoint="sam_vit_b.pth")) is False  # SAM's decoder
    assert resolve_position_in_embedding(SamTrainConfig(stage="distill", teacher_features="t/")) is False  # SAM's embedding
    assert resolve_position_in_embedding(SamTrainConfig(sam_checkpoint="x.pth", position_in_embedding=True)) is True
    for stored in (True, False):  # an init checkpoint's own setting wins over the from-scratch default
        path = tmp_path / f"init-{stored}.safetensors"
        save_rwkv_sam(build_rwkv_sam("tiny", image_size=32, position_in_embedding=stored), path)
        assert resolve_position_in_embedding(SamTrainConfig(init_checkpoint=str(path))) is stored
    # A file from before the setting existed records nothing: the from-scratch default applies.
    assert resolve_position_in_embedding(SamTrainConfig(init_checkpoint=str(_strip_metadata(path, "position_in_embedding")))) is True


def test_decoder_learns_to_place_a_box_mask_with_position_in_embedding():
    """The reason for position_in_embedding: on an image that carries no information, prompt encoder +
    decoder must learn to fill the prompted box from the prompt alone. With the position in the
    embedding they do within 200 steps (IoU ~0.67 measured); without it they predict one mask for
    every prompt (IoU ~0.2 after 200 steps, and the 800-step models of docs/sam.md ignored prompts)."""
    torch.manual_seed(0)
    size = 64
    model = build_rwkv_sam("tiny", image_size=size, position_in_embedding=True)
    prompt_encoder, decoder = model.prompt_encoder, model.mask_decoder
    with torch.no_grad():
        features = model.get_image_features(torch.zeros(1, 3, size, size))
    optimizer = torch.optim.AdamW([*prompt_encoder.parameters(), *decoder.parameters()], lr=8e-4)
    generator = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ious = []
    for _ in range(200):
        near = torch.rand(16, 2, generator=generator) * size * 0.6
        far = (near + size * (0.15 + 0.3 * torch.rand(16, 2, generator=generator))).clamp(max=size - 1)
        inside = (xs >= near[:, :1, None]) & (xs <= far[:, :1, None]) & (ys >= near[:, 1:, None]) & (ys <= far[:, 1:, None])
        sparse, dense = prompt_encoder(points=None, boxes=torch.cat([near, far], 1), masks=None)
        masks, _ = decoder.predict_masks(features.embedding, prompt_encoder.get_dense_pe(), sparse, dense,
                                         hq_features=features.hq_features)
        loss = _mask_losses(masks[:, 0], inside.float(), 512, 3.0, 0.75).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ious.append(float(_mask_iou(masks[:, :1].detach(), inside.float()).mean()))
    assert np.mean(ious[-10:]) > 0.45, ious[-10:]


def test_prompt_warmup_turns_every_prompt_into_its_filled_box_then_steps_aside():
    source = PromptBatchSource(ProceduralHQDataset(2), batch_size=4, image_size=64, prompts_per_image=2)
    warmup = PromptWarmup(source, steps=3)
    for step in (0, 2):
        plain, batch = source.get(step, 0, 0, 1), warmup.get(step, 0, 0, 1)
        assert batch["is_box"].all() and torch.equal(batch["images"], plain["images"])
        for image in range(4):
            for k in range(2):
                box = batch["boxes"][image, k]
                if plain["is_box"][image]:  # box prompts keep their (noisy) box
                    assert torch.equal(box, plain["boxes"][image, k])
                else:  # point prompts get the tight box of their object
                    ys, xs = torch.nonzero(plain["masks"][image, k] > 0.5, as_tuple=True)
                    assert box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
                x0, y0 = int(np.ceil(box[0])), int(np.ceil(box[1]))
                x1, y1 = int(np.floor(box[2])), int(np.floor(box[3]))
                expected = torch.zeros(64, 64)
                expected[y0 : y1 + 1, x0 : x1 + 1] = 1
                assert torch.equal(batch["masks"][image, k], expected)
    after = warmup.get(3, 0, 0, 1)
    for key, value in source.get(3, 0, 0, 1).items():
        assert torch.equal(after[key], value), key
    with pytest.raises(ValueError, match="prompt_warmup_steps must be an int >= 0"):
        SamTrainConfig(prompt_warmup_steps=-1)
    with pytest.raises(ValueError, match="stage 'finetune' only"):
        SamTrainConfig(stage="distill", teacher_features="t/", prompt_warmup_steps=5)
    with pytest.raises(ValueError, match="box_noise and box_noise_cap must be >= 0"):
        SamTrainConfig(box_noise_cap=-1)


def _strip_metadata(path: Path, key: str) -> Path:
    from safetensors.torch import load_file, save_file

    metadata = checkpoint_metadata(path)
    metadata.pop(key)
    stripped = path.with_name("stripped.safetensors")
    save_file(load_file(str(path)), str(stripped), metadata=metadata)
    return stripped


# ---------------------------------------------------------------------------------------------
# `linmix sam train` end to end


def test_cli_train_then_load_the_final_checkpoint(tmp_path):
    out = tmp_path / "run"
    code = main(["sam", "train", "--out", str(out), "--dataset", "procedural:0", "--steps", "2", "--save-every", "2",
                 "--freeze", "prompt_encoder", "--prompt-warmup-steps", "1", "--box-noise-cap", "3", *SMALL])
    assert code == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) and "train_iou" in r for r in records if "loss" in r)
    metadata = checkpoint_metadata(out / "final.safetensors")
    assert metadata["variant"] == "tiny" and metadata["image_size"] == "32" and metadata["token_mixer"] == "rwkv"
    # Trained from scratch (no SAM decoder): position goes into the image embedding, and the file says so.
    assert metadata["position_in_embedding"] == "true"
    run_config = json.loads((out / "sam_config.json").read_text())
    assert run_config["position_in_embedding"] is True and run_config["prompt_warmup_steps"] == 1
    assert run_config["box_noise"] == 0.1 and run_config["box_noise_cap"] == 3.0
    model = build_rwkv_sam("tiny", checkpoint=out / "final.safetensors")
    assert model.image_size == 32 and model.position_in_embedding
    # The frozen prompt encoder is bit-identical to its initialisation (same seed, same build).
    torch.manual_seed(0)
    initial = build_rwkv_sam("tiny", image_size=32)
    for (name, trained), (_, start) in zip(model.prompt_encoder.state_dict().items(), initial.prompt_encoder.state_dict().items()):
        assert torch.equal(trained, start), name
    assert not torch.equal(model.mask_decoder.iou_token.weight, initial.mask_decoder.iou_token.weight)
    # export --fp16 halves the file and still loads.
    assert main(["sam", "export", str(out), "--out", str(tmp_path / "half.safetensors"), "--fp16"]) == 0
    half = build_rwkv_sam("tiny", checkpoint=tmp_path / "half.safetensors")
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * (out / "final.safetensors").stat().st_size
    assert torch.allclose(half.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight, atol=1e-3)


def test_cli_train_reports_bad_input(tmp_path, capsys):
    assert main(["sam", "train", "--out", str(tmp_path), "--dataset", "dis5k:" + str(tmp_path / "nope"), *SMALL]) == 1
    assert "dis5k folder not found" in capsys.readouterr().err
    assert main(["sam", "train", "--out", str(tmp_path), "--freeze", "wheels", *SMALL]) == 1
    assert "cannot freeze" in capsys.readouterr().err


def test_cli_run_writes_its_recipe_and_refuses_a_changed_resume(tmp_path, capsys):
    from linmix.sam.train import SamRecipe

    out = tmp_path / "run"
    argv = ["sam", "train", "--out", str(out), "--dataset", "procedural:0", "--save-every", "1", *SMALL]
    assert main([*argv, "--steps", "1"]) == 0
    written = SamRecipe.from_file(out / "recipe.toml")
    assert written.train.max_steps == 1 and written.train.betas == (0.9, 0.999) and written.sam.loss_points == 64
    assert written.sam.position_in_embedding is True  # resolved (from scratch), as sam_config.json records it
    capsys.readouterr()
    assert main([*argv, "--steps", "1", "--loss-points", "32", "--lr", "1e-4"]) == 1
    err = capsys.readouterr().err
    assert "different settings" in err and "sam.loss_points: 64 -> 32" in err and "train.lr: 0.0008 -> 0.0001" in err
    # more steps, other log and save intervals: a legitimate resume; the run folder's recipe runs it again
    assert main(["sam", "train", "--config", str(out / "recipe.toml"), "--steps", "2", "--log-every", "2", "--save-every", "2"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert SamRecipe.from_file(out / "recipe.toml").train.max_steps == 2


# ---------------------------------------------------------------------------------------------
# stage 1: distillation


TINY_VIT = {"img_size": 64, "patch": 16, "width": 32, "depth": 2, "heads": 2, "window": 2, "global": (1,)}


@pytest.fixture
def tiny_sam_vit_checkpoint(tmp_path):
    """A random SAM checkpoint with SAM's key names, ViT encoder at 64 px (4 x 4 embedding grid)."""
    t = TINY_VIT
    shapes = {
        **sam_image_encoder_shapes(t["img_size"], t["patch"], t["width"], t["depth"], t["heads"], t["window"], t["global"]),
        **sam_prompt_encoder_shapes(),
        **sam_mask_decoder_shapes(),
    }
    generator = torch.Generator().manual_seed(7)
    path = tmp_path / "sam_tiny.pth"
    torch.save({name: 0.1 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}, path)
    return path


def test_distillation_from_dumped_features_and_from_the_teacher_agree(tmp_path, tiny_sam_vit_checkpoint):
    features = tmp_path / "teacher"
    assert main(["sam", "dump-teacher", str(tiny_sam_vit_checkpoint), "--dataset", "procedural:5:3", "--out", str(features)]) == 0
    index = json.loads((features / "index.json").read_text())
    assert len(index["items"]) == 3 and index["teacher_image_size"] == 64
    from safetensors.torch import load_file

    assert load_file(str(features / index["items"][0]["features"]))["embedding"].shape == (256, 4, 4)

    common = ["--stage", "distill", "--steps", "1", "--save-every", "1", *SMALL[:-2], "--image-size", "64"]
    assert main(["sam", "train", "--out", str(tmp_path / "from-features"), "--teacher-features", str(features), *common]) == 0
    # The first logged loss is the MSE of the initial student against the stored teacher embedding.
    config = SamTrainConfig(stage="distill", variant="tiny", image_size=64, batch_size=2, teacher_features=str(features))
    module, batches = build_training(config, TrainConfig(out_dir=str(tmp_path / "x")))
    batch = batches.get(0, 0, 0, 1)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(module.sam.image_encoder(batch["images"]).embedding, batch["teacher"]).item()
    assert losses(tmp_path / "from-features")[0] == pytest.approx(expected, rel=1e-4)

    # On the fly, the teacher sees the same frames (student size = teacher size here): same first loss
    # up to the fp16 storage of the dumped features.
    dataset_spec = "procedural:5:3"
    assert main(["sam", "train", "--out", str(tmp_path / "online"), "--teacher", str(tiny_sam_vit_checkpoint),
                 "--dataset", dataset_spec, *common]) == 0
    online = losses(tmp_path / "online")[0]
    assert online == pytest.approx(expected, rel=0.05)


def test_distillation_needs_a_teacher(tmp_path, capsys):
    assert main(["sam", "train", "--out", str(tmp_path), "--stage", "distill", *SMALL]) == 1
    assert "teacher" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# resume after SIGKILL and torchrun


def _train_command(out, steps, *extra):
    return [sys.executable, "-m", "linmix.cli", "sam", "train", "--out", str(out), "--dataset", "procedural:0",
            "--steps", str(steps), "--save-every", "2", *SMALL, *extra]


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_loss_curve_exactly(tmp_path):
    subprocess.run(_train_command(tmp_path / "full", 6), env=_env(), check=True, capture_output=True, timeout=600)
    process = subprocess.Popen(_train_command(tmp_path / "killed", 6), env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() >= "step-00000002"):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(losses(tmp_path / "killed")) < 6  # it really died mid-run
    subprocess.run(_train_command(tmp_path / "killed", 6), env=_env(), check=True, capture_output=True, timeout=600)
    assert losses(tmp_path / "killed")[-6:] == losses(tmp_path / "full")


def test_torchrun_two_processes_ddp(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found beside the interpreter")
    out = tmp_path / "ddp"
    command = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "linmix.cli", "sam", "train", "--out", str(out),
               "--dataset", "procedural:0", "--steps", "2", "--save-every", "2", *SMALL]
    completed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    # 2 ranks x batch 2: each step saw 4 images.
    model = build_rwkv_sam("tiny", checkpoint=out / "final.safetensors")
    torch.manual_seed(0)
    assert not torch.equal(model.mask_decoder.iou_token.weight, build_rwkv_sam("tiny", image_size=32).mask_decoder.iou_token.weight)
