"""The HTTP service as a real process: every endpoint, every input shape, every documented error."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from training.card import load_model
from training.typicality import Typicality


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference(model_store: Path, mnist_sample):
    """What the tiny model says in-process for the sample images (same [0, 1] floats as the PNGs)."""
    model, card = load_model(model_store / "tiny")
    x = torch.from_numpy(mnist_sample.images).float().div(255)[:, None]
    with torch.no_grad():
        z = model.forward_features(x)
        logits = model.forward_head(z)
    typicality = Typicality.from_dict(card.typicality).scores(z)
    return {
        "logits": logits.numpy(),
        "embedding": z.numpy(),
        "label": logits.argmax(1).numpy(),
        "card": card,
        "typicality": typicality,
    }


def _same_typicality(got: dict, reference: dict, i: int) -> bool:
    t = reference["typicality"]
    return (
        got["prior_log_density"] == pytest.approx(float(t["prior_log_density"][i]), abs=1e-3)
        and got["mahalanobis"] == pytest.approx(float(t["mahalanobis"][i]), abs=1e-3)
        and got["atypical"] == bool(t["atypical"][i])
    )


# -- health, listing, cards -----------------------------------------------------------------------
def test_health_and_readiness_report_the_refused_model(server) -> None:
    with server.client() as c:
        assert c.get("/healthz").json() == {"live": True}
        ready = c.get("/readyz")
        assert ready.status_code == 200
        detail = ready.json()["models"]
        assert detail["tiny"]["ready"] and detail["big"]["ready"]
        assert detail["broken"]["ready"] is False and "sha256" in detail["broken"]["reason"]
    assert "model broken refused" in server.log.read_text()
    assert server.started_s < 60


def test_model_list_and_card(server, reference) -> None:
    with server.client() as c:
        listing = c.get("/v1/models").json()
        names = {m["name"]: m for m in listing["models"]}
        assert set(names) == {"tiny", "big", "broken"} and listing["default_model"] == "tiny"
        tiny = c.get("/v1/models/tiny").json()
        assert tiny["weights_sha256"] == reference["card"].weights_sha256
        assert tiny["version"] == tiny["weights_sha256"][:12]
        assert tiny["input_shape"] == [1, 28, 28] and tiny["embed_dim"] == 4 and tiny["labels"][7] == "7"
        assert tiny["metrics"][0]["metric"] == "accuracy" and tiny["metrics"][0]["n"] == 200
        missing = c.get("/v1/models/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


# -- :predict and :embed ----------------------------------------------------------------------------
def test_predict_json_matches_the_model_in_process(server, mnist_sample, reference) -> None:
    n = 8
    body = {
        "instances": [{"b64": b64(p)} for p in mnist_sample.pngs[:n]],
        "parameters": {"return_embedding": True},
    }
    with server.client() as c:
        r = c.post("/v1/models/tiny:predict", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"] == "tiny" and "resize" in doc["preprocessing"]
    preds = doc["predictions"]
    assert [p["label"] for p in preds] == reference["label"][:n].tolist()
    assert [p["label_name"] for p in preds] == [str(v) for v in reference["label"][:n]]
    for i, (p, emb) in enumerate(zip(preds, reference["embedding"][:n], strict=True)):
        assert sum(p["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert np.allclose(p["embedding"], emb, atol=1e-5)
        assert p["input"] == {"format": "PNG", "mode": "L", "original_size": [28, 28], "resized": False}
        assert _same_typicality(p["typicality"], reference, i), (p["typicality"], i)


def test_the_served_model_reads_real_digits(server, mnist_sample) -> None:
    """End to end through PNG decoding: the tiny model's accuracy on real test digits."""
    with server.client() as c:
        labels = []
        for i in range(0, 64, 8):
            r = c.post(
                "/v1/models/tiny:predict",
                json={"instances": [{"b64": b64(p)} for p in mnist_sample.pngs[i : i + 8]]},
            )
            labels += [p["label"] for p in r.json()["predictions"]]
    acc = float(np.mean(np.array(labels) == mnist_sample.labels))
    assert acc >= 0.7, acc


def test_predict_raw_body_and_multipart(server, mnist_sample, reference) -> None:
    with server.client() as c:
        raw = c.post(
            "/v1/models/tiny:predict?return_embedding=true",
            content=mnist_sample.pngs[3],
            headers={"content-type": "image/png"},
        )
        assert raw.status_code == 200, raw.text
        (p,) = raw.json()["predictions"]
        assert p["label"] == reference["label"][3] and np.allclose(
            p["embedding"], reference["embedding"][3], atol=1e-5
        )
        files = [("file", (f"{i}.png", mnist_sample.pngs[i], "image/png")) for i in range(3)]
        multi = c.post("/v1/models/tiny:predict", files=files, data={"return_probabilities": "false"})
        assert multi.status_code == 200, multi.text
        preds = multi.json()["predictions"]
        assert [q["label"] for q in preds] == reference["label"][:3].tolist()
        assert all("probabilities" not in q and "embedding" not in q for q in preds)


def test_embed(server, mnist_sample, reference) -> None:
    with server.client() as c:
        r = c.post(
            "/v1/models/tiny:embed", json={"instances": [{"b64": b64(p)} for p in mnist_sample.pngs[:5]]}
        )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["embed_dim"] == 4 and len(doc["embeddings"]) == 5 and len(doc["inputs"]) == 5
    assert np.allclose(doc["embeddings"], reference["embedding"][:5], atol=1e-5)
    assert all(_same_typicality(t, reference, i) for i, t in enumerate(doc["typicality"]))


def test_typicality_flags_what_is_far_from_the_training_embeddings(server, mnist_sample, reference) -> None:
    """Clean digits are mostly typical (the threshold was calibrated to flag 5 % of held-out clean
    images); a blank and a noise image are not digits; a model without a fitted score answers
    without the field."""
    card = reference["card"].typicality
    assert 0.0 < card["calibration_flagged"] <= 0.06 and card["fpr"] == 0.05
    rng = np.random.default_rng(0)
    blank = np.zeros((28, 28), np.uint8)
    noise = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    odd = [png(blank), png(noise)]
    with server.client() as c:
        digits = [
            p
            for i in range(0, 64, 8)
            for p in c.post(
                "/v1/models/tiny:predict",
                json={"instances": [{"b64": b64(q)} for q in mnist_sample.pngs[i : i + 8]]},
            ).json()["predictions"]
        ]
        strange = c.post("/v1/models/tiny:predict", json={"instances": [{"b64": b64(p)} for p in odd]})
        big = c.post(
            "/v1/models/big:predict", content=mnist_sample.pngs[0], headers={"content-type": "image/png"}
        )
        big_embed = c.post(
            "/v1/models/big:embed", content=mnist_sample.pngs[0], headers={"content-type": "image/png"}
        )
    flagged = np.mean([p["typicality"]["atypical"] for p in digits])
    assert flagged <= 0.2, flagged
    dist = [p["typicality"]["mahalanobis"] for p in strange.json()["predictions"]]
    typical = np.median([p["typicality"]["mahalanobis"] for p in digits])
    assert min(dist) > typical, (dist, typical)
    assert big.status_code == 200 and "typicality" not in big.json()["predictions"][0]
    assert big_embed.status_code == 200 and "typicality" not in big_embed.json()


def test_resizing_colour_and_exif_are_applied_and_reported(server, mnist_sample, reference) -> None:
    digit = Image.fromarray(mnist_sample.images[0])
    big_rgb = digit.resize((84, 84), Image.Resampling.NEAREST).convert("RGB")
    buf = io.BytesIO()
    big_rgb.save(buf, format="PNG")
    rotated = digit.rotate(90, expand=True)  # shown upright once EXIF orientation 6 is applied
    exif = Image.Exif()
    exif[0x0112] = 6
    jbuf = io.BytesIO()
    rotated.save(jbuf, format="JPEG", quality=100, exif=exif)
    with server.client() as c:
        r = c.post(
            "/v1/models/tiny:predict",
            json={"instances": [{"b64": b64(buf.getvalue())}, {"b64": b64(jbuf.getvalue())}]},
        )
    assert r.status_code == 200, r.text
    first, second = r.json()["predictions"]
    assert first["input"] == {"format": "PNG", "mode": "RGB", "original_size": [84, 84], "resized": True}
    assert first["label"] == reference["label"][0]
    assert second["input"]["format"] == "JPEG" and second["input"]["resized"] is False
    assert second["label"] == reference["label"][0], "EXIF rotation undone before classification"


# -- Open Inference Protocol -------------------------------------------------------------------------
def test_v2_metadata_and_health(server, reference) -> None:
    with server.client() as c:
        assert c.get("/v2").json()["name"] == "erc-service"
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        meta = c.get("/v2/models/tiny").json()
        version = reference["card"].weights_sha256[:12]
        assert meta["versions"] == [version]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
            "logits": [-1, 10],
            "probabilities": [-1, 10],
            "embedding": [-1, 4],
            "label": [-1],
            "prior_log_density": [-1],
            "mahalanobis": [-1],
            "atypical": [-1],
        }
        big = {o["name"] for o in c.get("/v2/models/big").json()["outputs"]}
        assert big == {"logits", "probabilities", "embedding", "label"}
        assert c.get(f"/v2/models/tiny/versions/{version}").status_code == 200
        assert c.get("/v2/models/tiny/versions/000000000000").status_code == 404
        assert c.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
        broken = c.get("/v2/models/broken/ready")
        assert broken.status_code == 400 and broken.json()["ready"] is False


def test_v2_infer_fp32_and_bytes(server, mnist_sample, reference) -> None:
    x = (mnist_sample.images[:4].astype(np.float32) / 255)[:, None]
    body = {
        "id": "req-1",
        "inputs": [
            {"name": "input", "shape": [4, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}
        ],
    }
    with server.client() as c:
        r = c.post("/v2/models/tiny/infer", json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["id"] == "req-1" and doc["model_name"] == "tiny"
        out = {o["name"]: o for o in doc["outputs"]}
        assert out["label"]["datatype"] == "INT64" and out["label"]["data"] == reference["label"][:4].tolist()
        assert out["logits"]["shape"] == [4, 10]
        assert np.allclose(np.array(out["logits"]["data"]).reshape(4, 10), reference["logits"][:4], atol=1e-4)
        assert np.allclose(
            np.array(out["embedding"]["data"]).reshape(4, 4), reference["embedding"][:4], atol=1e-5
        )
        assert out["atypical"]["datatype"] == "BOOL" and out["mahalanobis"]["shape"] == [4]
        assert out["atypical"]["data"] == reference["typicality"]["atypical"][:4].tolist()
        assert np.allclose(out["mahalanobis"]["data"], reference["typicality"]["mahalanobis"][:4], atol=1e-3)
        assert np.allclose(
            out["prior_log_density"]["data"], reference["typicality"]["prior_log_density"][:4], atol=1e-3
        )
        nested = {
            "inputs": [{"name": "input", "shape": [4, 1, 28, 28], "datatype": "FP32", "data": x.tolist()}],
            "outputs": [{"name": "label"}],
        }
        r = c.post("/v2/models/tiny/infer", json=nested)
        assert [o["name"] for o in r.json()["outputs"]] == ["label"]
        nested["outputs"] = [{"name": "atypical"}]
        r = c.post("/v2/models/big/infer", json=nested)
        assert r.status_code == 422 and "no fitted typicality score" in r.json()["error"]["message"]
        bytes_body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [3],
                    "datatype": "BYTES",
                    "data": [b64(p) for p in mnist_sample.pngs[:3]],
                }
            ]
        }
        r = c.post("/v2/models/tiny/infer", json=bytes_body)
        assert r.status_code == 200, r.text
        labels = next(o for o in r.json()["outputs"] if o["name"] == "label")["data"]
        assert labels == reference["label"][:3].tolist()
        version = reference["card"].weights_sha256[:12]
        assert c.post(f"/v2/models/tiny/versions/{version}/infer", json=bytes_body).status_code == 200


# -- errors -------------------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _fp32(shape, data=None, datatype="FP32"):
    n = int(np.prod([max(s, 0) for s in shape])) if data is None else None
    return {
        "inputs": [
            {
                "name": "input",
                "shape": shape,
                "datatype": datatype,
                "data": data if data is not None else [0.5] * n,
            }
        ]
    }


ERRORS = [
    # (path, request kwargs, status, code, message fragment)
    (
        "/v1/models/nope:predict",
        {"content": b"x", "headers": {"content-type": "image/png"}},
        404,
        "model_not_found",
        "nope",
    ),
    (
        "/v1/models/broken:predict",
        {"content": b"x", "headers": {"content-type": "image/png"}},
        503,
        "model_not_ready",
        "sha256",
    ),
    (
        "/v1/models/tiny:predict",
        {"content": b"", "headers": {"content-type": "image/png"}},
        422,
        "invalid_image",
        "zero bytes",
    ),
    (
        "/v1/models/tiny:predict",
        {"content": b"<html>no</html>", "headers": {"content-type": "image/png"}},
        422,
        "invalid_image",
        "not an image",
    ),
    (
        "/v1/models/tiny:predict",
        {"content": _png_header(3000, 3000), "headers": {"content-type": "image/png"}},
        413,
        "limit_exceeded",
        "3000x3000",
    ),
    (
        "/v1/models/tiny:predict",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "bad_request",
        "malformed JSON",
    ),
    (
        "/v1/models/tiny:predict",
        {"json": {"instances": [{"b64": "@@@"}]}},
        422,
        "invalid_input",
        "instances[0].b64: not valid base64",
    ),
    ("/v1/models/tiny:predict", {"json": {"instances": []}}, 422, "invalid_input", "empty"),
    ("/v1/models/tiny:predict", {"json": {"images": []}}, 422, "invalid_input", "instances"),
    (
        "/v1/models/tiny:predict",
        {"json": {"instances": [{"b64": "aGk="}] * 9}},
        413,
        "limit_exceeded",
        "limit is 8",
    ),
    (
        "/v1/models/tiny:predict",
        {"json": {"instances": [{"url": "http://x"}]}},
        422,
        "invalid_input",
        "instances[0]",
    ),
    (
        "/v1/models/tiny:predict",
        {"json": {"instances": [{"b64": "aGk="}], "parameters": {"return_embedding": "maybe"}}},
        422,
        "invalid_input",
        "return_embedding",
    ),
    (
        "/v1/models/tiny:predict",
        {"content": b"a=1", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        415,
        "unsupported_media_type",
        "x-www-form-urlencoded",
    ),
    (
        "/v1/models/tiny:predict",
        {"content": b"x" * (1024 * 1024 + 1), "headers": {"content-type": "image/png"}},
        413,
        "payload_too_large",
        "limit of 1048576",
    ),
    ("/v2/models/tiny/infer", {"json": _fp32([1, 3, 28, 28])}, 422, "invalid_input", "does not match"),
    ("/v2/models/tiny/infer", {"json": _fp32([1, 1, 28, 28], [2.0] * 784)}, 422, "invalid_input", "[0, 1]"),
    (
        "/v2/models/tiny/infer",
        {"json": _fp32([1, 1, 28, 28], [0.5] * 700)},
        422,
        "invalid_input",
        "700 values",
    ),
    (
        "/v2/models/tiny/infer",
        {"json": _fp32([-1, 1, 28, 28], [0.5] * 784)},
        422,
        "invalid_input",
        "negative",
    ),
    ("/v2/models/tiny/infer", {"json": _fp32([1, 1, 28, 28], None, "INT8")}, 422, "invalid_input", "INT8"),
    (
        "/v2/models/tiny/infer",
        {
            "content": b'{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [1e999'
            + b", 0.5" * 783
            + b"]}]}",
            "headers": {"content-type": "application/json"},
        },
        422,
        "invalid_input",
        "infinite",
    ),
    (
        "/v2/models/tiny/infer",
        {
            "content": b'{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [NaN'
            + b", 0.5" * 783
            + b"]}]}",
            "headers": {"content-type": "application/json"},
        },
        422,
        "invalid_input",
        "NaN",
    ),
    (
        "/v2/models/tiny/infer",
        {"content": b"[" * 10000 + b"]" * 10000, "headers": {"content-type": "application/json"}},
        400,
        "bad_request",
        "malformed JSON",
    ),
    ("/v2/models/tiny/infer", {"json": {"inputs": []}}, 422, "invalid_input", "exactly one"),
    (
        "/v2/models/tiny/infer",
        {"json": {**_fp32([1, 1, 28, 28]), "outputs": [{"name": "scores"}]}},
        422,
        "invalid_input",
        "scores",
    ),
    (
        "/v2/models/tiny/infer",
        {"json": {"inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]}},
        422,
        "invalid_input",
        "needs 2",
    ),
]


@pytest.mark.parametrize(
    "path,kwargs,status,code,fragment", ERRORS, ids=[f"{e[2]}-{e[3]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_errors_are_4xx_json_naming_the_problem(server, path, kwargs, status, code, fragment) -> None:
    with server.client() as c:
        r = c.post(path, **kwargs)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and fragment in err["message"], err
        assert c.get("/healthz").status_code == 200


def test_body_limit_without_content_length(server) -> None:
    def chunks():
        for _ in range(40):
            yield b"\0" * 65536

    with server.client() as c:
        r = c.post("/v1/models/tiny:predict", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_unknown_route_and_method(server) -> None:
    with server.client() as c:
        r = c.get("/v3/anything")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.delete("/v1/models")
        assert r.status_code == 405 and "error" in r.json()


def test_head_is_get_without_the_body(server) -> None:
    with server.client() as c:
        for path in ("/healthz", "/readyz", "/v1/models", "/v1/models/tiny", "/metrics", "/openapi.json"):
            got, head = c.get(path), c.head(path)
            assert head.status_code == got.status_code, path
            assert head.content == b"", path
            assert head.headers["content-type"] == got.headers["content-type"], path
            if path != "/metrics":  # the metrics text changes between the two requests
                assert head.headers["content-length"] == got.headers["content-length"], path
        r = c.head("/v1/models/nope")
        assert r.status_code == 404 and r.content == b""
        r = c.head("/v2/models/tiny/infer")  # POST only: neither GET nor HEAD is offered
        assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""
        text = c.get("/metrics").text
    assert 'erc_http_requests_total{method="HEAD",route="/healthz",status="200"}' in text


def test_service_still_answers_correctly_after_bad_input(server, mnist_sample, reference) -> None:
    with server.client() as c:
        for bad in (b"", b"\x89PNG\r\n\x1a\n", _png_header(3000, 3000)):
            c.post("/v1/models/tiny:predict", content=bad, headers={"content-type": "image/png"})
        r = c.post(
            "/v1/models/tiny:predict", content=mnist_sample.pngs[5], headers={"content-type": "image/png"}
        )
    assert r.json()["predictions"][0]["label"] == reference["label"][5]


def test_concurrent_requests_each_get_their_own_answer(server, mnist_sample, reference) -> None:
    def one(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post(
                "/v1/models/tiny:predict", content=mnist_sample.pngs[i], headers={"content-type": "image/png"}
            )
            return int(r.json()["predictions"][0]["label"])

    with ThreadPoolExecutor(16) as pool:
        labels = list(pool.map(one, range(64)))
    assert labels == reference["label"].tolist()


def test_metrics(server, mnist_sample) -> None:
    with server.client() as c:
        c.post("/v1/models/tiny:predict", content=mnist_sample.pngs[0], headers={"content-type": "image/png"})
        c.post("/v1/models/tiny:predict", content=b"nope", headers={"content-type": "image/png"})
        text = c.get("/metrics").text
    assert 'erc_http_requests_total{method="POST",route="/v1/models/{name}:predict",status="200"}' in text
    assert 'route="/v1/models/{name}:predict",status="422"' in text
    assert "erc_inference_batch_size_bucket" in text and "erc_queue_wait_seconds_bucket" in text
    assert 'erc_model_ready{model="tiny"} 1.0' in text and 'erc_model_ready{model="broken"} 0.0' in text
    assert 'erc_model_info{arch="er_mnist"' in text and 'version="' in text
    assert "process_resident_memory_bytes" in text
    assert 'erc_typicality_mahalanobis_count{model="tiny"}' in text
    assert 'erc_typicality_mahalanobis_count{model="big"}' not in text
    assert "/v1/models/nope" not in text, "labels use route templates, never raw paths"


def test_openapi_describes_every_route(server) -> None:
    with server.client() as c:
        spec = c.get("/openapi.json").json()
        assert c.get("/docs").status_code == 200
    paths = spec["paths"]
    for p in (
        "/v1/models",
        "/v1/models/{name}:predict",
        "/v1/models/{name}:embed",
        "/v2/models/{name}/infer",
        "/v2/health/ready",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert p in paths, p
    body = paths["/v1/models/{name}:predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "image/png", "multipart/form-data"} <= set(body)
    assert (
        "PredictRequest" in spec["components"]["schemas"] and "InferRequest" in spec["components"]["schemas"]
    )
    json.dumps(spec)
