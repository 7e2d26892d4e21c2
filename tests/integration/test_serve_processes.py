"""``erc serve`` with ERC_HTTP_PROCESSES=2 (service/multiproc): one model process batching for two
HTTP processes on one port, as real processes. Answers equal the single-process server's and the
model file run directly; the faults (model process killed, HTTP process killed), the drain on
SIGTERM, metrics that add up across processes and the model repository through the HTTP
processes."""

from __future__ import annotations

import base64
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch

from service.inference import InferenceEngine

TOKEN = "multiproc-admin-token-0123456789"


def _layout(srv) -> dict[str, list[psutil.Process]]:
    """The supervisor's children by role (from their ERC_PROCESS_ROLE)."""
    roles: dict[str, list[psutil.Process]] = {"model": [], "http": []}
    for child in psutil.Process(srv.proc.pid).children():
        try:
            role = child.environ().get("ERC_PROCESS_ROLE", "")
        except psutil.NoSuchProcess:
            continue
        roles["model" if role == "model" else "http"].append(child)
    return roles


def _until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.1)


def _ready(srv) -> bool:
    try:
        return httpx.get(srv.url + "/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def multi(model_store: Path, tmp_path_factory: pytest.TempPathFactory, start_server_fn):
    tmp = tmp_path_factory.mktemp("multi")
    srv = start_server_fn(
        model_store,
        tmp,
        ERC_HTTP_PROCESSES="2",
        ERC_DEFAULT_MODEL="tiny",
        ERC_ADMIN_TOKEN=TOKEN,
        ERC_AUDIT_DB=f"sqlite:///{tmp / 'audits.db'}",
        ERC_REPOSITORY_POLL_S="0.5",
    )
    _until(lambda: len(_layout(srv)["http"]) == 2, 30, "two HTTP processes")
    yield srv
    assert srv.stop(), srv.log.read_text()[-3000:]


def test_the_supervisor_loads_no_torch(multi) -> None:
    """The supervisor only starts and watches its children: torch's libraries (about 200 MB
    resident) are mapped by the model and HTTP processes, not by it (bench/memory.py)."""

    def maps_torch(pid: int) -> bool:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()

    assert not maps_torch(multi.proc.pid)
    assert all(maps_torch(p.pid) for p in _layout(multi)["model"])  # what the check would see


def _png_body(pngs: list[bytes]) -> dict:
    return {"instances": [{"b64": base64.b64encode(p).decode()} for p in pngs]}


def _both(servers, path: str, body: dict, key: str) -> list:
    """``body[key]`` of the 200 answer of each server to ``POST path``."""
    out = []
    for srv in servers:
        with srv.client() as c:
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text
            out.append(r.json()[key])
    return out


def test_answers_equal_one_process_and_the_model_file(multi, server, model_store, mnist_sample) -> None:
    body = {**_png_body(mnist_sample.pngs[:8]), "parameters": {"return_embedding": True}}
    many, one = _both((multi, server), "/v1/models/tiny:predict", body, "predictions")
    assert [p["label"] for p in many] == [p["label"] for p in one]
    for key in ("probabilities", "embedding"):
        np.testing.assert_allclose([p[key] for p in many], [p[key] for p in one], rtol=1e-4, atol=1e-5)
    assert [p["typicality"]["atypical"] for p in many] == [p["typicality"]["atypical"] for p in one]
    # The file run directly (the server decodes the PNG to [0, 1] floats; so does this).
    engine = InferenceEngine.from_store(model_store / "tiny")
    x = torch.from_numpy(mnist_sample.images[:8]).float().div(255).unsqueeze(1)
    direct = engine.forward(x)
    assert [p["label"] for p in many] == direct.label.tolist()
    np.testing.assert_allclose([p["probabilities"] for p in many], direct.probabilities, rtol=1e-4, atol=1e-5)
    # KServe v2 through the other routes of the same processes.
    with multi.client() as c:
        inputs = [
            {"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x[:2].flatten().tolist()}
        ]
        v2 = c.post("/v2/models/tiny/infer", json={"inputs": inputs})
        assert v2.status_code == 200, v2.text
        logits = next(o for o in v2.json()["outputs"] if o["name"] == "logits")
        np.testing.assert_allclose(
            np.reshape(logits["data"], (2, -1)), direct.logits[:2], rtol=1e-4, atol=1e-4
        )


def test_errors_are_answered_as_by_one_process(multi, server, mnist_sample) -> None:
    cases = [
        ("/v1/models/nope:predict", _png_body(mnist_sample.pngs[:1])),
        ("/v1/models/tiny:predict", {"instances": [{"b64": base64.b64encode(b"not an image").decode()}]}),
        ("/v1/models/broken:predict", _png_body(mnist_sample.pngs[:1])),
    ]
    for path, body in cases:
        got = []
        for srv in (multi, server):
            with srv.client() as c:
                r = c.post(path, json=body)
                got.append((r.status_code, r.json()["error"]["code"]))
        assert got[0] == got[1], (path, got)
        assert 400 <= got[0][0] < 600 and got[0][0] != 500
    with multi.client() as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models["broken"]["status"] == "failed" and "sha256" in models["broken"]["reason"]
        assert c.post("/v1/models/tiny:predict", json=_png_body(mnist_sample.pngs[:1])).status_code == 200


def test_attack_check_runs_from_an_http_process(multi, server, mnist_sample) -> None:
    """:attack in its own child process, as in one process: the same seeded results."""
    body = {**_png_body(mnist_sample.pngs[:1]), "parameters": {"steps": 3, "seed": 2}}
    many, one = _both((multi, server), "/v1/models/tiny:attack", body, "results")
    assert many == one


def test_metrics_add_up_across_processes(multi, mnist_sample) -> None:
    def predict_count(text: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("erc_http_requests_total{") and 'route="/v1/models/{name}:predict"' in line
            and 'status="200"' in line
        )  # fmt: skip

    before = predict_count(httpx.get(multi.url + "/metrics").text)
    n = 40
    for _ in range(n):  # a new connection each: the kernel spreads them over both processes
        assert (
            httpx.post(
                multi.url + "/v1/models/tiny:predict", json=_png_body(mnist_sample.pngs[:1])
            ).status_code
            == 200
        )
    scrapes = [httpx.get(multi.url + "/metrics").text for _ in range(6)]
    counts = {predict_count(s) for s in scrapes}
    assert counts == {before + n}, counts  # every HTTP process reports the sum of all
    assert any('erc_inference_batch_size_count{model="tiny"}' in s for s in scrapes)  # the model process's


def test_model_process_killed_answers_503_then_is_restarted(multi, mnist_sample) -> None:
    body = _png_body(mnist_sample.pngs[:1])
    (model,) = _layout(multi)["model"]
    model.kill()
    model.wait(10)
    seen = Counter()
    deadline = time.time() + 60
    while True:
        r = httpx.post(multi.url + "/v1/models/tiny:predict", json=body, timeout=30)
        seen[r.status_code] += 1
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "model_not_ready", r.text
            assert "model process" in r.json()["error"]["message"]
            assert r.headers["retry-after"] == "1"
            assert httpx.get(multi.url + "/readyz").status_code in (200, 503)
        if r.status_code == 200 and seen[503]:
            break
        assert time.time() < deadline, seen
        time.sleep(0.05)
    assert set(seen) == {200, 503}, seen
    (restarted,) = _layout(multi)["model"]
    assert restarted.pid != model.pid
    _until(lambda: _ready(multi), 30, "ready again after the restart")
    assert "exited with -9; restarting" in multi.log.read_text()


def test_http_process_killed_is_restarted_while_the_other_serves(multi, mnist_sample) -> None:
    body = _png_body(mnist_sample.pngs[:1])
    before = _layout(multi)["http"]
    victim = before[0]
    victim.kill()
    victim.wait(10)
    for _ in range(20):  # new connections reach the live process only
        assert httpx.post(multi.url + "/v1/models/tiny:predict", json=body, timeout=30).status_code == 200
    _until(
        lambda: (
            len(_layout(multi)["http"]) == 2 and victim.pid not in {p.pid for p in _layout(multi)["http"]}
        ),
        30,
        "the killed HTTP process restarted",
    )
    _until(lambda: _ready(multi), 30, "ready")
    assert httpx.post(multi.url + "/v1/models/tiny:predict", json=body, timeout=30).status_code == 200


def test_repository_loads_and_unloads_through_the_http_processes(multi, model_store, mnist_sample) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = _png_body(mnist_sample.pngs[:1])
    with multi.client() as c:
        r = c.post(
            "/v2/repository/models/tiny-canary/load", headers=auth, json={"parameters": {"entry": "tiny"}}
        )
        assert r.status_code == 200 and r.json()["state"] == "READY", r.text
        for _ in range(6):  # whichever HTTP process answers, it routes to the loaded version
            assert httpx.post(multi.url + "/v1/models/tiny-canary:predict", json=body).status_code == 200
        index = {row["name"]: row for row in c.post("/v2/repository/index", headers=auth).json()}
        assert index["tiny-canary"]["state"] == "READY" and len(index["tiny-canary"]["replicas"]) == 1
        r = c.post("/v2/repository/models/tiny-canary/unload", headers=auth)
        assert r.status_code == 200, r.text
        for _ in range(6):
            assert httpx.post(multi.url + "/v1/models/tiny-canary:predict", json=body).status_code == 404


def test_a_version_swap_under_load_loses_no_request(multi, mnist_sample) -> None:
    """Four clients predict with ``tiny-swap`` through both HTTP processes while its version is
    swapped back and forth (the new one loaded as the default, the old one unloaded): every answer
    is 200, from one version or the other. The old version stops only once no HTTP process holds
    a request for it (the ``D`` frames)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = _png_body(mnist_sample.pngs[:1])
    url = multi.url + "/v1/models/tiny-swap:predict"

    def load(entry: str) -> str:
        params = {"parameters": {"entry": entry, "default": True}}
        r = httpx.post(
            multi.url + "/v2/repository/models/tiny-swap/load", headers=auth, json=params, timeout=120
        )
        assert r.status_code == 200 and r.json()["state"] == "READY", r.text
        return str(r.json()["version"])

    version = load("tiny")
    stop = threading.Event()
    seen: Counter[str] = Counter()

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(url, json=body)
                seen[
                    str(r.json()["model_version"]) if r.status_code == 200 else f"{r.status_code} {r.text}"
                ] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for entry in ("big", "tiny", "big", "tiny"):
            time.sleep(0.3)
            old, version = version, load(entry)
            r = httpx.post(
                multi.url + "/v2/repository/models/tiny-swap/unload",
                headers=auth,
                json={"parameters": {"version": old}},
                timeout=60,
            )
            assert r.status_code == 200, r.text
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
        httpx.post(multi.url + "/v2/repository/models/tiny-swap/unload", headers=auth, timeout=60)
    failed = {k: v for k, v in seen.items() if not k.isalnum()}
    assert not failed and len(seen) == 2, seen


def test_a_request_still_being_read_is_answered_by_the_version_being_unloaded(
    multi, mnist_sample, unload_during_a_slow_request
) -> None:
    """The model process waits for a request an HTTP process routed to a version being unloaded
    (the HTTP process says when it holds none: ``D`` frames), so it gets its answer from that
    version instead of a 503."""
    unload_during_a_slow_request(multi.url, TOKEN, _png_body(mnist_sample.pngs[:1]))


def test_sigterm_drains_every_process(model_store, tmp_path, mnist_sample, start_server_fn) -> None:
    """With a steady load on both HTTP processes, SIGTERM: readiness fails at once, requests keep
    being served for the drain period, no accepted request fails, and every process stops cleanly."""
    srv = start_server_fn(
        model_store, tmp_path, ERC_HTTP_PROCESSES="2", ERC_MODELS="tiny", ERC_SHUTDOWN_GRACE_S="6"
    )
    body = _png_body(mnist_sample.pngs[:1])
    stop, outcomes = threading.Event(), Counter()

    def steady() -> None:
        while not stop.is_set():
            try:
                outcomes[
                    httpx.post(srv.url + "/v1/models/tiny:predict", json=body, timeout=30).status_code
                ] += 1
            except httpx.HTTPError as exc:  # a request accepted and then dropped would count here
                outcomes[type(exc).__name__] += 1

    clients = [threading.Thread(target=steady) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        time.sleep(1.0)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        ready = httpx.get(srv.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["draining"] is True
        served_before = outcomes[200]
        time.sleep(1.5)
        assert outcomes[200] > served_before  # still served during the drain
    finally:
        # The clients stop before the drain ends: past it, a connection the kernel queued on a
        # closing socket is reset, as for any server that stops listening.
        stop.set()
        for t in clients:
            t.join()
    srv.proc.wait(60)
    assert set(outcomes) == {200}, outcomes
    assert srv.proc.returncode == 0
    log = srv.log.read_text()
    assert log.count("Application shutdown complete") == 2 and "erc serve: every process stopped" in log
