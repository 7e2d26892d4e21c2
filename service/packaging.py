"""``erc package NAME``: a TorchServe model archive (``model_store/NAME.mar``) of a store model.

The archive holds the handler (:mod:`service.torchserve_handler`) and the model's ``card.json``
and ``weights.safetensors``; the handler imports this package, which must be installed where
TorchServe runs. The model is verified (card, sha256, architecture) before it is packaged, and
the archive is written under a temporary name and renamed, so a failed build leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from training.card import CARD_FILE, read_card
from training.formats import load_served

HANDLER = Path(__file__).with_name("torchserve_handler.py")


def archiver_command() -> list[str]:
    exe = shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))
    if not Path(exe).exists():
        raise FileNotFoundError(
            "torch-model-archiver is not installed: pip install torch-model-archiver (part of the dev extras)"
        )
    return [exe]


def package_model(
    store: str | os.PathLike[str],
    name: str,
    *,
    version: str = "1.0",
    out_dir: str | os.PathLike[str] | None = None,
) -> Path:
    model_dir = Path(store) / name
    load_served(model_dir)  # refuse to package a model the service itself would refuse
    card = read_card(model_dir)
    out = Path(out_dir) if out_dir is not None else Path(store)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}.mar-") as tmp:
        cmd = [
            *archiver_command(),
            "--model-name",
            name,
            "--version",
            version,
            "--handler",
            str(HANDLER),
            "--extra-files",
            f"{model_dir / CARD_FILE},{model_dir / card.weights_file}",
            "--export-path",
            tmp,
            "--archive-format",
            "default",
            "--force",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(
                f"torch-model-archiver failed ({res.returncode}): {res.stderr.strip()[-2000:]}"
            )
        target = out / f"{name}.mar"
        os.replace(Path(tmp) / f"{name}.mar", target)
    return target
