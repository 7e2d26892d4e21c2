"""Shared fixtures. Tests are CPU-only and small: tiny widths, data subsets, few steps."""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import load_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    # Two cores in CI: keep torch from oversubscribing when tests start subprocesses.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def erc_env(tmp_path: Path) -> dict[str, str]:
    """Environment for ``erc`` subprocesses: this interpreter's scripts first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


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
