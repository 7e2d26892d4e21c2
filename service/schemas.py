"""Pydantic models that document the API in OpenAPI (/docs). The hot paths parse and serialize
with orjson directly; these classes describe what they read and write."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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


class Classified(BaseModel):
    label: int
    label_name: str
    probabilities: list[float] | None = None
    embedding: list[float] | None = None
    typicality: TypicalityScore | None = Field(None, description="present when the model has a fitted score")


class Prediction(Classified):
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


# -- the per-request attack check (POST /v1/models/{name}:attack) -------------------------------------
class AttackParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eps: float | None = Field(
        None, ge=0, le=1, description="l_inf radius on [0, 1] images; default: the model's training eps"
    )
    steps: int = Field(40, ge=1, description="PGD steps (at most ERC_ATTACK_MAX_STEPS, 100 by default)")
    restarts: int = Field(1, ge=1, description="PGD restarts (at most ERC_ATTACK_MAX_RESTARTS, 5 by default)")
    seed: int = Field(0, ge=0, le=2**62 - 1, description="seed of the random starts: same seed, same answer")
    smallest_eps: bool = Field(False, description="also search the smallest flipping eps on the 1/255 grid")
    smallest_eps_max: float = Field(0.5, ge=1 / 255, le=1, description="upper end of that search")
    return_embedding: bool = Field(False, description="add the clean and adversarial embeddings")
    return_probabilities: bool = Field(True, description="add the softmax probabilities")


class AttackRequest(BaseModel):
    instances: list[Instance] = Field(..., min_length=1)
    parameters: AttackParameters | None = None


class AttackedImage(Classified):
    png: str = Field(description="base64 PNG of the image as the model saw it (8-bit, the model's size)")


class Perturbation(BaseModel):
    linf: float = Field(description="max |adversarial - clean| over pixels, in [0, 1] units (<= eps)")
    linf_units: int = Field(description="the same in 8-bit steps (1/255)")
    l2: float = Field(description="l_2 norm of the perturbation, in [0, 1] units")
    changed_values: int = Field(description="pixel values (per channel) the attack changed")


class AttackResult(BaseModel):
    flipped: bool = Field(description="the served model labels the adversarial PNG otherwise than the clean")
    clean: AttackedImage
    adversarial: AttackedImage
    perturbation: Perturbation
    smallest_flipping_eps: float | None = Field(
        None, description="with smallest_eps: the smallest k/255 found to flip it (null: none up to the max)"
    )
    input: InputInfo


class AttackResponse(BaseModel):
    model: str
    model_version: str
    attack: dict[str, Any] = Field(description="how the images were made: PGD parameters, eps_effective")
    results: list[AttackResult]
    seconds: dict[str, float] = Field(description="queue: waiting for a worker; attack: in the worker")
    attack_runs: int = Field(description="attack runs made (the check, and the search's probes)")
    quantization: str
    preprocessing: dict[str, str]


# -- the console -----------------------------------------------------------------------------------
class EmbeddingMap(BaseModel):
    model: str
    model_version: str
    dataset: str
    split: str
    n: int
    seed: int
    embed_dim: int
    method: str = Field(description="the audit report's projection: PCA fitted on these clean embeddings")
    mean: list[float] = Field(description="[k]: subtracted before projecting")
    basis: list[list[float]] = Field(description="[k][2]: a point's map position is (z - mean) @ basis")
    points: list[list[float]] = Field(description="[n][2] projected test embeddings")
    labels: list[int] = Field(description="[n] their true labels")
    label_names: list[str]


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
    train_eps: float | None = Field(None, description="l_inf eps it was trained at (default eps of :attack)")
    headline: dict[str, Any] | None = Field(
        None,
        description="the worst robust accuracy measured at the training eps over every attack in the card, "
        "with its n, 95 % interval and attack",
    )
    metrics: list[dict[str, Any]] | None = None
    typicality: bool | None = Field(None, description="whether answers carry the typicality scores")
    missing: dict[str, str] | None = Field(
        None,
        description="optional parts of the card the model is served without (typicality), each with "
        "the reason; predictions are unaffected",
    )
    warnings: list[str] | None = Field(
        None, description="what export found wrong with the model (accuracy at chance, ...)"
    )
    model_format: str | None = Field(
        None, description="er (this project's checkpoints), or an imported pt2, torchscript or onnx model"
    )
    capabilities: dict[str, Any] | None = Field(
        None, description="gradients (white-box attacks and audits) and embedding (:embed, typicality)"
    )
    threat_model: str | None = Field(
        None, description='for a black-box model: "black-box: an upper bound, not a worst case"'
    )


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


def _with_json_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An image request body whose JSON form is the schema ``model`` (the other forms unchanged)."""
    json_form = {"schema": {"$ref": f"#/components/schemas/{model}"}}
    content = {**body["requestBody"]["content"], "application/json": json_form}
    return {"requestBody": {**body["requestBody"], "content": content}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


# :attack takes :predict's three body forms; with a raw image body its parameters come in the query.
ATTACK_BODY = {
    **_with_json_request(IMAGE_BODY, "AttackRequest"),
    "parameters": [
        _query("eps", {"type": "number", "minimum": 0, "maximum": 1}, "l_inf radius (default: training eps)"),
        _query("steps", {"type": "integer", "minimum": 1}, "PGD steps"),
        _query("restarts", {"type": "integer", "minimum": 1}, "PGD restarts"),
        _query("seed", {"type": "integer", "minimum": 0, "maximum": 2**62 - 1}, "seed of the random starts"),
        _query("smallest_eps", {"type": "boolean"}, "search the smallest flipping eps"),
        _query("smallest_eps_max", {"type": "number", "minimum": 1 / 255, "maximum": 1}, "its upper end"),
        _query("return_embedding", {"type": "boolean"}, "add embeddings"),
        _query("return_probabilities", {"type": "boolean"}, "add probabilities"),
    ],
}


# Request models the routes parse by hand, and the error body json_error_responses refers to: added
# to the OpenAPI components by the app factory.
REQUEST_MODELS: list[type[BaseModel]] = [PredictRequest, InferRequest, AttackRequest, ErrorResponse]


def component_schemas() -> dict[str, Any]:
    """JSON schemas of REQUEST_MODELS and everything they reference, keyed by model name."""
    out: dict[str, Any] = {}
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out
