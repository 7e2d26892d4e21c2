"""Registry, name and split errors, resolve_data_dir's layouts and search order, describe()."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from training.data import (
    DataError,
    dataset_info,
    datasets,
    describe,
    list_datasets,
    load_split,
    resolve_data_dir,
)
from training.data.core import checksum_file

ALL = ["mnist", "fashion-mnist", "cifar10", "stl10", "tiny-imagenet"]


def test_list_and_info() -> None:
    assert list_datasets() == ALL
    for name in ALL:
        info = dataset_info(name)
        assert info.name == name
        assert info.num_classes == (200 if name == "tiny-imagenet" else 10)
        if name != "tiny-imagenet":
            assert len(info.label_names) == 10
    assert dataset_info("fashion-mnist").label_names[0] == "T-shirt/top"
    assert dataset_info("fashion-mnist").label_names[-1] == "Ankle boot"
    assert dataset_info("cifar10").label_names[:2] == ("airplane", "automobile")
    assert dataset_info("mnist").label_names == tuple("0123456789")


@pytest.mark.parametrize(("alias", "name"), [("CIFAR-10", "cifar10"), ("fashion_mnist", "fashion-mnist")])
def test_aliases(alias: str, name: str) -> None:
    assert dataset_info(alias).name == name


def test_unknown_dataset_lists_known_names() -> None:
    for call in (lambda: dataset_info("svhn"), lambda: load_split("svhn", "train"), lambda: describe("svhn")):
        with pytest.raises(KeyError) as info:
            call()
        assert (
            "svhn" in str(info.value) and "cifar10" in str(info.value) and "tiny-imagenet" in str(info.value)
        )


@pytest.mark.parametrize("split", ["val", "validation", "Train", ""])
def test_unknown_split(split: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        load_split("mnist", split, tmp_path)  # checked before looking for files
    assert "train" in str(info.value) and "test" in str(info.value)


@pytest.mark.parametrize(
    "layout",
    ["", "cifar-10-batches-py", "cifar10", "cifar10/cifar-10-batches-py"],
)
def test_cifar_layouts(tmp_path: Path, writers: SimpleNamespace, layout: str) -> None:
    files = tmp_path / layout
    writers.make_cifar(files)
    assert resolve_data_dir("cifar10", tmp_path) == files.resolve()


@pytest.mark.parametrize("layout", ["", "mnist", "MNIST/raw", "mnist/MNIST/raw"])
def test_mnist_layouts(tmp_path: Path, writers: SimpleNamespace, layout: str) -> None:
    writers.make_idx(tmp_path / layout)
    assert resolve_data_dir("mnist", tmp_path) == (tmp_path / layout).resolve()


def test_explicit_dir_without_data(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        resolve_data_dir("stl10", tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "train_X.bin" in msg and "stl10_binary" in msg
    assert "erc data download stl10 --data-dir" in msg


def test_explicit_dir_wins_over_search(
    tmp_path: Path, writers: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers.make_idx(tmp_path / "env" / "mnist")
    monkeypatch.setenv("ERC_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DataError):  # an explicit folder is never silently replaced by another
        resolve_data_dir("mnist", tmp_path / "elsewhere")


def test_env_dir_searched_first(
    tmp_path: Path, writers: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers.make_idx(tmp_path / "env" / "fashion-mnist")
    monkeypatch.setenv("ERC_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir("fashion-mnist") == (tmp_path / "env" / "fashion-mnist").resolve()
    assert datasets.search_dirs("fashion-mnist")[0] == tmp_path / "env" / "fashion-mnist"


def test_user_cache_searched(tmp_path: Path, writers: SimpleNamespace) -> None:
    home_dir = tmp_path / "home" / ".cache" / "erc" / "data" / "stl10"
    writers.make_stl(home_dir / "stl10_binary")
    assert resolve_data_dir("stl10") == (home_dir / "stl10_binary").resolve()


def test_search_order_and_system_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Settings only: nothing relative to the package's files (an installed wheel has no checkout).
    assert datasets.search_dirs("mnist") == [
        Path.cwd() / "data" / "mnist",  # no $ERC_DATA_DIR in the tests
        Path.home() / ".cache" / "erc" / "data" / "mnist",
    ]
    assert datasets.search_dirs("fashion-mnist")[-1] == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.setenv("ERC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ERC_DATA_DIR", str(tmp_path / "data"))
    assert datasets.search_dirs("mnist") == [
        tmp_path / "data" / "mnist",
        Path.cwd() / "data" / "mnist",
        tmp_path / "cache" / "data" / "mnist",
    ]
    package = Path(datasets.__file__).resolve().parents[2]
    for name in datasets.list_datasets():
        assert not any(d.is_relative_to(package) for d in datasets.search_dirs(name)), name


def test_not_found_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = datasets.get_spec("fashion-mnist")
    fake = dataclasses.replace(spec, system_dirs=(str(tmp_path / "none"),))
    monkeypatch.setitem(datasets._SPECS, "fashion-mnist", fake)
    with pytest.raises(DataError) as info:
        load_split("fashion-mnist", "test")
    msg = str(info.value)
    assert str(tmp_path / "cwd" / "data" / "fashion-mnist") in msg  # ./data (conftest's working dir)
    assert str(tmp_path / "home" / ".cache" / "erc" / "data" / "fashion-mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "erc data download fashion-mnist" in msg


def test_describe_found_with_mismatched_checksums(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_idx(tmp_path)
    d = describe("mnist", tmp_path)
    json.dumps(d)  # what `erc data info` prints
    assert d["found"] and d["data_dir"] == str(tmp_path.resolve()) and d["error"] is None
    assert [f["checksum"] for f in d["files"]] == ["mismatch"] * 4  # fake data, real md5s expected
    assert all(f["exists"] and f["size"] > 0 and len(f["md5"]) == 32 for f in d["files"])
    assert tuple(d["info"]["shape"]) == (1, 28, 28)
    assert d["info"]["train_eps"] == 0.3
    assert d["download"]["base_url"].startswith("https://")


def test_describe_missing(tmp_path: Path) -> None:
    d = describe("cifar10", tmp_path)
    json.dumps(d)
    assert not d["found"] and d["data_dir"] is None and "cifar10" in d["error"]
    assert {f["checksum"] for f in d["files"]} == {"missing"}
    assert d["archives"][0]["path"] == "cifar-10-python.tar.gz" and d["archives"][0]["checksum"] == "missing"
    assert str(tmp_path / "cifar-10-batches-py") in d["searched"]


def test_describe_unknown_checksums_and_tiny_labels(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_tiny(tmp_path / "tiny-imagenet-200", n_val=2)
    d = describe("tiny-imagenet", tmp_path)
    assert d["found"] and d["data_dir"].endswith("tiny-imagenet-200")
    assert {f["checksum"] for f in d["files"]} == {"unknown"}
    assert len(d["info"]["label_names"]) == 200


def test_describe_archive_beside_data(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.make_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"partial")
    d = describe("cifar10", tmp_path)
    assert d["archives"][0]["exists"] and d["archives"][0]["checksum"] == "mismatch"
    meta = next(f for f in d["files"] if f["path"].endswith("batches.meta"))
    assert not meta["required"]


def test_describe_verifies_raw_and_recompressed_copies(tmp_path: Path, data_dir: Path) -> None:
    # An un-gzipped file checks against the content md5; a re-compressed .gz (different bytes,
    # same content, like the Debian package's) is recognized too.
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(gzip.decompress((data_dir / "mnist" / f"{stem}.gz").read_bytes()))
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(data_dir / "mnist" / f"{stem}.gz", tmp_path)
    src = tmp_path / "train-labels-idx1-ubyte.gz"
    src.write_bytes(gzip.compress(gzip.decompress(src.read_bytes()), compresslevel=1, mtime=0))
    d = describe("mnist", tmp_path)
    status = {Path(f["path"]).name: (f["checksum"], f.get("note")) for f in d["files"]}
    assert status["train-images-idx3-ubyte.gz"] == ("ok", None)
    assert (
        status["train-labels-idx1-ubyte.gz"][0] == "ok"
        and "re-compressed" in status["train-labels-idx1-ubyte.gz"][1]
    )
    assert status["t10k-images-idx3-ubyte"] == ("ok", None)
    assert status["t10k-labels-idx1-ubyte"] == ("ok", None)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\0" * 10)
    d = describe("mnist", tmp_path)
    assert {Path(f["path"]).name: f["checksum"] for f in d["files"]}["t10k-labels-idx1-ubyte"] == "mismatch"
    assert checksum_file(tmp_path / "train-images-idx3-ubyte.gz") == "f68b3c2dcbeaaa9fbdd348bbdeb94873"


def test_each_family_module_registers_its_own_datasets() -> None:
    """The attacks' style: a family's specs live beside its reader; the registry module holds the
    mechanics only (fails on the old code: every spec was inline in training/data/registry.py)."""
    import inspect

    from training.data import cifar, idx, stl10, tiny_imagenet

    assert "DatasetSpec(\n" not in inspect.getsource(datasets)
    families = {idx: ("mnist", "fashion-mnist"), cifar: ("cifar10",), stl10: ("stl10",)}
    families[tiny_imagenet] = ("tiny-imagenet",)
    for module, names in families.items():
        source = inspect.getsource(module)
        assert all(f'name="{n}"' in source for n in names), module.__name__
    assert datasets.get_spec("Tiny_ImageNet_200").info.name == "tiny-imagenet"  # aliases from the spec
