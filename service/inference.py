"""The forward pass and its outputs, shared by the FastAPI service and the TorchServe handler.

``InferenceEngine.forward`` maps a batch ``[N, C, H, W]`` (floats in [0, 1]) to numpy arrays:
logits ``[N, m]``, probabilities ``[N, m]``, embeddings ``[N, k]`` (the encoder's output, the
paper's z-tilde, or an imported model's named embedding output; ``[N, 0]`` for a model without
one) and labels ``[N]``, from one pass of the served model (:mod:`training.formats`: the engine
asks its ``capabilities``, never its class).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.errors import CapabilityMissing
from service.imaging import InputSpec, unit_range
from training.card import ModelCard
from training.formats import Capabilities, ServedNet, load_served
from training.typicality import Typicality


@dataclass
class Outputs:
    logits: np.ndarray  # [N, m] float32
    probabilities: np.ndarray  # [N, m] float32
    embedding: np.ndarray  # [N, k] float32 ([N, 0] for a model without an embedding)
    label: np.ndarray  # [N] int64
    # Embedding typicality (training.typicality), when the model's card has it; else None.
    prior_log_density: np.ndarray | None = None  # [N] float32
    mahalanobis: np.ndarray | None = None  # [N] float32, minimum class-conditional distance
    atypical: np.ndarray | None = None  # [N] bool, mahalanobis above the card's threshold

    def __len__(self) -> int:
        return len(self.label)

    def rows(self, start: int, stop: int) -> Outputs:
        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[start:stop]

        return Outputs(
            self.logits[start:stop],
            self.probabilities[start:stop],
            self.embedding[start:stop],
            self.label[start:stop],
            cut(self.prior_log_density),
            cut(self.mahalanobis),
            cut(self.atypical),
        )

    @staticmethod
    def concat(parts: list[Outputs]) -> Outputs:
        if len(parts) == 1:
            return parts[0]

        def cat(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        def core(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        return Outputs(
            core("logits"),
            core("probabilities"),
            core("embedding"),
            core("label"),
            cat("prior_log_density"),
            cat("mahalanobis"),
            cat("atypical"),
        )

    def typicality(self, i: int) -> dict[str, Any] | None:
        """Row ``i``'s ``typicality`` object of the JSON answers, or None without a fitted score."""
        if self.mahalanobis is None or self.prior_log_density is None or self.atypical is None:
            return None
        return {
            "prior_log_density": float(self.prior_log_density[i]),
            "mahalanobis": float(self.mahalanobis[i]),
            "atypical": bool(self.atypical[i]),
        }


def require_embedding(capabilities: Capabilities, what: str) -> None:
    """Raise a 422 naming what is missing when ``what`` needs an embedding the model lacks."""
    if not capabilities.embedding:
        raise CapabilityMissing(f"{what} needs an embedding: {capabilities.why_no_embedding}")


class InferenceEngine:
    """A loaded, verified model on its device, in eval mode, ready for batches."""

    def __init__(self, model: ServedNet, card: ModelCard, device: torch.device) -> None:
        self.model = model.eval().to(device)
        self.capabilities: Capabilities = model.capabilities
        self.card = card
        self.device = device
        # On the CPU, oneDNN's convolutions run faster on NHWC tensors (measured on the paper's MNIST
        # encoder, batch 32: +17 %; docs/benchmarks.md); the weights were verified before this copy.
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)  # type: ignore[call-overload]
        self.spec = InputSpec.from_shape(card.input_shape)
        # Optional parts the card holds but that cannot be used: {part: why}. The model is served
        # without them (its predictions do not depend on them); /v1/models and /readyz say so.
        self.missing: dict[str, str] = {}
        self.typicality = self._typicality(card)

    def require_embedding(self, what: str) -> None:
        require_embedding(self.capabilities, what)

    def _typicality(self, card: ModelCard) -> Typicality | None:
        if not card.typicality or not self.capabilities.embedding:
            return None
        try:
            return Typicality.from_dict(card.typicality)
        except (ValueError, KeyError, TypeError) as exc:
            why = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            self.missing["typicality"] = f"the card's typicality section is unusable ({why})"
            return None

    @classmethod
    def from_store(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> InferenceEngine:
        dev = torch.device(device)
        model, card = load_served(model_dir, dev)
        return cls(model, card, dev)

    @property
    def name(self) -> str:
        return self.card.name

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> Outputs:
        """``x``: ``[n, C, H, W]``, uint8 pixels or float32 in [0, 1]."""
        # uint8 pixels cross to the device as bytes and are scaled there.
        x = unit_range(x.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)
        # ER models: the encoder's embedding and the head of it (RSE: the ensemble's logits).
        logits, z = self.model.forward_with_embedding(x)
        if z is None:
            z = logits.new_zeros(len(logits), 0)
        probs = torch.softmax(logits.float(), dim=1)
        out = Outputs(
            logits.float().cpu().numpy(),
            probs.cpu().numpy(),
            z.float().cpu().numpy(),
            probs.argmax(dim=1).cpu().numpy(),
        )
        if self.typicality is not None:
            t = self.typicality.scores(z)
            out.prior_log_density = t["prior_log_density"].astype(np.float32)
            out.mahalanobis = t["mahalanobis"].astype(np.float32)
            out.atypical = t["atypical"]
        return out

    def warmup(self, batch_sizes: list[int]) -> None:
        for n in batch_sizes:
            self.forward(torch.zeros(n, self.spec.channels, self.spec.height, self.spec.width))


def predictions(
    out: Outputs,
    label_names: list[str],
    *,
    embedding: bool,
    probabilities: bool = True,
    extra: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """KServe v1 ``predictions`` entries, one per row."""
    result = []
    for i in range(len(out)):
        label = int(out.label[i])
        p: dict[str, Any] = {"label": label, "label_name": label_names[label]}
        if probabilities:
            p["probabilities"] = out.probabilities[i]
        if embedding:
            p["embedding"] = out.embedding[i]
        typicality = out.typicality(i)
        if typicality is not None:
            p["typicality"] = typicality
        if extra is not None:
            p.update(extra[i])
        result.append(p)
    return result
