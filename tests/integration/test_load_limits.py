"""Back-pressure and shutdown on a real server: a full queue answers 503 with Retry-After at
once, and SIGTERM lets in-flight requests finish."""

from __future__ import annotations

import base64
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest


@pytest.fixture
def small_queue_server(model_store, tmp_path, start_server_fn):
    srv = start_server_fn(
        model_store,
        tmp_path,
        ERC_MODELS="big",
        ERC_MAX_QUEUE="4",
        ERC_MAX_INSTANCES="4",
        ERC_MAX_BATCH_SIZE="4",
        ERC_BATCH_WAIT_MS="0",
    )
    yield srv
    srv.stop()


def test_full_queue_answers_503_with_retry_after(small_queue_server, mnist_sample) -> None:
    body = {"instances": [{"b64": base64.b64encode(p).decode()} for p in mnist_sample.pngs[:4]]}

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=small_queue_server.url, timeout=60) as c:
            t0 = time.perf_counter()
            r = c.post("/v1/models/big:predict", json=body)
            r.elapsed_s = time.perf_counter() - t0  # type: ignore[attr-defined]
            return r

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(one, range(48)))
    codes = sorted({r.status_code for r in responses})
    assert codes == [200, 503], codes
    refused = [r for r in responses if r.status_code == 503]
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    ok = [r for r in responses if r.status_code == 200]
    assert all(len(r.json()["predictions"]) == 4 for r in ok)
    # Refusals are immediate, not an unbounded wait behind the queue.
    assert min(r.elapsed_s for r in refused) < 1.0  # type: ignore[attr-defined]
    with httpx.Client(base_url=small_queue_server.url) as c:
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/models/big:predict", json=body).status_code == 200


def test_sigterm_finishes_in_flight_requests(model_store, tmp_path, mnist_sample, start_server_fn) -> None:
    srv = start_server_fn(model_store, tmp_path, ERC_MODELS="big", ERC_MAX_BATCH_SIZE="2", ERC_MAX_QUEUE="64")
    body = {"instances": [{"b64": base64.b64encode(p).decode()} for p in mnist_sample.pngs[:2]]}

    def one(_: int) -> int:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            return c.post("/v1/models/big:predict", json=body).status_code

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        time.sleep(0.3)  # requests are in flight: queued behind a slow model, batch size 2
        t0 = time.perf_counter()
        assert srv.stop(timeout=60), srv.log.read_text()[-2000:]
        stopped_in = time.perf_counter() - t0
        codes = [f.result() for f in futures]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1, codes
    assert stopped_in < 30


def test_sigterm_with_a_drain_period(model_store, tmp_path, mnist_sample, start_server_fn) -> None:
    """ERC_SHUTDOWN_GRACE_S: after SIGTERM, readiness fails at once (a load balancer stops routing)
    but requests are still served until the drain period ends; then the server stops cleanly."""
    grace = 3.0
    srv = start_server_fn(model_store, tmp_path, ERC_MODELS="tiny", ERC_SHUTDOWN_GRACE_S=str(grace))
    png = mnist_sample.pngs[0]
    with srv.client() as c:
        assert c.get("/readyz").json()["draining"] is False
        t0 = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        assert c.get("/v2/health/ready").status_code == 400
        served = 0
        while time.perf_counter() - t0 < grace - 0.8:
            r = c.post("/v1/models/tiny:predict", content=png, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            served += 1
        assert served > 0
    srv.proc.wait(timeout=30)
    exited_after = time.perf_counter() - t0
    assert grace - 0.5 < exited_after < grace + 20
    assert srv.stop(), srv.log.read_text()[-2000:]  # exited cleanly: "Application shutdown complete"
    assert "draining for 3.0 s" in srv.log.read_text()
