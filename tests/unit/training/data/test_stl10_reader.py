"""STL-10 binary: round trips, column-major orientation, damaged files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.data import DataError, dataset_info, load_split

PLANE = 96 * 96
IMAGE = 3 * PLANE


def test_round_trip(tmp_path: Path, writers: SimpleNamespace) -> None:
    arrays = writers.make_stl(tmp_path / "stl10_binary")
    for split in ("train", "test"):
        s = load_split("stl10", split, tmp_path)
        n = len(arrays[f"{split}_labels"])
        assert s.images.shape == (n, 3, 96, 96) and s.images.dtype == torch.uint8
        assert s.images.is_contiguous()
        assert np.array_equal(s.images.numpy(), arrays[f"{split}_images"])
        assert np.array_equal(s.labels.numpy(), arrays[f"{split}_labels"])
        assert int(s.labels.min()) >= 0 and int(s.labels.max()) <= 9


def test_column_major_orientation(tmp_path: Path, writers: SimpleNamespace) -> None:
    """Bytes laid out by hand from the format's description come back the right way up."""
    root = tmp_path / "stl10_binary"
    writers.make_stl(root)
    raw = np.zeros(IMAGE, dtype=np.uint8)
    # Red plane: a horizontal bar along the top row (row 0, columns 0..49). Column-major means
    # the byte of (row r, column c) sits at c * 96 + r.
    for c in range(50):
        raw[c * 96 + 0] = 255
    # Blue plane: one dot at row 10, column 80.
    raw[2 * PLANE + 80 * 96 + 10] = 77
    (root / "test_X.bin").write_bytes(raw.tobytes())
    (root / "test_y.bin").write_bytes(bytes([8]))
    s = load_split("stl10", "test", root)
    img = s.images[0]
    assert (
        bool((img[0, 0, :50] == 255).all()) and int(img[0, 1:].sum()) == 0 and int(img[0, 0, 50:].sum()) == 0
    )
    assert int(img[2, 10, 80]) == 77 and int(img[2].sum()) == 77
    assert s.labels.tolist() == [7]  # 1-based on disk
    assert s.info.label_names[7] == "monkey"


def test_size_not_a_multiple(tmp_path: Path, writers: SimpleNamespace) -> None:
    root = tmp_path / "stl10_binary"
    writers.make_stl(root)
    path = root / "train_X.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError) as info:
        load_split("stl10", "train", root)
    assert path.name in str(info.value) and "multiple" in str(info.value)


def test_label_count_mismatch(tmp_path: Path, writers: SimpleNamespace) -> None:
    root = tmp_path / "stl10_binary"
    writers.make_stl(root)
    path = root / "test_y.bin"
    path.write_bytes(path.read_bytes() + b"\x01")
    with pytest.raises(DataError) as info:
        load_split("stl10", "test", root)
    assert path.name in str(info.value) and "4 labels" in str(info.value)


@pytest.mark.parametrize("bad", [0, 11])
def test_label_outside_1_to_10(tmp_path: Path, writers: SimpleNamespace, bad: int) -> None:
    root = tmp_path / "stl10_binary"
    writers.make_stl(root)
    path = root / "test_y.bin"
    path.write_bytes(bytes([1, bad, 2]))
    with pytest.raises(DataError) as info:
        load_split("stl10", "test", root)
    assert path.name in str(info.value)


def test_class_names_mismatch(tmp_path: Path, writers: SimpleNamespace) -> None:
    root = tmp_path / "stl10_binary"
    writers.make_stl(root)
    (root / "class_names.txt").write_text("\n".join(reversed(dataset_info("stl10").label_names)))
    with pytest.raises(DataError, match=r"class_names\.txt"):
        load_split("stl10", "train", root)
