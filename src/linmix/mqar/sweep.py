"""Training and evaluating MQAR models, and the resumable sweep over models and learning rates.

Every (model, learning rate) run appends one line to ``out_dir/runs.jsonl`` when it finishes; a
model's summary (best learning rate, accuracies, state size) goes to ``out_dir/results.jsonl``
once all its runs are done. A stopped sweep resumes from those files: finished runs are never
redone. Both files record the preset's data/training fields, and resuming into a directory made
with different ones is refused (the numbers would not be comparable).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path

import torch

from linmix.mqar.data import generate_epoch_segments, generate_segments, per_example_accuracy
from linmix.mqar.models import MQARModel, MQARModelConfig, masked_recall_loss, state_size_bytes
from linmix.mqar.presets import MQARPreset, get_preset
from linmix.training import parameter_groups, warmup_cosine_lambda

__all__ = ["build_optimizer", "curve_gain", "evaluate", "run_preset", "run_sweep", "train_and_evaluate", "epoch_batches"]

Dataset = list[tuple[torch.Tensor, torch.Tensor]]


def epoch_batches(segment_sizes: list[int], batch_size: int, seed: int, epoch: int) -> list[tuple[int, torch.Tensor]]:
    """The batches of one epoch: ``(segment index, example indices)``, a pure function of (seed, epoch).

    Each segment is shuffled and cut into batches (one length per batch, so no padding); the
    batches of all segments are then shuffled together.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = []
    for index, size in enumerate(segment_sizes):
        order = torch.randperm(size, generator=generator)
        batches += [(index, order[start : start + batch_size]) for start in range(0, size, batch_size)]
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


@torch.no_grad()
def evaluate(model: MQARModel, data: Dataset, batch_size: int) -> list[float]:
    """Per segment: the mean over examples of each example's accuracy over its query positions."""
    was_training = model.training
    model.eval()
    accuracies = []
    for inputs, labels in data:
        per_example = []
        for start in range(0, len(inputs), batch_size):
            batch_inputs, batch_labels = inputs[start : start + batch_size], labels[start : start + batch_size]
            hidden = model.hidden_states(batch_inputs)
            predictions = model.logits(hidden).argmax(dim=-1)
            per_example.append(per_example_accuracy(predictions, batch_labels))
        accuracies.append(float(torch.cat(per_example).mean()))
    model.train(was_training)
    return accuracies


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.98), decay ``weight_decay`` except on norms, biases, embeddings and any
    parameter a layer marks ``_no_weight_decay`` (Mamba's ``A_log`` and ``D``, as the Mamba reference
    trains them: decaying A_log pulls every state's decay rate towards one value)."""
    groups = parameter_groups(model, weight_decay)
    exempt = [p for group in groups if group["weight_decay"] > 0 for p in group["params"] if getattr(p, "_no_weight_decay", False)]
    if exempt:
        exempt_ids = {id(p) for p in exempt}
        for group in groups:
            if group["weight_decay"] > 0:
                group["params"] = [p for p in group["params"] if id(p) not in exempt_ids]
        no_decay = [g for g in groups if g["weight_decay"] == 0]
        if no_decay:
            no_decay[0]["params"] += exempt
        else:
            groups.append({"params": exempt, "weight_decay": 0.0})
        groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def train_and_evaluate(
    config: MQARModelConfig,
    preset: MQARPreset,
    lr: float,
    train_data: Dataset | None = None,
    test_data: Dataset | None = None,
    *,
    progress=None,
    device: torch.device | str = "cpu",
) -> dict:
    """Train one model at one learning rate; evaluate on every test segment after each epoch.

    AdamW (weight decay ``preset.weight_decay``, none on norms/biases/embeddings), cosine schedule
    from ``lr`` to 0 over all epochs, stop as soon as the mean test accuracy reaches
    ``preset.early_stop_accuracy``. ``train_data`` / ``test_data``: None = generated from the
    preset; with ``preset.fresh_train_data`` the training examples are generated anew for every
    epoch from ``(preset.train_seed, epoch)`` and ``train_data`` must be None. ``progress``: an
    optional callable(steps_done) for a bar.

    Returns the run record: accuracies of the last evaluation, steps, epochs, seconds, and
    ``curve``, one point per finished epoch (step, examples seen, mean training loss over the epoch,
    test accuracy per segment and their mean): the accuracy curve that shows whether training had
    flattened out.
    """
    if preset.fresh_train_data and train_data is not None:
        raise ValueError("preset.fresh_train_data generates each epoch's examples itself: pass train_data=None")
    torch.manual_seed(preset.model_seed)
    device = torch.device(device)
    model = MQARModel(config, preset.vocab_size, preset.max_seq_len).to(device)
    if test_data is None:
        test_data = generate_segments(preset.vocab_size, preset.test_segments, preset.test_seed, power_a=preset.power_a)
    if train_data is None and not preset.fresh_train_data:
        train_data = generate_segments(preset.vocab_size, preset.train_segments, preset.train_seed, power_a=preset.power_a)
    test_data = [(inputs.to(device), labels.to(device)) for inputs, labels in test_data]
    optimizer = build_optimizer(model, lr, preset.weight_decay)
    sizes = [len(inputs) for inputs, _ in train_data] if train_data is not None else [s.num_examples for s in preset.train_segments]
    steps_per_epoch = sum(math.ceil(size / preset.train_batch_size) for size in sizes)
    total_steps = steps_per_epoch * preset.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(0, total_steps, min_lr_ratio=0.0))
    started = time.perf_counter()
    step, examples_seen, epochs_run, diverged = 0, 0, 0, False
    accuracies = [0.0] * len(test_data)
    last_loss = float("nan")
    curve = []
    segment_names = [s.name for s in preset.test_segments]
    model.train()
    for epoch in range(preset.epochs):
        if preset.fresh_train_data:
            epoch_data = generate_epoch_segments(preset.vocab_size, preset.train_segments, preset.train_seed, epoch,
                                                 power_a=preset.power_a)
        else:
            epoch_data = train_data
        epoch_data = [(inputs.to(device), labels.to(device)) for inputs, labels in epoch_data]
        epoch_loss, epoch_steps = 0.0, 0
        for segment, indices in epoch_batches(sizes, preset.train_batch_size, preset.train_seed, epoch):
            inputs, labels = epoch_data[segment]
            indices = indices.to(device)
            loss, _, _ = masked_recall_loss(model, inputs[indices], labels[indices])
            if not torch.isfinite(loss):
                diverged = True  # a too-large learning rate: this run scores what it last evaluated to
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            examples_seen += len(indices)
            last_loss = float(loss.detach())
            epoch_loss += last_loss
            epoch_steps += 1
            if progress is not None:
                progress(1)
        if diverged:
            break
        epochs_run = epoch + 1
        accuracies = evaluate(model, test_data, preset.test_batch_size)
        mean_accuracy = sum(accuracies) / len(accuracies)
        curve.append({"epoch": epochs_run, "step": step, "examples": examples_seen,
                      "train_loss": epoch_loss / max(epoch_steps, 1), "mean_accuracy": mean_accuracy,
                      "accuracy": dict(zip(segment_names, accuracies))})
        if mean_accuracy >= preset.early_stop_accuracy:
            break
    if progress is not None:
        progress(total_steps - step)  # skipped steps (early stop) still count as done for the bar
    return {
        "model": config.name,
        "lr": lr,
        "accuracy": dict(zip(segment_names, accuracies)),
        "mean_accuracy": sum(accuracies) / len(accuracies),
        "steps": step,
        "epochs": epochs_run,
        "diverged": diverged,
        "final_train_loss": last_loss,
        "train_seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in model.parameters()),
        "curve": curve,
    }


def curve_gain(curve: list[dict], fraction: float = 0.25) -> float | None:
    """How much the mean test accuracy still rose over the last ``fraction`` of the run's epochs.

    The last point minus the point ``fraction`` of the epochs before it (the first point when the run
    is shorter): near 0 when the curve had flattened, clearly positive when the model was still
    learning when training stopped. None without at least two points (JSON has no NaN that
    compares equal to itself, and result rows are compared on resume).
    """
    if len(curve) < 2:
        return None
    back = max(1, round(fraction * len(curve)))
    earlier = curve[max(0, len(curve) - 1 - back)]
    return curve[-1]["mean_accuracy"] - earlier["mean_accuracy"]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill mid-write: that run is simply redone
    return records


def _append_jsonl(path: Path, record: dict) -> None:
    """Append one line, durably; an exclusive lock keeps lines whole when several workers append."""
    with path.open("ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            line = json.dumps(record) + "\n"  # key order kept: segments stay in preset order
            if handle.tell() > 0:
                with path.open("rb") as reader:
                    reader.seek(-1, os.SEEK_END)
                    if reader.read(1) != b"\n":  # a line cut short by a kill: end it, keep ours whole
                        line = "\n" + line
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _summarize(config: MQARModelConfig, preset: MQARPreset, runs: list[dict]) -> dict:
    """The result row of one model: the best learning rate by mean test accuracy (ties: the faster run)."""
    best = max(runs, key=lambda run: (run["mean_accuracy"], -run["train_seconds"]))
    train_lengths = preset.train_lengths
    in_training = [acc for s, acc in zip(preset.test_segments, best["accuracy"].values()) if s.seq_len in train_lengths]
    return {
        "model": config.name,
        "mixer": config.mixer,
        "config": config.to_dict(),
        "preset": preset.name,
        "state_bytes": state_size_bytes(config, preset.max_seq_len),
        "state_bytes_at": preset.max_seq_len,
        "accuracy": best["accuracy"],
        "mean_accuracy": best["mean_accuracy"],
        "in_training_lengths_accuracy": sum(in_training) / len(in_training) if in_training else float("nan"),
        "best_lr": best["lr"],
        "accuracy_by_lr": {str(run["lr"]): run["mean_accuracy"] for run in runs},
        "train_seconds": best["train_seconds"],
        "train_seconds_all_lrs": sum(run["train_seconds"] for run in runs),
        "epochs": best["epochs"],
        "steps": best.get("steps"),
        "parameters": best["parameters"],
        "curve": best.get("curve", []),
        "curve_gain_last_quarter": curve_gain(best.get("curve", [])),
    }


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use --device cpu")
    return device


def _select_models(preset: MQARPreset, models: list[str] | None) -> list[MQARModelConfig]:
    if not models:
        return list(preset.models)
    wanted = set(models)
    known = {c.name for c in preset.models} | {c.mixer for c in preset.models}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"unknown models {unknown} for preset {preset.name!r}; expected names or mixers among {sorted(known)}")
    return [c for c in preset.models if c.name in wanted or c.mixer in wanted]


def _prepare_directory(preset: MQARPreset, out: Path, resume: bool) -> None:
    """Refuse to mix settings in one directory; start over if asked; record the preset."""
    out.mkdir(parents=True, exist_ok=True)
    preset_path = out / "preset.json"
    if resume and preset_path.exists():
        previous = MQARPreset.from_dict(json.loads(preset_path.read_text()))
        if previous.data_dict() != preset.data_dict():
            raise ValueError(
                f"{out} holds a sweep with different data or training settings (preset {previous.name!r}); "
                "use another directory or start over (resume=False, --restart)"
            )
    if not resume:
        for name in ("runs.jsonl", "results.jsonl"):
            (out / name).unlink(missing_ok=True)
    preset_path.write_text(json.dumps(preset.to_dict(), indent=2, sort_keys=True) + "\n")


def _relative_cost(config: MQARModelConfig) -> float:
    """Rough CPU cost of one run, to start the slow ones first when several workers share the sweep."""
    per_mixer = {"mamba": 6.0 * config.d_state / 16, "rwkv": 4.0, "rwkv5": 2.0, "based_window": 2.0, "based": 1.5}
    return per_mixer.get(config.mixer, 1.0) * config.d_model / 64


def run_sweep(
    preset: MQARPreset,
    out_dir,
    *,
    models: list[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device = "auto",
    threads: int | None = 1,
    workers: int | None = None,
) -> list[dict]:
    """Run (or resume) the sweep of ``preset`` into ``out_dir``; returns the result rows of its models.

    ``models``: restrict to these model names (see ``MQARModelConfig.name``) or mixer kinds.
    ``resume=False`` starts over (existing runs.jsonl / results.jsonl are replaced).
    ``device``: "auto" = CUDA when available. ``threads``: torch CPU threads per process (these
    models are tiny: one thread avoids the synchronisation stalls of several on a busy machine);
    None leaves torch's setting alone. ``workers``: processes training different models at once;
    None = one per CPU core up to 2 on CPU (the presets are sized for 2 cores), 1 on CUDA. Results
    do not depend on it: every run is seeded.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    device = _resolve_device(device)
    if workers is None:
        workers = 1 if device.type == "cuda" else max(1, min(2, os.cpu_count() or 1))
    configs = _select_models(preset, models)
    out = Path(out_dir)
    _prepare_directory(preset, out, resume)
    if workers > 1 and len(configs) > 1:
        return _parallel_sweep(preset, out, configs, progress, device, threads, workers)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _sweep(preset, out, configs, progress, device)
    finally:
        torch.set_num_threads(previous_threads)


def _sweep_worker(preset_data: dict, out: str, model_name: str, device: str, threads: int | None) -> dict:
    """One model's learning-rate sweep in a worker process (spawned: a fresh torch)."""
    if threads is not None:
        torch.set_num_threads(threads)
    preset = MQARPreset.from_dict(preset_data)
    configs = [c for c in preset.models if c.name == model_name]
    return _sweep(preset, Path(out), configs, False, torch.device(device))[0]


def _parallel_sweep(preset, out: Path, configs, progress: bool, device, threads, workers: int) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    rows: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {
            pool.submit(_sweep_worker, preset.to_dict(), str(out), config.name, str(device), threads): config.name
            for config in sorted(configs, key=_relative_cost, reverse=True)
        }
        with tqdm(total=len(futures), disable=not progress, unit="model", dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                row = future.result()
                rows[row["model"]] = row
                bar.write(f"{row['model']}: mean acc {row['mean_accuracy']:.3f} (best lr {row['best_lr']:g}, "
                          f"{row['train_seconds_all_lrs']:.0f} s for all learning rates)")
                bar.update(1)
    return [rows[config.name] for config in configs]


def _sweep(preset: MQARPreset, out: Path, configs: list[MQARModelConfig], progress: bool, device: torch.device) -> list[dict]:
    from tqdm.auto import tqdm

    runs_path, results_path = out / "runs.jsonl", out / "results.jsonl"
    done = {(r["model"], float(r["lr"])): r for r in _read_jsonl(runs_path)}
    summarized = {r["model"]: r for r in _read_jsonl(results_path)}
    # Fixed training data is generated once for all runs; fresh data is generated per epoch inside each run.
    train_data = None if preset.fresh_train_data else generate_segments(
        preset.vocab_size, preset.train_segments, preset.train_seed, power_a=preset.power_a)
    test_data = generate_segments(preset.vocab_size, preset.test_segments, preset.test_seed, power_a=preset.power_a)
    steps_per_run = preset.epochs * preset.steps_per_epoch
    pending = [(c, lr) for c in configs for lr in preset.learning_rates if (c.name, float(lr)) not in done]
    bar = tqdm(total=steps_per_run * len(pending), disable=not progress, unit="step", dynamic_ncols=True)
    rows = []
    try:
        for config in configs:
            runs = []
            for lr in preset.learning_rates:
                key = (config.name, float(lr))
                if key in done:
                    runs.append(done[key])
                    continue
                if preset.stop_lr_sweep_when_solved and any(r["mean_accuracy"] >= preset.early_stop_accuracy for r in runs):
                    bar.update(steps_per_run)
                    continue
                bar.set_description(f"{config.name} lr={lr:g}")
                record = train_and_evaluate(config, preset, lr, train_data, test_data, progress=bar.update, device=device)
                _append_jsonl(runs_path, record)
                runs.append(record)
                if progress:
                    bar.write(f"{config.name} lr={lr:g}: mean acc {record['mean_accuracy']:.3f} "
                              f"({record['epochs']} epochs, {record['train_seconds']:.0f} s)")
            row = _summarize(config, preset, runs)
            if summarized.get(config.name) != row:
                _append_jsonl(results_path, row)
                summarized[config.name] = row
            rows.append(row)
    finally:
        bar.close()
    return rows


def run_preset(
    preset: str | MQARPreset,
    out_dir,
    *,
    resume: bool = True,
    progress: bool = True,
    models: list[str] | None = None,
    device: str | torch.device = "auto",
    threads: int | None = 1,
    workers: int | None = None,
) -> list[dict]:
    """Run the named preset (``quick``, ``cpu`` or ``paper``) into ``out_dir``, resuming by default.

    See :func:`run_sweep` for the keyword arguments.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    return run_sweep(preset, out_dir, models=models, resume=resume, progress=progress, device=device, threads=threads, workers=workers)
