"""One contract for a served model: what every model the service serves, audits and attacks is.

A served model (:class:`ServedNet`, an ``nn.Module``) takes images ``x`` ``[N, C, H, W]``, floats in
[0, 1] (the card's ``input_shape``), applies the card's mean/std itself (so attacks and their eps
stay in [0, 1] pixel space), and gives:

- ``forward(x)`` -> logits ``[N, num_classes]``, differentiable w.r.t. ``x`` when
  ``capabilities.gradients`` (white-box); otherwise computed without autograd (black-box: only
  query attacks may run);
- ``forward_with_embedding(x)`` -> ``(logits, embedding [N, k] or None)`` from one pass;
- ``forward_features(x)`` -> the embedding, or :class:`MissingCapability` naming what is missing.

Everything downstream (routes, the batcher, the TorchServe handler, typicality, ``:attack``,
audits, the report, the console) asks :attr:`ServedNet.capabilities`, never the class of a model
(LitServe's ``LitAPI``: the loops never look inside it). Each format is one module of this
package (``er``, ``pt2``, ``torchscript``, ``onnx``) registered in :data:`FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.errors import ErcError

BLACK_BOX_NOTE = "black-box: an upper bound, not a worst case"


class MissingCapability(ErcError):
    """A request needs a part this model does not have (input gradients, an embedding)."""


class ModelFileError(ErcError):
    """A model file that cannot be imported or loaded: unreadable, the wrong format, fails a check."""


@dataclass(frozen=True)
class Capabilities:
    """What a served model can do; the card records it (``imported.capabilities``)."""

    gradients: bool  # input gradients through the model: white-box attacks and audits
    embedding: bool  # an embedding from the same pass as the logits: :embed, typicality, the map
    head: bool = False  # logits computable from an embedding alone (forward_head): ER models only
    why_no_gradients: str = ""
    why_no_embedding: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def threat_note(self) -> str | None:
        """What an audit of this model measures, when it is not a white-box worst case."""
        return None if self.gradients else BLACK_BOX_NOTE


WHITE_BOX = Capabilities(gradients=True, embedding=True, head=True)


def capabilities_of(model: Any) -> Capabilities:
    """A model's capabilities: a served model's own; a bare ER network (a training run evaluated
    directly) is white-box with an embedding."""
    caps = getattr(model, "capabilities", None)
    return caps if isinstance(caps, Capabilities) else WHITE_BOX


class ServedNet(nn.Module):
    """Base of every served model. ``mean``/``std`` (per channel, or None) are applied to the [0, 1]
    input before the wrapped network sees it."""

    format_name = "base"

    def __init__(
        self,
        capabilities: Capabilities,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.capabilities = capabilities
        # A zero-size parameter: code that finds a model's device with next(model.parameters())
        # works for formats without torch parameters (ONNX) too.
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.normalized = mean is not None and std is not None
        if mean is not None and std is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if not self.normalized:
            return x
        return (x - self.mean) / self.std  # type: ignore[operator]

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The wrapped network on preprocessed input: ``(logits, embedding or None)``."""
        raise NotImplementedError

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [0, 1] -> ``(logits [N, m], embedding [N, k] or None)`` from one pass."""
        return self.run(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(x)[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> embeddings ``[N, k]``; :class:`MissingCapability` without one."""
        if not self.capabilities.embedding:
            raise MissingCapability(self.capabilities.why_no_embedding or "this model has no embedding")
        z = self.forward_with_embedding(x)[1]
        assert z is not None
        return z

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        raise MissingCapability("logits from an embedding alone are only available for ER models")

    def train(self, mode: bool = True) -> ServedNet:
        # An imported network is frozen as its file holds it (torch.export programs refuse
        # .train()/.eval(); the import refused any model whose outputs are not deterministic).
        self.training = mode
        return self


def check_embedding_shape(z: torch.Tensor | None, n: int, where: str) -> torch.Tensor | None:
    """Flatten an embedding output to ``[N, k]`` (a feature map ``[N, C, H, W]`` becomes ``[N, C*H*W]``)."""
    if z is None:
        return None
    if z.ndim < 2 or z.shape[0] != n:
        raise ModelFileError(f"{where}: the embedding output has shape {list(z.shape)}, expected [N, ...]")
    return z.flatten(1)


@dataclass(frozen=True)
class Format:
    """One model format: its name on the card, the file name in the store, how it is loaded."""

    name: str
    file_name: str  # the model file's name inside model_store/NAME
    suffixes: tuple[str, ...]  # file name endings ``erc import`` recognises
    # (path, card's imported section, device) -> the served model
    load: Callable[[Path, dict[str, Any], torch.device], ServedNet]
    white_box: bool  # gradients available when the import's gradient probe passes
    description: str
    # (source, target): how erc import stores the file (default: a byte copy)
    store: Callable[[Path, Path], None] | None = None
