"""The docker-compose stack built and run for real with rootful podman, offline.

Opt-in (marker ``deploy``; ``make test`` runs it): builds a Debian base image with debootstrap
once (kept between runs), a wheelhouse from this machine's pip, the stack's images from the
repository's Dockerfiles, validates docker-compose.yml with Debian's docker-compose, brings the
stack up with podman-compose in a copy of the repository holding a freshly trained model and the
MNIST test split, two API replicas behind the nginx proxy (``--scale api=2``) and one audit
worker, and checks it end to end: the API classifies real MNIST images through the proxy,
TorchServe gives the same labels, an audit submitted through the proxy is run by the worker and
read back through the proxy from both replicas, and Prometheus scrapes every replica, the worker
and TorchServe. Tears everything down and leaves no container behind.

Needs root (rootful podman) and the packages of ``make deploy-deps``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from service.launch import free_port, http_status
from training.card import load_model
from training.config import load_config
from training.data import resolve_data_dir
from training.export import export_run
from training.train import run_training

REPO = Path(__file__).resolve().parents[2]

# A cold build of every image (no layer cached, apt and pip inside) takes longer than the suite's
# default 900 s per test on a busy 2-core machine.
pytestmark = [pytest.mark.deploy, pytest.mark.timeout(2400)]

PROJECT = "ercdeploy"
TOKEN = "deploy-test-token"
REPLICAS = 2
# What the images are built from (the rest of the repository stays out of the build context).
CONTEXT = [
    "pyproject.toml",
    "constraints.txt",
    "README.md",
    ".dockerignore",
    "docker-compose.yml",
    "training",
    "service",
    "docker",
]


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory, podman) -> Path:
    """A copy of the repository's deployment files, a wheelhouse, and a trained `mnist-er`."""
    ctx = tmp_path_factory.mktemp("ctx")
    for name in CONTEXT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, ctx / name, ignore=shutil.ignore_patterns("__pycache__", "*.whl", "erc.env"))
        else:
            shutil.copy2(src, ctx / name)
    wheels = ctx / "docker" / "wheels"
    podman.timed(
        "wheelhouse_s",
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "-w",
            str(wheels),
            "-c",
            str(REPO / "constraints.txt"),
            f"{REPO}[torchserve]",
            "setuptools",
        ],
    )
    runs = tmp_path_factory.mktemp("runs")
    run_training(
        load_config(
            overrides={
                "method.name": "er-minus",
                "model.width": 0.25,
                "data.train_subset": 4000,
                "data.eval_subset": 500,
                "data.batch_size": 50,
                "run.epochs": 2,
                "run.progress": False,
                "run.out_dir": str(runs / "m"),
            }
        )
    )
    export_run(runs / "m", "mnist-er", ctx / "model_store", eval_n=500, device="cpu")
    # MNIST for the audit worker's test split (./data is mounted at /data in audit-worker).
    mnist = ctx / "data" / "mnist"
    mnist.mkdir(parents=True)
    for src in resolve_data_dir("mnist").glob("*.gz"):
        shutil.copyfile(src, mnist / src.name)
    (ctx / "docker" / "erc.env").write_text(
        (REPO / "docker" / "erc.env.example").read_text()
        + f"ERC_ADMIN_TOKEN={TOKEN}\nERC_TORCH_THREADS=1\nERC_AUDIT_THREADS=1\n"
        + "ERC_AUDIT_DB_PASSWORD=deploy-test-db-password\n"
    )
    return ctx


@pytest.fixture(scope="module")
def stack(podman, context: Path) -> Iterator[dict[str, object]]:
    api_port = free_port()
    port = {"ERC_API_PORT": str(api_port)}
    compose = ["podman-compose", "-p", PROJECT]
    # The schema check (podman-compose has none); each image is built by one service only.
    config = yaml.safe_load(podman.run(["docker-compose", "config"], context, **port))
    built = [service["image"] for service in config["services"].values() if "build" in service]
    assert len(built) == len(set(built)), f"services build the same image twice: {sorted(built)}"
    try:
        # Builds on the host's network: the Debian images install packages with apt, and this
        # machine's resolver does not answer containers on podman's bridge (docs/deploy.md).
        build = ["--podman-build-args", f"--network=host --label={podman.build_label}", "build"]
        podman.timed("build_s", [*compose, *build], context, **port)
        podman.timed("up_s", [*compose, "up", "-d", "--scale", f"api={REPLICAS}"], context, **port)
        up_at = time.perf_counter()
        url = f"http://127.0.0.1:{api_port}"
        t0 = time.perf_counter()
        while http_status(url + "/readyz") != 200:
            assert time.perf_counter() - t0 < 180, podman.run([*compose, "logs"], context, **port)
            time.sleep(0.5)
        podman.timings["api_ready_after_up_s"] = round(time.perf_counter() - t0, 1)
        yield {"url": url, "ctx": context, "up_at": up_at}
    finally:
        subprocess.run(
            # --remove-orphans: podman-compose's down knows one container per service, not the
            # scaled replicas; this removes every container labelled with the project.
            [*compose, "down", "-v", "--remove-orphans"],
            env={**podman.env, **port},
            cwd=context,
            capture_output=True,
            timeout=300,
        )
        podman.write_timings(REPO)
    assert podman.project_containers(PROJECT) == [], "podman-compose down left containers behind"


def _name(service: str, replica: int = 1) -> str:
    return f"{PROJECT}_{service}_{replica}"


def test_api_classifies_real_mnist_images_like_the_model_in_process(stack, mnist_sample) -> None:
    model, _ = load_model(Path(stack["ctx"]) / "model_store" / "mnist-er")
    import torch

    with torch.no_grad():
        expected = (
            model(torch.from_numpy(mnist_sample.images[:8]).float().div(255)[:, None]).argmax(1).tolist()
        )
    labels = []
    for png in mnist_sample.pngs[:8]:
        req = urllib.request.Request(
            f"{stack['url']}/v1/models/mnist-er:predict", data=png, headers={"Content-Type": "image/png"}
        )
        labels.append(json.load(urllib.request.urlopen(req, timeout=30))["predictions"][0]["label"])
    assert labels == expected
    assert sum(int(a == b) for a, b in zip(labels, mnist_sample.labels[:8], strict=True)) >= 6


def test_the_image_serves_the_console_and_attack_check(stack, mnist_sample) -> None:
    """The console's files travel in the package (package data) and the attack-check child process starts
    inside the container."""
    with urllib.request.urlopen(f"{stack['url']}/", timeout=30) as page:
        assert page.status == 200 and "ER-Classifier console" in page.read().decode()
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert http_status(f"{stack['url']}/console/console.js") == 200
    req = urllib.request.Request(
        f"{stack['url']}/v1/models/mnist-er:attack?steps=3",
        data=mnist_sample.pngs[0],
        headers={"Content-Type": "image/png"},
    )
    body = json.load(urllib.request.urlopen(req, timeout=120))
    assert body["results"][0]["perturbation"]["linf_units"] <= body["attack"]["eps_units"]


def test_torchserve_answers_the_same_label(podman, stack, mnist_sample) -> None:
    deadline = time.time() + 240
    while not podman.ok(["podman", "healthcheck", "run", _name("torchserve")]):
        assert time.time() < deadline, "TorchServe never became healthy (READY worker)"
        time.sleep(2)
    podman.timings["torchserve_healthy_after_up_s"] = round(time.perf_counter() - stack["up_at"], 1)
    key = json.loads(
        podman.run(["podman", "exec", _name("torchserve"), "cat", "/home/model-server/key_file.json"])
    )["inference"]["key"]
    png_hex = mnist_sample.pngs[1].hex()
    code = (
        "import json, urllib.request\n"
        f"png = bytes.fromhex('{png_hex}')\n"
        "def post(url, headers):\n"
        "    req = urllib.request.Request(url, data=png, headers={'Content-Type': 'image/png', **headers})\n"
        "    return json.load(urllib.request.urlopen(req, timeout=30))['predictions'][0]['label']\n"
        f"print(post('http://torchserve:8080/predictions/mnist-er', {{'Authorization': 'Bearer {key}'}}),"
        " post('http://127.0.0.1:8080/v1/models/mnist-er:predict', {}))\n"
    )
    ts_label, api_label = podman.exec_python(_name("api"), code).split()
    assert ts_label == api_label


def test_an_audit_through_the_proxy_runs_on_the_worker_and_any_replica_answers(podman, stack) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    audit = {
        "model": "mnist-er",
        "data": {"n": 50},
        "eps": [0.1],
        "attacks": [{"name": "fgsm"}],
        "checks": False,
    }
    with httpx.Client(base_url=stack["url"], headers=auth, timeout=60) as c:
        r = c.post("/admin/audits", json=audit)
        assert r.status_code == 202, r.text
        audit_id = r.json()["id"]
        t0 = time.perf_counter()
        deadline = time.time() + 300
        while (body := c.get(f"/admin/audits/{audit_id}").json())["status"] != "done":
            assert body["status"] in ("queued", "running") and time.time() < deadline, body
            time.sleep(0.5)
        podman.timings["audit_through_proxy_s"] = round(time.perf_counter() - t0, 1)
        assert body["result"]["data"] == {
            "source": "test",
            "dataset": "mnist",
            "split": "test",
            "n": 50,
            "seed": 0,
        }
        assert body["attempts"] == 1
        report = c.get(f"/admin/audits/{audit_id}/report")
        assert report.status_code == 200 and "Robustness audit: mnist-er" in report.text
        for _ in range(4):  # a few more reads: the proxy spreads them over the replicas
            assert c.get(f"/admin/audits/{audit_id}").status_code == 200
    code = (
        "import urllib.request\n"
        "m = urllib.request.urlopen('http://127.0.0.1:8080/metrics').read().decode()\n"
        "print(sum(float(l.rsplit(' ', 1)[1]) for l in m.splitlines()"
        " if l.startswith('erc_http_requests_total{') and 'route=\"/admin/audits/{audit_id}\"' in l))\n"
    )
    served = [float(podman.exec_python(_name("api", i), code)) for i in range(1, REPLICAS + 1)]
    assert all(n > 0 for n in served), f"reads of the audit per replica: {served}"
    # The replicas never attacked: the worker ran the audit's process.
    assert 'erc_audit_attempts_total{outcome="done"} 1.0' in podman.exec_python(
        _name("audit-worker"),
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9101/metrics').read().decode())",
    )


def _until_every_replica(podman, path: str, status: int, failure: str, timeout_s: float = 60) -> None:
    """Wait until ``GET path`` answers ``status`` on every API replica, each asked inside its container."""
    code = (
        "import urllib.error, urllib.request\n"
        "try:\n"
        f"    print(urllib.request.urlopen('http://127.0.0.1:8080{path}').status)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
    )
    deadline = time.time() + timeout_s
    while True:
        seen = [int(podman.exec_python(_name("api", i), code)) for i in range(1, REPLICAS + 1)]
        if seen == [status] * REPLICAS:
            return
        assert time.time() < deadline, f"{failure}: {path} answered {seen}"
        time.sleep(0.5)


def test_a_model_rolled_into_the_running_stack_through_the_proxy(podman, stack, mnist_sample) -> None:
    """docs/deploy.md's roll-out on the running stack: a new store entry (the bind-mounted
    model_store) is loaded through the proxy and reaches every replica; predictions to mnist-er
    never fail meanwhile; unloaded, it answers 404 on every replica."""
    import threading
    from collections import Counter

    store = Path(stack["ctx"]) / "model_store"
    shutil.copytree(store / "mnist-er", store / "canary")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    png = {"content": mnist_sample.pngs[0], "headers": {"content-type": "image/png"}}
    stop, outcomes = threading.Event(), Counter()

    def steady() -> None:
        with httpx.Client(base_url=stack["url"], timeout=30) as c:
            while not stop.is_set():
                outcomes[c.post("/v1/models/mnist-er:predict", **png).status_code] += 1

    client = threading.Thread(target=steady)
    client.start()
    try:
        with httpx.Client(base_url=stack["url"], timeout=120) as c:
            r = c.post("/v2/repository/models/canary/load", headers=auth)
            assert r.status_code == 200 and r.json()["state"] == "READY", r.text
            # Each replica is asked directly: through the proxy, the round-robin interleaves these
            # probes with the steady client's requests and can send every probe to one replica.
            _until_every_replica(
                podman, "/v2/models/canary/ready", 200, "the load did not reach every replica"
            )
            deadline = time.time() + 30  # a replica reports its rows after it has loaded
            while True:
                index = {row["name"]: row for row in c.post("/v2/repository/index", headers=auth).json()}
                if len(index["canary"]["replicas"]) == REPLICAS:
                    break
                assert time.time() < deadline, index["canary"]
                time.sleep(0.5)
            assert index["canary"]["state"] == "READY", index["canary"]
            assert {r["state"] for r in index["canary"]["replicas"].values()} == {"ready"}, index["canary"]
            label = c.post("/v1/models/mnist-er:predict", **png).json()["predictions"][0]["label"]
            assert c.post("/v1/models/canary:predict", **png).json()["predictions"][0]["label"] == label
            r = c.post("/v2/repository/models/canary/unload", headers=auth)
            assert r.status_code == 200, r.text
            _until_every_replica(
                podman, "/v2/models/canary/ready", 404, "the unload did not reach every replica"
            )
            assert c.post("/v1/models/canary:predict", **png).status_code == 404
    finally:
        stop.set()
        client.join()
        shutil.rmtree(store / "canary", ignore_errors=True)
    assert outcomes[200] > 0 and set(outcomes) == {200}, outcomes


def test_prometheus_scrapes_every_replica_the_worker_and_torchserve(podman, stack) -> None:
    code = (
        "import json, urllib.request\n"
        "t = json.load(urllib.request.urlopen('http://prometheus:9090/api/v1/targets'))['data']['activeTargets']\n"
        "q = json.load(urllib.request.urlopen('http://prometheus:9090/api/v1/query?query=erc_http_requests_total'))\n"
        "print(json.dumps({'health': sorted([x['labels']['job'], x['health']] for x in t), 'samples': len(q['data']['result'])}))\n"
    )
    expected = [["erc-api", "up"]] * REPLICAS + [["erc-audit-worker", "up"], ["torchserve", "up"]]
    deadline = time.time() + 120
    while True:
        state = json.loads(podman.exec_python(_name("api"), code))
        if state["health"] == expected and state["samples"] > 0:
            break
        assert time.time() < deadline, state
        time.sleep(2)


def test_containers_are_hardened_and_healthy(podman, stack) -> None:
    for i in range(1, REPLICAS + 1):
        assert podman.run(["podman", "exec", _name("api", i), "id", "-u"]).strip() == "10001"
        assert podman.ok(["podman", "healthcheck", "run", _name("api", i)])
    assert podman.run(["podman", "exec", _name("audit-worker"), "id", "-u"]).strip() == "10001"
    assert podman.run(["podman", "exec", _name("torchserve"), "id", "-u"]).strip() == "10002"
    assert podman.run(["podman", "exec", _name("proxy"), "id", "-un"]).strip() == "www-data"
    assert podman.run(["podman", "exec", _name("postgres"), "id", "-un"]).strip() == "postgres"
    for service in ("audit-worker", "proxy", "postgres"):
        assert podman.ok(["podman", "healthcheck", "run", _name(service)]), service
    ports = podman.run(["podman", "port", "-a"])
    published = [ln for ln in ports.splitlines() if "->" in ln]
    assert len(published) == 1 and "8080/tcp" in published[0], ports  # only the proxy is published
