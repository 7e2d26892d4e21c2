"""Tiny ImageNet folders: label mapping, grayscale, the decode cache, subsets, damaged files."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from training.data import DataError, dataset_info, load_split
from training.data import tiny_imagenet as tiny

# JPEG keeps a flat colour within a few levels, not exactly.
TOL = 3


@pytest.fixture
def tiny_root(tmp_path: Path, writers: SimpleNamespace) -> tuple[Path, dict[str, Any]]:
    root = tmp_path / "tiny-imagenet-200"
    meta = writers.make_tiny(root, gray=("val_2.JPEG",))
    return root, meta


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = tiny._decode

    def counting(path: Path, info: Any, image_mod: Any) -> np.ndarray:
        calls.append(path)
        return real(path, info, image_mod)

    monkeypatch.setattr(tiny, "_decode", counting)
    return calls


def _close(img: torch.Tensor, rgb: tuple[int, int, int]) -> bool:
    want = torch.tensor(rgb, dtype=torch.int16).view(3, 1, 1)
    return bool((img.to(torch.int16) - want).abs().max() <= TOL)


def test_train_labels_follow_sorted_wnids(tiny_root: tuple[Path, dict[str, Any]]) -> None:
    root, meta = tiny_root
    s = load_split("tiny-imagenet", "train", root.parent)
    assert s.images.shape == (200, 3, 64, 64) and s.images.dtype == torch.uint8
    assert s.labels.tolist() == list(range(200))  # one image per class, classes in sorted order
    for i in (0, 1, 57, 199):
        assert _close(s.images[i], meta["colour"](int(s.labels[i])))
    assert meta["wnids"] != meta["sorted"]  # the file lists them unsorted: sorting mattered


def test_label_names_from_words(tiny_root: tuple[Path, dict[str, Any]]) -> None:
    root, meta = tiny_root
    names = load_split("tiny-imagenet", "test", root).info.label_names
    assert len(names) == 200 and len(set(names)) == 200
    first, second = meta["sorted"].index(meta["wnids"][0]), meta["sorted"].index(meta["wnids"][1])
    assert names[first] == f"crane ({meta['wnids'][0]})" and names[second] == f"crane ({meta['wnids'][1]})"
    other = next(i for i in range(200) if i not in (first, second))
    assert names[other] == f"class {other}"
    assert dataset_info("tiny-imagenet").label_names == ()  # the static info stays file-free


def test_label_names_fall_back_to_wnids(tiny_root: tuple[Path, dict[str, Any]]) -> None:
    root, meta = tiny_root
    (root / "words.txt").unlink()
    assert load_split("tiny-imagenet", "test", root).info.label_names == tuple(meta["sorted"])


def test_val_split_and_grayscale(tiny_root: tuple[Path, dict[str, Any]]) -> None:
    root, meta = tiny_root
    s = load_split("tiny-imagenet", "test", root)
    assert s.images.shape == (6, 3, 64, 64)
    assert s.labels.tolist() == meta["val_labels"]
    gray = s.images[2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # L -> RGB replicates
    assert abs(int(gray[0, 0, 0]) - 102) <= TOL
    assert _close(s.images[0], meta["colour"](meta["val_labels"][0]))


def test_cache_is_written_and_reused(
    tiny_root: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = tiny_root
    first = load_split("tiny-imagenet", "train", root)
    cached = list((root / ".erc-cache").glob("train-*.npz"))
    assert len(cached) == 1
    assert not list((root / ".erc-cache").glob("*.tmp"))
    calls = _count_decodes(monkeypatch)
    again = load_split("tiny-imagenet", "train", root)
    assert calls == [] and torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)


def test_cache_invalidated_when_a_file_changes(
    tiny_root: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = tiny_root
    load_split("tiny-imagenet", "test", root)
    old = next((root / ".erc-cache").glob("test-*.npz"))
    img = root / "val" / "images" / "val_0.JPEG"
    stat = img.stat()
    os.utime(img, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    calls = _count_decodes(monkeypatch)
    load_split("tiny-imagenet", "test", root)
    assert len(calls) == 6
    new = list((root / ".erc-cache").glob("test-*.npz"))
    assert len(new) == 1 and new[0] != old  # the stale cache is removed


def test_corrupt_cache_is_rebuilt(tiny_root: tuple[Path, dict[str, Any]]) -> None:
    root, _ = tiny_root
    first = load_split("tiny-imagenet", "test", root)
    cache = next((root / ".erc-cache").glob("test-*.npz"))
    cache.write_bytes(b"not a zip")
    again = load_split("tiny-imagenet", "test", root)
    assert torch.equal(first.images, again.images)
    with np.load(cache) as z:  # rewritten
        assert z["images"].shape == (6, 3, 64, 64)


def test_cache_falls_back_to_user_cache(tiny_root: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, _ = tiny_root
    (root / ".erc-cache").write_text("a file where the cache folder would go")  # unwritable, even as root
    load_split("tiny-imagenet", "test", root)
    assert list((tmp_path / "home" / ".cache" / "erc" / "tiny-imagenet").glob("*/test-*.npz"))


def test_subset_decodes_only_the_chosen_images(
    tiny_root: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = tiny_root
    calls = _count_decodes(monkeypatch)
    part = load_split("tiny-imagenet", "train", root, n=10, seed=7)
    assert len(calls) == 10 and len(part) == 10
    assert not (root / ".erc-cache").exists()  # partial decodes are not cached
    full = load_split("tiny-imagenet", "train", root)
    from_cache = load_split("tiny-imagenet", "train", root, n=10, seed=7)
    assert torch.equal(part.images, full.subset(10, seed=7).images)
    assert torch.equal(part.labels, from_cache.labels) and torch.equal(part.images, from_cache.images)


def test_corrupt_jpeg(tiny_root: tuple[Path, dict[str, Any]]) -> None:
    root, _ = tiny_root
    path = root / "val" / "images" / "val_3.JPEG"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError) as info:
        load_split("tiny-imagenet", "test", root)
    assert path.name in str(info.value)


def test_wrong_image_size(tiny_root: tuple[Path, dict[str, Any]]) -> None:
    from PIL import Image

    root, _ = tiny_root
    path = root / "val" / "images" / "val_1.JPEG"
    Image.new("RGB", (32, 64)).save(path)
    with pytest.raises(DataError, match=r"val_1.JPEG: image is 32x64"):
        load_split("tiny-imagenet", "test", root)


def test_missing_class_folder(tiny_root: tuple[Path, dict[str, Any]]) -> None:
    root, meta = tiny_root
    folder = root / "train" / meta["wnids"][5] / "images"
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    with pytest.raises(DataError, match=meta["wnids"][5]):
        load_split("tiny-imagenet", "train", root)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("val_0.JPEG\tn00000000x\t0\t0\t1\t1", "not listed in wnids.txt"),
        ("val_0.JPEG", "expected"),
        ("../../etc/passwd\t{wnid}", "bad image name"),
        ("val_99.JPEG\t{wnid}", "val_99.JPEG: missing"),
    ],
)
def test_bad_annotations(tiny_root: tuple[Path, dict[str, Any]], line: str, needle: str) -> None:
    root, meta = tiny_root
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + line.format(wnid=meta["wnids"][0]) + "\n")
    with pytest.raises(DataError) as info:
        load_split("tiny-imagenet", "test", root)
    assert needle in str(info.value)
    assert "val_annotations.txt" in str(info.value) or "val_99" in str(info.value)


def test_duplicate_annotation(tiny_root: tuple[Path, dict[str, Any]]) -> None:
    root, _ = tiny_root
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + ann.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="annotated twice"):
        load_split("tiny-imagenet", "test", root)


def test_wrong_wnid_count(tiny_root: tuple[Path, dict[str, Any]]) -> None:
    root, meta = tiny_root
    (root / "wnids.txt").write_text("\n".join(meta["wnids"][:199]))
    with pytest.raises(DataError, match=r"wnids.txt: 199 wnids, expected 200"):
        load_split("tiny-imagenet", "test", root)


def test_missing_pillow_is_a_clear_error(
    tiny_root: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = tiny_root
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    with pytest.raises(DataError, match="Pillow"):
        load_split("tiny-imagenet", "test", root)


def test_cached_split_loads_without_pillow(
    tiny_root: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = tiny_root
    first = load_split("tiny-imagenet", "test", root)
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert torch.equal(load_split("tiny-imagenet", "test", root).images, first.images)
