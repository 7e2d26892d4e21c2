"""The docker-compose stack built and run for real with rootful podman, offline.

Opt-in (marker ``deploy``; ``make test`` runs it): builds a Debian base image with debootstrap
once (kept between runs), a wheelhouse from this machine's pip, the stack's images from the
repository's Dockerfiles, validates docker-compose.yml with Debian's docker-compose, brings the
stack up with podman-compose in a copy of the repository holding a freshly trained model, and
checks it end to end: the API classifies real MNIST images, TorchServe gives the same labels, and
Prometheus scrapes both. Tears everything down and leaves no container behind.

Needs root (rootful podman) and the packages of ``make deploy-deps``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.launch import REPO, free_port, http_status
from training.card import load_model
from training.config import load_config
from training.export import export_run
from training.train import run_training

pytestmark = pytest.mark.deploy

BASE_IMAGE = "localhost/localbase:bookworm"
PROJECT = "ercdeploy"
CONTAINERS_CONF = (
    '[containers]\ndefault_ulimits = ["nofile=8192:8192", "nproc=8192:8192"]\n'
    '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
)
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
TIMINGS: dict[str, float] = {}


def _run(cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: int = 1200) -> str:
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res.stdout


def _timed(name: str, fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    TIMINGS[name] = round(time.perf_counter() - t0, 1)
    return out


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    assert os.geteuid() == 0, "rootful podman: run the deploy tests as root"
    for tool in ("podman", "debootstrap", "docker-compose"):
        assert shutil.which(tool), f"{tool} missing: make deploy-deps installs it"
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)  # ulimits at or below the host's, runc (see docs/deploy.md)
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(conf),
        "BUILDAH_FORMAT": "docker",
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
    }
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=env).returncode != 0:
        rootfs = tmp_path_factory.mktemp("rootfs")
        mirror = "http://deb.debian.org/debian"
        sources = Path("/etc/apt/sources.list.d/debian.sources")
        if sources.exists():
            uris = [
                ln.split(":", 1)[1].strip()
                for ln in sources.read_text().splitlines()
                if ln.startswith("URIs:")
            ]
            mirror = uris[0] if uris else mirror
        _timed(
            "base_image_s", _run, ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], env
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=env, check=True, capture_output=True
        )
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
    return env


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository's deployment files, a wheelhouse, and a trained `mnist-er`."""
    ctx = tmp_path_factory.mktemp("ctx")
    for name in CONTEXT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, ctx / name, ignore=shutil.ignore_patterns("__pycache__", "*.whl", "erc.env"))
        else:
            shutil.copy2(src, ctx / name)
    _timed(
        "wheelhouse_s",
        _run,
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "-w",
            str(ctx / "docker" / "wheels"),
            "-c",
            str(REPO / "constraints.txt"),
            f"{REPO}[torchserve]",
            "setuptools",
        ],
        dict(os.environ),
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
    (ctx / "docker" / "erc.env").write_text(
        (REPO / "docker" / "erc.env.example").read_text()
        + "ERC_ADMIN_TOKEN=deploy-test-token\nERC_TORCH_THREADS=1\n"
    )
    return ctx


def _compose(env: dict[str, str], ctx: Path, *args: str, timeout: int = 1800) -> str:
    return _run(["podman-compose", "-p", PROJECT, *args], env, cwd=ctx, timeout=timeout)


def _containers(env: dict[str, str]) -> list[str]:
    out = _run(
        [
            "podman",
            "ps",
            "-a",
            "--filter",
            f"label=io.podman.compose.project={PROJECT}",
            "--format",
            "{{.Names}}",
        ],
        env,
    )
    return [ln for ln in out.split() if ln]


def _exec_python(env: dict[str, str], container: str, code: str) -> str:
    return _run(["podman", "exec", container, "python3", "-c", code], env, timeout=120)


@pytest.fixture(scope="module")
def stack(podman_env: dict[str, str], context: Path) -> Iterator[dict[str, object]]:
    api_port = free_port()
    env = {
        **podman_env,
        "ERC_BASE_IMAGE": BASE_IMAGE,
        "ERC_PROMETHEUS_BASE_IMAGE": BASE_IMAGE,
        "ERC_PIP_ARGS": "--no-index",
        "ERC_API_PORT": str(api_port),
    }
    _run(["docker-compose", "config", "-q"], env, cwd=context)  # schema validation (podman-compose does none)
    try:
        _timed("build_s", _compose, env, context, "build")
        _timed("up_s", _compose, env, context, "up", "-d")
        up_at = time.perf_counter()
        url = f"http://127.0.0.1:{api_port}"
        t0 = time.perf_counter()
        while http_status(url + "/readyz") != 200:
            assert time.perf_counter() - t0 < 180, _compose(env, context, "logs")
            time.sleep(0.5)
        TIMINGS["api_ready_after_up_s"] = round(time.perf_counter() - t0, 1)
        yield {"env": env, "url": url, "ctx": context, "up_at": up_at}
    finally:
        subprocess.run(
            ["podman-compose", "-p", PROJECT, "down", "-v"],
            env=env,
            cwd=context,
            capture_output=True,
            timeout=300,
        )
        sys.stderr.write(f"\ndeploy timings: {json.dumps(TIMINGS)}\n")
        (REPO / "build").mkdir(exist_ok=True)
        (REPO / "build" / "deploy-timings.json").write_text(json.dumps(TIMINGS, indent=2))
    assert _containers(env) == [], "podman-compose down left containers behind"


def _name(service: str) -> str:
    return f"{PROJECT}_{service}_1"


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


def test_torchserve_answers_the_same_label(stack, mnist_sample) -> None:
    env = stack["env"]
    deadline = time.time() + 240
    while (
        subprocess.run(
            ["podman", "healthcheck", "run", _name("torchserve")], env=env, capture_output=True
        ).returncode
        != 0
    ):
        assert time.time() < deadline, "TorchServe never became healthy (READY worker)"
        time.sleep(2)
    TIMINGS["torchserve_healthy_after_up_s"] = round(time.perf_counter() - stack["up_at"], 1)
    key = json.loads(
        _run(["podman", "exec", _name("torchserve"), "cat", "/home/model-server/key_file.json"], env)
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
    ts_label, api_label = _exec_python(env, _name("api"), code).split()
    assert ts_label == api_label


def test_prometheus_scrapes_both_targets(stack) -> None:
    code = (
        "import json, urllib.request\n"
        "t = json.load(urllib.request.urlopen('http://prometheus:9090/api/v1/targets'))['data']['activeTargets']\n"
        "q = json.load(urllib.request.urlopen('http://prometheus:9090/api/v1/query?query=erc_http_requests_total'))\n"
        "print(json.dumps({'health': {x['labels']['job']: x['health'] for x in t}, 'samples': len(q['data']['result'])}))\n"
    )
    deadline = time.time() + 120
    while True:
        state = json.loads(_exec_python(stack["env"], _name("api"), code))
        if state["health"] == {"erc-api": "up", "torchserve": "up"} and state["samples"] > 0:
            break
        assert time.time() < deadline, state
        time.sleep(2)


def test_containers_are_hardened_and_healthy(stack) -> None:
    env = stack["env"]
    assert _run(["podman", "exec", _name("api"), "id", "-u"], env).strip() == "10001"
    assert _run(["podman", "exec", _name("torchserve"), "id", "-u"], env).strip() == "10002"
    assert (
        subprocess.run(
            ["podman", "healthcheck", "run", _name("api")], env=env, capture_output=True
        ).returncode
        == 0
    )
    ports = _run(["podman", "port", "-a"], env)
    published = [ln for ln in ports.splitlines() if "->" in ln]
    assert len(published) == 1 and "8080/tcp" in published[0], ports  # only the API is published
