"""One training loop for every linmix model: AdamW + warmup/cosine, clipping, accumulation,
autocast, torchrun (DDP / FSDP2), atomic checkpoints with exact resume, progress bar, JSONL metrics.

The caller supplies the model, a ``loss_fn(model, batch) -> (loss, metrics, n_items)`` and a batch
source whose ``get(step, micro_step, rank, world_size)`` is a pure function of its indices. Because
the data is addressed by step rather than drawn from an iterator, a run killed with SIGKILL resumes
from its last checkpoint with the same batches, the same optimizer state and the same RNG state, so
its loss curve continues exactly.

A resumed run must be the same run: :func:`check_resume_settings` compares the settings stored in the
newest checkpoint with the current ones and refuses a resume that changed any of them, except the
keys in :data:`RESUMABLE_TRAIN_KEYS` (and those a trainer adds).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Protocol

import torch
import torch.distributed as dist
from torch import nn

from linmix.training.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from linmix.training.distributed import (
    STRATEGIES,
    DistributedContext,
    all_reduce_sum,
    barrier,
    gradient_sync,
    setup_distributed,
    wrap_model,
)
from linmix.training.metrics import MetricsLog
from linmix.training.optim import build_adamw, warmup_cosine_multiplier

PRECISIONS = ("auto", "fp32", "bf16")
SETTINGS_FILE = "run_settings.json"  # in every checkpoint folder: the settings a resume must match
# Shared settings a resume may change: a longer run (max_steps; the cosine stretches from the
# resumed step on), bookkeeping (logging, checkpoints, progress bar), how the work is spread
# (threads, DDP or FSDP: checkpoints hold full state) or compiled, and where the run lives.
RESUMABLE_TRAIN_KEYS = frozenset({
    "out_dir", "max_steps", "log_every", "save_every", "eval_every", "keep_checkpoints", "progress", "resume",
    "threads", "distributed", "compile",
})


class BatchSource(Protocol):
    def get(self, step: int, micro_step: int, rank: int, world_size: int) -> Any:
        """The batch for optimizer step ``step``, accumulation micro-step ``micro_step`` on ``rank``."""


LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, float], int]"]


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    precision: str = "auto"  # auto: bf16 autocast on CUDA GPUs that support it, fp32 otherwise
    compile: bool = False
    log_every: int = 10
    save_every: int = 100
    eval_every: int = 0  # 0: no periodic evaluation
    keep_checkpoints: int = 2
    seed: int = 0
    distributed: str = "ddp"  # used only under torchrun with more than one process
    progress: bool = True
    resume: bool = True
    threads: int = 0  # torch CPU threads per process; 0: torch's default

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        positive = {"max_steps": self.max_steps, "grad_accum": self.grad_accum, "log_every": self.log_every,
                    "save_every": self.save_every, "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.threads < 0:
            raise ValueError("warmup_steps, eval_every and threads must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.distributed not in STRATEGIES:
            raise ValueError(f"distributed must be one of {STRATEGIES}, got {self.distributed!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based); the warm-up is capped at ``max_steps``
        so a short run still reaches the peak."""
        return self.lr * warmup_cosine_multiplier(
            step, warmup_steps=min(self.warmup_steps, self.max_steps), total_steps=self.max_steps,
            min_lr_ratio=self.min_lr_ratio,
        )


def adopt_schedule(train_config: "TrainConfig | None", schedule_cls: type, trainer: str):
    """``train_config`` as the trainer's schedule class (a TrainConfig subclass carrying that trainer's
    defaults); None gives those defaults. A plain TrainConfig is kept value for value, with a warning
    naming the fields where it holds the generic default and the trainer's recipe another."""
    import warnings

    if train_config is None:
        return schedule_cls()
    if isinstance(train_config, schedule_cls):
        return train_config
    if not isinstance(train_config, TrainConfig):
        raise TypeError(f"{trainer} needs a TrainConfig as train_config, got {type(train_config).__name__}")
    generic, recipe = TrainConfig(), schedule_cls()
    differing = [item.name for item in dataclasses.fields(TrainConfig) if item.name != "out_dir"
                 and getattr(train_config, item.name) == getattr(generic, item.name) != getattr(recipe, item.name)]
    if differing:
        warnings.warn(
            f"{trainer} got a plain TrainConfig whose {', '.join(differing)} keep the generic defaults, not the "
            f"recipe's; pass a {schedule_cls.__name__} (or the whole recipe) to get the recipe's defaults",
            stacklevel=4,  # the caller of train_sam / train_lm (through their recipe helper)
        )
    return schedule_cls(**train_config.to_dict())


def _flatten(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    # JSON round trip: tuples and lists compare equal, as they do once stored.
    plain = json.loads(json.dumps(settings))
    return {f"{section}.{key}": value for section, values in plain.items() for key, value in values.items()}


def _stored_settings(folder: Path) -> dict[str, Any] | None:
    """The flattened settings stored in a checkpoint folder; checkpoints written before the settings
    file existed hold only the Trainer's config (inside trainer_state.pt)."""
    path = folder / SETTINGS_FILE
    if path.is_file():
        return _flatten(json.loads(path.read_text()))
    _, trainer_state = load_checkpoint(folder)
    if "config" not in trainer_state:
        return None
    return _flatten({"train": json.loads(trainer_state["config"])})


def check_resume_settings(
    out_dir: str | Path, settings: Mapping[str, Mapping[str, Any]], *, resumable: Collection[str] = (),
) -> None:
    """Refuse to resume the run in ``out_dir`` with settings other than those it was trained with.

    ``settings`` maps section names to their values, e.g. ``{"train": TrainConfig.to_dict(), "sam":
    ...}``. Keys may differ from the newest checkpoint's only if they are in
    :data:`RESUMABLE_TRAIN_KEYS` (as ``train.KEY``, or bare for the train section) or in
    ``resumable`` (``"section.key"``, e.g. ``"lm.eval_data"``). A key the checkpoint does not record
    (added to linmix after it was written) is not compared. Nothing to resume: nothing to check.
    Raises ``ValueError`` listing each differing key with its old and new value.
    """
    folder = latest_checkpoint(out_dir)
    if folder is None:
        return
    stored = _stored_settings(folder)
    if stored is None:
        return
    allowed = {f"train.{key}" for key in RESUMABLE_TRAIN_KEYS} | set(resumable)
    current = _flatten(settings)
    changed = {key: (stored[key], value) for key, value in current.items()
               if key in stored and key not in allowed and stored[key] != value}
    if changed:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
        raise ValueError(
            f"{out_dir} holds a run with different settings ({listed}); resume with the original settings or "
            f"use a new output folder (may change on resume: {', '.join(sorted(allowed))})"
        )


def resolve_autocast(precision: str, device: torch.device):
    """The autocast context for ``precision`` on ``device`` (a null context for fp32)."""
    if precision == "fp32":
        return nullcontext()
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def move_to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(value, device) for value in batch]
        return type(batch)(moved) if isinstance(batch, list) else tuple(moved)
    return batch


@dataclass
class _Window:
    """Sums over the optimizer steps since the last log line."""

    steps: int = 0
    loss: float = 0.0
    items: float = 0.0
    grad_norm: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


class Trainer:
    """Runs ``config.max_steps`` optimizer steps of ``loss_fn`` over ``batches``.

    ``settings`` are the caller's own sections of the run's recipe (e.g. ``{"sam": {...}}``); with the
    Trainer's config as ``train`` they are stored in every checkpoint, and :meth:`fit` refuses to resume
    a run whose settings differ (see :func:`check_resume_settings`; ``resumable`` lists the caller's
    keys that may change, as ``"section.key"``).
    ``save_extra(folder)`` may write more files into each checkpoint folder (e.g. config.json, so a
    checkpoint is also a loadable model folder). ``eval_fn(model) -> dict`` runs every
    ``eval_every`` steps on every rank. ``items_name`` labels the throughput (tokens, images).
    Build the model with a fixed seed before constructing the Trainer (FSDP needs identical weights
    on every rank).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        *,
        loss_fn: LossFn,
        batches: BatchSource,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        save_extra: Callable[[Path], None] | None = None,
        items_name: str = "tokens",
        device: str | torch.device | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        resumable: Collection[str] = (),
    ):
        self.model = model
        self.config = config
        self.loss_fn = loss_fn
        self.batches = batches
        self.eval_fn = eval_fn
        self.save_extra = save_extra
        self.items_name = items_name
        self.requested_device = device
        self.out_dir = Path(config.out_dir)
        if settings and "train" in settings:
            raise ValueError("settings must not hold a 'train' section: the Trainer's config is that section")
        self.settings = {"train": config.to_dict(), **(settings or {})}
        self.resumable = tuple(resumable)

    def check_resume(self) -> None:
        """Raise if ``out_dir`` holds a checkpoint trained with other settings (see :func:`check_resume_settings`)."""
        if self.config.resume:
            check_resume_settings(self.out_dir, self.settings, resumable=self.resumable)

    def _save_settings(self, folder: Path) -> None:
        (folder / SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2) + "\n")
        if self.save_extra is not None:
            self.save_extra(folder)

    # -- state ---------------------------------------------------------------------------------

    def _state_dicts(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True))

    def _save(self, step: int, wrapped, optimizer, context: DistributedContext) -> None:
        model_state, optimizer_state = self._state_dicts(wrapped, optimizer)  # collective under FSDP
        rng = capture_rng_state()
        if context.is_distributed:
            gathered: list[Any] = [None] * context.world_size
            dist.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        if context.is_main:
            trainer_state = {
                "step": step,
                "optimizer": optimizer_state,
                "rng": rng_states,
                "world_size": context.world_size,
                "config": json.dumps(self.config.to_dict()),
            }
            save_checkpoint(
                self.out_dir, step, model_state=model_state, trainer_state=trainer_state,
                save_extra=self._save_settings, keep=self.config.keep_checkpoints,
            )
        barrier(context)

    def _resume(self, wrapped, optimizer, context: DistributedContext) -> int:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        folder = latest_checkpoint(self.out_dir) if self.config.resume else None
        if folder is None:
            return 0
        model_state, trainer_state = load_checkpoint(folder)
        set_state_dict(
            wrapped, optimizer, model_state_dict=model_state, optim_state_dict=trainer_state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        rng_states = trainer_state["rng"]
        if trainer_state.get("world_size", 1) == context.world_size:
            restore_rng_state(rng_states[context.rank])
        else:  # a different world size cannot continue every rank's stream; keep rank 0's
            restore_rng_state(rng_states[0])
        return int(trainer_state["step"])

    # -- loop ----------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        config = self.config
        self.check_resume()
        if config.threads:
            torch.set_num_threads(config.threads)
        context = setup_distributed(self.requested_device)
        torch.manual_seed(config.seed + context.rank)
        model = self.model.to(context.device)
        wrapped = wrap_model(model, context, config.distributed)
        forward_model = torch.compile(wrapped) if config.compile else wrapped
        optimizer = build_adamw(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps)
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        start_step = self._resume(wrapped, optimizer, context)
        if start_step >= config.max_steps:
            if context.is_main:
                print(f"already trained to step {start_step} (max_steps={config.max_steps}); nothing to do")
            return {"step": start_step, "resumed_from": start_step, "checkpoint": str(latest_checkpoint(self.out_dir))}
        log = MetricsLog(self.out_dir / "metrics.jsonl", resume_step=start_step if start_step else None,
                         enabled=context.is_main)
        if context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            if start_step:
                print(f"resuming from step {start_step} ({latest_checkpoint(self.out_dir)})")
        autocast = resolve_autocast(config.precision, context.device)
        bar = tqdm(total=config.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                   disable=not (config.progress and context.is_main))
        window = _Window()
        last_record: dict[str, Any] = {}
        model.train()
        for step in range(start_step, config.max_steps):
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(config.grad_accum):
                batch = move_to_device(self.batches.get(step, micro, context.rank, context.world_size), context.device)
                # Forward and backward both inside: DDP decides at forward time whether to all-reduce.
                with gradient_sync(wrapped, enabled=micro == config.grad_accum - 1):
                    with autocast:
                        loss, metrics, n_items = self.loss_fn(forward_model, batch)
                    if not torch.isfinite(loss.detach()).all():
                        raise FloatingPointError(
                            f"loss is {loss.item()} at step {step + 1} (micro-step {micro}); lower the learning "
                            f"rate (now {lr:.3g}) or check the data"
                        )
                    (loss / config.grad_accum).backward()
                window.loss += loss.item() / config.grad_accum
                window.items += n_items
                for key, value in metrics.items():
                    window.metrics[key] = window.metrics.get(key, 0.0) + float(value) / config.grad_accum
            if config.grad_clip > 0:
                norm = nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                window.grad_norm += float(norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window.steps += 1
            done = step + 1
            bar.update(1)
            will_save = done % config.save_every == 0 or done == config.max_steps
            # A checkpoint closes the log window too, so a resumed run logs the same windows.
            if done % config.log_every == 0 or will_save:
                last_record = self._log(window, done, lr, context, log, bar)
                window = _Window()
            if self.eval_fn is not None and config.eval_every and done % config.eval_every == 0:
                model.eval()
                with torch.no_grad(), autocast:
                    results = self.eval_fn(model)
                model.train()
                record = {"step": done, **{f"eval_{key}": float(value) for key, value in results.items()}}
                log.write(record)
                if context.is_main:
                    bar.write(" | ".join(f"{key} {value:.4g}" for key, value in record.items() if key != "step")
                              + f" (step {done})")
            if will_save:
                self._save(done, wrapped, optimizer, context)
        bar.close()
        return {"step": config.max_steps, "resumed_from": start_step, "last": last_record,
                "checkpoint": str(latest_checkpoint(self.out_dir))}

    def _log(self, window: _Window, step: int, lr: float, context: DistributedContext, log: MetricsLog, bar) -> dict:
        elapsed = time.perf_counter() - window.started
        sums = {"loss": window.loss, "items": window.items, "grad_norm": window.grad_norm,
                **{f"m:{key}": value for key, value in window.metrics.items()}}
        sums = all_reduce_sum(sums, context)
        ranks = context.world_size
        steps = max(1, window.steps)
        record = {
            "step": step,
            "loss": sums["loss"] / (steps * ranks),
            "lr": lr,
            f"{self.items_name}_per_s": sums["items"] / max(elapsed, 1e-9),
        }
        if self.config.grad_clip > 0:
            record["grad_norm"] = sums["grad_norm"] / (steps * ranks)
        for key, value in sums.items():
            if key.startswith("m:"):
                record[key[2:]] = value / (steps * ranks)
        log.write(record)
        if context.is_main:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            rate = record[f"{self.items_name}_per_s"]
            extra = "".join(f" | {k} {v:.4g}" for k, v in record.items()
                            if k not in ("step", "loss", "lr", f"{self.items_name}_per_s"))
            bar.write(f"step {step}/{self.config.max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                      f"{rate:,.0f} {self.items_name}/s{extra}")
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"mean loss is {record['loss']} at step {step}")
        return record
