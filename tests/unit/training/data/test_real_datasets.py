"""The real MNIST and Fashion-MNIST files of this machine, found through resolve_data_dir's search.

MNIST lies in ``$ERC_DATA_DIR/mnist`` (tests/conftest.py points ERC_DATA_DIR at
``../shared/data`` beside the checkout, as in CI); Fashion-MNIST comes from the Debian package
``dataset-fashion-mnist``, which `make test` installs. Absent files fail these tests: CI always
has both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.data import describe, load_split, resolve_data_dir

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

# Class counts of the official splits.
MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    monkeypatch.setenv("ERC_DATA_DIR", str(data_dir))  # the data conftest clears it
    root = resolve_data_dir("mnist")  # no data_dir: the search must find it
    assert root.resolve() == (data_dir / "mnist").resolve()
    train, test = load_split("mnist", "train"), load_split("mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels, minlength=10).tolist() == MNIST_TRAIN
    assert torch.bincount(test.labels, minlength=10).tolist() == MNIST_TEST
    # Digits are white strokes on black: mostly zeros, some full-intensity pixels.
    x = test.as_float()
    assert 0.10 < float(x.mean()) < 0.15 and float(x.max()) == 1.0 and float((x == 0).float().mean()) > 0.7
    d = describe("mnist")
    assert d["found"] and [f["checksum"] for f in d["files"]] == ["ok"] * 4


def test_real_fashion_mnist() -> None:
    root = resolve_data_dir("fashion-mnist")
    assert root == DEBIAN_FASHION
    train, test = load_split("fashion-mnist", "train"), load_split("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert int(train.labels[0]) == 9  # the first training image is an ankle boot
    assert train.info.label_names[9] == "Ankle boot"
    # The Debian files are re-compressed (other md5 than the published .gz), same content.
    assert [f["checksum"] for f in describe("fashion-mnist")["files"]] == ["ok"] * 4
