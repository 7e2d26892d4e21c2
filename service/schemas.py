"""Pydantic models that document the API in OpenAPI (/docs). The hot paths parse and serialize
with orjson directly; these classes describe what they read and write."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(..., examples=["invalid_image"])
    message: str = Field(..., examples=["instances[0]: corrupt or truncated PNG image: ..."])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Instance(BaseModel):
    b64: str = Field(..., description="base64 of an image file (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)")


class PredictParameters(BaseModel):
    return_embedding: bool = Field(False, description="add each image's embedding (the encoder output)")
    return_probabilities: bool = Field(True, description="add the softmax probabilities")


class PredictRequest(BaseModel):
    instances: list[Instance] = Field(..., min_length=1)
    parameters: PredictParameters | None = None


class InputInfo(BaseModel):
    format: str
    mode: str
    original_size: list[int] = Field(..., description="[width, height] as sent")
    resized: bool


class TypicalityScore(BaseModel):
    prior_log_density: float = Field(description="log-density of the embedding under the model's prior")
    mahalanobis: float = Field(
        description="smallest Mahalanobis distance to the class-conditional Gaussians of the "
        "training embeddings"
    )
    atypical: bool = Field(description="mahalanobis above the threshold calibrated on held-out clean images")


class Prediction(BaseModel):
    label: int
    label_name: str
    probabilities: list[float] | None = None
    embedding: list[float] | None = None
    typicality: TypicalityScore | None = Field(None, description="present when the model has a fitted score")
    input: InputInfo


class PredictResponse(BaseModel):
    model: str
    model_version: str
    predictions: list[Prediction]
    preprocessing: dict[str, str]


class EmbedResponse(BaseModel):
    model: str
    model_version: str
    embed_dim: int
    embeddings: list[list[float]]
    typicality: list[TypicalityScore] | None = Field(
        None, description="one per image, for models with a score"
    )
    inputs: list[InputInfo]
    preprocessing: dict[str, str]


class ModelSummary(BaseModel):
    name: str
    ready: bool
    status: str
    reason: str | None = None
    version: str | None = None
    arch: str | None = None
    dataset: str | None = None
    method: str | None = None
    input_shape: list[int] | None = None
    embed_dim: int | None = None
    prior: str | None = None
    labels: list[str] | None = None
    weights_sha256: str | None = None
    weights_dtype: str | None = None
    metrics: list[dict[str, Any]] | None = None


class ModelList(BaseModel):
    models: list[ModelSummary]
    default_model: str | None


# -- Open Inference Protocol (KServe v2) --------------------------------------------------------
class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32", "BYTES"]
    parameters: dict[str, Any] | None = None
    data: list[Any]


class RequestedOutput(BaseModel):
    name: Literal[
        "logits", "probabilities", "embedding", "label", "prior_log_density", "mahalanobis", "atypical"
    ]
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(..., min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class AuditStoreReadiness(BaseModel):
    store: str = Field(description="the job store's URL, password hidden")
    ok: bool = Field(description="whether the store answers (the admin audit routes answer 503 while not)")
    local_worker: bool = Field(description="whether this API process runs audits itself (embedded mode)")
    error: str | None = Field(None, description="why the store cannot be used")


class Readiness(BaseModel):
    ready: bool
    draining: bool = False
    models: dict[str, dict[str, Any]] | None = None
    audits: AuditStoreReadiness | None = Field(
        None, description="present with the admin routes on; does not affect ready"
    )


class Liveness(BaseModel):
    live: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": "error"} for c in codes}


def json_error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """:func:`error_responses` for a route whose own response class is not JSON (FastAPI files a
    ``model`` under the route's media type, e.g. text/html): the error body declared as JSON."""
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {c: {"description": "error", "content": body} for c in codes}


IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "description": "image files (any field name is read; at least one file part)",
                        }
                    },
                    "required": ["file"],
                }
            },
        },
    }
}


# Request models the routes parse by hand, and the error body json_error_responses refers to: added
# to the OpenAPI components by the app factory.
REQUEST_MODELS: list[type[BaseModel]] = [PredictRequest, InferRequest, ErrorResponse]


def component_schemas() -> dict[str, Any]:
    """JSON schemas of REQUEST_MODELS and everything they reference, keyed by model name."""
    out: dict[str, Any] = {}
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out
