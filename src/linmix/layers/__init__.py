"""nn.Modules on the ops. Causal mixers share the contract of :mod:`linmix.layers.base`; the vision
token mixers (:mod:`linmix.layers.vision_rwkv`) take ``(x [B, T, C], height, width)``."""

from linmix.layers.attention import KVCache, MultiHeadAttention, SlidingWindowAttention
from linmix.layers.base import CausalMixer, MixerState
from linmix.layers.base_conv import BaseConv, ShortConvolution
from linmix.layers.linear_attention import BasedLinearAttention
from linmix.layers.mamba import Mamba, MambaState
from linmix.layers.mlp import GatedMLP
from linmix.layers.norm import RMSNorm
from linmix.layers.rwkv import RWKVTimeMix
from linmix.layers.rwkv5 import RWKV5State, RWKV5TimeMix
from linmix.layers.vision_common import DropPath
from linmix.layers.vision_mamba import SS2D, VisionMambaBlock
from linmix.layers.vision_rwkv import VRWKVBlock, VRWKVChannelMix, VRWKVSpatialMix

__all__ = [
    "BaseConv",
    "BasedLinearAttention",
    "CausalMixer",
    "DropPath",
    "GatedMLP",
    "KVCache",
    "Mamba",
    "MambaState",
    "MixerState",
    "MultiHeadAttention",
    "RMSNorm",
    "RWKV5State",
    "RWKV5TimeMix",
    "RWKVTimeMix",
    "SS2D",
    "ShortConvolution",
    "SlidingWindowAttention",
    "VRWKVBlock",
    "VRWKVChannelMix",
    "VRWKVSpatialMix",
    "VisionMambaBlock",
]
