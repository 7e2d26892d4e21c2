"""Real servers for the integration tests: a model store built by training and exporting small
models for real, and ``erc serve`` started as a subprocess on a free loopback port."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from training.config import load_config
from training.data import load_split
from training.export import export_run
from training.train import run_training

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class MnistSample:
    images: np.ndarray  # [N, 28, 28] uint8
    labels: np.ndarray  # [N]
    pngs: list[bytes]


@pytest.fixture(scope="session")
def mnist_sample() -> MnistSample:
    test = load_split("mnist", "test", n=64, seed=123)
    images = test.images[:, 0].numpy()
    return MnistSample(images, test.labels.numpy(), [png_bytes(a) for a in images])


def _train_export(root: Path, store: Path, name: str, overrides: dict) -> Path:
    base = {
        "method.name": "er-minus",
        "data.eval_subset": 200,
        "data.batch_size": 50,
        "run.progress": False,
        "run.out_dir": str(root / name),
    }
    run_training(load_config(overrides={**base, **overrides}))
    return export_run(root / name, name, store, eval_n=200, device="cpu")


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny`` (slim, trained enough to read digits), ``big`` (paper size, barely trained) and
    ``broken`` (a copy of tiny whose weights no longer match the card's sha256)."""
    root = tmp_path_factory.mktemp("runs")
    store = tmp_path_factory.mktemp("store")
    _train_export(root, store, "tiny", {"model.width": 0.25, "data.train_subset": 4000, "run.epochs": 2})
    _train_export(root, store, "big", {"data.train_subset": 100, "run.epochs": 1})
    shutil.copytree(store / "tiny", store / "broken")
    weights = store / "broken" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    return store


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    started_s: float

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM; True when the server shut down gracefully within ``timeout``.

        uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM
        (or 0); the log line "Application shutdown complete" tells a clean stop from a kill.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return False
        clean_exit = self.proc.returncode in (0, -signal.SIGTERM)
        return clean_exit and "Application shutdown complete" in self.log.read_text()


def start_server(store: Path, log_dir: Path, **env: str) -> Server:
    port = free_port()
    environ = {
        **os.environ,
        "ERC_MODEL_STORE": str(store),
        "ERC_PORT": str(port),
        "ERC_HOST": "127.0.0.1",
        "ERC_TORCH_THREADS": "1",
        "PYTHONPATH": str(REPO),
        **env,
    }
    log = log_dir / f"server-{port}.log"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        env=environ,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return Server(url, proc, log, time.perf_counter() - t0)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server not ready in time:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        model_store,
        tmp_path_factory.mktemp("logs"),
        ERC_DEFAULT_MODEL="tiny",
        ERC_MAX_INSTANCES="8",
        ERC_MAX_BODY_BYTES=str(1024 * 1024),
        ERC_MAX_IMAGE_PIXELS=str(2000 * 2000),
    )
    yield srv
    assert srv.stop(), srv.log.read_text()[-3000:]


@pytest.fixture(scope="session")
def start_server_fn():
    """``start_server`` as a fixture, for tests that need a server with their own settings."""
    return start_server


@pytest.fixture(scope="session")
def free_port_fn():
    return free_port


@pytest.fixture(scope="module")
def torchserve_tiny(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Real TorchServe serving the ``tiny`` model (archived by ``erc package``), batch 8 / 5 ms."""
    from service import torchserve
    from service.packaging import package_model

    assert torchserve.java_available(), "Java 17 is needed for TorchServe"
    mar_store = tmp_path_factory.mktemp("mar")
    package_model(model_store, "tiny", out_dir=mar_store)
    ts = torchserve.start(
        tmp_path_factory.mktemp("torchserve"),
        model_store=mar_store,
        models={"tiny": {"batchSize": 8, "maxBatchDelay": 5}},
        ports=(free_port(), free_port(), free_port()),
        env={"ERC_TORCH_THREADS": "1"},
    )
    try:
        ts.wait_ready("tiny")
        yield ts
    finally:
        ts.stop()
