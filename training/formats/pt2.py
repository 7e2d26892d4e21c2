"""torch.export programs (``.pt2``, ``torch.export.save``): white-box through ``ep.module()``.

``torch.export.load`` reads the program's own serialized graph and weights (no pickle of Python
objects runs). The program must have a dynamic batch dimension
(``dynamic_shapes={"x": {0: torch.export.Dim("batch")}}``); the embedding is an output of the
program (a forward returning ``(logits, features)``, named ``output:1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.formats.base import Capabilities, ModelFileError, ServedNet, check_embedding_shape


def output_index(spec: str | int | None, where: str) -> int | None:
    """``"output:1"`` or ``1`` -> 1; None -> None."""
    if spec is None:
        return None
    text = str(spec)
    text = text.removeprefix("output:")
    try:
        return int(text)
    except ValueError:
        raise ModelFileError(
            f"{where}: the embedding of this format is an output of the model, named output:K "
            f"(K = its position in the returned tuple), not {spec!r}"
        ) from None


def pick_outputs(
    out: Any, logits_at: int, embed_at: int | None, where: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits and embedding tensors of a model's output (a tensor, or a tuple/list of them)."""
    outs = list(out) if isinstance(out, tuple | list) else [out]
    for k in [logits_at] + ([embed_at] if embed_at is not None else []):
        if k >= len(outs) or not isinstance(outs[k], torch.Tensor):
            raise ModelFileError(
                f"{where}: output {k} does not exist or is not a tensor ({len(outs)} outputs)"
            )
    logits = outs[logits_at]
    z = check_embedding_shape(outs[embed_at], logits.shape[0], where) if embed_at is not None else None
    return logits, z


class ModuleNet(ServedNet):
    """A torch module (an exported program's ``module()``, a TorchScript module) behind the contract."""

    def __init__(self, module: torch.nn.Module, imported: dict[str, Any], where: str) -> None:
        embed_at = output_index(imported.get("embedding"), where)
        gradients = bool(imported.get("gradients", True))
        caps = Capabilities(
            gradients=gradients,
            embedding=embed_at is not None,
            why_no_gradients="" if gradients else str(imported.get("why_no_gradients") or ""),
            why_no_embedding="" if embed_at is not None else no_embedding_reason(imported),
        )
        super().__init__(caps, imported.get("mean"), imported.get("std"))
        for p in module.parameters():
            p.requires_grad_(False)  # only input gradients are ever needed
        self.module = module
        self.embed_at = embed_at
        self.logits_at = int(imported.get("logits_output", 0))
        self.where = where

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.capabilities.gradients and torch.is_grad_enabled():
            with torch.no_grad():
                return pick_outputs(self.module(x), self.logits_at, self.embed_at, self.where)
        return pick_outputs(self.module(x), self.logits_at, self.embed_at, self.where)


def no_embedding_reason(imported: dict[str, Any]) -> str:
    return (
        "this model was imported without an embedding layer (erc import --embedding), so it has no "
        "embedding: :embed, return_embedding, the v2 embedding output, typicality and the embedding "
        "map are not available"
    )


class ExportedNet(ModuleNet):
    format_name = "pt2"


def load(path: Path, imported: dict[str, Any], device: torch.device) -> ServedNet:
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:  # a truncated or foreign file raises anything from zipfile to torch
        raise ModelFileError(
            f"{path}: not a readable torch.export program ({type(exc).__name__}: {exc})"
        ) from None
    try:
        module = ep.module()
    except Exception as exc:
        raise ModelFileError(f"{path}: the program cannot be run ({type(exc).__name__}: {exc})") from None
    return ExportedNet(module, imported, str(path.name)).to(device)
