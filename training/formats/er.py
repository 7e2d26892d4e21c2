"""The project's own checkpoints (:class:`~training.models.EmbeddingClassifier` + safetensors) as a
served model: white-box, with the encoder's embedding and a separate head."""

from __future__ import annotations

import torch
from torch import nn

from training.formats.base import Capabilities, ServedNet
from training.models import EmbeddingClassifier

ER_CAPABILITIES = Capabilities(gradients=True, embedding=True, head=True)


class ERNet(ServedNet):
    """``EmbeddingClassifier`` behind the contract; its numerics are the network's own: the
    embedding is ``forward_features``, the logits ``forward_head`` of it (RSE ensembles: the
    network's averaged ``forward``, the embedding from one pass)."""

    format_name = "er"

    def __init__(self, net: EmbeddingClassifier) -> None:
        super().__init__(ER_CAPABILITIES)
        self.net = net  # normalization lives inside the network (its Normalize layer)
        self.ensemble = int(getattr(net, "ensemble", 1))

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.net.forward_features(x)
        logits = self.net.forward_head(z) if self.ensemble == 1 else self.net(x)
        return logits, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net.forward_features(x)
        return out

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net.forward_head(z)
        return out

    @property
    def embed_dim(self) -> int:
        return int(self.net.embed_dim)

    def train(self, mode: bool = True) -> ERNet:
        nn.Module.train(self, mode)  # the network's own modes (BatchNorm, RSE noise) follow
        return self
