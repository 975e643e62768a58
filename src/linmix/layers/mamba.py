"""The Mamba-1 block (selective state space model), as a linmix causal mixer.

``x: [B, T, d_model] -> y: [B, T, d_model]``::

    x, z   = in_proj(x)                                  # [B, T, d_inner] each, d_inner = expand * d_model
    x      = silu(causal depthwise conv1d(x))           # kernel d_conv
    dt, B, C = x_proj(x)                                 # dt_rank, d_state, d_state
    delta  = softplus(dt_proj(dt))                       # [B, T, d_inner], computed in fp32
    y      = selective_scan(x, delta, A = -exp(A_log), B, C, D, z)   # gated by silu(z)
    out    = out_proj(y)

Parameter names follow the reference implementation (``mamba_simple.Mamba``): ``in_proj``, ``conv1d``,
``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``, so its state dicts load as they are.
The recurrent state (:class:`MambaState`) is the conv history ``[B, d_inner, d_conv - 1]`` (the last
pre-conv inputs, activation dtype) and the SSM state ``[B, d_inner, d_state]`` (fp32).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from linmix.ops.selective_scan import selective_scan, selective_scan_step

from .base import CausalMixer, MixerState, check_sequence_input, check_step_input, normalize_attention_mask

__all__ = ["Mamba", "MambaState"]

# Lower bound of the initial step size (as in the reference initialisation).
_DT_INIT_FLOOR = 1e-4


@dataclasses.dataclass
class MambaState(MixerState):
    """Decode state of one :class:`Mamba` layer.

    conv: ``[B, d_inner, d_conv - 1]`` the last ``d_conv - 1`` conv inputs, oldest first (activation dtype).
    ssm: ``[B, d_inner, d_state]`` the selective-scan state (fp32).
    """

    conv: torch.Tensor
    ssm: torch.Tensor


class Mamba(CausalMixer):
    """Mamba-1 mixer block.

    Args:
        d_model: model width.
        d_state: SSM state size N per inner channel.
        d_conv: kernel size of the causal depthwise convolution.
        expand: d_inner = expand * d_model.
        dt_rank: rank of the step-size projection; ``"auto"`` = ceil(d_model / 16).
        dt_min, dt_max: the initial step sizes are log-uniform in [dt_min, dt_max] (through the
            inverse-softplus initialisation of ``dt_proj.bias``).
        conv_bias: bias in the depthwise convolution.
        bias: biases in ``in_proj`` and ``out_proj``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        conv_bias: bool = True,
        bias: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank <= 0:
            raise ValueError(f"dt_rank must be 'auto' or a positive integer, got {dt_rank!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        # padding is unused (forward pads with the conv history itself); kept for parity with the reference module.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(dt_rank, self.d_inner, bias=True, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

        with torch.no_grad():
            std = dt_rank ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            # delta = softplus(bias) starts log-uniform in [dt_min, dt_max]; bias = softplus^-1(dt).
            dt = torch.exp(torch.rand(self.d_inner, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=_DT_INIT_FLOOR)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

        # S4D-real initialisation: A[d, n] = -(n + 1).
        a = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a).to(dtype or torch.float32))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device, dtype=dtype or torch.float32))
        self.D._no_weight_decay = True

    def reset_parameters_for_lm(self, num_residual_layers: int) -> None:
        """The Mamba reference LM's init (mamba_ssm's ``MixerModel``), used by a language model in place
        of its own GPT-2 init for this layer: ``in_proj`` and ``x_proj`` get PyTorch's default
        kaiming-uniform init, their biases and ``out_proj``'s are zero, and ``out_proj`` is
        kaiming-uniform scaled by ``1/sqrt(num_residual_layers)`` (n_layer, or 2 n_layer with MLPs).
        ``dt_proj``, ``A_log``, ``D`` and the convolution keep their own init: a zeroed ``dt_proj``
        bias would make every channel's delta softplus(0) = 0.69, one fast timescale, no long memory."""
        if isinstance(num_residual_layers, bool) or not isinstance(num_residual_layers, int) or num_residual_layers <= 0:
            raise ValueError(f"num_residual_layers must be a positive integer, got {num_residual_layers!r}")
        with torch.no_grad():
            for linear in (self.in_proj, self.x_proj, self.out_proj):
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            self.out_proj.weight /= math.sqrt(num_residual_layers)

    # ----------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> MambaState:
        """Empty state: conv history ``[B, d_inner, d_conv - 1]`` (dtype) and SSM ``[B, d_inner, d_state]`` (fp32)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        weight = self.in_proj.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        return MambaState(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def state_size_bytes(self, seq_len: int) -> int:
        """Recurrent state of one sequence in bytes by the BASED paper's accounting: 4 * 2 * d_model * d_state.

        The paper counts Mamba as ``2 * d * d_state`` fp32 numbers, i.e. the SSM state
        ``d_inner * d_state`` with the standard expand = 2; it ignores the short conv history
        (``d_inner * (d_conv - 1)`` numbers, which :meth:`MambaState.nbytes` does include). Independent of
        ``seq_len`` (fixed-size state).
        """
        return 4 * 2 * self.d_model * self.d_state

    # ----------------------------------------------------------------------------------------------
    def _check_state(self, state, batch: int) -> None:
        if not isinstance(state, MambaState):
            raise ValueError(f"state must be a MambaState (from init_state or forward(..., return_state=True)), got {type(state).__name__}")
        expected_conv = (batch, self.d_inner, self.d_conv - 1)
        expected_ssm = (batch, self.d_inner, self.d_state)
        if tuple(state.conv.shape) != expected_conv or tuple(state.ssm.shape) != expected_ssm:
            raise ValueError(
                f"state must hold conv [B, d_inner, d_conv - 1] = {expected_conv} and ssm [B, d_inner, d_state] = "
                f"{expected_ssm}, got {tuple(state.conv.shape)} and {tuple(state.ssm.shape)}"
            )

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def _ssm_inputs(self, x: torch.Tensor):
        """From the conv output x ``[..., d_inner]``: delta (fp32, softplus applied), B, C."""
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        return delta, B, C

    def forward(self, x: torch.Tensor, state: MambaState | None = None, *, attention_mask: torch.Tensor | None = None,
                return_state: bool = False):
        """x: ``[B, T, d_model]`` -> ``[B, T, d_model]`` (and the final state with ``return_state``).

        ``state`` continues from a previous chunk; ``attention_mask: [B, T]`` (True/1 = real token)
        marks left padding, which enters neither the conv history nor the SSM state.
        """
        check_sequence_input(x, self.d_model)
        batch, length, _ = x.shape
        mask = normalize_attention_mask(attention_mask, batch, length, x.device)
        if mask is not None and length > 1 and bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
            raise ValueError("attention_mask must be left padding: per row zeros (padding) then ones (real tokens)")
        if state is not None:
            self._check_state(state, batch)

        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, d_inner] each
        if mask is not None:
            xs = xs.masked_fill(~mask[..., None], 0.0)
        history = self.d_conv - 1
        xs = xs.transpose(1, 2)  # [B, d_inner, T]
        if state is None:
            padded = F.pad(xs, (history, 0))
        elif mask is None:
            padded = torch.cat([state.conv.to(xs.dtype), xs], dim=2)
        else:
            # The history must sit right before each row's first real token, i.e. after its padding.
            padded = F.pad(xs, (history, 0))
            if history:
                first_real = length - mask.sum(dim=1)  # [B]; in `padded` the real tokens start at first_real + history
                index = (first_real[:, None] + torch.arange(history, device=x.device))[:, None, :].expand(-1, self.d_inner, -1)
                padded = padded.scatter_add(2, index, state.conv.to(xs.dtype))
        conv_state = padded[:, :, length:]  # the last d_conv - 1 inputs
        xs = F.silu(F.conv1d(padded, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)).transpose(1, 2)

        delta, B, C = self._ssm_inputs(xs)
        u = xs
        if mask is not None:
            # A padded token must leave the state as it is, but silu(conv bias) is non-zero there: delta = 0
            # makes its decay 1 and its input delta * u * B zero; u = 0 also zeroes its D * u output.
            u = u.masked_fill(~mask[..., None], 0.0)
            delta = delta.masked_fill(~mask[..., None], 0.0)
        y, ssm_state = selective_scan(
            u, delta, self._A(), B, C, D=self.D, z=z,
            initial_state=None if state is None else state.ssm, return_final_state=True,
        )
        out = self.out_proj(y)
        if not return_state:
            return out
        conv_dtype = state.conv.dtype if state is not None else x.dtype
        return out, MambaState(conv=conv_state.to(conv_dtype).contiguous(), ssm=ssm_state.float())

    def step(self, x_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One token: x_t ``[B, d_model]`` -> ``([B, d_model], state)``; the state is updated in place."""
        check_step_input(x_t, self.d_model)
        self._check_state(state, x_t.shape[0])
        xs, z = self.in_proj(x_t).chunk(2, dim=-1)  # [B, d_inner] each
        window = torch.cat([state.conv.to(xs.dtype), xs[:, :, None]], dim=2)  # [B, d_inner, d_conv]
        conv = (window * self.conv1d.weight[:, 0, :]).sum(dim=-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        state.conv.copy_(window[:, :, 1:])
        xs = F.silu(conv)
        delta, B, C = self._ssm_inputs(xs)
        y, _ = selective_scan_step(state.ssm, xs, delta, self._A(), B, C, D=self.D, z_t=z)
        return self.out_proj(y), state

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, dt_rank={self.dt_rank}"
