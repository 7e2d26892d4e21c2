"""The ``:attack`` response body, with no web framework (numpy arrays inside: serialize with orjson
OPT_SERIALIZE_NUMPY)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from service.attack_check.check import LEVELS, CheckParams
from service.imaging import Decoded, InputSpec
from service.inference import Outputs, predictions

QUANTIZATION = (
    "the attack runs at eps_effective = floor(255 * eps) / 255 on images rounded to the 8-bit grid (straight-"
    "through gradient); the result is rounded to the nearest 1/255 and clipped to clean +- eps_units/255 and "
    "[0, 1] in integer space; flipped is decided by the served model on the returned PNG"
)


def encode_png(image: np.ndarray) -> bytes:
    """One uint8 image ``[C, H, W]`` (C = 1 or 3) as a PNG file (lossless: decoding gives it back)."""
    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "L" if image.shape[0] == 1 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def attack_body(
    *,
    model: str,
    version: str,
    label_names: list[str],
    params: CheckParams,
    clean: Outputs,
    adversarial: Outputs,
    clean_u8: np.ndarray,
    adversarial_pngs: list[bytes],
    adversarial_u8: np.ndarray,
    decoded: list[Decoded],
    options: dict[str, bool],
    spec: InputSpec,
    work: dict[str, Any],
) -> dict[str, Any]:
    """Per image: both predictions with their PNGs, the perturbation's size, ``flipped`` and, when
    searched, the smallest flipping eps on the 1/255 grid."""
    emb, probs = options["embedding"], options["probabilities"]
    before = predictions(clean, label_names, embedding=emb, probabilities=probs)
    after = predictions(adversarial, label_names, embedding=emb, probabilities=probs)
    results = []
    for i in range(len(clean)):
        delta = adversarial_u8[i].astype(np.int16) - clean_u8[i].astype(np.int16)
        units = int(np.abs(delta).max()) if delta.size else 0
        entry: dict[str, Any] = {
            "flipped": bool(adversarial.label[i] != clean.label[i]),
            "clean": {**before[i], "png": base64.b64encode(encode_png(clean_u8[i])).decode()},
            "adversarial": {**after[i], "png": base64.b64encode(adversarial_pngs[i]).decode()},
            "perturbation": {
                "linf": units / LEVELS,
                "linf_units": units,
                "l2": float(np.sqrt((delta.astype(np.float64) ** 2).sum())) / LEVELS,
                "changed_values": int(np.count_nonzero(delta)),
            },
            "input": decoded[i].info(),
        }
        if params.smallest_eps:
            found = work["smallest_units"][i]
            entry["smallest_flipping_eps"] = None if found is None else found / LEVELS
        results.append(entry)
    return {
        "model": model,
        "model_version": version,
        "attack": params.record(),
        "results": results,
        "seconds": {"queue": round(work["queue_s"], 4), "attack": round(work["seconds"], 4)},
        "attack_runs": work["runs"],
        "quantization": QUANTIZATION,
        "preprocessing": spec.policy,
    }
