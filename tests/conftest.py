"""Shared fixtures. Tests are CPU-only and small: tiny widths, data subsets, few steps."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service import launch
from service.launch import ServerProcess, free_port
from training.config import load_config
from training.data import load_split
from training.export import export_run
from training.train import run_training

REPO = Path(__file__).resolve().parents[1]
# Development data: the package searches only its settings (README "Data"); full MNIST lies in
# ../shared/data/mnist beside a CI checkout, so the tests (and every erc they start, which inherits
# the environment) point ERC_DATA_DIR there unless the caller set it (the Makefile does the same).
SHARED_DATA = REPO.parent / "shared" / "data"
if "ERC_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["ERC_DATA_DIR"] = str(SHARED_DATA)
DATA_DIR = Path(os.environ["ERC_DATA_DIR"]) if os.environ.get("ERC_DATA_DIR") else None


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    # Two cores in CI: keep torch from oversubscribing when tests start subprocesses.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder of the development datasets (``$ERC_DATA_DIR``, ``mnist/`` below it)."""
    if DATA_DIR is None:
        pytest.fail("no development data: set ERC_DATA_DIR (or put MNIST in ../shared/data/mnist)")
    return DATA_DIR


def _erc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def erc_env(tmp_path: Path) -> dict[str, str]:
    """Environment for ``erc`` subprocesses: this interpreter's scripts first on PATH."""
    return _erc_env()


@pytest.fixture(scope="module")
def erc_module_env() -> dict[str, str]:
    """:func:`erc_env` for module-scoped fixtures (a fresh copy per module)."""
    return _erc_env()


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


# -- real servers (integration and security tests) -------------------------------------------
# A model store built by training and exporting small models for real, and ``erc serve`` started
# as a subprocess on a free loopback port.


def _train_export(root: Path, store: Path, name: str, overrides: dict, typicality_fit_n: int = 4000) -> Path:
    base = {
        "method.name": "er-minus",
        "data.eval_subset": 200,
        "data.batch_size": 50,
        "run.progress": False,
        "run.out_dir": str(root / name),
    }
    run_training(load_config(overrides={**base, **overrides}))
    return export_run(root / name, name, store, eval_n=200, device="cpu", typicality_fit_n=typicality_fit_n)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny`` (slim, trained enough to read digits, with a fitted typicality score), ``big``
    (paper size, barely trained, no typicality score) and ``broken`` (a copy of tiny whose weights
    no longer match the card's sha256)."""
    root = tmp_path_factory.mktemp("runs")
    store = tmp_path_factory.mktemp("store")
    _train_export(root, store, "tiny", {"model.width": 0.25, "data.train_subset": 4000, "run.epochs": 2})
    _train_export(root, store, "big", {"data.train_subset": 100, "run.epochs": 1}, typicality_fit_n=0)
    shutil.copytree(store / "tiny", store / "broken")
    weights = store / "broken" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    return store


def start_server(store: Path, log_dir: Path, **env: str) -> ServerProcess:
    """``erc serve`` on ``store`` with one torch thread (the tests run side by side on 2 cores)."""
    log = log_dir / f"server-{len(list(log_dir.glob('server-*')))}.log"
    return launch.start_server(store, log, env={"ERC_TORCH_THREADS": "1", **env})


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
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


# The small image folder a new user trains first (issue 25): three RGB classes that colour alone
# separates, a red disc, a green bar, a blue cross, on dark noise.
SMALL_SHAPES = {"bar": (40, 200, 50), "cross": (50, 70, 230), "disc": (220, 40, 40)}


def write_small_shapes(
    root: Path, n_train: int = 60, n_test: int = 15, size: int = 32, seed: int = 0
) -> Path:
    """``root/{train,test}/{bar,cross,disc}/*.png``: ``n_train`` and ``n_test`` images a class."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for name, colour in SMALL_SHAPES.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 50, (size, size, 3), dtype=np.uint8))
                draw = ImageDraw.Draw(img)
                r = int(rng.integers(6, 11))
                cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
                fill = tuple(int(v) for v in np.clip(np.array(colour) + rng.integers(-30, 31, 3), 0, 255))
                if name == "disc":
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
                elif name == "bar":
                    draw.rectangle((cx - r, cy - 2, cx + r, cy + 2), fill=fill)
                else:
                    draw.rectangle((cx - r, cy - 1, cx + r, cy + 1), fill=fill)
                    draw.rectangle((cx - 1, cy - r, cx + 1, cy + r), fill=fill)
                img.save(root / split / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def small_shapes_fn():
    """:func:`write_small_shapes` as a fixture."""
    return write_small_shapes


def _screenshot(html: str, tmp_path: Path) -> None:
    """The report renders in headless Chromium (Debian's package) without a crash."""
    page = tmp_path / "report.html"
    page.write_text(html)
    shot = tmp_path / "report.png"
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (make test installs it)"
    res = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1100,2000",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    img = Image.open(shot).convert("L")
    assert img.size == (1100, 2000)
    lo, hi = img.getextrema()
    assert hi - lo > 100, "the screenshot is not blank"


@pytest.fixture(scope="session")
def screenshot_html():
    """``screenshot_html(html, folder)``: render a page in headless Chromium and check it is not blank."""
    return _screenshot


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A throwaway PostgreSQL cluster (Debian's postgresql, on a fresh machine) on a free loopback
    port for the whole session; tests create their own databases in it (``create_database``)."""
    from service.postgres import start_postgres

    pg = start_postgres(durable=False)
    try:
        yield pg
    finally:
        pg.destroy()


def cut_autoattack(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, queries: int
):
    """(ours, reference): robust accuracy under our cascade of APGD-CE, APGD-T, FAB-T and Square
    and under torchattacks' MultiAttack of its own four (the test-time reference), every budget
    cut to ``steps`` and ``queries`` (AutoAttack's standard suite, small enough for CI)."""
    import torchattacks

    from training.attacks import Suite, build_attack
    from training.evaluate import robust_flags

    suite = Suite(
        (
            build_attack("apgd", {"steps": steps}),
            build_attack("apgd-t", {"steps": steps, "n_target_classes": 9}),
            build_attack("fab-t", {"steps": steps, "n_target_classes": 9}),
            build_attack("square", {"queries": queries, "p_init": 0.8}),
        ),
        cascade=True,
    )
    ours = robust_flags(model, x, y, eps, suite, torch.Generator().manual_seed(0)).float().mean().item()
    reference = torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0),
            torchattacks.APGDT(model, eps=eps, steps=steps, n_restarts=1, n_classes=10, seed=0),
            torchattacks.FAB(
                model, eps=eps, steps=steps, n_restarts=1, multi_targeted=True, n_classes=10, seed=0
            ),
            torchattacks.Square(model, eps=eps, n_queries=queries, p_init=0.8, n_restarts=1, seed=0),
        ]
    )
    with torch.no_grad():
        ref = (model(reference(x, y)).argmax(1) == y).float().mean().item()
    return ours, ref


@pytest.fixture(scope="session")
def cut_autoattack_fn():
    """:func:`cut_autoattack` as a fixture."""
    return cut_autoattack
