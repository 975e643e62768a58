"""Sliding-window attention prefill through PyTorch's FlexAttention with a block-sparse band mask.

The GPU path of :func:`linmix.ops.sliding_window_attention` (``backend="flex"``, chosen by
``"auto"`` for CUDA tensors). The block mask is built analytically from the band: for each block of
queries only the key blocks that meet the band are listed (the blocks wholly inside it as "full",
so the kernel skips the mask there), so its metadata is ``O(T / block * (window / block + 2))``
integers and nothing of size ``T x T`` (not even a bool mask) is ever built. On CUDA the
attention runs through ``torch.compile(flex_attention)`` (a fused Triton kernel); on CPU the
uncompiled FlexAttention is used, which materialises scores and serves only to test the path.

Layout as the op: ``q [B, T, H, D]`` and the keys/values ``[B, context + T, H, D]``, whose first
``context`` entries precede the chunk (cached keys or invalid padding). Query ``t`` sees the keys
``t .. t + context`` of that list (itself at ``context + t`` and the ``context`` keys before it)
whose ``keys_valid`` flag is set; a query that sees none returns zeros, as the reference does.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 128  # FlexAttention's default tile; also the granularity of the block mask


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def band_block_lists(query_length: int, key_length: int, context: int, block: int, key_block_valid: torch.Tensor,
                     key_block_any_valid: torch.Tensor | None = None):
    """Key blocks each query block must visit for the band ``key - query in [0, context]``.

    ``key_block_valid [Nk]`` bool: every key of that block is valid in every batch row;
    ``key_block_any_valid [Nk]``: some key of it is valid in some row (blocks of padding alone are
    skipped; None: all blocks count).
    Returns ``(partial_counts [Nq], partial_indices [Nq, Nk], full_counts [Nq], full_indices [Nq, Nk])``
    (int32; a row lists at most the band's width in blocks, the rest is padding). A visited block is "full" (no mask evaluated) when every
    (query, key) pair in it lies inside the band and all its keys are valid; the others are partial.
    """
    query_blocks = -(-query_length // block)
    key_blocks = -(-key_length // block)
    query_block = torch.arange(query_blocks)
    first_row = query_block * block
    last_row = torch.clamp((query_block + 1) * block, max=query_length) - 1
    first_key_block = first_row // block  # the band starts at key index = query index
    last_key_block = torch.clamp((last_row + context) // block, max=key_blocks - 1)
    width = int((last_key_block - first_key_block).max()) + 1
    candidate = first_key_block[:, None] + torch.arange(width)[None, :]  # [Nq, M]
    visited = candidate <= last_key_block[:, None]
    candidate = candidate.clamp(max=key_blocks - 1)
    if key_block_any_valid is not None:
        visited = visited & key_block_any_valid.cpu()[candidate]
    key_first = candidate * block
    key_last = torch.clamp((candidate + 1) * block, max=key_length) - 1
    in_band = (key_first >= last_row[:, None]) & (key_last <= first_row[:, None] + context)
    # Ragged edge blocks (past T or the key length) always stay masked.
    whole = ((candidate + 1) * block <= key_length) & (((query_block + 1) * block <= query_length)[:, None])
    full = visited & in_band & whole & key_block_valid.cpu()[candidate]
    partial = visited & ~full

    def pack(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = selected.sum(dim=1).to(torch.int32)
        # The selected blocks first (in order); entries past a row's count are never read. Rows are
        # padded to Nk entries: BlockMask derives the query-block lists (for backward) from that width.
        order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)
        indices = torch.gather(candidate, 1, order).to(torch.int32)
        return counts, torch.nn.functional.pad(indices, (0, key_blocks - indices.shape[1]))

    return (*pack(partial), *pack(full))


def band_block_mask(query_length: int, key_length: int, context: int, keys_valid: torch.Tensor, device):
    """The FlexAttention BlockMask of the band (see :func:`flex_banded_attention`), block lists built
    analytically by :func:`band_block_lists`; keys_valid: [B or 1, key_length] bool."""
    from torch.nn.attention.flex_attention import BlockMask

    valid = keys_valid.to(device)
    shared = valid.shape[0] == 1

    def band_mask(b, h, query_index, key_index):
        in_band = (key_index >= query_index) & (key_index <= query_index + context)
        return in_band & (valid[0, key_index] if shared else valid[b, key_index])

    key_blocks = -(-key_length // BLOCK)
    padded = torch.nn.functional.pad(valid.all(dim=0), (0, key_blocks * BLOCK - key_length), value=True)
    key_block_valid = padded.view(key_blocks, BLOCK).all(dim=1)
    padded_any = torch.nn.functional.pad(valid.any(dim=0), (0, key_blocks * BLOCK - key_length), value=False)
    key_block_any_valid = padded_any.view(key_blocks, BLOCK).any(dim=1)
    counts, indices, full_counts, full_indices = band_block_lists(query_length, key_length, context, BLOCK, key_block_valid,
                                                                  key_block_any_valid)
    return BlockMask.from_kv_blocks(
        counts[None, None].to(device), indices[None, None].to(device),
        full_counts[None, None].to(device), full_indices[None, None].to(device),
        BLOCK_SIZE=BLOCK, mask_mod=band_mask, seq_lengths=(query_length, key_length),
    )


def flex_banded_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    keys_valid: torch.Tensor,
    context: int,
    scale: float,
) -> torch.Tensor:
    """q [B, T, H, D]; keys, values [B, context + T, H, D]; keys_valid [B or 1, context + T] bool.

    Returns [B, T, H, D] in q's dtype.
    """
    block_mask = band_block_mask(q.shape[1], keys.shape[1], context, keys_valid, q.device)
    attend = _compiled_flex_attention() if q.is_cuda else _flex_attention()
    out = attend(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)
