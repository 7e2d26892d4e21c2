"""Real TorchServe for the integration tests (the model store and ``erc serve`` fixtures are in
tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.launch import free_port


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
