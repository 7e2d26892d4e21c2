"""Exponential moving average of a network's weights (``run.ema_decay``; Polyak averaging as in
timm's ``ModelEmaV2``).

After every optimizer step each floating-point parameter of the copy becomes
``decay * average + (1 - decay) * parameter``; buffers (BatchNorm's running statistics and
counters) are copied from the live network, since an average of running statistics describes no
network. The trainer recomputes the copy's BatchNorm statistics for its own weights after each
epoch (:func:`training.methods.base.recalibrate_batchnorm`) before evaluating and saving it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """An averaged copy ``module`` of ``model`` (same device and memory format), in eval mode."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step toward ``model``'s current weights."""
        for avg, live in zip(self.module.parameters(), model.parameters(), strict=True):
            avg.lerp_(live.detach(), 1.0 - self.decay)  # avg + (1 - decay) * (live - avg)
        for avg_b, live_b in zip(self.module.buffers(), model.buffers(), strict=True):
            avg_b.copy_(live_b)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["decay"]) != self.decay:
            raise ValueError(f"checkpoint EMA decay {state['decay']} differs from run.ema_decay {self.decay}")
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["model"])
