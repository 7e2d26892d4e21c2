"""The model-repository API on a deployment, for real: two ``erc serve`` replicas and an ``erc
audit-worker`` on one SQLite store, on 127.0.0.1.

- a load said to one replica reaches the other; unload; a new version beside the old, made the
  default, the old one retired; a model file that fails to load leaves the others serving and
  the index says why, per replica;
- under load: predictions to one model answer with no failed request while another is loaded and
  unloaded in a loop;
- an audit running on weights that are being replaced finishes on the weights it started with.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service import launch
from service.launch import ServerProcess
from training.card import read_card

TOKEN = "repository-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POLL_S = 0.5


@dataclass
class Deployment:
    store: Path
    a: ServerProcess
    b: ServerProcess
    worker: ServerProcess
    engine: str

    def version(self, entry: str) -> str:
        return read_card(self.store / entry).weights_sha256[:12]


def _env(db: str) -> dict[str, str]:
    return {
        "ERC_ADMIN_TOKEN": TOKEN,
        "ERC_AUDIT_DB": db,
        "ERC_AUDIT_LOCAL_WORKER": "off",
        "ERC_MODELS": "tiny,big",
        "ERC_DEFAULT_MODEL": "tiny",
        "ERC_TORCH_THREADS": "1",
        "ERC_AUDIT_THREADS": "1",
        "ERC_AUDIT_SCHED_IDLE": "false",
        "ERC_AUDIT_NICENESS": "0",
        "ERC_REPOSITORY_POLL_S": str(POLL_S),
    }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def deployment(
    request: pytest.FixtureRequest, model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("repository")
    store = base / "store"
    store.mkdir()
    for name in ("tiny", "big"):
        shutil.copytree(model_store / name, store / name)
    if request.param == "sqlite":
        db = f"sqlite:///{base / 'store.db'}"
    else:
        db = request.getfixturevalue("postgres").create_database(f"repository_{secrets.token_hex(4)}")
    env = _env(db)
    a = launch.start_server(store, base / "a.log", env=env)
    b = launch.start_server(store, base / "b.log", env=env)
    worker = launch.start_worker(store, base / "worker.log", env=env)
    yield Deployment(store, a, b, worker, request.param)
    for p in (a, b):
        assert p.stop(), p.log.read_text()[-3000:]
    worker.stop()
    assert worker.proc.returncode in (0, -15), worker.log.read_text()[-3000:]


def _index(srv: ServerProcess) -> list[dict]:
    r = httpx.post(f"{srv.url}/v2/repository/index", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _until(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.1)


def _unload(srv: ServerProcess, name: str, version: str | None = None) -> httpx.Response:
    body = {"parameters": {"version": version}} if version else None
    return httpx.post(f"{srv.url}/v2/repository/models/{name}/unload", headers=AUTH, json=body, timeout=30)


def _predict(srv: ServerProcess, name: str, png: bytes) -> httpx.Response:
    return httpx.post(
        f"{srv.url}/v1/models/{name}:predict", content=png, headers={"content-type": "image/png"}, timeout=30
    )


def test_the_index_lists_every_model_on_every_replica(deployment: Deployment) -> None:
    def both_ready() -> bool:
        rows = {r["name"]: r for r in _index(deployment.a)}
        return all(len(rows[n]["replicas"]) == 2 and rows[n]["state"] == "READY" for n in ("tiny", "big"))

    _until(both_ready)
    rows = {r["name"]: r for r in _index(deployment.b)}
    assert rows["tiny"]["version"] == deployment.version("tiny") and rows["tiny"]["default"]
    no_auth = httpx.post(f"{deployment.a.url}/v2/repository/index", timeout=10)
    assert no_auth.status_code == 401


def test_load_and_unload_reach_every_replica(deployment: Deployment, mnist_sample) -> None:
    a, b = deployment.a, deployment.b
    png = mnist_sample.pngs[0]
    assert _predict(b, "big", png).status_code == 200
    r = _unload(a, "big")
    assert r.status_code == 200, r.text
    assert _predict(a, "big", png).status_code == 404  # the replica told answers at once
    _until(lambda: _predict(b, "big", png).status_code == 404)
    gone = _predict(b, "big", png).json()["error"]["message"]
    assert "was unloaded" in gone
    assert _predict(b, "tiny", png).status_code == 200
    r = httpx.post(f"{b.url}/v2/repository/models/big/load", headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["state"] == "READY", r.text
    _until(lambda: _predict(a, "big", png).status_code == 200)


def test_a_new_version_beside_the_old_then_the_default_then_retire(
    deployment: Deployment, mnist_sample
) -> None:
    """Serve the store entry ``big`` as a second version of ``tiny``, reach it by its version,
    make it the default everywhere, retire the first version."""
    a, b = deployment.a, deployment.b
    png = mnist_sample.pngs[1]
    old, new = deployment.version("tiny"), deployment.version("big")
    body = {"parameters": {"entry": "big", "default": False}}
    r = httpx.post(f"{a.url}/v2/repository/models/tiny/load", headers=AUTH, json=body, timeout=120)
    assert r.status_code == 200 and r.json()["version"] == new and not r.json()["default"], r.text
    assert _predict(b, "tiny", png).json()["model_version"] == old

    def version_reachable_on_b() -> bool:
        return httpx.get(f"{b.url}/v2/models/tiny/versions/{new}", timeout=10).status_code == 200

    _until(version_reachable_on_b)
    refused = _unload(a, "tiny", old)
    assert refused.status_code == 409 and "default" in refused.json()["error"]["message"]
    r = httpx.post(f"{b.url}/v2/repository/models/tiny/versions/{new}/default", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    _until(lambda: all(_predict(s, "tiny", png).json()["model_version"] == new for s in (a, b)))
    r = _unload(a, "tiny", old)
    assert r.status_code == 200, r.text
    _until(lambda: httpx.get(f"{b.url}/v2/models/tiny/versions/{old}", timeout=10).status_code == 404)
    assert _predict(b, "tiny", png).json()["model_version"] == new
    # Back as it was, for the other tests.
    httpx.post(f"{a.url}/v2/repository/models/tiny/load", headers=AUTH, timeout=120).raise_for_status()
    _unload(a, "tiny", new).raise_for_status()
    _until(lambda: all(_predict(s, "tiny", png).json()["model_version"] == old for s in (a, b)))


def test_a_request_still_being_read_is_answered_by_the_version_being_unloaded(
    deployment: Deployment, mnist_sample, unload_during_a_slow_request
) -> None:
    body = {"instances": [{"b64": base64.b64encode(mnist_sample.pngs[0]).decode()}]}
    unload_during_a_slow_request(deployment.a.url, TOKEN, body)


def test_a_model_that_fails_to_load_leaves_the_others_serving(deployment: Deployment, mnist_sample) -> None:
    a, b = deployment.a, deployment.b
    bad = deployment.store / "corrupt"
    shutil.copytree(deployment.store / "tiny", bad)
    weights = bad / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    r = httpx.post(f"{a.url}/v2/repository/models/corrupt/load", headers=AUTH, timeout=120)
    assert r.status_code == 422 and "sha256" in r.json()["error"]["message"], r.text

    def failed_on_both() -> bool:
        row = next(x for x in _index(b) if x["name"] == "corrupt")
        return len(row["replicas"]) == 2 and all(v["state"] == "failed" for v in row["replicas"].values())

    _until(failed_on_both)
    row = next(x for x in _index(b) if x["name"] == "corrupt")
    assert row["state"] == "UNAVAILABLE" and "sha256" in row["reason"]
    assert _predict(b, "tiny", mnist_sample.pngs[0]).status_code == 200
    _unload(b, "corrupt").raise_for_status()
    shutil.rmtree(bad)


def test_no_request_fails_while_another_model_is_loaded_and_unloaded(
    deployment: Deployment, mnist_sample
) -> None:
    """Predictions to ``tiny`` on both replicas from four threads while ``big`` is unloaded and
    loaded through alternating replicas in a loop (60 s on SQLite, 20 s on PostgreSQL); every
    failed request is counted."""
    a, b = deployment.a, deployment.b
    stop = threading.Event()
    outcomes: Counter[int] = Counter()
    lock = threading.Lock()

    def client(srv: ServerProcess, png: bytes) -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    code = c.post(
                        "/v1/models/tiny:predict", content=png, headers={"content-type": "image/png"}
                    ).status_code
                except httpx.HTTPError:
                    code = -1
                with lock:
                    outcomes[code] += 1

    threads = [
        threading.Thread(target=client, args=(s, mnist_sample.pngs[i])) for i, s in enumerate((a, b, a, b))
    ]
    for t in threads:
        t.start()
    cycles = 0
    deadline = time.monotonic() + (60 if deployment.engine == "sqlite" else 20)
    try:
        while time.monotonic() < deadline:
            via = (a, b)[cycles % 2]
            _unload(via, "big").raise_for_status()
            httpx.post(
                f"{via.url}/v2/repository/models/big/load", headers=AUTH, timeout=120
            ).raise_for_status()
            cycles += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(
        f"\nrepository under load ({deployment.engine}): {cycles} unload/load cycles of big, predictions to tiny: {dict(outcomes)}"
    )
    assert cycles >= 3 and outcomes[200] > 100
    assert set(outcomes) == {200}, outcomes


def test_an_audit_finishes_on_the_weights_it_started_with(deployment: Deployment) -> None:
    a, b = deployment.a, deployment.b
    old, new = deployment.version("tiny"), deployment.version("big")
    job = {"model": "tiny", "data": {"n": 150}, "eps": [0.1, 0.2], "attacks": [{"name": "pgd", "params": {"steps": 40}}],
           "checks": False}  # fmt: skip
    r = httpx.post(f"{a.url}/admin/audits", headers=AUTH, json=job, timeout=30)
    assert r.status_code == 202, r.text
    audit = r.json()["id"]
    _until(lambda: httpx.get(f"{a.url}/admin/audits/{audit}", headers=AUTH).json()["status"] == "running", 60)
    # Replace tiny's weights while the audit runs: the new version becomes the default, the old retires.
    body = {"parameters": {"entry": "big", "default": True}}
    httpx.post(
        f"{b.url}/v2/repository/models/tiny/load", headers=AUTH, json=body, timeout=120
    ).raise_for_status()
    _unload(b, "tiny", old).raise_for_status()
    _until(
        lambda: (
            httpx.get(f"{a.url}/admin/audits/{audit}", headers=AUTH).json()["status"] in ("done", "failed")
        ),
        300,
    )
    done = httpx.get(f"{a.url}/admin/audits/{audit}", headers=AUTH).json()
    assert done["status"] == "done", done
    assert done["result"]["model"]["weights_sha256"].startswith(old)
    report = httpx.get(f"{a.url}/admin/audits/{audit}/report", headers=AUTH).text
    assert old in report
    assert _predict(b, "tiny", b"").status_code in (400, 422)  # still answering (an empty body is refused)
    assert httpx.get(f"{b.url}/v1/models/tiny", timeout=10).json()["version"] == new
