"""The MQAR (multi-query associative recall) data generator, as specified in spec/BASED.md section 4.

One example of length L with N key-value pairs over a vocabulary of V tokens::

    inputs:  k1 v1 k2 v2 ... kN vN | q-region of L - 2N tokens
    labels:  -100 everywhere except at the N query positions, where the label is the value

- keys are N distinct tokens from ``[1, V/2)``, values N distinct tokens from ``[V/2, V)``
  (distinct as in the official generator), so a key never collides with a value;
- the query region has ``(L - 2N) / 2`` slots; N distinct slots are drawn with probability
  proportional to ``i^(power_a - 1)`` for slot ``i = 1, 2, ...`` (queries cluster near the
  context); key j goes to offset ``2 * (slot_j - 1)`` of the region, and the label at that same
  position is v_j (the model predicts the value as the next token after seeing the key);
- every other query-region token is noise, uniform over ``[0, V)``.

Requires L even, V > L and 4N <= L. Generation is a pure function of its seed (numpy's PCG64).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX", "MQARSegment", "generate_epoch_segments", "generate_mqar", "generate_segments", "query_slot_probabilities",
    "per_example_accuracy",
]

IGNORE_INDEX = -100  # label of every position that is not a query
DEFAULT_POWER_A = 0.01
_CHUNK = 2048  # examples drawn at once: bounds the [chunk, V/2] random matrix for distinct keys


@dataclasses.dataclass(frozen=True)
class MQARSegment:
    """``num_examples`` examples of length ``seq_len`` with ``num_kv_pairs`` key-value pairs each."""

    seq_len: int
    num_kv_pairs: int
    num_examples: int

    @property
    def name(self) -> str:
        return f"L{self.seq_len}_N{self.num_kv_pairs}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MQARSegment":
        return cls(**{f.name: int(data[f.name]) for f in dataclasses.fields(cls)})


def _check_arguments(vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, power_a: float) -> None:
    for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs), ("num_examples", num_examples)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (key-value pairs and query slots are 2 tokens), got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size must exceed seq_len (V > L), got V={vocab_size}, L={seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"need 4 * num_kv_pairs <= seq_len (room for the context and the queries), got N={num_kv_pairs}, L={seq_len}")
    if not 0.0 < power_a <= 1.0:
        raise ValueError(f"power_a must lie in (0, 1], got {power_a}")


def query_slot_probabilities(seq_len: int, num_kv_pairs: int, power_a: float = DEFAULT_POWER_A) -> np.ndarray:
    """p[i - 1] proportional to i^(power_a - 1) over the (L - 2N) / 2 query slots i = 1, 2, ... (sums to 1)."""
    slots = (seq_len - 2 * num_kv_pairs) // 2
    weights = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
    return weights / weights.sum()


def _distinct_draws(rng: np.random.Generator, rows: int, count: int, population: int, log_weights: np.ndarray | None = None) -> np.ndarray:
    """[rows, count] distinct indices in [0, population) per row, drawn without replacement.

    Uniform, or with weights: the Gumbel-top-k trick, which is exactly successive weighted draws
    without replacement (what numpy's ``choice(replace=False, p=...)`` does), vectorised.
    """
    scores = rng.random((rows, population))
    if log_weights is not None:
        scores = log_weights[None, :] - np.log(-np.log(np.clip(scores, 1e-300, None)))
    return np.argpartition(-scores, count - 1, axis=1)[:, :count] if count < population else np.argsort(-scores, axis=1)


def generate_mqar(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    seed: int,
    *,
    power_a: float = DEFAULT_POWER_A,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MQAR examples.

    Returns ``inputs, labels``: int64 ``[num_examples, seq_len]``. ``labels[b, t]`` is the value the
    model must predict after reading ``inputs[b, t]`` (a query key), -100 elsewhere.
    """
    _check_arguments(vocab_size, seq_len, num_kv_pairs, num_examples, power_a)
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    context = 2 * num_kv_pairs
    log_p = np.log(query_slot_probabilities(seq_len, num_kv_pairs, power_a))
    inputs = np.empty((num_examples, seq_len), dtype=np.int64)
    labels = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int64)
    for start in range(0, num_examples, _CHUNK):
        rows = min(_CHUNK, num_examples - start)
        keys = 1 + _distinct_draws(rng, rows, num_kv_pairs, half - 1)
        values = half + _distinct_draws(rng, rows, num_kv_pairs, vocab_size - half)
        slots = _distinct_draws(rng, rows, num_kv_pairs, len(log_p), log_p)  # 0-based slot index
        block = rng.integers(0, vocab_size, size=(rows, seq_len))  # noise everywhere, then overwrite
        block[:, 0:context:2] = keys
        block[:, 1:context:2] = values
        query_positions = context + 2 * slots
        np.put_along_axis(block, query_positions, keys, axis=1)
        inputs[start : start + rows] = block
        np.put_along_axis(labels[start : start + rows], query_positions, values, axis=1)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def generate_segments(vocab_size: int, segments: list[MQARSegment], seed: int, *, power_a: float = DEFAULT_POWER_A) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (inputs, labels) pair per segment; segment i is seeded by (seed, i) so segments are independent."""
    return [
        generate_mqar(vocab_size, s.seq_len, s.num_kv_pairs, s.num_examples, seed=int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), power_a=power_a)
        for i, s in enumerate(segments)
    ]


def generate_epoch_segments(
    vocab_size: int, segments: list[MQARSegment], seed: int, epoch: int, *, power_a: float = DEFAULT_POWER_A
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch ``epoch``'s own fresh training examples: one (inputs, labels) pair per segment.

    A pure function of (seed, epoch, segment index): a resumed or repeated run sees exactly the same
    examples, while every epoch sees new ones (no example is shown twice, so nothing can be
    memorised). The streams are SeedSequence spawn keys ``(epoch, i)`` under ``seed``, disjoint from
    :func:`generate_segments`' streams ``[seed, i]`` (which the test sets use).
    """
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    return [
        generate_mqar(vocab_size, s.seq_len, s.num_kv_pairs, s.num_examples,
                      seed=int(np.random.SeedSequence(seed, spawn_key=(int(epoch), i)).generate_state(1)[0]), power_a=power_a)
        for i, s in enumerate(segments)
    ]


def per_example_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """predictions, labels [B, T] -> [B]: per example, the fraction of labelled positions predicted right."""
    labelled = labels != IGNORE_INDEX
    correct = (predictions == labels) & labelled
    return correct.sum(dim=1).double() / labelled.sum(dim=1).clamp_min(1).double()
