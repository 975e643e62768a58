"""The MQAR generator against the specification (spec/BASED.md section 4), on generated batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linmix.mqar.data import (
    IGNORE_INDEX, MQARSegment, generate_epoch_segments, generate_mqar, generate_segments, per_example_accuracy, query_slot_probabilities,
)

V, L, N = 128, 64, 8


@pytest.fixture(scope="module")
def batch():
    return generate_mqar(V, L, N, 300, seed=3)


def test_shapes_and_label_layout(batch):
    inputs, labels = batch
    assert inputs.shape == labels.shape == (300, L) and inputs.dtype == labels.dtype == torch.int64
    assert ((inputs >= 0) & (inputs < V)).all()
    labelled = labels != IGNORE_INDEX
    assert (labelled.sum(dim=1) == N).all()  # exactly one query per key
    assert not labelled[:, : 2 * N].any()  # nothing asked inside the context
    # queries sit at even offsets of the query region (slot i -> offset 2 (i - 1))
    rows, positions = labelled.nonzero(as_tuple=True)
    assert ((positions - 2 * N) % 2 == 0).all()


def test_keys_and_values_distinct_and_in_their_halves(batch):
    inputs, _ = batch
    keys, values = inputs[:, 0 : 2 * N : 2], inputs[:, 1 : 2 * N : 2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((values >= V // 2) & (values < V)).all()
    for row_keys, row_values in zip(keys, values):
        assert len(set(row_keys.tolist())) == N
        assert len(set(row_values.tolist())) == N


def test_each_query_is_a_context_key_labelled_with_its_value(batch):
    inputs, labels = batch
    for row_inputs, row_labels in zip(inputs.tolist(), labels.tolist()):
        key_to_value = {row_inputs[2 * j]: row_inputs[2 * j + 1] for j in range(N)}
        queried = []
        for position in range(2 * N, L):
            if row_labels[position] != IGNORE_INDEX:
                key = row_inputs[position]
                assert key in key_to_value
                assert row_labels[position] == key_to_value[key]
                queried.append(key)
        assert sorted(queried) == sorted(key_to_value)  # every key asked exactly once


def test_noise_covers_the_vocabulary(batch):
    inputs, labels = batch
    region = inputs[:, 2 * N :][labels[:, 2 * N :] == IGNORE_INDEX]
    counts = torch.bincount(region, minlength=V).double()
    # uniform over [0, V): every token appears and no token is far off its expected share
    assert (counts > 0).all()
    assert float(counts.max() / counts.mean()) < 1.6


def test_requirements_are_enforced():
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs <= seq_len"):
        generate_mqar(128, 64, 17, 4, seed=0)
    with pytest.raises(ValueError, match="even"):
        generate_mqar(128, 63, 4, 4, seed=0)
    with pytest.raises(ValueError, match="V > L"):
        generate_mqar(64, 64, 4, 4, seed=0)
    with pytest.raises(ValueError, match="positive integer"):
        generate_mqar(128, 64, 0, 4, seed=0)


def test_query_slot_probabilities_power_law():
    p = query_slot_probabilities(64, 4, power_a=0.01)
    assert len(p) == (64 - 8) // 2 and p.sum() == pytest.approx(1.0)
    i = np.arange(1, len(p) + 1)
    # p_i / p_1 = i^(a - 1)
    np.testing.assert_allclose(p / p[0], i ** (0.01 - 1.0), rtol=1e-12)


def test_single_query_position_follows_the_power_law():
    """With N = 1 each example draws one slot, so the empirical slot histogram estimates p itself."""
    examples = 40_000
    inputs, labels = generate_mqar(64, 32, 1, examples, seed=11)
    slot = ((labels != IGNORE_INDEX).float().argmax(dim=1) - 2) // 2  # 0-based slot
    p = query_slot_probabilities(32, 1)
    counts = np.bincount(slot.numpy(), minlength=len(p))
    expected = p * examples
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    # 14 degrees of freedom: the 99.9% quantile is 36.1
    assert chi_square < 36.1, (counts, expected.round())


def test_several_queries_are_successive_weighted_draws_without_replacement():
    """For N = 2 the chance that slot 1 is among the two is p1 + sum_{i != 1} p_i p1 / (1 - p_i)."""
    examples = 40_000
    _, labels = generate_mqar(64, 24, 2, examples, seed=5)
    p = query_slot_probabilities(24, 2)
    exact = p[0] + sum(p[i] * p[0] / (1 - p[i]) for i in range(1, len(p)))
    first_slot_taken = (labels[:, 4] != IGNORE_INDEX).double().mean().item()
    standard_error = (exact * (1 - exact) / examples) ** 0.5
    assert abs(first_slot_taken - exact) < 4 * standard_error


def test_seeded_and_segments_independent():
    a = generate_mqar(V, L, N, 20, seed=7)
    b = generate_mqar(V, L, N, 20, seed=7)
    c = generate_mqar(V, L, N, 20, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    segments = [MQARSegment(32, 4, 10), MQARSegment(32, 4, 10)]
    train = generate_segments(V, segments, seed=0)
    test = generate_segments(V, segments, seed=1)
    assert not torch.equal(train[0][0], train[1][0])  # two segments of one split differ
    assert not torch.equal(train[0][0], test[0][0])  # train and test seeds give different examples
    assert torch.equal(generate_segments(V, segments, seed=0)[1][0], train[1][0])


def test_chunked_generation_is_deterministic_across_chunks():
    """More examples than one internal chunk: still distinct keys and correct labels everywhere."""
    inputs, labels = generate_mqar(1024, 16, 4, 5000, seed=2)
    keys = inputs[:, 0:8:2]
    assert (keys.sort(dim=1).values.diff(dim=1) > 0).all()
    values = inputs[:, 1:8:2]
    position = labels != IGNORE_INDEX
    for row in (0, 2047, 2048, 4999):
        mapping = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert all(mapping[k] == v for k, v in zip(inputs[row][position[row]].tolist(), labels[row][position[row]].tolist()))


def test_per_example_accuracy_hand_computed():
    labels = torch.tensor([[-100, 5, -100, 6], [7, -100, -100, -100]])
    predictions = torch.tensor([[1, 5, 2, 9], [7, 0, 0, 0]])
    torch.testing.assert_close(per_example_accuracy(predictions, labels), torch.tensor([0.5, 1.0], dtype=torch.float64))


def test_fresh_epoch_data_is_a_pure_function_of_seed_and_epoch_and_new_every_epoch():
    segments = [MQARSegment(32, 4, 40), MQARSegment(64, 8, 20)]
    epoch_0 = generate_epoch_segments(V, segments, seed=5, epoch=0)
    again = generate_epoch_segments(V, segments, seed=5, epoch=0)
    epoch_1 = generate_epoch_segments(V, segments, seed=5, epoch=1)
    other_seed = generate_epoch_segments(V, segments, seed=6, epoch=0)
    fixed = generate_segments(V, segments, seed=5)  # the fixed-data / test-set streams
    for index, segment in enumerate(segments):
        inputs, labels = epoch_0[index]
        assert inputs.shape == (segment.num_examples, segment.seq_len)
        assert ((labels != IGNORE_INDEX).sum(dim=1) == segment.num_kv_pairs).all()  # the same generator's examples
        assert torch.equal(inputs, again[index][0]) and torch.equal(labels, again[index][1])
        for different in (epoch_1, other_seed, fixed):
            # no example of epoch 0 recurs (as a whole sequence) in another epoch, seed or the fixed stream
            rows = {tuple(row) for row in inputs.tolist()}
            assert not rows & {tuple(row) for row in different[index][0].tolist()}
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        generate_epoch_segments(V, segments, seed=5, epoch=-1)
