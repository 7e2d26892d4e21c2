"""Image-folder datasets (``folder:PATH``): layouts, class names, the seeded split, size and channel
inference, the same pixels as the service, the decoded cache, and every kind of bad folder (each a
clear error naming it, or a counted skip)."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.imaging import InputSpec, decode_image
from training.data import DataError, FolderOptions, load_split
from training.data.folder import check_folder, load_folder, parse_size


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ERC_CACHE_DIR", str(cache))
    return cache


def _img(path: Path, value: int, size: tuple[int, int] = (12, 10), mode: str = "L", fmt: str = "PNG") -> None:
    """An image of ``size`` (width, height) whose pixels encode ``value`` (and their position)."""
    w, h = size
    base = (np.arange(w * h).reshape(h, w) + value * 7) % 256
    arr = (
        base.astype(np.uint8) if mode == "L" else np.stack([base, 255 - base, base // 2], -1).astype(np.uint8)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path, format=fmt)


def _classes(root: Path, counts: dict[str, int], **kw) -> None:
    """``counts[name]`` distinct images per class folder (no two images of a call are equal)."""
    for k, (name, n) in enumerate(counts.items()):
        for i in range(n):
            _img(root / name / f"{i:03d}.png", i + 40 * k, **kw)


def _truncated_png() -> bytes:
    """A PNG whose header reads fine but whose pixel data stops half way."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (10, 12), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) * 2 // 3]


def test_train_test_folders_classes_sorted_and_labels(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _classes(root / "train", {"dog": 4, "cat": 3, "zebra": 2})
    _classes(root / "test", {"cat": 2, "dog": 1})
    data = load_folder(f"folder:{root}")
    assert data.info.label_names == ("cat", "dog", "zebra") and data.info.num_classes == 3
    assert data.info.shape == (1, 10, 12) and data.info.train_eps is None
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert data.test.labels.tolist() == [0, 0, 1]
    assert data.description["split"] == "test/ folder"
    assert data.description["counts"]["test"] == {"cat": 2, "dog": 1, "zebra": 0}
    assert data.info.name == f"folder:{root}"


def test_val_folder_is_the_test_split(tmp_path: Path) -> None:
    _classes(tmp_path / "d" / "train", {"a": 2, "b": 2})
    _classes(tmp_path / "d" / "val", {"a": 1, "b": 1})
    data = load_folder(tmp_path / "d")
    assert len(data.test) == 2 and data.description["split"] == "val/ folder"


def test_seeded_split_is_stratified_deterministic_and_stated(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _classes(root, {"a": 10, "b": 5, "c": 2})
    one = load_folder(root, FolderOptions(test_fraction=0.2, split_seed=3))
    assert one.test.labels.tolist() == [0, 0, 1, 2]  # 20 % of each class, at least one, never all
    assert one.train.labels.bincount().tolist() == [8, 4, 1]
    assert "seeded split" in one.description["split"] and "seed 3" in one.description["split"]
    again = load_folder(root, FolderOptions(test_fraction=0.2, split_seed=3))
    other = load_folder(root, FolderOptions(test_fraction=0.2, split_seed=4))
    assert torch.equal(one.test.images, again.test.images)
    assert not torch.equal(one.test.images, other.test.images)
    # train and test never share an image
    train_rows = {bytes(r) for r in one.train.images.flatten(1).numpy()}
    assert not any(bytes(r) in train_rows for r in one.test.images.flatten(1).numpy())


def test_same_pixels_as_the_service_for_any_size_format_and_mode(tmp_path: Path) -> None:
    """Decoding goes through the service's code: a JPEG of another size, an RGBA PNG and a 16-bit
    PNG come out exactly as :func:`service.imaging.decode_image` makes them."""
    root = tmp_path / "d"
    _img(root / "a" / "big.jpg", 1, size=(40, 30), mode="RGB", fmt="JPEG")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    (root / "a").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(root / "a" / "alpha.png")
    (root / "b").mkdir()
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(root / "b" / "deep.png")
    _img(root / "b" / "x.png", 5, size=(9, 9), mode="RGB")
    data = load_folder(root, FolderOptions(size=(24, 20), channels=3, test_fraction=0.5))
    images = torch.cat([data.train.images, data.test.images])
    spec = InputSpec(3, 24, 20)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    expected = {
        (decode_image(p.read_bytes(), spec, max_pixels=10**7).tensor * 255)
        .round()
        .to(torch.uint8)
        .numpy()
        .tobytes()
        for p in files
    }
    assert {img.numpy().tobytes() for img in images} == expected
    assert images.shape[1:] == (3, 24, 20)


def test_size_and_channels_are_inferred(tmp_path: Path) -> None:
    grey = tmp_path / "grey"
    _classes(grey, {"a": 2, "b": 2}, size=(14, 14))
    assert load_folder(grey).info.shape == (1, 14, 14)
    mixed = tmp_path / "mixed"
    _classes(mixed, {"a": 2, "b": 2}, size=(14, 14))
    _img(mixed / "b" / "colour.png", 3, size=(14, 14), mode="RGB")
    assert load_folder(mixed).info.shape == (3, 14, 14)  # one colour image makes the set RGB
    forced = load_folder(mixed, FolderOptions(channels=1))
    assert forced.info.channels == 1


def test_mixed_sizes_without_a_size_name_the_sizes(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _classes(root, {"a": 3, "b": 2}, size=(12, 10))
    _img(root / "b" / "wide.png", 1, size=(30, 10))
    with pytest.raises(DataError) as err:
        load_folder(root)
    msg = str(err.value)
    assert "disagree in size" in msg and "12x10 (5 files" in msg and "30x10 (1 files, e.g. b/wide.png)" in msg
    assert "--size" in msg
    assert load_folder(root, FolderOptions(size=parse_size("16x8"))).info.shape == (1, 8, 16)


def test_parse_size() -> None:
    assert parse_size("32") == (32, 32) and parse_size("64x48") == (48, 64) and parse_size(None) is None
    for bad in ("", "x", "0", "3x4x5", "big", "-3"):
        with pytest.raises(DataError, match="WIDTHxHEIGHT"):
            parse_size(bad)


@pytest.mark.parametrize(
    "build,says",
    [
        (lambda r: _classes(r, {"only": 3}), "only one class folder ('only')"),
        (
            lambda r: (_classes(r, {"a": 2}), (r / "empty").mkdir()),
            "empty: class 'empty' holds no image files",
        ),
        (lambda r: r.mkdir(), "no class folders"),
        (
            lambda r: (_classes(r / "train", {"a": 2, "b": 2}), _classes(r / "test", {"c": 1})),
            "class 'c' has no",
        ),
        (
            lambda r: (_classes(r, {"a": 2, "b": 2}), _classes(r / "test", {"a": 1})),
            "test/ folder without a train/",
        ),
    ],
    ids=["one-class", "empty-class", "no-classes", "unknown-test-class", "test-without-train"],
)
def test_untrainable_folders_are_errors_naming_the_folder(tmp_path: Path, build, says: str) -> None:
    root = tmp_path / "d"
    build(root)
    with pytest.raises(DataError) as err:
        load_split(f"folder:{root}", "train")
    assert says in str(err.value) and str(root) in str(err.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        load_split(f"folder:{tmp_path / 'nope'}", "train")


def _damaged(root: Path) -> None:
    """Two good classes plus one of each kind of bad file."""
    _classes(root, {"a": 4, "b": 4})
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG header, no image
    (root / "a" / "text.jpg").write_text("not an image at all")
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "notes.txt").write_text("ignored: not an image file name")
    (root / "b" / ".DS_Store").write_bytes(b"\0\1")
    (root / "b" / "truncated.png").write_bytes(_truncated_png())
    os.symlink("..", root / "b" / "loop")  # b/loop -> the dataset root, already being walked
    os.symlink("nowhere.png", root / "b" / "dangling.png")


def test_unreadable_files_are_skipped_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "d"
    _damaged(root)
    with caplog.at_level(logging.WARNING, logger="training.data.folder"):
        data = load_folder(root, FolderOptions(test_fraction=0.25))
    assert len(data.train) + len(data.test) == 8
    assert data.description["skipped"] == 6 and data.description["ignored"] == 1
    log = caplog.text
    assert "skipped 6 unreadable image file(s)" in log
    for name in ("corrupt.png", "text.jpg", "empty.png", "truncated.png", "loop", "dangling.png"):
        assert name in log
    assert "empty file (0 bytes)" in log and "symbolic link loop" in log and "broken symbolic link" in log
    # the cache remembers the skips: a second load logs them again, strict refuses them
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.data.folder"):
        load_folder(root, FolderOptions(test_fraction=0.25))
    assert "skipped 6" in caplog.text
    with pytest.raises(DataError, match=r"6 unreadable image file\(s\) \(--strict\)"):
        load_folder(root, FolderOptions(test_fraction=0.25, strict=True))


def test_strict_names_a_corrupt_file_found_only_by_decoding(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _classes(root, {"a": 2, "b": 2})
    (root / "b" / "cut.png").write_bytes(_truncated_png())
    with pytest.raises(DataError) as err:
        load_folder(root, FolderOptions(strict=True))
    assert "cut.png" in str(err.value) and "truncated" in str(err.value)


def test_a_class_without_readable_images_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _classes(root, {"a": 3})
    (root / "b").mkdir()
    (root / "b" / "x.png").write_text("nope")
    (root / "b" / "y.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"class 'b' has no readable training image \(2 unreadable"):
        load_folder(root)


def test_cache_is_reused_and_invalidated(tmp_path: Path, _cache: Path) -> None:
    root = tmp_path / "d"
    _classes(root / "train", {"a": 3, "b": 3})
    _classes(root / "test", {"a": 1, "b": 1})
    first = load_folder(root)
    cached = list(_cache.rglob("folder-*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    # the same arrays under the model's explicit options: found via the remembered geometry
    model = FolderOptions.for_model({}, [1, 10, 12], ["a", "b"])
    again = load_folder(root, model)
    assert torch.equal(first.train.images, again.train.images)
    assert [p.stat().st_mtime_ns for p in _cache.rglob("folder-*.npz")] == [stamp]
    # a changed file is a new key; the stale arrays are removed
    _img(root / "train" / "a" / "000.png", 99)
    changed = load_folder(root)
    assert not torch.equal(first.train.images, changed.train.images)
    assert len(list(_cache.rglob("folder-*.npz"))) == 1
    assert not list(root.rglob(".erc-cache"))  # nothing is written into the user's folder


def test_a_model_reads_folders_in_its_own_label_order(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _classes(root / "test", {"dog": 2})
    _classes(root / "train", {"dog": 1})
    model = FolderOptions.for_model({}, [1, 10, 12], ["cat", "dog", "emu"])
    data = load_folder(root, model)
    assert data.test.labels.tolist() == [1, 1] and data.info.label_names == ("cat", "dog", "emu")
    _classes(root / "test", {"yak": 1})
    with pytest.raises(DataError, match="'yak' is not one of the model's classes"):
        load_folder(root, model)


def test_check_folder_reports_everything_at_once(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _damaged(root)
    _img(root / "a" / "big.png", 1, size=(20, 20))
    (root / "c").mkdir()
    header = check_folder(root, decode=False)
    assert header["classes"] == ["a", "b", "c"] and header["layout"] == "class folders + seeded split"
    assert header["sizes"] == {"12x10": 9, "20x20": 1} and header["modes"] == {"L": 10}
    assert any("holds no image files" in p for p in header["problems"])
    assert any("disagree in size" in p for p in header["problems"])
    assert header["ignored"] == [{"path": "b/notes.txt", "why": "not an image file name (.txt)"}]
    header_bad = {u["path"] for u in header["unreadable"]}
    assert {"a/empty.png", "a/text.jpg", "b/loop", "b/dangling.png"} <= header_bad
    assert "b/truncated.png" not in header_bad  # its header is fine: only decoding finds it
    decoded = check_folder(root, decode=True, size=(12, 10))
    assert {u["path"] for u in decoded["unreadable"]} >= header_bad | {"b/truncated.png"}
    assert decoded["counts"]["train"] == {"a": 5, "b": 4, "c": 0} and not decoded["ok"]


def test_cache_is_found_again_with_only_a_size_given(tmp_path: Path, _cache: Path) -> None:
    """``--size`` without ``--channels``: the inferred channels are remembered, so the second read
    neither probes nor decodes (the arrays file is not rewritten)."""
    root = tmp_path / "d"
    _classes(root, {"a": 3, "b": 3}, size=(30, 20), mode="RGB")
    options = FolderOptions(size=(16, 16))
    first = load_folder(root, options)
    (npz,) = _cache.rglob("folder-*.npz")
    stamp = npz.stat().st_mtime_ns
    again = load_folder(root, options)
    assert torch.equal(first.train.images, again.train.images) and first.info.shape == (3, 16, 16)
    assert [p.stat().st_mtime_ns for p in _cache.rglob("folder-*.npz")] == [stamp]
