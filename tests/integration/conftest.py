"""Real TorchServe for the integration tests (the model store and ``erc serve`` fixtures are in
tests/conftest.py), and a check of the model repository's unload that single-process and
multi-process serving share."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.launch import free_port


@contextlib.contextmanager
def _torchserve(store: Path, name: str, factory: pytest.TempPathFactory, batch: int) -> Iterator[Any]:
    """Real TorchServe serving store model ``name`` (archived by ``erc package``), ``batch`` / 5 ms."""
    from service import torchserve
    from service.packaging import package_model

    assert torchserve.java_available(), "Java 17 is needed for TorchServe"
    mar_store = factory.mktemp("mar")
    package_model(store, name, out_dir=mar_store)
    ts = torchserve.start(
        factory.mktemp("torchserve"),
        model_store=mar_store,
        models={name: {"batchSize": batch, "maxBatchDelay": 5}},
        ports=(free_port(), free_port(), free_port()),
        env={"ERC_TORCH_THREADS": "1"},
    )
    try:
        ts.wait_ready(name)
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="session")
def torchserve_for():
    """``with torchserve_for(store, name, tmp_path_factory, batch): ...``: TorchServe on a store model."""
    return _torchserve


@pytest.fixture(scope="module")
def torchserve_tiny(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Real TorchServe serving the ``tiny`` model (archived by ``erc package``), batch 8 / 5 ms."""
    with _torchserve(model_store, "tiny", tmp_path_factory, 8) as ts:
        yield ts


def _unload_during_a_slow_request(url: str, token: str, body: dict) -> None:
    """Load store entry ``tiny`` as ``tiny-slow``; start a prediction whose body arrives slowly
    (routed to ``tiny-slow`` before its body is read), unload ``tiny-slow`` meanwhile, then send the
    rest: the request gets its 200 from that version, and the next one a 404 saying it was
    unloaded."""
    auth = {"Authorization": f"Bearer {token}"}
    load = {"parameters": {"entry": "tiny"}}
    r = httpx.post(url + "/v2/repository/models/tiny-slow/load", headers=auth, json=load, timeout=120)
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            f"POST /v1/models/tiny-slow:predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + data[:10])
        time.sleep(0.5)  # routed to tiny-slow, reading its body
        unload = threading.Thread(
            target=lambda: httpx.post(
                url + "/v2/repository/models/tiny-slow/unload", headers=auth, timeout=60
            ).raise_for_status()
        )
        unload.start()
        time.sleep(1.0)  # tiny-slow is out of routing; its unload waits for this request
        sock.sendall(data[10:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    unload.join()
    status, _, rest = answer.partition(b"\r\n")
    assert b" 200 " in status, answer[:2000]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["model_version"] == version
    r = httpx.post(url + "/v1/models/tiny-slow:predict", content=data, timeout=30)
    assert r.status_code == 404 and "was unloaded" in r.text, r.text


@pytest.fixture(scope="session")
def unload_during_a_slow_request():
    return _unload_during_a_slow_request
