"""What a conditional layer reports besides its output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerInfo:
    """Auxiliary losses and metrics returned by a layer next to its output.

    aux_losses: name -> scalar tensor (differentiable); the trainer weights and adds them to the loss.
    metrics:    name -> scalar or small tensor (detached), logged but never optimised.
    """

    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)

    def add(self, prefix: str, other: "LayerInfo | None") -> "LayerInfo":
        """Merge another layer's info: aux losses summed by name, metrics under ``prefix.``."""
        if other is not None:
            for name, value in other.aux_losses.items():
                self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value
            for name, value in other.metrics.items():
                self.metrics[f"{prefix}.{name}" if prefix else name] = value
        return self
