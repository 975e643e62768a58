"""RWKV-4 time mixing as a causal mixer (see :mod:`linmix.layers.base` for the contract).

For ``x: [B, T, d]``, with ``shift(x)_t = x_{t-1}`` (zero before the first token, or the last token
of the previous chunk when a state is passed)::

    x_k = mu_k * x + (1 - mu_k) * shift(x)        (the same for v and r, with mu_v, mu_r)
    k, v, r = key(x_k), value(x_v), receptance(x_r)          (bias-free d -> d linears)
    y = output(sigmoid(r) * causal_wkv(w = exp(time_decay), u = time_first, k, v))

The WKV sum is :func:`linmix.ops.wkv.causal_wkv` (decay ``exp(-w)`` per step and channel, bonus ``u``
on the current token). The recurrent state is a vector per channel, not a matrix: the WKV
numerator ``a``, denominator ``b`` and running exponent ``p``, plus the previous token for the
shift.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from linmix.layers.base import CausalMixer, check_sequence_input, check_step_input, normalize_attention_mask
from linmix.ops._checks import accumulation_dtype, require_positive_int
from linmix.ops.wkv import WKVState, causal_wkv, causal_wkv_step


def rwkv_fancy_init(dim: int, layer_id: int, depth: int) -> dict[str, torch.Tensor]:
    """RWKV's depth-dependent ("fancy") init, shared by RWKV-4 and Vision-RWKV (fp64 [dim] each).

    With r0 = l / (L - 1) (0 -> 1; a single layer counts as the first), r1 = 1 - l / L and
    x_c = c / C: decay[c] = -5 + 8 (c / (C - 1))^(0.7 + 1.3 r0); first[c] = ln(0.3) + 0.5 ((c + 1) % 3 - 1);
    mix_k = x^r1, mix_v = x^r1 + 0.3 r0, mix_r = x^(0.5 r1).
    """
    ratio_0_to_1 = layer_id / (depth - 1) if depth > 1 else 0.0
    ratio_1_to_almost_0 = 1.0 - layer_id / depth
    channel = torch.arange(dim, dtype=torch.float64)
    x = channel / dim
    return {
        "decay": -5 + 8 * (channel / max(dim - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1),
        "first": math.log(0.3) + 0.5 * ((channel + 1) % 3 - 1),
        "mix_k": x ** ratio_1_to_almost_0,
        "mix_v": x ** ratio_1_to_almost_0 + 0.3 * ratio_0_to_1,
        "mix_r": x ** (0.5 * ratio_1_to_almost_0),
    }


@dataclasses.dataclass
class RWKVTimeMixState(WKVState):
    """WKV sums ``a, b, p`` [B, d] (fp32, fp64 for fp64 activations) and ``previous_x`` [B, d],
    the last real token seen (activation dtype), which the next token's shift mixes in."""

    previous_x: torch.Tensor


class RWKVTimeMix(CausalMixer):
    """RWKV-4 time mixing: ``x [B, T, d_model] -> [B, T, d_model]``.

    ``layer_id`` and ``num_layers`` set RWKV-4's depth-dependent initialisation (with
    ``r0 = layer_id / (num_layers - 1)``, ``r1 = 1 - layer_id / num_layers``, ``x_c = c / d``):
    ``time_decay[c] = -5 + 8 (c / (d - 1))^(0.7 + 1.3 r0)``,
    ``time_first[c] = ln(0.3) + 0.5 ((c + 1) % 3 - 1)``,
    ``mu_k = x^r1``, ``mu_v = x^r1 + 0.3 r0``, ``mu_r = x^(0.5 r1)``. The linears keep PyTorch's
    default initialisation. ``chunk_size`` is the WKV chunk length of the whole-sequence path.
    """

    def __init__(self, d_model: int, layer_id: int = 0, num_layers: int = 1, *, chunk_size: int = 16):
        super().__init__()
        require_positive_int("d_model", d_model)
        require_positive_int("num_layers", num_layers)
        require_positive_int("chunk_size", chunk_size)
        if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not 0 <= layer_id < num_layers:
            raise ValueError(f"layer_id must be an integer in [0, num_layers) = [0, {num_layers}), got {layer_id!r}")
        self.d_model = d_model
        self.layer_id = layer_id
        self.num_layers = num_layers
        self.chunk_size = chunk_size

        self.time_decay = nn.Parameter(torch.empty(d_model))
        self.time_first = nn.Parameter(torch.empty(d_model))
        self.time_mix_k = nn.Parameter(torch.empty(d_model))
        self.time_mix_v = nn.Parameter(torch.empty(d_model))
        self.time_mix_r = nn.Parameter(torch.empty(d_model))
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.output = nn.Linear(d_model, d_model, bias=False)
        self.reset_time_parameters()

    @torch.no_grad()
    def reset_time_parameters(self) -> None:
        """RWKV-4's depth-dependent initialisation of the decay, bonus and token-shift mixes."""
        init = rwkv_fancy_init(self.d_model, self.layer_id, self.num_layers)
        for name in ("decay", "first", "mix_k", "mix_v", "mix_r"):
            getattr(self, "time_" + name).copy_(init[name])

    def _mix(self, x: torch.Tensor, shifted: torch.Tensor):
        def interpolate(mu):
            return x * mu + shifted * (1 - mu)

        return (
            self.key(interpolate(self.time_mix_k)),
            self.value(interpolate(self.time_mix_v)),
            self.receptance(interpolate(self.time_mix_r)),
        )

    def forward(self, x: torch.Tensor, state: RWKVTimeMixState | None = None, *, attention_mask=None, return_state: bool = False):
        check_sequence_input(x, self.d_model)
        batch, length, _ = x.shape
        mask = normalize_attention_mask(attention_mask, batch, length, x.device)
        if state is None:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        else:
            self._check_state(state, batch)
        previous = state.previous_x.to(x.dtype)

        if mask is None:
            shifted = torch.cat([previous[:, None, :], x[:, :-1]], dim=1)[:, :length]
            last = x[:, -1] if length > 0 else previous
        else:
            # The shift skips padded tokens: each token sees the last real token before it, or the
            # state's previous token if there is none, exactly as if the padding were absent.
            index = torch.arange(length, device=x.device)
            last_real = torch.cummax(torch.where(mask, index, torch.full_like(index, -1)), dim=1).values
            before = torch.cat([torch.full_like(last_real[:, :1], -1), last_real[:, :-1]], dim=1)  # [B, T]
            gathered = torch.gather(x, 1, before.clamp_min(0)[..., None].expand(-1, -1, self.d_model))
            shifted = torch.where((before >= 0)[..., None], gathered, previous[:, None, :])
            if length > 0:
                final = last_real[:, -1]
                last_gathered = torch.gather(x, 1, final.clamp_min(0)[:, None, None].expand(-1, 1, self.d_model))[:, 0]
                last = torch.where((final >= 0)[:, None], last_gathered, previous)
            else:
                last = previous

        k, v, r = self._mix(x, shifted)
        wkv, wkv_state = causal_wkv(
            torch.exp(self.time_decay), self.time_first, k, v, state, return_state=True, mask=mask, chunk_size=self.chunk_size
        )
        y = self.output(torch.sigmoid(r) * wkv.to(r.dtype))
        if not return_state:
            return y
        return y, RWKVTimeMixState(a=wkv_state.a, b=wkv_state.b, p=wkv_state.p, previous_x=last)

    def step(self, x_t: torch.Tensor, state: RWKVTimeMixState):
        check_step_input(x_t, self.d_model)
        self._check_state(state, x_t.shape[0])
        k, v, r = self._mix(x_t, state.previous_x.to(x_t.dtype))
        wkv, state = causal_wkv_step(state, torch.exp(self.time_decay), self.time_first, k, v)
        if torch.is_grad_enabled():  # new tensors: the old ones may be saved for backward
            state = dataclasses.replace(state, previous_x=x_t)
        else:  # decode: update in place, no allocation per token
            state.previous_x.copy_(x_t)
        return self.output(torch.sigmoid(r) * wkv.to(r.dtype)), state

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> RWKVTimeMixState:
        weight = self.key.weight
        device = device if device is not None else weight.device
        dtype = dtype if dtype is not None else weight.dtype
        sums = WKVState.empty(batch_size, self.d_model, device=device, dtype=accumulation_dtype(dtype))
        return RWKVTimeMixState(
            a=sums.a, b=sums.b, p=sums.p, previous_x=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)
        )

    def state_size_bytes(self, seq_len: int) -> int:
        """4 bytes x (3 d + d): the WKV numerator ``a``, denominator ``b`` and max exponent ``p`` per
        channel, plus the previous token for the shift. Constant in ``seq_len``.

        This RWKV-4 layer has a vector state of 4 d numbers; the BASED paper's table instead counts a
        matrix-valued (multi-head) RWKV with ``heads * head_dim^2`` numbers per layer.
        """
        return 4 * 4 * self.d_model

    def _check_state(self, state, batch: int) -> None:
        if not isinstance(state, RWKVTimeMixState):
            raise ValueError(
                f"state must be an RWKVTimeMixState (from init_state or forward(..., return_state=True)) "
                f"with tensors of shape [B, d_model] = [{batch}, {self.d_model}], got {type(state).__name__}"
            )
        for name in ("a", "b", "p", "previous_x"):
            shape = tuple(getattr(state, name).shape)
            if shape != (batch, self.d_model):
                raise ValueError(f"state.{name} must have shape [B, d_model] = [{batch}, {self.d_model}], got {shape}")
