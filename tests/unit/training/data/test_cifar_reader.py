"""CIFAR-10 python batches: exact round trips for every pickle flavour, and the safe unpickler."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.data import DataError, load_split
from training.data.cifar import safe_unpickle


@pytest.mark.parametrize("style", ["py2", "2", "4", "5"])
def test_round_trip(tmp_path: Path, writers: SimpleNamespace, style: str) -> None:
    root = tmp_path / "cifar-10-batches-py"
    arrays = writers.make_cifar(root, style=style)
    for split in ("train", "test"):
        s = load_split("cifar10", split, tmp_path)  # the parent folder: canonical layout
        n = len(arrays[f"{split}_labels"])
        assert s.images.shape == (n, 3, 32, 32) and s.images.dtype == torch.uint8
        assert s.labels.dtype == torch.int64
        assert np.array_equal(s.images.numpy(), arrays[f"{split}_images"])
        assert np.array_equal(s.labels.numpy(), arrays[f"{split}_labels"])
    assert len(load_split("cifar10", "train", root)) == 15  # 5 batches x 3


def test_channel_order_is_rgb_planes(tmp_path: Path, writers: SimpleNamespace) -> None:
    root = tmp_path / "cifar-10-batches-py"
    writers.make_cifar(root)
    row = np.zeros((1, 3072), dtype=np.uint8)
    row[0, :1024] = 200  # red plane
    row[0, 1024 + 32] = 99  # green plane, row 1, column 0
    (root / "test_batch").write_bytes(writers.py2_cifar_pickle(row, [6]))
    s = load_split("cifar10", "test", root)
    img = s.images[0]
    assert bool((img[0] == 200).all()) and int(img[1, 1, 0]) == 99 and int(img[1].sum()) == 99
    assert int(img[2].sum()) == 0 and s.labels.tolist() == [6]


class _Boom:
    """Pickles as a call to os.system: what a malicious batch would contain."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_forbidden_global_is_refused_not_run(tmp_path: Path, writers: SimpleNamespace) -> None:
    root = tmp_path / "cifar-10-batches-py"
    writers.make_cifar(root)
    marker = tmp_path / "pwned"
    path = root / "data_batch_3"
    path.write_bytes(pickle.dumps({"data": _Boom(marker), "labels": []}, protocol=2))
    with pytest.raises(DataError) as info:
        load_split("cifar10", "train", root)
    assert path.name in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("target", [("builtins", "eval"), ("numpy", "load"), ("_codecs", "decode")])
def test_other_globals_refused(tmp_path: Path, target: tuple[str, str]) -> None:
    path = tmp_path / "batch"
    # GLOBAL opcode naming the target, then STOP: refused before anything is called.
    path.write_bytes(b"\x80\x02c" + f"{target[0]}\n{target[1]}\n".encode() + b".")
    with pytest.raises(DataError, match=re.escape(f"{target[0]}.{target[1]}")):
        safe_unpickle(path)


def test_codecs_encode_only_latin1(tmp_path: Path) -> None:
    path = tmp_path / "batch"
    stream = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
    path.write_bytes(stream)
    with pytest.raises(DataError, match="rot13"):
        safe_unpickle(path)


def test_truncated_pickle(tmp_path: Path, writers: SimpleNamespace) -> None:
    root = tmp_path / "cifar-10-batches-py"
    writers.make_cifar(root)
    path = root / "test_batch"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError) as info:
        load_split("cifar10", "test", root)
    assert path.name in str(info.value)


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"data": np.zeros((3, 3071), np.uint8), "labels": [0, 1, 2]}, "[N, 3072]"),
        ({"data": np.zeros((3, 3072), np.float32), "labels": [0, 1, 2]}, "uint8"),
        ({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1]}, "2 labels for 3 images"),
        ({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1, 10]}, "labels span"),
        ({"pixels": np.zeros((3, 3072), np.uint8)}, "'data'"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_malformed_batches(tmp_path: Path, writers: SimpleNamespace, entry: object, needle: str) -> None:
    root = tmp_path / "cifar-10-batches-py"
    writers.make_cifar(root)
    path = root / "test_batch"
    path.write_bytes(pickle.dumps(entry, protocol=4))
    with pytest.raises(DataError) as info:
        load_split("cifar10", "test", root)
    assert path.name in str(info.value) and needle in str(info.value)


def test_meta_with_other_label_names(tmp_path: Path, writers: SimpleNamespace) -> None:
    root = tmp_path / "cifar-10-batches-py"
    writers.make_cifar(root)
    names = [b"apple", b"aquarium_fish"] + [b"x"] * 8  # CIFAR-100-like: not our label order
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    with pytest.raises(DataError, match=r"batches\.meta"):
        load_split("cifar10", "test", root)


def test_missing_batch(tmp_path: Path, writers: SimpleNamespace) -> None:
    root = tmp_path / "cifar-10-batches-py"
    writers.make_cifar(root)
    (root / "data_batch_4").unlink()
    with pytest.raises(DataError) as info:
        load_split("cifar10", "train", root)
    assert f"Closest: {root}, where {root / 'data_batch_4'} is missing" in str(info.value)
