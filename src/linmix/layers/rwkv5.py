"""RWKV-5 ("Eagle")-style time mixing: a matrix-valued state per head, as a causal mixer.

For ``x: [B, T, d]`` with ``H`` heads of size ``K = d / H`` and ``shift(x)_t = x_{t-1}`` (the state's
previous token before the first one)::

    x_c   = mu_c * x + (1 - mu_c) * shift(x)                 for c in r, k, v, g
    r, k, v = receptance(x_r), key(x_k), value(x_v)          [B, T, H, K]
    w     = exp(-exp(time_decay))                            [H, K], decay per key channel
    S_t   = diag(w) S_{t-1} + k_t^T v_t                       S: [B, H, K, K] (key x value)
    y_t   = r_t (diag(u) k_t^T v_t + S_{t-1})                 u = time_first [H, K], the bonus
    out   = output(GroupNorm_per_head(y) * silu(gate(x_g)))

The recurrence is the op :func:`linmix.ops.rwkv5.rwkv5_recurrence` (chunked; its token-by-token
oracle is :func:`linmix.ops.rwkv5.rwkv5_recurrence_reference`, both re-exported here); the one-token
update :func:`linmix.ops.rwkv5.rwkv5_recurrence_step` is behind :meth:`RWKV5TimeMix.step`. Decays are per position (``log_decay [B, T, H, K]``) so that
padded tokens get decay 1 and no input.

State size by the BASED paper's accounting for a matrix-valued RWKV: ``H * K^2`` numbers (the
previous token of the shift, d numbers, is not counted there).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from linmix.layers.base import CausalMixer, MixerState, check_sequence_input, check_step_input, normalize_attention_mask
from linmix.ops._checks import accumulation_dtype, require_positive_int
from linmix.ops.rwkv5 import rwkv5_recurrence, rwkv5_recurrence_reference, rwkv5_recurrence_step

__all__ = ["RWKV5State", "RWKV5TimeMix", "rwkv5_recurrence", "rwkv5_recurrence_reference"]


@dataclasses.dataclass
class RWKV5State(MixerState):
    """``wkv`` [B, H, K, K] (fp32, fp64 for fp64 activations) and ``previous_x`` [B, d] (activation dtype)."""

    wkv: torch.Tensor
    previous_x: torch.Tensor


class RWKV5TimeMix(CausalMixer):
    """RWKV-5-style time mixing, ``x [B, T, d_model] -> [B, T, d_model]``; see the module docstring.

    ``layer_id`` / ``num_layers`` set the depth-dependent initialisation of RWKV-5 (with
    ``r0 = layer_id / (num_layers - 1)``, ``r1 = 1 - layer_id / num_layers``, ``x_c = c / d``):
    ``time_decay = -6 + 5 (n / (d - 1))^(0.7 + 1.3 r0)``, ``time_first = r0 (1 - n / (d - 1)) +
    0.1 ((n + 1) % 3 - 1)``, ``mu_k = x^r1``, ``mu_v = x^r1 + 0.3 r0``, ``mu_r = mu_g = x^(0.5 r1)``.
    """

    def __init__(self, d_model: int, num_heads: int = 1, layer_id: int = 0, num_layers: int = 1, *, chunk_size: int = 16):
        super().__init__()
        require_positive_int("d_model", d_model)
        require_positive_int("num_heads", num_heads)
        require_positive_int("num_layers", num_layers)
        require_positive_int("chunk_size", chunk_size)
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not 0 <= layer_id < num_layers:
            raise ValueError(f"layer_id must be an integer in [0, num_layers) = [0, {num_layers}), got {layer_id!r}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.chunk_size = chunk_size
        ratio_0_to_1 = layer_id / (num_layers - 1) if num_layers > 1 else 0.0
        ratio_1_to_almost_0 = 1.0 - layer_id / num_layers
        channel = torch.arange(d_model, dtype=torch.float32)
        x = channel / d_model
        position = channel / max(d_model - 1, 1)
        shape = (num_heads, self.head_dim)
        self.time_decay = nn.Parameter((-6 + 5 * position ** (0.7 + 1.3 * ratio_0_to_1)).view(shape))
        self.time_first = nn.Parameter((ratio_0_to_1 * (1 - position) + 0.1 * ((channel + 1) % 3 - 1)).view(shape))
        self.time_mix_k = nn.Parameter(x ** ratio_1_to_almost_0)
        self.time_mix_v = nn.Parameter(x ** ratio_1_to_almost_0 + 0.3 * ratio_0_to_1)
        self.time_mix_r = nn.Parameter(x ** (0.5 * ratio_1_to_almost_0))
        self.time_mix_g = nn.Parameter(x ** (0.5 * ratio_1_to_almost_0))
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.output = nn.Linear(d_model, d_model, bias=False)
        self.ln_x = nn.GroupNorm(num_heads, d_model, eps=64e-5)  # per-head normalisation of the readout

    def _projections(self, x: torch.Tensor, shifted: torch.Tensor):
        """x, shifted: [..., d] -> r, k, v [..., H, K] and the gate [..., d]."""
        def mix(mu):
            return x * mu + shifted * (1 - mu)

        heads = (*x.shape[:-1], self.num_heads, self.head_dim)
        r = self.receptance(mix(self.time_mix_r)).view(heads)
        k = self.key(mix(self.time_mix_k)).view(heads)
        v = self.value(mix(self.time_mix_v)).view(heads)
        return r, k, v, F.silu(self.gate(mix(self.time_mix_g)))

    def _readout(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """y [..., H, K] (state dtype), gate [..., d] -> [..., d]."""
        flat = y.reshape(-1, self.d_model).to(gate.dtype)
        normed = self.ln_x(flat).view(gate.shape)
        return self.output(normed * gate)

    def _log_decay(self) -> torch.Tensor:
        return -torch.exp(self.time_decay.float())  # [H, K], < 0

    def forward(self, x: torch.Tensor, state: RWKV5State | None = None, *, attention_mask=None, return_state: bool = False):
        """x: [B, T, d_model] -> [B, T, d_model] (and the new state with ``return_state``).

        ``attention_mask`` [B, T] marks left padding: padded tokens neither enter the state nor
        count as the previous token of the shift. The given state is not modified.
        """
        check_sequence_input(x, self.d_model)
        batch, length, _ = x.shape
        mask = normalize_attention_mask(attention_mask, batch, length, x.device)
        if state is None:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        else:
            self._check_state(state, batch)
        previous = state.previous_x.to(x.dtype)
        before = torch.cat([previous[:, None], x[:, :-1]], dim=1)
        if mask is not None:  # left padding: a real token after padding shifts in the state's token
            before_is_real = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
            before = torch.where(before_is_real[..., None], before, previous[:, None])
        r, k, v, gate = self._projections(x, before)
        log_decay = self._log_decay().expand(batch, length, -1, -1)
        if mask is not None:
            keep = mask[:, :, None, None]
            k = k * keep.to(k.dtype)
            log_decay = log_decay * keep.to(log_decay.dtype)
        y, wkv = rwkv5_recurrence(r, k, v, log_decay, self.time_first, state.wkv, chunk_size=self.chunk_size)
        out = self._readout(y, gate)
        if not return_state:
            return out
        last = x[:, -1] if length else previous
        if mask is not None and length:
            last = torch.where(mask[:, -1:], x[:, -1], previous)
        return out, RWKV5State(wkv=wkv, previous_x=last)

    def step(self, x_t: torch.Tensor, state: RWKV5State):
        """One token: x_t [B, d_model] -> ([B, d_model], state)."""
        check_step_input(x_t, self.d_model)
        self._check_state(state, x_t.shape[0])
        r, k, v, gate = self._projections(x_t, state.previous_x.to(x_t.dtype))
        y, wkv = rwkv5_recurrence_step(r, k, v, self._log_decay(), self.time_first, state.wkv)
        return self._readout(y, gate), RWKV5State(wkv=wkv, previous_x=x_t)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> RWKV5State:
        weight = self.key.weight
        device = device if device is not None else weight.device
        dtype = dtype if dtype is not None else weight.dtype
        return RWKV5State(
            wkv=torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, device=device, dtype=accumulation_dtype(dtype)),
            previous_x=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
        )

    def state_size_bytes(self, seq_len: int) -> int:
        """4 * heads * head_dim^2: the matrix-valued state, as the BASED paper counts RWKV."""
        return 4 * self.num_heads * self.head_dim * self.head_dim

    def _check_state(self, state, batch: int) -> None:
        expected = (batch, self.num_heads, self.head_dim, self.head_dim)
        if not isinstance(state, RWKV5State) or tuple(state.wkv.shape) != expected or tuple(state.previous_x.shape) != (batch, self.d_model):
            got = type(state).__name__ if not isinstance(state, RWKV5State) else f"wkv {tuple(state.wkv.shape)}, previous_x {tuple(state.previous_x.shape)}"
            raise ValueError(f"state must be an RWKV5State with wkv [B, H, K, K] = {expected} and previous_x [B, d] = {(batch, self.d_model)}, got {got}")

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, chunk_size={self.chunk_size}"
