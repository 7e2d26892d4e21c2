"""Shared fixtures. Tests are CPU-only and small: tiny widths, data subsets, few steps."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

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
