"""API fuzzing with schemathesis against the service's own OpenAPI spec.

Every operation the spec describes, the admin ones with a valid bearer token, gets a bounded and
reproducible set of generated requests: the coverage phase's boundary and invalid cases (wrong
types, missing fields, undeclared methods, ...) and ``MAX_EXAMPLES`` Hypothesis-fuzzed ones, valid
and invalid. Each response must be no 5xx, carry a status code and a content type the spec declares
for the operation, match the declared response schema and headers, and (for undeclared methods) be
a 405 whose ``Allow`` lists the documented methods. Each operation is one test: ``test_api[POST
/v1/models/{name}:predict]``.

The spec is built in-process at collection time (``create_app().openapi()``: no model is loaded), so
that pytest collects one test per operation; ``test_the_fuzzed_spec_is_the_served_one`` checks that
it is the document the live server serves. (``schemathesis.pytest.from_fixture``, the lazy loader,
rewrites ``node._nodeid``, which pytest 9.2 no longer has.) Path names and audited models are the
served model's, so request bodies reach the decoders, the model and the audits rather than a 404;
the audits the fuzzer starts must finish without failing, and the server log must hold no traceback.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.config import SchemathesisConfig

from service.app import create_app
from service.launch import ServerProcess
from service.settings import Settings

TOKEN = "fuzz-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tiny"
SCRATCH = "fuzz-scratch"  # the name the repository's load/unload/default operations are fuzzed with
MAX_EXAMPLES = 50  # Hypothesis-generated requests per operation, besides the coverage phase's cases
SEED = 20240501
SERVED: dict[str, str] = {}  # the served model's version, read from the running server
# The statuses schemathesis' positive_data_acceptance and negative_data_rejection checks accept by default.
POSITIVE_OK = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
NEGATIVE_OK = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]


@pytest.fixture(scope="module")
def fuzz_server(
    model_store: Path, tmp_path_factory: pytest.TempPathFactory, start_server_fn
) -> Iterator[ServerProcess]:
    srv = start_server_fn(
        model_store,
        tmp_path_factory.mktemp("logs"),
        ERC_ADMIN_TOKEN=TOKEN,
        ERC_MODELS=MODEL,
        ERC_DEFAULT_MODEL=MODEL,
        ERC_MAX_INSTANCES="8",
        ERC_MAX_BODY_BYTES=str(256 * 1024),
        # Fuzzed audits stay small: few samples, little work, at most one waiting behind the running one.
        ERC_AUDIT_DB=f"sqlite:///{tmp_path_factory.mktemp('audits')}/audits.db",
        ERC_AUDIT_MAX_N="50",
        ERC_AUDIT_MAX_WORK="20000",
        ERC_AUDIT_MAX_QUEUED="1",
        ERC_AUDIT_THREADS="1",
        # Fuzzed attack checks stay small too; the console's map uses a few test images.
        ERC_ATTACK_MAX_WORK="200",
        ERC_ATTACK_MAX_QUEUE="8",
        ERC_EMBEDDING_MAP_N="100",
    )
    try:
        with srv.client() as c:
            SERVED["version"] = c.get(f"/v2/models/{MODEL}").json()["versions"][0]
        yield srv
        failed = _failed_audits(srv)
    finally:
        stopped = srv.stop()
    log = srv.log.read_text(errors="replace")
    assert stopped, log[-3000:]
    # The audits the fuzzer started ran to their end: none failed on a request the API accepted.
    assert not failed, (failed, log[-5000:])
    assert "Traceback" not in log, log[-5000:]


def _failed_audits(srv: ServerProcess, timeout: float = 180) -> list[dict[str, Any]]:
    """The failed audits, once none is queued or running (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    with srv.client() as c:
        while True:
            audits = c.get("/admin/audits", headers=AUTH).json()["audits"]
            if all(a["status"] not in ("queued", "running") for a in audits) or time.monotonic() > deadline:
                return [a for a in audits if a["status"] == "failed"]
            time.sleep(0.5)


def _spec() -> dict[str, Any]:
    """The app's OpenAPI document, built without loading a model (models load in the lifespan)."""
    return create_app(Settings(admin_token=TOKEN)).openapi()


CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "headers": AUTH,
        # Every {name} and audited model is the served one, so requests reach the decoders, the model
        # and the audit checks rather than stopping at 404 (unknown names: tests/integration).
        "parameters": {"name": MODEL, "body.model": MODEL},
        "request-timeout": 60,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},  # the spec declares no links
        "checks": {
            "not_a_server_error": {"enabled": True},
            "status_code_conformance": {"enabled": True},
            "content_type_conformance": {"enabled": True},
            "response_schema_conformance": {"enabled": True},
            "response_headers_conformance": {"enabled": True},
        },
        "operations": [
            {
                # The image routes refuse some schema-valid requests by design, for what no JSON schema
                # states: a b64 string or a body that is not an image file, a tensor whose shape or
                # values do not fit the model (422), more images or pixels than the deployment's
                # limits (413). positive_data_acceptance gets those two statuses added, so a 400 or 415
                # for a schema-valid request still fails. Invalid requests are refused, but the image
                # count is checked before the images (no work on a request over the limit), so a
                # schema-violating one with too many instances gets 413: negative_data_rejection takes
                # 413 too.
                "include-path": [
                    "/v1/models/{name}:predict",
                    "/v1/models/{name}:embed",
                    "/v1/models/{name}:attack",
                    "/v2/models/{name}/infer",
                    "/v2/models/{name}/versions/{version}/infer",
                ],
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": [*POSITIVE_OK, "413", "422"]},
                    "negative_data_rejection": {"expected-statuses": [*NEGATIVE_OK, "413"]},
                },
            },
            {
                # The model repository's changes act on the deployment: fuzzed with a name that is
                # no store entry (valid requests get 404 or 409), so they never unload the served
                # model the other operations are fuzzed against (tests/integration/test_repository.py
                # covers loads and unloads for real).
                "include-path-regex": "^/v2/repository/models/",
                "parameters": {"name": SCRATCH},
            },
            {
                # An audit request's validity depends on the model it names (its label count, the l2
                # eps bound sqrt(C*H*W), the parameters each attack takes, the uploaded images) and on
                # the deployment's limits (samples, work): schema-valid requests may get 422 or 413.
                "include-path": "/admin/audits",
                "include-method": "POST",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*POSITIVE_OK, "413", "422"]}},
            },
        ],
    }
)
schema = schemathesis.openapi.from_dict(_spec(), config=CONFIG)


def test_the_fuzzed_spec_is_the_served_one(fuzz_server: ServerProcess) -> None:
    with fuzz_server.client() as c:
        r = c.get("/openapi.json")
    assert r.status_code == 200
    assert r.json() == _spec()


@schema.parametrize()
@settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api(case: schemathesis.Case, fuzz_server: ServerProcess) -> None:
    if case.path_parameters and "version" in case.path_parameters:
        # The served version (a hash of the weights, known once they exist; set here rather than in
        # a hook, as the coverage phase's cases are built at collection and skip the hooks).
        case.path_parameters["version"] = SERVED["version"]
    case.call_and_validate(base_url=fuzz_server.url)


def _png(seed: int, size: int = 28, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def test_valid_requests_conform(fuzz_server: ServerProcess) -> None:
    """Random data seldom makes a valid image: the successful responses of the inference and admin
    routes are validated against the spec here, from well-formed requests."""
    b64 = [base64.b64encode(_png(i)).decode() for i in range(3)]
    predict = {"instances": [{"b64": b} for b in b64], "parameters": {"return_embedding": True}}
    fp32 = {"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28], "data": [0.5] * (2 * 28 * 28)}
    infer = {"id": "req-1", "inputs": [fp32], "outputs": [{"name": "label"}, {"name": "logits"}]}
    infer_bytes = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [3], "data": b64}]}
    audit = {"model": MODEL, "data": {"n": 10}, "eps": [0, 0.1], "attacks": [{"name": "fgsm"}]}
    attack = {"instances": [{"b64": b} for b in b64[:2]], "parameters": {"steps": 3, "smallest_eps": True}}
    name = {"name": MODEL}
    cases = [
        ("/v1/models", "GET", {}, {}),
        ("/v1/models/{name}", "GET", name, {}),
        ("/v1/models/{name}:predict", "POST", name, {"body": predict, "media_type": "application/json"}),
        ("/v1/models/{name}:predict", "POST", name, {"body": _png(7, 40, "RGB"), "media_type": "image/png"}),
        ("/v1/models/{name}:embed", "POST", name, {"body": predict, "media_type": "application/json"}),
        ("/v2/models/{name}", "GET", name, {}),
        ("/v2/models/{name}/ready", "GET", name, {}),
        ("/v2/models/{name}/infer", "POST", name, {"body": infer, "media_type": "application/json"}),
        ("/v2/models/{name}/infer", "POST", name, {"body": infer_bytes, "media_type": "application/json"}),
        ("/v1/models/{name}:attack", "POST", name, {"body": attack, "media_type": "application/json"}),
        (
            "/v1/models/{name}:attack",
            "POST",
            name,
            {"body": _png(8), "media_type": "image/png", "query": {"eps": 0.1}},
        ),
        ("/v1/models/{name}/embedding-map", "GET", name, {}),
        ("/", "GET", {}, {}),
        ("/console", "GET", {}, {}),
        ("/admin/audits", "POST", {}, {"body": audit, "media_type": "application/json"}),
        ("/admin/audits", "GET", {}, {}),
    ]
    statuses = []
    for path, method, params, kw in cases:
        case = schema[path][method].Case(path_parameters=params, headers=AUTH, **kw)
        statuses.append(case.call_and_validate(base_url=fuzz_server.url).status_code)
    # 409 when the fuzzed audits still fill the queue (ERC_AUDIT_MAX_QUEUED=1)
    assert statuses[:14] == [200] * 14 and statuses[14] in (202, 409) and statuses[15] == 200, statuses
    with fuzz_server.client() as c:
        audit_id = c.get("/admin/audits", headers=AUTH).json()["audits"][0]["id"]
    for path in ("/admin/audits/{audit_id}", "/admin/audits/{audit_id}/report"):
        case = schema[path]["GET"].Case(path_parameters={"audit_id": audit_id}, headers=AUTH)
        assert case.call_and_validate(base_url=fuzz_server.url).status_code in (200, 409)


def test_audit_of_an_unknown_dataset_is_422(fuzz_server: ServerProcess) -> None:
    """Found while fixing the fuzzer's audit findings: an unknown data.dataset was a KeyError (500)."""
    body = {"model": MODEL, "data": {"dataset": "no-such-set", "n": 5}, "eps": [0.1]}
    case = schema["/admin/audits"]["POST"].Case(body=body, media_type="application/json", headers=AUTH)
    r = case.call_and_validate(base_url=fuzz_server.url)
    assert r.status_code == 422 and "unknown dataset" in r.json()["error"]["message"], r.text
