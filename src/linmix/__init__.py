"""linmix: linear-time sequence models (BASED language models, RWKV-SAM segmentation)."""

__version__ = "0.1.0"
