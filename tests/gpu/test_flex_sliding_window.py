"""Sliding-window prefill through FlexAttention (the CUDA path) equals the reference.

On CPU FlexAttention runs uncompiled (it evaluates the mask densely), so the block lists that make
the GPU kernel block-sparse are checked on their own: every allowed (query, key) pair lies in a
listed block, and every block listed as full holds only allowed pairs.
"""

import warnings

import pytest
import torch

from helpers import TOLERANCE, assert_close_rms
from linmix.ops import sliding_window_attention, sliding_window_attention_reference

pytest.importorskip("torch.nn.attention.flex_attention")
from linmix.ops.flex_sliding_window import band_block_lists  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def _qkv(batch, length, heads, dim, dtype=torch.float32):
    return (torch.randn(batch, length, heads, dim, device=DEVICE).to(dtype) for _ in range(3))


@pytest.mark.parametrize("batch, length, window", [(2, 140, 40), (1, 33, 50)])
def test_flex_equals_reference(batch, length, window):
    q, k, v = _qkv(batch, length, 2, 16)
    expected = sliding_window_attention_reference(q, k, v, window=window)
    assert_close_rms(sliding_window_attention(q, k, v, window=window, backend="flex"), expected, TOLERANCE[torch.float32])


def test_flex_with_left_padding_and_empty_rows():
    q, k, v = _qkv(2, 100, 2, 16)
    mask = torch.ones(2, 100, dtype=torch.bool, device=DEVICE)
    mask[0, :45] = False  # left padding: those queries see no key and must return zeros
    out = sliding_window_attention(q, k, v, window=32, key_padding_mask=mask, backend="flex")
    expected = sliding_window_attention_reference(q, k, v, window=32, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert_close_rms(out, expected, TOLERANCE[torch.float32])


def test_flex_continues_from_a_cache():
    q, k, v = _qkv(1, 150, 2, 16)
    _, cache = sliding_window_attention(q[:, :90], k[:, :90], v[:, :90], window=50, return_cache=True, backend="torch")
    out, new_cache = sliding_window_attention(q[:, 90:], k[:, 90:], v[:, 90:], window=50, cache=cache, return_cache=True, backend="flex")
    assert_close_rms(out, sliding_window_attention_reference(q, k, v, window=50)[:, 90:], TOLERANCE[torch.float32])
    assert new_cache.seen == 150


def test_flex_bf16():
    q, k, v = _qkv(1, 70, 2, 16, torch.bfloat16)
    out = sliding_window_attention(q, k, v, window=64, backend="flex")
    assert out.dtype == torch.bfloat16
    assert_close_rms(out, sliding_window_attention_reference(q.double(), k.double(), v.double(), window=64), TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("length, context, block", [(1000, 300, 128), (257, 0, 64), (64, 64, 16), (300, 5, 32)])
@pytest.mark.parametrize("invalid_prefix", [0, 70])
def test_band_block_lists_cover_the_band(length, context, block, invalid_prefix):
    key_length = length + context
    key_valid = torch.arange(key_length) >= invalid_prefix
    key_blocks = -(-key_length // block)
    padded = torch.nn.functional.pad(key_valid, (0, key_blocks * block - key_length), value=True)
    counts, indices, full_counts, full_indices = band_block_lists(length, key_length, context, block, padded.view(key_blocks, block).all(1))
    query = torch.arange(length)[:, None]
    key = torch.arange(key_length)[None, :]
    allowed = (key >= query) & (key <= query + context) & key_valid[None, :]
    listed = torch.zeros(-(-length // block), key_blocks, dtype=torch.bool)
    for row in range(listed.shape[0]):
        for index in indices[row, : counts[row]].tolist():
            listed[row, index] = True
        for index in full_indices[row, : full_counts[row]].tolist():
            assert not listed[row, index], "a block listed both partial and full"
            listed[row, index] = True
            tile = allowed[row * block:(row + 1) * block, index * block:(index + 1) * block]
            assert tile.all(), f"block ({row}, {index}) listed full but holds masked pairs"
    covered = listed.repeat_interleave(block, 0).repeat_interleave(block, 1)[:length, :key_length]
    assert not (allowed & ~covered).any(), "an allowed pair lies in no listed block"
    # Block-sparse: each query block visits at most the band's width in blocks (+2 for alignment).
    assert int((counts + full_counts).max()) <= context // block + 2


@pytest.mark.parametrize("length, context, pad", [(700, 200, 0), (650, 100, 300), (130, 5, 0)])
def test_block_mask_as_flex_reads_it(length, context, pad):
    """The BlockMask that FlexAttention receives: its dense block map (partial | full) covers every
    allowed pair and stays inside the band; the query-block lists it derives for the backward pass
    agree with the key-block lists (no block index lost to the row width)."""
    from linmix.ops.flex_sliding_window import BLOCK, band_block_mask

    key_length = length + context
    valid = (torch.arange(key_length) >= pad)[None]
    block_mask = band_block_mask(length, key_length, context, valid, "cpu")
    dense = block_mask.to_dense()[0, 0].bool()  # [Nq, Nk]
    query = torch.arange(length)[:, None]
    key = torch.arange(key_length)[None, :]
    allowed = (key >= query) & (key <= query + context) & valid
    rows, columns = -(-length // BLOCK), -(-key_length // BLOCK)
    padded = torch.zeros(rows * BLOCK, columns * BLOCK, dtype=torch.bool)
    padded[:length, :key_length] = allowed
    needed = padded.view(rows, BLOCK, columns, BLOCK).any(dim=3).any(dim=1)
    assert torch.equal(dense, needed)
    transposed = torch.zeros_like(dense)
    q_counts, q_indices = block_mask.q_num_blocks[0, 0], block_mask.q_indices[0, 0]
    full_q_counts, full_q_indices = block_mask.full_q_num_blocks[0, 0], block_mask.full_q_indices[0, 0]
    for column in range(columns):
        for row in q_indices[column, : q_counts[column]].tolist() + full_q_indices[column, : full_q_counts[column]].tolist():
            transposed[row, column] = True
    assert torch.equal(transposed, dense)
