"""Pure tensor ops: each has a reference (the test oracle), a fast path and, where causal, a step.

Sequence layout ``[B, T, H, D]`` (batch, time, heads, head dim) for the attention-like ops; the
channel ops (short conv, WKV, selective scan) use ``[B, T, C]``; the token shift of Vision-RWKV
(:func:`q_shift`) reads ``[B, T, C]`` as a row-major ``height x width`` grid.
"""

from linmix.ops.feature_maps import taylor_feature_dim, taylor_feature_map
from linmix.ops.linear_attention import (
    LinearAttentionState,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)
from linmix.ops.q_shift import q_shift, q_shift_reference, shifted_mixes
from linmix.ops.rotary import apply_rotary, rotary_cos_sin
from linmix.ops.rwkv5 import rwkv5_recurrence, rwkv5_recurrence_reference, rwkv5_recurrence_step
from linmix.ops.selective_scan import (
    cross_scan_selective_scan,
    cross_scan_selective_scan_reference,
    selective_scan,
    selective_scan_reference,
    selective_scan_step,
)
from linmix.ops.short_conv import ShortConvState, short_conv, short_conv_reference, short_conv_step
from linmix.ops.sliding_window import (
    SlidingWindowCache,
    sliding_window_attention,
    sliding_window_attention_reference,
    sliding_window_attention_step,
)
from linmix.ops.state import MixerState
from linmix.ops.wkv import WKVState, bi_wkv, bi_wkv_reference, causal_wkv, causal_wkv_reference, causal_wkv_step

__all__ = [
    "LinearAttentionState",
    "MixerState",
    "ShortConvState",
    "SlidingWindowCache",
    "WKVState",
    "apply_rotary",
    "bi_wkv",
    "bi_wkv_reference",
    "causal_wkv",
    "causal_wkv_reference",
    "causal_wkv_step",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
    "q_shift",
    "q_shift_reference",
    "rotary_cos_sin",
    "rwkv5_recurrence",
    "rwkv5_recurrence_reference",
    "rwkv5_recurrence_step",
    "cross_scan_selective_scan",
    "cross_scan_selective_scan_reference",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_step",
    "short_conv",
    "short_conv_reference",
    "short_conv_step",
    "shifted_mixes",
    "sliding_window_attention",
    "sliding_window_attention_reference",
    "sliding_window_attention_step",
    "taylor_feature_dim",
    "taylor_feature_map",
]
