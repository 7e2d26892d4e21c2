"""Real TorchServe for the integration tests (the model store and ``erc serve`` fixtures are in
tests/conftest.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
