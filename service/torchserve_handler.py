"""TorchServe handler: a thin adapter over the service's own preprocessing and inference, so that
TorchServe answers with exactly the ``:predict`` JSON of the FastAPI service (embeddings included
when asked for).

The model archive (``erc package NAME``) carries ``card.json`` and ``weights.safetensors`` as extra
files; the weights are verified against the card's sha256 and loaded from safetensors only. This
package (``service``, ``training``) must be installed in TorchServe's Python environment.

Requests: a raw image body, or JSON ``{"instances": [{"b64": ...}], "parameters": {...}}``. Each
request of a TorchServe batch may hold several images; a bad request gets its own 4xx JSON error
(``{"error": {"code", "message"}}``) without failing the others in its batch.

Environment: ``ERC_TORCH_THREADS`` (torch intra-op threads), ``ERC_MAX_IMAGE_PIXELS``,
``ERC_MAX_INSTANCES``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import torch
from ts.torch_handler.base_handler import BaseHandler

from service.errors import BadRequest, InvalidInput, ServiceError
from service.imaging import Decoded
from service.inference import InferenceEngine, Outputs
from service.payloads import ImagePayload, decode_all, parse_instances, predict_body, prediction_options
from service.settings import Settings

log = logging.getLogger(__name__)


class _Request:
    """One TorchServe request of a batch: its rows in the stacked batch, or its error."""

    def __init__(self) -> None:
        self.rows = (0, 0)
        self.decoded: list[Decoded] = []
        self.options: dict[str, bool] = {}
        self.error: ServiceError | None = None


class ERCHandler(BaseHandler):
    def __init__(self) -> None:
        super().__init__()
        self.engine: InferenceEngine | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        settings = Settings()  # the same ERC_* variables as the service
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        gpu = props.get("gpu_id")
        device = f"cuda:{gpu}" if torch.cuda.is_available() and gpu is not None else "cpu"
        self.engine = InferenceEngine.from_store(props["model_dir"], device)
        self.max_pixels = settings.max_image_pixels
        self.max_instances = settings.max_instances
        for part, why in self.engine.missing.items():
            log.warning("model %s: served without %s: %s", self.engine.name, part, why)
        self.engine.warmup([1])
        self.initialized = True
        log.info(
            "erc handler ready: %s (%s) on %s", self.engine.name, self.engine.card.weights_sha256[:12], device
        )

    # -- TorchServe's three steps -----------------------------------------------------------------
    def preprocess(self, data: list[dict[str, Any]]) -> tuple[torch.Tensor | None, list[_Request]]:
        assert self.engine is not None
        requests, tensors, start = [], [], 0
        for row in data:
            req = _Request()
            try:
                payload = self._payload(row.get("data") if row.get("data") is not None else row.get("body"))
                req.options = prediction_options(payload.params)
                if req.options["embedding"]:
                    self.engine.require_embedding("return_embedding")
                x, req.decoded = decode_all(payload, self.engine.spec, self.max_pixels)
                req.rows = (start, start + len(x))
                start += len(x)
                tensors.append(x)
            except ServiceError as exc:
                req.error = exc
            requests.append(req)
        return (torch.cat(tensors) if tensors else None), requests

    def inference(self, data: tuple[torch.Tensor | None, list[_Request]], *args: Any, **kwargs: Any) -> Any:
        assert self.engine is not None
        x, requests = data
        return (self.engine.forward(x) if x is not None else None), requests

    def postprocess(self, data: tuple[Outputs | None, list[_Request]]) -> list[bytes]:
        assert self.engine is not None
        out, requests = data
        engine = self.engine
        responses = []
        for idx, req in enumerate(requests):
            if req.error is not None or out is None:
                err = req.error or InvalidInput("no images")
                self.context.set_response_status(err.status, err.code, idx)
                body: dict[str, Any] = err.body()
            else:
                rows = out.rows(*req.rows)
                body = predict_body(
                    engine.name,
                    engine.card.weights_sha256[:12],
                    rows,
                    engine.card.label_names,
                    req.decoded,
                    req.options,
                    engine.spec,
                )
            self.context.set_response_content_type(idx, "application/json")
            responses.append(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))
        return responses

    # -- helpers ------------------------------------------------------------------------------------
    def _payload(self, body: Any) -> ImagePayload:
        """TorchServe hands over a parsed dict/list for JSON requests, bytes for anything else."""
        if isinstance(body, dict | list):
            return parse_instances(body, self.max_instances)
        if isinstance(body, str):
            body = body.encode()
        if isinstance(body, bytes | bytearray):
            data = bytes(body)
            if data[:1] == b"{":
                try:
                    doc = orjson.loads(data)
                except orjson.JSONDecodeError as exc:
                    raise BadRequest(f"malformed JSON: {exc}") from None
                return parse_instances(doc, self.max_instances)
            return ImagePayload([data], ["body"])
        raise InvalidInput(f"unreadable request body of type {type(body).__name__}")


_service = ERCHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[bytes] | None:
    """Module-level entry point TorchServe calls."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    _service.context = context
    return _service.postprocess(_service.inference(_service.preprocess(data)))
