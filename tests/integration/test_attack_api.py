"""POST /v1/models/{name}:attack on a real server: answers, the 8-bit guarantees, agreement with
:predict, determinism, bounds and bad input, its own queue (429 + Retry-After) that leaves
predictions served, timeouts, access settings, metrics; and the embedding map the console draws."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

TOKEN = "attack-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def attack_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory, start_server_fn):
    """One worker, nobody waiting behind it: the second concurrent attack gets 429."""
    srv = start_server_fn(
        model_store,
        tmp_path_factory.mktemp("logs"),
        ERC_MODELS="tiny",
        ERC_DEFAULT_MODEL="tiny",
        ERC_MAX_INSTANCES="8",
        ERC_ATTACK_MAX_INSTANCES="4",
        ERC_ATTACK_CONCURRENCY="1",
        ERC_ATTACK_MAX_QUEUE="0",
        ERC_ATTACK_MAX_WORK="5000",
        ERC_EMBEDDING_MAP_N="300",
    )
    yield srv
    log = srv.log.read_text(errors="replace")
    assert srv.stop(), log[-3000:]
    assert "Traceback" not in log, log[-5000:]


@pytest.fixture(scope="module")
def restricted_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory, start_server_fn):
    """:attack behind the admin token, with a 2-second time limit."""
    srv = start_server_fn(
        model_store,
        tmp_path_factory.mktemp("logs"),
        ERC_MODELS="tiny",
        ERC_DEFAULT_MODEL="tiny",
        ERC_ADMIN_TOKEN=TOKEN,
        ERC_ATTACK_ACCESS="admin",
        ERC_ATTACK_TIMEOUT_S="2",
        ERC_ATTACK_MAX_WORK="1e6",
        ERC_ATTACK_MAX_STEPS="1000",
        ERC_CONSOLE="false",
    )
    yield srv
    assert srv.stop(), srv.log.read_text()[-3000:]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))))


def attack(c: httpx.Client, pngs: list[bytes], **parameters) -> httpx.Response:
    body = {"instances": [{"b64": b64(p)} for p in pngs], "parameters": parameters}
    return c.post("/v1/models/tiny:attack", json=body)


def predict_png(c: httpx.Client, png: bytes) -> dict:
    r = c.post("/v1/models/tiny:predict", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_attack_answers_per_image_within_eps_and_agrees_with_predict(attack_server, mnist_sample) -> None:
    pngs = mnist_sample.pngs[:4]
    with attack_server.client() as c:
        r = attack(c, pngs, eps=0.3, steps=10, seed=1, return_embedding=True)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny" and len(body["model_version"]) == 12
        a = body["attack"]
        assert (a["name"], a["norm"], a["label"], a["steps"], a["restarts"], a["seed"]) == (
            "pgd",
            "linf",
            "PGD-10",
            10,
            1,
            1,
        )
        assert a["eps_units"] == 76 and a["eps_effective"] == pytest.approx(76 / 255)
        assert body["attack_runs"] == 1 and body["seconds"]["attack"] > 0
        assert len(body["results"]) == 4
        flips = 0
        for res, image in zip(body["results"], mnist_sample.images[:4], strict=True):
            clean, adv = pixels(res["clean"]["png"]), pixels(res["adversarial"]["png"])
            assert clean.dtype == adv.dtype == np.uint8 and clean.shape == adv.shape == (28, 28)
            assert np.array_equal(clean, image), "the clean PNG is the image as sent (28x28, 8 bits)"
            delta = np.abs(adv.astype(int) - clean.astype(int))
            # within eps after 8-bit quantisation (76/255 <= 0.3), in [0, 1] by construction of uint8
            assert delta.max() <= 76 and delta.max() / 255 <= 0.3
            assert res["perturbation"]["linf_units"] == delta.max()
            assert res["perturbation"]["linf"] == pytest.approx(delta.max() / 255)
            assert res["perturbation"]["changed_values"] == int(np.count_nonzero(delta))
            # :predict on both returned PNGs says what :attack said
            before = predict_png(c, base64.b64decode(res["clean"]["png"]))
            after = predict_png(c, base64.b64decode(res["adversarial"]["png"]))
            assert before["label"] == res["clean"]["label"] and after["label"] == res["adversarial"]["label"]
            assert after["probabilities"] == pytest.approx(res["adversarial"]["probabilities"], abs=1e-6)
            assert res["flipped"] == (after["label"] != before["label"])
            assert len(res["clean"]["embedding"]) == len(res["adversarial"]["embedding"]) == 4
            assert "smallest_flipping_eps" not in res
            flips += res["flipped"]
        assert flips >= 1, "PGD at eps 0.3 should flip a barely trained model"
        metrics = c.get("/metrics").text
    assert 'erc_attack_requests_total{model="tiny",outcome="done"}' in metrics
    assert 'erc_attack_images_total{model="tiny"} 4.0' in metrics
    assert f'erc_attack_flips_total{{model="tiny"}} {float(flips)}' in metrics
    assert 'erc_attack_duration_seconds_count{model="tiny"}' in metrics


def test_same_seed_same_answer(attack_server, mnist_sample) -> None:
    pngs = mnist_sample.pngs[4:6]
    with attack_server.client() as c:
        first = attack(c, pngs, eps=0.1, steps=5, seed=42).json()
        again = attack(c, pngs, eps=0.1, steps=5, seed=42).json()
        other = attack(c, pngs, eps=0.1, steps=5, seed=43).json()
    for key in ("results", "attack"):
        assert first[key] == again[key]
    assert [r["adversarial"]["png"] for r in first["results"]] != [
        r["adversarial"]["png"] for r in other["results"]
    ]


def test_default_eps_is_the_training_eps_and_raw_and_multipart_bodies_work(
    attack_server, mnist_sample
) -> None:
    with attack_server.client() as c:
        train_eps = c.get("/v1/models/tiny").json()["train_eps"]
        raw = c.post(
            "/v1/models/tiny:attack?steps=3&seed=2",
            content=mnist_sample.pngs[0],
            headers={"content-type": "image/png"},
        )
        form = c.post(
            "/v1/models/tiny:attack",
            files=[("file", ("a.png", mnist_sample.pngs[0], "image/png"))],
            data={"steps": "3", "seed": "2"},
        )
    assert raw.status_code == 200 and form.status_code == 200, (raw.text, form.text)
    assert raw.json()["attack"]["eps"] == train_eps == 0.3
    assert raw.json()["results"] == form.json()["results"]


def test_smallest_flipping_eps(attack_server, mnist_sample) -> None:
    with attack_server.client() as c:
        r = attack(c, mnist_sample.pngs[6:8], eps=0.3, steps=5, smallest_eps=True, smallest_eps_max=0.5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["attack"]["smallest_eps"] is True and 1 < body["attack_runs"] <= 9
    for res in body["results"]:
        found = res["smallest_flipping_eps"]
        assert found is None or (0 < found <= 0.5 and round(found * 255, 6) == round(found * 255))
        if res["flipped"]:
            assert found is not None and found <= 76 / 255


@pytest.mark.parametrize(
    "parameters,n,status,code,fragment",
    [
        ({"steps": 101}, 1, 413, "limit_exceeded", "ERC_ATTACK_MAX_STEPS"),
        ({"restarts": 6}, 1, 413, "limit_exceeded", "ERC_ATTACK_MAX_RESTARTS"),
        (
            {"steps": 100, "restarts": 5, "smallest_eps": True},
            2,
            413,
            "limit_exceeded",
            "ERC_ATTACK_MAX_WORK",
        ),
        ({}, 5, 413, "limit_exceeded", "ERC_ATTACK_MAX_INSTANCES"),
        ({"eps": 1.5}, 1, 422, "invalid_input", "outside [0, 1]"),
        ({"eps": "lots"}, 1, 422, "invalid_input", "'eps' must be a number"),
        ({"steps": 0}, 1, 422, "invalid_input", "at least 1"),
        ({"seed": -3}, 1, 422, "invalid_input", "seed"),
        ({"stepz": 10}, 1, 422, "invalid_input", "unknown parameter(s) 'stepz'"),
    ],
)
def test_bounds_and_bad_parameters(
    attack_server, mnist_sample, parameters, n, status, code, fragment
) -> None:
    with attack_server.client() as c:
        r = attack(c, mnist_sample.pngs[:n], **parameters)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and fragment in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "request_kw,status,code",
    [
        ({"json": {"instances": [{"b64": b64(b"not an image")}]}}, 422, "invalid_image"),
        ({"json": {"instances": [{"b64": "%%%"}]}}, 422, "invalid_input"),
        ({"json": {"instances": []}}, 422, "invalid_input"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad_request"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ],
)
def test_bad_input_is_a_clear_4xx(attack_server, request_kw, status, code) -> None:
    with attack_server.client() as c:
        r = c.post("/v1/models/tiny:attack", **request_kw)
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        assert c.get("/readyz").status_code == 200
        missing = c.post("/v1/models/nope:attack", json={"instances": [{"b64": "aGk="}]})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_a_full_queue_is_429_with_retry_after_and_predictions_keep_flowing(
    attack_server, mnist_sample
) -> None:
    """One worker, no queue: while an attack runs, another gets 429 and :predict answers. The busy
    client repeats full-budget attacks at a radius that flips few images (PGD's early stop does not
    cut them short) until the other has seen its 429."""
    long: list[httpx.Response] = []
    refused = threading.Event()
    deadline = time.monotonic() + 60

    def keep_busy() -> None:
        with attack_server.client() as c:
            while not refused.is_set() and time.monotonic() < deadline:
                long.append(attack(c, mnist_sample.pngs[:4], eps=0.01, steps=100, restarts=5, seed=9))

    worker = threading.Thread(target=keep_busy)
    worker.start()
    try:
        with attack_server.client() as c:
            while time.monotonic() < deadline:
                second = attack(c, mnist_sample.pngs[:1], steps=2)
                if second.status_code == 429:
                    refused.set()
                    break
                time.sleep(0.02)
            assert second.status_code == 429, second.text
            assert second.json()["error"]["code"] == "attack_queue_full"
            assert int(second.headers["retry-after"]) >= 1
            t0 = time.monotonic()
            label = predict_png(c, mnist_sample.pngs[0])["label"]
            assert label in range(10) and time.monotonic() - t0 < 10
            assert c.get("/readyz").status_code == 200
    finally:
        refused.set()
        worker.join(120)
    assert long and all(r.status_code in (200, 429) for r in long), [r.text for r in long]
    assert any(r.status_code == 200 for r in long)
    with attack_server.client() as c:
        metrics = c.get("/metrics").text
    assert 'erc_attack_requests_total{model="tiny",outcome="queue_full"}' in metrics


def test_embedding_map_uses_the_audit_projection(attack_server, mnist_sample) -> None:
    with attack_server.client() as c:
        m = c.get("/v1/models/tiny/embedding-map").json()
        again = c.get("/v1/models/tiny/embedding-map").json()
        p = c.post(
            "/v1/models/tiny:predict?return_embedding=true",
            content=mnist_sample.pngs[0],
            headers={"content-type": "image/png"},
        ).json()["predictions"][0]
    assert m == again  # computed once per model
    assert (m["model"], m["dataset"], m["split"], m["n"], m["embed_dim"]) == ("tiny", "mnist", "test", 300, 4)
    assert m["method"] == "PCA fitted on the clean embeddings"
    points, labels = np.asarray(m["points"]), np.asarray(m["labels"])
    assert points.shape == (300, 2) and labels.shape == (300,) and set(labels) <= set(range(10))
    # the projection centres the test embeddings and has orthonormal axes
    basis = np.asarray(m["basis"])
    assert np.allclose(points.mean(0), 0, atol=1e-3) and np.allclose(basis.T @ basis, np.eye(2), atol=1e-5)
    # and places any embedding: the first principal axis carries the most variance
    assert points[:, 0].var() >= points[:, 1].var()
    xy = (np.asarray(p["embedding"]) - np.asarray(m["mean"])) @ basis
    assert np.isfinite(xy).all()


def test_restricted_to_the_admin_token(restricted_server, mnist_sample) -> None:
    with restricted_server.client() as c:
        body = {"instances": [{"b64": b64(mnist_sample.pngs[0])}], "parameters": {"steps": 2}}
        r = c.post("/v1/models/tiny:attack", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = c.post("/v1/models/tiny:attack", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = c.post("/v1/models/tiny:attack", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        # the console is off on this server
        assert c.get("/").status_code == 404 and "ERC_CONSOLE" in c.get("/console").json()["error"]["message"]


def test_an_attack_past_its_time_limit_is_503_and_the_worker_serves_on(
    restricted_server, mnist_sample
) -> None:
    with restricted_server.client() as c:
        heavy = {"instances": [{"b64": b64(p)} for p in mnist_sample.pngs[:8]]}
        heavy["parameters"] = {"steps": 1000, "restarts": 5, "eps": 0.01}
        t0 = time.monotonic()
        r = c.post("/v1/models/tiny:attack", json=heavy, headers=AUTH)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "attack_timeout" and "ERC_ATTACK_TIMEOUT_S" in r.text
        assert r.headers["retry-after"] and time.monotonic() - t0 < 15
        light = {"instances": [{"b64": b64(mnist_sample.pngs[0])}], "parameters": {"steps": 2}}
        assert c.post("/v1/models/tiny:attack", json=light, headers=AUTH).status_code == 200
        assert predict_png(c, mnist_sample.pngs[0])["label"] in range(10)


def test_off_is_403(model_store: Path, tmp_path: Path, start_server_fn, mnist_sample) -> None:
    srv = start_server_fn(model_store, tmp_path, ERC_MODELS="tiny", ERC_ATTACK_ACCESS="off")
    try:
        with srv.client() as c:
            r = c.post(
                "/v1/models/tiny:attack", content=mnist_sample.pngs[0], headers={"content-type": "image/png"}
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "attack_disabled"
            assert "ERC_ATTACK_ACCESS=off" in r.json()["error"]["message"]
            assert predict_png(c, mnist_sample.pngs[0])["label"] in range(10)
    finally:
        assert srv.stop()
