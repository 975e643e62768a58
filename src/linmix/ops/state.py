"""The base class of recurrent states (ops and layers both build on it)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class MixerState:
    """Base class of the per-layer recurrent states (dataclasses whose fields are tensors or ints)."""

    def tensors(self) -> list[torch.Tensor]:
        return [v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if isinstance(v, torch.Tensor)]

    def nbytes(self) -> int:
        """Bytes held by this state's tensors (what decode really keeps in memory)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clone(self) -> "MixerState":
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values[field.name] = value.clone() if isinstance(value, torch.Tensor) else value
        return type(self)(**values)
