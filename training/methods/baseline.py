"""Baseline methods on the Figure 8 networks: ``none`` (plain training), ``madry`` (PGD adversarial
training, Madry et al. 2018) and ``rse`` (Random Self-Ensemble, Liu et al. 2018: Gaussian noise
layers before every convolution in training and inference, predictions averaged over an ensemble
of noisy passes).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from training.methods.base import Method, accuracy, register_method


@register_method
class StandardMethod(Method):
    name: ClassVar[str] = "none"
    family: ClassVar[str] = "baseline"
    minmax_default: ClassVar[bool] = False
    description: ClassVar[str] = "No defense: the baseline network trained on clean images"

    def build(self) -> None:
        self.net = self.wrap(self.model)
        self.add_optimizer("model", self.adam(self.model.parameters(), self.cfg.optim.lr))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.adversarial(x, y)
        with self.autocast():
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y)
        self.descend(loss, "model")
        return {"loss": loss.detach(), "acc": accuracy(logits, y)}


@register_method
class MadryMethod(StandardMethod):
    name: ClassVar[str] = "madry"
    minmax_default: ClassVar[bool] = True
    description: ClassVar[str] = "Madry's adversarial training: the baseline network on PGD examples"


@register_method
class RSEMethod(StandardMethod):
    name: ClassVar[str] = "rse"
    description: ClassVar[str] = "Random Self-Ensemble: noise layers before every conv, ensemble at inference"
    # Liu et al.'s CIFAR-10 setting: init noise 0.2, inner noise 0.1, 10 noisy passes at inference.
    defaults: ClassVar[dict[str, Any]] = {"noise_init": 0.2, "noise_inner": 0.1, "ensemble": 10}

    def build_arch_kwargs(self) -> dict[str, Any]:
        return {**self.defaults, **super().build_arch_kwargs()}
