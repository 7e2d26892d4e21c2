"""The served-model contract (:mod:`training.formats.base`) and its formats, one module each.

:func:`load_served` is how the service, the TorchServe handler, the attack and audit workers and
``erc audit`` load any store entry: it verifies the model file's sha256 against the card (like
the ER weights), then loads it with its format's own loader. Never ``torch.load`` of a pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.card import CardError, ModelCard, read_card, verified_file
from training.formats import er, onnx, pt2, torchscript
from training.formats.base import (
    BLACK_BOX_NOTE,
    Capabilities,
    Format,
    MissingCapability,
    ModelFileError,
    ServedNet,
    capabilities_of,
)

IMPORTED_FORMATS: dict[str, Format] = {
    "pt2": Format(
        "pt2",
        "model.pt2",
        (".pt2",),
        pt2.load,
        True,
        "torch.export ExportedProgram (torch.export.save): white-box through ep.module()",
    ),
    "torchscript": Format(
        "torchscript",
        "model.torchscript.pt",
        (".ts", ".torchscript", ".jit", ".pt", ".pth"),
        torchscript.load,
        True,
        "TorchScript (torch.jit.save): white-box once the gradient probe at import passes",
    ),
    "onnx": Format(
        "onnx",
        "model.onnx",
        (".onnx",),
        onnx.load,
        False,
        f"ONNX through onnxruntime: {BLACK_BOX_NOTE}",
        onnx.store_file,
    ),
}


def format_of(path: str | os.PathLike[str], name: str | None = None) -> Format:
    """The format named, or the one the file name's ending says."""
    if name:
        if name not in IMPORTED_FORMATS:
            raise ModelFileError(f"unknown format {name!r}; known: {', '.join(IMPORTED_FORMATS)}")
        return IMPORTED_FORMATS[name]
    lower = str(path).lower()
    for fmt in IMPORTED_FORMATS.values():
        if lower.endswith(fmt.suffixes):
            return fmt
    known = ", ".join(f"{s} ({f.name})" for f in IMPORTED_FORMATS.values() for s in f.suffixes)
    raise ModelFileError(
        f"{path}: cannot tell the format from the file name (known: {known}); name it with --format"
    )


def build_served(card: ModelCard, model_dir: Path, device: torch.device) -> ServedNet:
    """The served model of a verified store entry."""
    if card.model_format == "er":
        from training.card import load_model

        net, _ = load_model(model_dir, device)
        return er.ERNet(net).to(device).eval()
    fmt = IMPORTED_FORMATS.get(card.model_format)
    if fmt is None:
        raise CardError(f"card {card.name!r}: unknown model_format {card.model_format!r}")
    path = verified_file(model_dir, card)
    try:
        return fmt.load(path, card.imported, device).eval()
    except ModelFileError as exc:
        raise CardError(str(exc)) from None


def load_served(
    model_dir: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[ServedNet, ModelCard]:
    """Verify and load any store entry; returns the served model (eval mode, on ``device``) and its card."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    return build_served(card, model_dir, torch.device(device)), card


__all__ = [
    "BLACK_BOX_NOTE",
    "IMPORTED_FORMATS",
    "Capabilities",
    "Format",
    "MissingCapability",
    "ModelFileError",
    "ServedNet",
    "build_served",
    "capabilities_of",
    "format_of",
    "load_served",
]
