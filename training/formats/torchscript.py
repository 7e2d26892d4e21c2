"""TorchScript modules (``torch.jit.save``): white-box once the import's gradient probe passed.

``torch.jit.load`` reads TorchScript's own archive (code in the TorchScript language, run by the
TorchScript interpreter, not Python). TorchScript modules do not run Python hooks, so the
embedding is an output of ``forward`` (return ``(logits, features)`` and name ``output:1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.formats.base import ModelFileError, ServedNet
from training.formats.pt2 import ModuleNet


class ScriptNet(ModuleNet):
    format_name = "torchscript"


def load(path: Path, imported: dict[str, Any], device: torch.device) -> ServedNet:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # truncated archives, foreign files
        raise ModelFileError(
            f"{path}: not a readable TorchScript archive ({type(exc).__name__}: {exc})"
        ) from None
    module.eval()
    return ScriptNet(module, imported, str(path.name)).to(device)
