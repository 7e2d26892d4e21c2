"""The one interface every servable model has: embedding (features) + head (logits).

``EmbeddingClassifier.forward_features(x)`` maps images ``x`` of shape ``[N, C, H, W]`` with values in
[0, 1] to embeddings ``[N, k]`` (the paper's z-tilde for ER models, the penultimate activations for
baselines); ``forward_head(z)`` maps embeddings to logits ``[N, num_classes]``; ``forward`` composes
them, so the service gets both from one pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from training.models.layers import Normalize


class GaussianEncoder(nn.Module):
    """VAE encoder: a body whose last layer emits ``2k`` numbers, read as (mu, log-variance).

    ``forward`` returns the mean (deterministic inference embedding); ``distribution`` returns
    both halves for the KL term during training.
    """

    def __init__(self, body: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.body = body
        self.embed_dim = embed_dim

    def distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.body(x)
        mu, logvar = out[:, : self.embed_dim], out[:, self.embed_dim :]
        return mu, logvar.clamp(-30.0, 20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.distribution(x)[0]


class EmbeddingClassifier(nn.Module):
    """``classifier(encoder(normalize(x)))`` with access to the embedding.

    Args:
        encoder: maps normalized images to embeddings ``[N, embed_dim]``.
        classifier: maps embeddings to logits ``[N, num_classes]``.
        embed_dim: size of the embedding.
        num_classes: number of logits.
        normalize: optional per-channel normalization applied to the [0, 1] input.
        ensemble: for stochastic models (RSE): at inference (``not self.training``) ``forward``
            averages the softmax of this many noisy passes and returns its log, which is a valid
            logit vector (log-probabilities).
    """

    def __init__(
        self,
        encoder: nn.Module,
        classifier: nn.Module,
        *,
        embed_dim: int,
        num_classes: int,
        normalize: Normalize | None = None,
        ensemble: int = 1,
    ) -> None:
        super().__init__()
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.encoder = encoder
        self.classifier = classifier
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.ensemble = ensemble

    @property
    def variational(self) -> bool:
        return isinstance(self.encoder, GaussianEncoder)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in [0, 1] -> embeddings ``[N, embed_dim]``."""
        return self.encoder(self.normalize(x))

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[N, embed_dim]`` -> logits ``[N, num_classes]``."""
        return self.classifier(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ensemble == 1 or self.training:
            return self.forward_head(self.forward_features(x))
        logp = torch.stack(
            [F.log_softmax(self.forward_head(self.forward_features(x)), dim=1) for _ in range(self.ensemble)]
        )
        return torch.logsumexp(logp, dim=0) - math.log(self.ensemble)
