"""Text generation: parallel prefill of the prompt, then one recurrent step per new token.

Fixed-state mixers (linear attention, BaseConv, sliding window, Mamba, RWKV) decode in constant
memory: the state after 1024 new tokens has exactly the bytes it had after 16. Batched prompts of
different lengths are left-padded and passed with ``attention_mask``; padded tokens never enter a
state, so every row generates what it would generate alone.
"""

from __future__ import annotations

import torch


def _check_left_padded(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    mask = attention_mask.to(torch.bool)
    if input_ids.shape[1] and not bool(mask[:, -1].all()):
        raise ValueError("attention_mask must be left-padded: the last position of every row must be a real token")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("attention_mask must be left-padded: zeros (padding) first, then ones (the prompt) in each row")
    return mask


def sample_next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy; top_k / top_p filter before sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked before it already hold top_p of the mass
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probabilities = scores.softmax(-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def prefill(model, input_ids: torch.Tensor, mask: torch.Tensor | None, chunk_size: int | None):
    """Run the prompt through the parallel forward (in chunks when ``chunk_size`` is set) and
    return (last-position logits [B, V], state)."""
    length = input_ids.shape[1]
    step = length if chunk_size is None else chunk_size
    state = None
    for start in range(0, length, step):
        chunk_mask = None if mask is None else mask[:, start : start + step]
        out = model(input_ids[:, start : start + step], attention_mask=chunk_mask, state=state,
                    return_state=True, logits_to_keep=1)
        state = out.state
    return out.logits[:, -1], state


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             pad_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, return_scores: bool = False,
             prefill_chunk_size: int | None = 2048):
    """Generate up to ``max_new_tokens`` after ``input_ids [B, T]``; returns ``[B, T + n]`` ids
    (and, with ``return_scores``, the list of per-step logits ``[B, V]``).

    ``temperature`` 0 means greedy. Rows that emit ``eos_token_id`` are padded with ``pad_token_id``
    (default: the eos id) afterwards; generation stops when every row is done.
    ``prefill_chunk_size`` feeds a long prompt through the parallel forward that many tokens at a
    time, carrying the state, so prefill activations stay bounded (None: the whole prompt at once).
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, T] with T >= 1 (a prompt per row), got {tuple(input_ids.shape)}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    mask = None if attention_mask is None else _check_left_padded(attention_mask, input_ids)
    if prefill_chunk_size is not None and (isinstance(prefill_chunk_size, bool) or not isinstance(prefill_chunk_size, int)
                                           or prefill_chunk_size <= 0):
        raise ValueError(f"prefill_chunk_size must be a positive integer or None, got {prefill_chunk_size!r}")
    was_training = model.training
    model.eval()
    try:
        logits, state = prefill(model, input_ids, mask, prefill_chunk_size)
        fill = pad_token_id if pad_token_id is not None else eos_token_id
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens, scores = [], []
        for index in range(max_new_tokens):
            if return_scores:
                scores.append(logits)
            token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, fill), token)
                finished |= token == eos_token_id
            new_tokens.append(token)
            if index == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            logits, state = model.step(token, state)
    finally:
        model.train(was_training)
    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids
    return (sequences, scores) if return_scores else sequences
