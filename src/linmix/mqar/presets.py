"""Named MQAR study configurations: ``paper`` (the full protocol), ``cpu`` and ``quick`` (reduced).

A preset fixes the data (vocabulary, train and test segments, seeds), the training protocol (epochs,
batch sizes, learning-rate sweep, early stop) and the list of models. See docs/mqar.md for how
the reduced presets depart from the paper and what that changes.
"""

from __future__ import annotations

import dataclasses
import json
import math

from linmix.mqar.data import MQARSegment
from linmix.mqar.models import MQARModelConfig

__all__ = ["MQARPreset", "PRESETS", "get_preset"]


@dataclasses.dataclass
class MQARPreset:
    """Everything one sweep needs besides the output directory.

    ``learning_rates`` are tried in order. ``stop_lr_sweep_when_solved``: once one of them reaches
    ``early_stop_accuracy`` (mean test accuracy), the remaining ones are skipped for that model, since
    they could at best tie (the reduced presets use it to save time; ``paper`` runs them all).

    ``fresh_train_data``: every epoch trains on its own newly generated examples
    (:func:`linmix.mqar.data.generate_epoch_segments`, a pure function of ``(train_seed, epoch)``),
    so no example is seen twice and a small model cannot memorise the training set; an "epoch" is
    then ``train_segments``' worth of examples and the unit of the accuracy curve (the test
    segments are evaluated after each). False: the same ``train_segments`` examples every epoch (the
    paper's fixed 180k-example training set).
    """

    name: str
    vocab_size: int
    train_segments: list[MQARSegment]
    test_segments: list[MQARSegment]
    models: list[MQARModelConfig]
    epochs: int
    learning_rates: list[float]
    train_batch_size: int
    test_batch_size: int
    weight_decay: float = 0.1
    early_stop_accuracy: float = 0.99
    train_seed: int = 0
    test_seed: int = 1
    model_seed: int = 0
    stop_lr_sweep_when_solved: bool = False
    power_a: float = 0.01
    fresh_train_data: bool = False

    def __post_init__(self) -> None:
        self.train_segments = [s if isinstance(s, MQARSegment) else MQARSegment.from_dict(s) for s in self.train_segments]
        self.test_segments = [s if isinstance(s, MQARSegment) else MQARSegment.from_dict(s) for s in self.test_segments]
        self.models = [m if isinstance(m, MQARModelConfig) else MQARModelConfig.from_dict(m) for m in self.models]
        if not self.train_segments or not self.test_segments:
            raise ValueError("a preset needs at least one train and one test segment")
        if not self.models:
            raise ValueError("a preset needs at least one model")
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(f"learning_rates must be a non-empty list of positive numbers, got {self.learning_rates}")
        if self.train_seed == self.test_seed:
            raise ValueError("train_seed and test_seed must differ (test examples must be new)")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate models in preset {self.name!r}: {duplicates}")

    @property
    def max_seq_len(self) -> int:
        return max(s.seq_len for s in self.train_segments + self.test_segments)

    @property
    def steps_per_epoch(self) -> int:
        return sum(math.ceil(s.num_examples / self.train_batch_size) for s in self.train_segments)

    @property
    def train_lengths(self) -> set[int]:
        return {s.seq_len for s in self.train_segments}

    def data_dict(self) -> dict:
        """The fields that determine one (model, learning rate) run's result: runs are comparable
        (and a directory resumable) only when these agree. The model list, the name and which
        learning rates are swept do not change any single run, so they are left out."""
        data = dataclasses.asdict(self)
        for name in ("models", "name", "learning_rates", "stop_lr_sweep_when_solved"):
            data.pop(name)
        return data

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MQARPreset":
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _segments(pairs: list[tuple[int, int, int]]) -> list[MQARSegment]:
    return [MQARSegment(seq_len, kv, n) for seq_len, kv, n in pairs]


def _paper() -> MQARPreset:
    models = []
    for d in (48, 64, 128):
        for f in (8, 16, 24):
            models.append(MQARModelConfig("based", d, feature_dim=f))
            models.append(MQARModelConfig("based_window", d, feature_dim=f, window=64))
    models += [MQARModelConfig("attention", d) for d in (64, 128)]
    models += [MQARModelConfig("sliding_window", 128, window=w) for w in (8, 16, 32, 64, 128, 256, 512, 1024)]
    models += [MQARModelConfig("mamba", d, d_state=n) for d in (64, 128, 256) for n in (8, 16, 24)]
    models += [MQARModelConfig("base_conv", d) for d in (64, 128, 256)]
    models += [MQARModelConfig("rwkv", d) for d in (64, 128, 256)]
    models += [MQARModelConfig("rwkv5", d, num_heads=h) for d in (64, 128, 256) for h in (1, 4)]
    return MQARPreset(
        name="paper",
        vocab_size=8192,
        train_segments=_segments([(64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000)]),
        test_segments=_segments([(64, 4, 1000), (64, 8, 1000), (64, 16, 1000), (128, 32, 1000), (256, 64, 1000), (512, 128, 1000), (1024, 256, 1000)]),
        models=models,
        epochs=32,
        learning_rates=[1e-3, 3.16e-3, 1e-2, 3.16e-2],
        train_batch_size=256,
        test_batch_size=32,
    )


# The cpu preset's budget: 3 learning rates x 13 models x 14 epochs of 158 steps, on fresh examples.
# Estimated with linmix.mqar.budget (single-thread step and evaluation times of every model, added
# up over learning rates and epochs; early stops only shorten it): 66 CPU-minutes, 33 min of wall
# time with 2 workers on free cores, 43 min with a 1.3x allowance for a shared machine; the slowest
# model, Mamba d64 n16, takes a third of the total in one worker.
CPU_LEARNING_RATES = [1e-3, 3e-3, 1e-2]
CPU_EPOCHS = 14


def _cpu() -> MQARPreset:
    """The reduced study (see docs/mqar.md): V = 512, lengths up to 256, 5k fresh examples an epoch,
    14 epochs (2,212 steps), learning rates 1e-3, 3e-3 and 1e-2 for every model, the best reported."""
    models = [MQARModelConfig("attention", 64)]
    models += [MQARModelConfig("based", d, feature_dim=f) for d, f in ((32, 8), (64, 8), (64, 16))]
    models += [MQARModelConfig("based_window", 64, feature_dim=8, window=16)]
    models += [MQARModelConfig("sliding_window", 64, window=w) for w in (8, 32, 128)]
    models += [MQARModelConfig("mamba", 64, d_state=n) for n in (8, 16)]
    # One RWKV-4 and one RWKV-5 (d 128 RWKV-4 and 2-head RWKV-5 cost 0.25 s a step between them, a
    # third of the sweep, for points the others already place): the budget goes to more steps instead.
    models += [MQARModelConfig("rwkv", 64), MQARModelConfig("rwkv5", 64, num_heads=4)]
    models += [MQARModelConfig("base_conv", 64)]
    return MQARPreset(
        name="cpu",
        vocab_size=512,
        train_segments=_segments([(64, 4, 2000), (64, 8, 2000), (128, 16, 1000)]),
        test_segments=_segments([(64, 4, 200), (64, 8, 200), (64, 16, 200), (128, 32, 200), (256, 64, 200)]),
        models=models,
        epochs=CPU_EPOCHS,
        learning_rates=list(CPU_LEARNING_RATES),
        train_batch_size=32,
        test_batch_size=50,
        stop_lr_sweep_when_solved=True,
        fresh_train_data=True,
    )


def _quick() -> MQARPreset:
    """A few minutes on 2 cores: four mixers at d = 64, length 64, fresh examples every epoch, two
    learning rates (the second only for models the first did not solve)."""
    models = [
        MQARModelConfig("attention", 64),
        MQARModelConfig("based", 64, feature_dim=16),
        MQARModelConfig("sliding_window", 64, window=16),
        MQARModelConfig("mamba", 64, d_state=8),
    ]
    return MQARPreset(
        name="quick",
        vocab_size=256,
        train_segments=_segments([(64, 4, 1500), (64, 8, 1500)]),
        test_segments=_segments([(64, 4, 200), (64, 8, 200), (64, 16, 200)]),
        models=models,
        epochs=6,
        learning_rates=[3e-3, 1e-2],
        train_batch_size=32,
        test_batch_size=50,
        stop_lr_sweep_when_solved=True,
        fresh_train_data=True,
    )


PRESETS = {"paper": _paper, "cpu": _cpu, "quick": _quick}


def get_preset(name: str) -> MQARPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown MQAR preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]()
