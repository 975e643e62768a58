"""BASED's Taylor linear attention layer.

``proj_q, proj_k: d -> h*f``, ``proj_v, out_proj: d -> d`` (no biases, no rotary), per head
``y_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / (sum_{j<=i} phi(q_i).phi(k_j) + eps)`` with the 2nd-order
Taylor map. Parameter names follow the official checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from linmix.layers.base import CausalMixer, check_sequence_input, check_step_input, normalize_attention_mask
from linmix.ops.feature_maps import taylor_feature_dim
from linmix.ops.linear_attention import DEFAULT_EPS, LinearAttentionState, linear_attention, linear_attention_step


class BasedLinearAttention(CausalMixer):
    """x [B, T, d] -> [B, T, d]; state kv [B, h, D', d/h] and k_sum [B, h, D'] in fp32 (constant size).

    ``feature_map_input_dim`` is the official config's ``feature_map.input_dim`` (the ``f`` in the
    Taylor map's scales); it defaults to ``feature_dim``. q and k are pre-scaled so that the map with
    ``f = feature_dim`` gives the same features.
    """

    def __init__(self, d_model: int, *, feature_dim: int = 16, num_heads: int = 16,
                 feature_map_input_dim: int | None = None, symmetric: bool = True,
                 eps: float = DEFAULT_EPS, chunk_size: int = 64):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model = d_model
        self.feature_dim = feature_dim
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.eps = eps
        self.chunk_size = chunk_size
        self.feature_map = "taylor" if symmetric else "taylor_full"
        self.expanded_dim = taylor_feature_dim(feature_dim, symmetric)
        input_dim = feature_map_input_dim or feature_dim
        self.qk_scale = (feature_dim / input_dim) ** 0.25
        self.proj_q = nn.Linear(d_model, feature_dim * num_heads, bias=False)
        self.proj_k = nn.Linear(d_model, feature_dim * num_heads, bias=False)
        self.proj_v = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, x: torch.Tensor):
        shape = x.shape[:-1]
        q = self.proj_q(x).view(*shape, self.num_heads, self.feature_dim)
        k = self.proj_k(x).view(*shape, self.num_heads, self.feature_dim)
        v = self.proj_v(x).view(*shape, self.num_heads, self.head_dim)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        return q, k, v

    def forward(self, x: torch.Tensor, state: LinearAttentionState | None = None, *, attention_mask=None,
                return_state: bool = False):
        check_sequence_input(x, self.d_model)
        mask = normalize_attention_mask(attention_mask, x.shape[0], x.shape[1], x.device)
        q, k, v = self._qkv(x)
        result = linear_attention(q, k, v, feature_map=self.feature_map, eps=self.eps, initial_state=state,
                                  return_final_state=return_state, key_padding_mask=mask, chunk_size=self.chunk_size)
        y, new_state = result if return_state else (result, None)
        y = self.out_proj(y.reshape(*x.shape[:-1], self.d_model))
        return (y, new_state) if return_state else y

    def step(self, x_t: torch.Tensor, state: LinearAttentionState):
        check_step_input(x_t, self.d_model)
        q, k, v = self._qkv(x_t)
        y, state = linear_attention_step(state, q, k, v, feature_map=self.feature_map, eps=self.eps)
        return self.out_proj(y.reshape(x_t.shape[0], self.d_model)), state

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> LinearAttentionState:
        # Accumulators are fp32 whatever the activation dtype (fp64 only when the model is fp64).
        weight = self.proj_q.weight
        state_dtype = torch.float64 if (dtype or weight.dtype) == torch.float64 else torch.float32
        return LinearAttentionState.empty(batch_size, self.num_heads, self.expanded_dim, self.head_dim,
                                          device=device or weight.device, dtype=state_dtype)

    def state_size_bytes(self, seq_len: int) -> int:
        """h * head_dim * D' + h * D' numbers (KV state and K state), 4 bytes each."""
        return 4 * (self.num_heads * self.head_dim * self.expanded_dim + self.num_heads * self.expanded_dim)
