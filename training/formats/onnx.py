"""ONNX models through onnxruntime: black-box (no input gradients), so only query attacks run, and
every robust figure is an upper bound, not a worst case.

onnxruntime executes the graph's operators in its own runtime; a model file carries no Python.
The embedding is a graph output, named by its output name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.formats.base import (
    BLACK_BOX_NOTE,
    Capabilities,
    MissingCapability,
    ModelFileError,
    ServedNet,
    check_embedding_shape,
)
from training.formats.pt2 import no_embedding_reason

WHY_NO_GRADIENTS = f"ONNX models run in onnxruntime, which gives no input gradients ({BLACK_BOX_NOTE})"


def output_name(spec: Any, names: list[str], where: str) -> str | None:
    if spec is None:
        return None
    text = str(spec)
    if text.startswith("output:") and text[7:].isdigit() and text not in names:
        k = int(text[7:])
        if k < len(names):
            return names[k]
    if text not in names:
        raise ModelFileError(f"{where}: no output named {text!r}; the graph's outputs: {', '.join(names)}")
    return text


class OnnxNet(ServedNet):
    format_name = "onnx"

    def __init__(self, session: Any, imported: dict[str, Any], where: str) -> None:
        outputs = [o.name for o in session.get_outputs()]
        embed = output_name(imported.get("embedding"), outputs, where)
        caps = Capabilities(
            gradients=False,
            embedding=embed is not None,
            why_no_gradients=WHY_NO_GRADIENTS,
            why_no_embedding="" if embed is not None else no_embedding_reason(imported),
        )
        super().__init__(caps, imported.get("mean"), imported.get("std"))
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.logits_name = output_name(imported.get("logits_output") or outputs[0], outputs, where)
        self.embed_name = embed
        self.where = where

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.is_grad_enabled() and x.requires_grad:
            raise MissingCapability(f"{self.where}: no input gradients: {WHY_NO_GRADIENTS}")
        names = [self.logits_name] + ([self.embed_name] if self.embed_name else [])
        feed = {self.input_name: np.ascontiguousarray(x.detach().float().cpu().numpy())}
        try:
            outs = self.session.run(names, feed)
        except Exception as exc:  # onnxruntime's own error types
            raise ModelFileError(f"{self.where}: onnxruntime failed ({type(exc).__name__}: {exc})") from None
        logits = torch.from_numpy(np.asarray(outs[0])).to(x.device)
        z = torch.from_numpy(np.asarray(outs[1])).to(x.device) if self.embed_name else None
        return logits, check_embedding_shape(z, logits.shape[0], self.where)

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxNet:
        return self  # the session is immutable and thread-safe; nothing to copy


def store_file(source: Path, target: Path) -> None:
    """Copy an ONNX model into the store as one self-contained file: weights the exporter wrote as
    external data (``model.onnx.data`` beside it) are read and embedded, so the card's sha256
    covers every weight."""
    try:
        import onnx as onnx_lib
    except ImportError as exc:
        raise ModelFileError(f"{source}: importing ONNX models needs the onnx package: {exc}") from None
    try:
        model = onnx_lib.load(str(source), load_external_data=True)
        onnx_lib.save_model(model, str(target), save_as_external_data=False)
    except Exception as exc:  # protobuf decode errors, missing external data files
        raise ModelFileError(f"{source}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def load(path: Path, imported: dict[str, Any], device: torch.device) -> ServedNet:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelFileError(f"{path}: ONNX models need onnxruntime (pip install '.[onnx]'): {exc}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    return OnnxNet(session, imported, str(path.name)).to(device)
