"""Before a model enters the store: load the staged entry exactly as the service and the TorchServe
handler will, and answer the same images through both (``erc export`` runs this on the staged
directory, so a model the server would refuse never replaces anything).

Checks: the card and weights (or an imported model file) load through
:class:`~service.inference.InferenceEngine` with every optional part usable (a card whose
typicality cannot be used is refused here, where the server would serve the model without it);
logits, embeddings and typicality scores are finite; for ``erc import``, the served logits equal
the model file's run directly; the TorchServe handler (when TorchServe is installed) answers PNG
files of those images with the same labels and probabilities as the engine. Failures raise
:class:`NotServable` with one line.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from service.attack_check.body import encode_png
from service.inference import InferenceEngine, Outputs
from training.errors import ErcError

log = logging.getLogger(__name__)


class NotServable(ErcError):
    """A staged model the service or the TorchServe handler would not serve as written."""


class _HandlerContext:
    """What TorchServe's context gives a handler: the model directory and per-request response
    settings (status codes are kept, to be checked)."""

    def __init__(self, model_dir: Path) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest: dict[str, Any] = {}
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass


def probe_images(shape: list[int], n: int = 4, seed: int = 0) -> np.ndarray:
    """``n`` seeded uint8 images ``[n, C, H, W]``: noise, black, white, mid grey."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    images[1:2], images[2:3], images[3:4] = 0, 255, 128
    return images


def _finite(name: str, out: Outputs) -> None:
    parts = {"logits": out.logits, "embedding": out.embedding}
    if out.mahalanobis is not None and out.prior_log_density is not None:
        parts.update(mahalanobis=out.mahalanobis, prior_log_density=out.prior_log_density)
    for part, values in parts.items():
        if not np.isfinite(values).all():
            raise NotServable(f"{name}: the served model gives non-finite {part} on probe images")


def check_servable(model_dir: str | Path, reference: torch.nn.Module | None = None) -> None:
    """Raise :class:`NotServable` unless ``model_dir`` serves as written (see the module doc).

    ``reference`` (``erc import``: the model file run directly, [0, 1] images -> logits): the
    served logits must equal its logits on the probe images (same labels, within float tolerance).
    """
    model_dir = Path(model_dir)
    try:
        engine = InferenceEngine.from_store(model_dir, "cpu")
    except ErcError as exc:
        raise NotServable(f"the service cannot load it: {exc}") from None
    name = engine.card.name
    if engine.missing:
        part, why = next(iter(engine.missing.items()))
        raise NotServable(f"{name}: the service would serve it without {part}: {why}")
    images = probe_images(engine.card.input_shape)
    x = torch.from_numpy(images).float().div(255.0)
    out = engine.forward(x)
    _finite(name, out)
    if reference is not None:
        with torch.no_grad():
            direct = reference(x).float().cpu().numpy()
        if not np.allclose(out.logits, direct, atol=1e-4, rtol=1e-4) or (
            out.label.tolist() != direct.argmax(1).tolist()
        ):
            diff = float(np.abs(out.logits - direct).max())
            raise NotServable(
                f"{name}: check served_equals_file: the store entry's logits differ from the file run "
                f"directly by up to {diff:.3g}"
            )
    try:
        from service.torchserve_handler import ERCHandler
    except ImportError as exc:  # TorchServe is an optional extra
        log.info("%s: TorchServe handler not checked (%s)", name, exc)
        return
    handler = ERCHandler()
    context = _HandlerContext(model_dir)
    try:
        handler.initialize(context)
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise NotServable(f"{name}: the TorchServe handler cannot load it: {why}") from None
    handler.context = context
    body = {"instances": [{"b64": base64.b64encode(encode_png(im)).decode()} for im in images]}
    answers = handler.postprocess(handler.inference(handler.preprocess([{"body": orjson.dumps(body)}])))
    if context.statuses:
        raise NotServable(f"{name}: the TorchServe handler refused probe images: {context.statuses[0]}")
    preds = orjson.loads(answers[0])["predictions"]
    served = np.array([p["probabilities"] for p in preds], dtype=np.float32)
    same_labels = [p["label"] for p in preds] == out.label.tolist()
    if not same_labels or not np.allclose(served, out.probabilities, atol=1e-5):
        raise NotServable(f"{name}: the TorchServe handler's answers differ from the service's")
