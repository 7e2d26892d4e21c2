"""Real TorchServe (Java frontend + Python worker) serving the same model through the project's
handler: the same labels, probabilities and embeddings as the FastAPI service, token auth on."""

from __future__ import annotations

import base64
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_archive_holds_handler_card_and_weights(torchserve_tiny) -> None:
    mars = list(torchserve_tiny.workdir.parent.glob("mar*/tiny.mar"))
    assert mars, "erc package wrote tiny.mar"
    names = set(zipfile.ZipFile(mars[0]).namelist())
    assert {"torchserve_handler.py", "card.json", "weights.safetensors", "MAR-INF/MANIFEST.json"} <= names


def test_token_authorization_is_on(torchserve_tiny) -> None:
    r = httpx.post(
        f"{torchserve_tiny.inference_url}/predictions/tiny",
        content=b"x",
        headers={"content-type": "image/png"},
    )
    assert r.status_code in (400, 401) and "Token" in r.text


def test_same_answers_as_the_fastapi_service(torchserve_tiny, server, mnist_sample) -> None:
    body = {
        "instances": [{"b64": _b64(p)} for p in mnist_sample.pngs[:8]],
        "parameters": {"return_embedding": True},
    }
    ts = httpx.post(
        f"{torchserve_tiny.inference_url}/predictions/tiny",
        json=body,
        headers=torchserve_tiny.inference_headers(),
        timeout=60,
    )
    assert ts.status_code == 200, ts.text
    ours = httpx.post(f"{server.url}/v1/models/tiny:predict", json=body, timeout=60)
    a, b = ts.json(), ours.json()
    assert a["model"] == b["model"] and a["model_version"] == b["model_version"]
    assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
    for p, q in zip(a["predictions"], b["predictions"], strict=True):
        assert np.allclose(p["embedding"], q["embedding"], atol=1e-5)
        assert np.allclose(p["probabilities"], q["probabilities"], atol=1e-5)
        assert p["input"] == q["input"]
    assert a["preprocessing"] == b["preprocessing"]


def test_raw_image_body_and_batched_concurrent_requests(torchserve_tiny, server, mnist_sample) -> None:
    headers = {**torchserve_tiny.inference_headers(), "content-type": "image/png"}

    def both(i: int) -> tuple[int, int]:
        png = mnist_sample.pngs[i]
        t = httpx.post(
            f"{torchserve_tiny.inference_url}/predictions/tiny", content=png, headers=headers, timeout=60
        )
        o = httpx.post(
            f"{server.url}/v1/models/tiny:predict",
            content=png,
            headers={"content-type": "image/png"},
            timeout=60,
        )
        return t.json()["predictions"][0]["label"], o.json()["predictions"][0]["label"]

    with ThreadPoolExecutor(8) as pool:  # concurrent requests share TorchServe batches of up to 8
        pairs = list(pool.map(both, range(32)))
    assert all(t == o for t, o in pairs)


def test_bad_request_gets_its_own_json_error(torchserve_tiny) -> None:
    headers = {**torchserve_tiny.inference_headers(), "content-type": "image/png"}
    r = httpx.post(
        f"{torchserve_tiny.inference_url}/predictions/tiny", content=b"<html>", headers=headers, timeout=60
    )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_image"
    ok = httpx.post(
        f"{torchserve_tiny.inference_url}/predictions/tiny",
        json={"instances": [{"b64": "@@"}]},
        headers=torchserve_tiny.inference_headers(),
        timeout=60,
    )
    assert ok.status_code == 422 and "not valid base64" in ok.json()["error"]["message"]
