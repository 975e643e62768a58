"""CUDA-graph decoding: the whole BASED decode step (every layer, the logits and the greedy pick)
recorded once as a CUDA graph and replayed for each new token.

At small batch a decode step of a 1.3B model is hundreds of small kernel launches; replaying a graph
removes the CPU launch cost, which is most of the step's time at batch 1. A graph replays fixed
kernels on fixed buffers, so the step must not depend on Python numbers that change per token:
:class:`StaticDecodeStep` is ``model.step`` with the token position held in a device tensor (the
sliding-window layers take their rotary angle and ring-buffer slot from it) and every state updated in
place. The linear-attention layers run the fused Triton step on CUDA (:mod:`linmix.ops.triton`).

:class:`GraphedGreedyDecoder` captures that step (CUDA) or runs it eagerly (CPU, or
``use_cuda_graph=False``), and :func:`generate_greedy` is prefill + graphed greedy decode, equal to
``model.generate(..., temperature=0)`` token for token.
"""

from __future__ import annotations

import torch

from linmix.lm.generation import prefill
from linmix.ops.rotary import apply_rotary, rotary_cos_sin
from linmix.ops.sliding_window import SlidingWindowCache

# Mixers whose step is position-free and updates its state in place (sliding window is handled here).
_IN_PLACE_MIXERS = ("linear_attention", "base_conv")
SUPPORTED_MIXERS = (*_IN_PLACE_MIXERS, "sliding_window")


def _sliding_window_step(layer, x_t: torch.Tensor, cache: SlidingWindowCache, position: torch.Tensor) -> torch.Tensor:
    """:meth:`SlidingWindowAttention.step` with the position as a 0-dim device tensor.

    x_t: [B, d_model] -> [B, d_model]. Writes k, v into ring slot ``position % window`` in place;
    leaves ``cache.seen`` to the caller. Same arithmetic as
    :func:`linmix.ops.sliding_window_attention_step`.
    """
    batch = x_t.shape[0]
    heads, head_dim = layer.num_heads, layer.head_dim
    q, k, v = layer.Wqkv(x_t).view(batch, 1, 3, heads, head_dim).unbind(dim=2)  # [B, 1, H, D]
    if layer.rotary_dim:
        cos, sin = rotary_cos_sin(position.view(1), layer.rotary_dim, layer.rotary_base)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = head_dim ** -0.5
    qc = q.to(compute)
    cached = torch.einsum("bhd,bwhd->bhw", qc, cache.k.to(compute)) * scale
    cached = cached.masked_fill(~cache.valid[:, None, :], float("-inf"))
    own = (qc * k.to(compute)).sum(-1, keepdim=True) * scale
    scores = torch.cat([cached, own], dim=-1)  # [B, H, window + 1]; the own key is always valid
    weights = torch.softmax(scores, dim=-1)
    y = torch.einsum("bhw,bwhd->bhd", weights[..., :-1], cache.v.to(compute)) + weights[..., -1:] * v.to(compute)
    slot = torch.remainder(position, cache.window).view(1)
    cache.k.index_copy_(1, slot, k[:, None].to(cache.k.dtype))
    cache.v.index_copy_(1, slot, v[:, None].to(cache.v.dtype))
    cache.valid.index_fill_(1, slot, True)
    return layer.out_proj(y.to(q.dtype).reshape(batch, layer.d_model))


class StaticDecodeStep:
    """``model.step`` for graph capture: no host synchronisation, no per-token Python state.

    ``state`` (an :class:`~linmix.lm.model.LMState` after prefill) is updated in place; its host-side
    counters (``state.seen`` and each sliding-window cache's ``seen``) are brought up to date by
    :meth:`sync_host_counters`. Supported mixers: ``SUPPORTED_MIXERS``.
    """

    def __init__(self, model, state):
        layers = model.transformer.layers
        unsupported = sorted({block.layer_type for block in layers} - set(SUPPORTED_MIXERS))
        if unsupported:
            raise ValueError(f"graphed decoding supports the mixers {list(SUPPORTED_MIXERS)}, the model has {unsupported}")
        for layer_state in state.layers:
            if isinstance(layer_state, SlidingWindowCache) and layer_state.seen != state.seen:
                raise ValueError(f"sliding-window cache has seen {layer_state.seen} tokens but the model state {state.seen}")
        self.model = model
        self.state = state
        self.position = torch.tensor(state.seen, device=model.device, dtype=torch.int64)
        self._host_synced_position = state.seen

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [B] -> logits [B, V]; advances the device position by one."""
        model = self.model
        dtype = model.dtype
        residual = model._residual(token_ids)
        for block, layer_state in zip(model.transformer.layers, self.state.layers):
            normed = block.norm1(residual.to(dtype))
            if block.layer_type == "sliding_window":
                mixed = _sliding_window_step(block.mixer, normed, layer_state, self.position)
            else:
                mixed, _ = block.mixer.step(normed, layer_state)  # in place
            residual = block._mlp(residual + mixed.to(residual.dtype), dtype)
        self.position.add_(1)
        return model._logits(residual)

    def sync_host_counters(self, steps: int) -> None:
        """Record ``steps`` more tokens in the state's host-side counters (after eager or graphed steps)."""
        self.state.seen += steps
        for layer_state in self.state.layers:
            if isinstance(layer_state, SlidingWindowCache):
                layer_state.seen += steps


def _state_tensors(state) -> list[torch.Tensor]:
    return [t for layer in state.layers for t in layer.tensors()]


class GraphedGreedyDecoder:
    """Greedy decode from a prefilled state: each :meth:`step` feeds the last token and returns the next.

    ``first_token [B]`` is the token picked from the prefill logits. On CUDA (``use_cuda_graph`` None or
    True) the step, logits and argmax are captured once as a CUDA graph (after ``warmup_steps`` eager
    steps on a side stream, which also compile the Triton kernels; the state is restored afterwards)
    and each :meth:`step` is one replay. Elsewhere the same step runs eagerly. Call :meth:`finish`
    when done to bring the state's host counters up to date.
    """

    def __init__(self, model, state, first_token: torch.Tensor, *, use_cuda_graph: bool | None = None, warmup_steps: int = 2):
        if not isinstance(first_token, torch.Tensor) or first_token.dim() != 1 or first_token.is_floating_point():
            raise ValueError(f"first_token must be an integer tensor of shape [B], got {getattr(first_token, 'shape', type(first_token).__name__)}")
        self.step_function = StaticDecodeStep(model, state)
        self.token = first_token.clone()
        self.logits = None
        self.steps = 0
        if use_cuda_graph is None:
            use_cuda_graph = first_token.is_cuda
        if use_cuda_graph and not (first_token.is_cuda and torch.cuda.is_available()):
            raise ValueError("use_cuda_graph=True needs the model and tokens on a CUDA device")
        self.graph = None
        if use_cuda_graph:
            self._capture(warmup_steps)

    def _eager_step(self) -> torch.Tensor:
        logits = self.step_function(self.token)
        self.token.copy_(logits.argmax(dim=-1))
        return logits

    def _capture(self, warmup_steps: int) -> None:
        buffers = [*_state_tensors(self.step_function.state), self.token, self.step_function.position]
        snapshot = [t.clone() for t in buffers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup_steps):
                self._eager_step()
        torch.cuda.current_stream().wait_stream(side)
        for buffer, saved in zip(buffers, snapshot):
            buffer.copy_(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = self._eager_step()  # recorded, not run

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Run one decode step on the current token; returns the next token [B] (a fresh tensor)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._eager_step()
        self.steps += 1
        return self.token.clone()

    def finish(self) -> None:
        """Bring ``state.seen`` and the sliding-window caches' counters up to date with the steps run."""
        self.step_function.sync_host_counters(self.steps)
        self.steps = 0


@torch.no_grad()
def generate_greedy(model, input_ids: torch.Tensor, max_new_tokens: int, *, use_cuda_graph: bool | None = None,
                    prefill_chunk_size: int | None = 2048) -> torch.Tensor:
    """Prefill ``input_ids [B, T]`` then decode ``max_new_tokens`` greedily with a graphed step.

    Returns ``[B, T + max_new_tokens]`` ids, equal to ``model.generate(input_ids, max_new_tokens)``.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {tuple(getattr(input_ids, 'shape', ()))}")
    if max_new_tokens == 0:
        return input_ids
    was_training = model.training
    model.eval()
    try:
        logits, state = prefill(model, input_ids, None, prefill_chunk_size)
        token = logits.argmax(dim=-1)
        new_tokens = [token]
        if max_new_tokens > 1:
            decoder = GraphedGreedyDecoder(model, state, token, use_cuda_graph=use_cuda_graph)
            for _ in range(max_new_tokens - 1):
                new_tokens.append(decoder.step())
            decoder.finish()
    finally:
        model.train(was_training)
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
