"""IDX (MNIST / Fashion-MNIST): exact round trips and every kind of damaged file."""

from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.data import DataError, load_split


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_round_trip(tmp_path: Path, writers: SimpleNamespace, gz: bool, name: str) -> None:
    arrays = writers.make_idx(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        s = load_split(name, split, tmp_path)
        n = len(arrays[f"{prefix}_labels"])
        assert s.images.shape == (n, 1, 28, 28) and s.images.dtype == torch.uint8
        assert s.labels.shape == (n,) and s.labels.dtype == torch.int64
        assert s.images.is_contiguous()
        assert np.array_equal(s.images[:, 0].numpy(), arrays[f"{prefix}_images"])
        assert np.array_equal(s.labels.numpy(), arrays[f"{prefix}_labels"])
        assert s.info.name == name


def test_subset_through_load_split(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_idx(tmp_path, n_train=40)
    full = load_split("mnist", "train", tmp_path)
    a = load_split("mnist", "train", tmp_path, n=9, seed=5)
    b = load_split("mnist", "train", tmp_path, n=9, seed=5)
    assert len(a) == 9 and torch.equal(a.images, b.images)
    assert torch.equal(a.images, full.subset(9, seed=5).images)


def _rewrite(path: Path, payload: bytes) -> None:
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _payload(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def _error(tmp_path: Path, split: str = "train") -> str:
    with pytest.raises(DataError) as info:
        load_split("mnist", split, tmp_path)
    return str(info.value)


def test_truncated_gzip(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    msg = _error(tmp_path)
    assert path.name in msg and "gzip" in msg


def test_not_gzip_at_all(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_idx(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip data")
    assert path.name in _error(tmp_path, "test")


def test_wrong_magic(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_idx(tmp_path)
    # Labels where images belong: magic 2049 instead of 2051.
    path = tmp_path / "train-images-idx3-ubyte.gz"
    writers.write_idx(path, np.zeros(12, dtype=np.uint8))
    msg = _error(tmp_path)
    assert path.name in msg and "magic" in msg and "2051" in msg


@pytest.mark.parametrize("delta", [-1, +1, -28 * 28])
def test_payload_length_must_be_exact(tmp_path: Path, writers: SimpleNamespace, delta: int) -> None:
    writers.make_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = _payload(path)
    _rewrite(path, data[:delta] if delta < 0 else data + b"\0" * delta)
    msg = _error(tmp_path)
    assert path.name in msg and ("truncated" in msg if delta < 0 else "trailing" in msg)


def test_truncated_header(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_idx(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    _rewrite(path, _payload(path)[:6])
    msg = _error(tmp_path)
    assert path.name in msg and "header" in msg


def test_wrong_image_size(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    writers.write_idx(path, np.zeros((12, 27, 28), dtype=np.uint8))
    msg = _error(tmp_path)
    assert path.name in msg and "(12, 27, 28)" in msg


def test_label_count_mismatch(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_idx(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    writers.write_idx(path, np.zeros(11, dtype=np.uint8))
    msg = _error(tmp_path)
    assert path.name in msg and "11 labels" in msg and "12 images" in msg


def test_label_out_of_range(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_idx(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels = np.zeros(7, dtype=np.uint8)
    labels[4] = 10
    writers.write_idx(path, labels)
    msg = _error(tmp_path, "test")
    assert path.name in msg and "label 10 at index 4" in msg


def test_gz_preferred_over_raw(tmp_path: Path, writers: SimpleNamespace) -> None:
    arrays = writers.make_idx(tmp_path, gz=True)
    # A stale raw copy beside the .gz must not be read.
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"garbage")
    s = load_split("mnist", "test", tmp_path)
    assert np.array_equal(s.images[:, 0].numpy(), arrays["t10k_images"])
