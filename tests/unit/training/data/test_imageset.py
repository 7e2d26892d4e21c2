"""DatasetInfo and ImageSet: validation, subsets, float conversion."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.data import DataError, DatasetInfo, ImageSet, dataset_info
from training.data.core import subset_indices


def _info(**kw: object) -> DatasetInfo:
    base = dict(
        name="toy",
        channels=1,
        height=2,
        width=3,
        num_classes=4,
        label_names=("a", "b", "c", "d"),
        train_eps=0.1,
        mean=None,
        std=None,
    )
    base.update(kw)
    return DatasetInfo(**base)  # type: ignore[arg-type]


def _set(n: int = 20) -> ImageSet:
    images = torch.arange(n * 6, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 2, 3)
    return ImageSet(images, torch.arange(n) % 4, _info())


def test_info_shape_and_frozen() -> None:
    info = _info()
    assert info.shape == (1, 2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kw",
    [
        {"label_names": ("a", "b")},  # wrong count
        {"mean": (0.5,), "std": None},  # only one of mean/std
        {"mean": (0.5, 0.5), "std": (0.2, 0.2)},  # wrong channel count
    ],
)
def test_info_rejects_inconsistent_fields(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _info(**kw)


def test_imageset_len_dtypes_and_float() -> None:
    s = _set(5)
    assert len(s) == 5
    x = s.as_float()
    assert x.dtype == torch.float32 and x.shape == (5, 1, 2, 3)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal((x * 255).round().to(torch.uint8), s.images)
    assert s.images.dtype == torch.uint8  # as_float does not touch the stored images


@pytest.mark.parametrize(
    ("images", "labels"),
    [
        (torch.zeros(2, 1, 2, 3, dtype=torch.float32), torch.zeros(2, dtype=torch.int64)),  # not uint8
        (torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)),  # wrong shape
        (torch.zeros(2, 1, 2, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32)),  # not int64
        (torch.zeros(2, 1, 2, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64)),  # count
        (torch.zeros(2, 1, 2, 3, dtype=torch.uint8), torch.tensor([0, 4])),  # label out of range
        (torch.zeros(2, 1, 2, 3, dtype=torch.uint8), torch.tensor([0, -1])),
    ],
)
def test_imageset_validates(images: torch.Tensor, labels: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        ImageSet(images, labels, _info())


def test_imageset_makes_tensors_contiguous() -> None:
    images = torch.zeros(3, 1, 3, 2, dtype=torch.uint8).transpose(2, 3)
    assert not images.is_contiguous()
    s = ImageSet(images, torch.zeros(3, dtype=torch.int64), _info())
    assert s.images.is_contiguous()


def test_subset_is_deterministic_and_without_replacement() -> None:
    s = _set(50)
    a, b, c = s.subset(10, seed=3), s.subset(10, seed=3), s.subset(10, seed=4)
    assert len(a) == 10
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    # Every image of the toy set is distinct (marker in the first pixels): no duplicates drawn.
    keys = {tuple(img.flatten().tolist()) for img in a.images}
    assert len(keys) == 10
    assert a.images.is_contiguous() and a.info == s.info


def test_subset_keeps_original_order_and_pairs() -> None:
    s = _set(30)
    idx = subset_indices(30, 8, seed=1)
    assert idx is not None and torch.all(idx[1:] > idx[:-1])
    sub = s.subset(8, seed=1)
    assert torch.equal(sub.images, s.images[idx]) and torch.equal(sub.labels, s.labels[idx])


@pytest.mark.parametrize("n", [None, 20, 100])
def test_subset_all(n: int | None) -> None:
    s = _set(20)
    assert s.subset(n) is s


def test_subset_zero_and_negative() -> None:
    s = _set(20)
    assert len(s.subset(0)) == 0
    with pytest.raises(ValueError):
        s.subset(-1)


def test_dataerror_carries_path() -> None:
    err = DataError("x: broken", path="some/file")
    assert str(err) == "x: broken" and err.path is not None and err.path.name == "file"
    assert DataError("no path").path is None


def test_paper_eps_and_normalization() -> None:
    assert dataset_info("mnist").train_eps == 0.3
    assert dataset_info("cifar10").train_eps == 0.03
    assert dataset_info("stl10").train_eps == 0.03
    assert dataset_info("tiny-imagenet").train_eps == 0.01
    assert dataset_info("fashion-mnist").train_eps == 0.1
    for name in ("mnist", "fashion-mnist"):
        info = dataset_info(name)
        assert info.mean is None and info.std is None and info.shape == (1, 28, 28)
    for name, shape in (("cifar10", (3, 32, 32)), ("stl10", (3, 96, 96)), ("tiny-imagenet", (3, 64, 64))):
        info = dataset_info(name)
        assert info.shape == shape
        assert info.mean is not None and info.std is not None
        assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
