"""BASED language models: config, model, generation (and, in later modules, training and conversion)."""

from linmix.lm.config import PRESETS, BasedConfig, preset
from linmix.lm.generation import generate, sample_next_token
from linmix.lm.model import BasedForCausalLM, CausalLMOutput, LMState

__all__ = ["PRESETS", "BasedConfig", "BasedForCausalLM", "CausalLMOutput", "LMState", "generate", "preset", "sample_next_token"]
