"""download() against a real loopback HTTP server: success, corruption, archives, traversal, errors."""

from __future__ import annotations

import re
import shutil
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from training.data import DataError, datasets, load_split
from training.data.download import checksum_file, download, extract

MNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or folders (downloads in progress, extractions) under ``folder``."""
    return sorted(p.name for p in folder.rglob(".*"))


def _serve_fake_mnist(server: Any, writers: SimpleNamespace) -> dict[str, str]:
    writers.make_idx(server.root)
    return {name: checksum_file(server.root / name) for name in MNIST_FILES}


def test_real_mnist_with_canonical_checksums(http_server: Any, tmp_path: Path, data_dir: Path) -> None:
    for name in MNIST_FILES:
        shutil.copy(data_dir / "mnist" / name, http_server.root / name)
    dest = tmp_path / "data" / "mnist"
    paths = download("mnist", dest, mirror=http_server.url)
    assert paths == [dest / n for n in MNIST_FILES]
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_FILES)
    test = load_split("mnist", "test", dest)
    assert len(test) == 10000 and torch.bincount(test.labels).sum() == 10000
    assert len(load_split("mnist", "train", dest)) == 60000
    # Everything is present and verified: a second call transfers nothing.
    before = len(http_server.requests)
    assert download("mnist", dest, mirror=http_server.url) == paths
    assert len(http_server.requests) == before


def test_corrupted_file_is_discarded(http_server: Any, writers: SimpleNamespace, tmp_path: Path) -> None:
    sums = _serve_fake_mnist(http_server, writers)
    expected = sums["t10k-images-idx3-ubyte.gz"]
    served = http_server.root / "t10k-images-idx3-ubyte.gz"
    data = bytearray(served.read_bytes())
    data[100] ^= 0xFF
    served.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as info:
        download("mnist", dest, mirror=http_server.url, checksums=sums)
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and expected in msg and checksum_file(served) in msg
    assert not (dest / "t10k-images-idx3-ubyte.gz").exists()
    assert _leftovers(dest) == []
    # The files before it in the list were complete and verified: they stay.
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_FILES[:2])


def test_stale_file_is_replaced(http_server: Any, writers: SimpleNamespace, tmp_path: Path) -> None:
    sums = _serve_fake_mnist(http_server, writers)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "train-labels-idx1-ubyte.gz").write_bytes(b"half a file")
    download("mnist", dest, mirror=http_server.url, checksums=sums)
    assert checksum_file(dest / "train-labels-idx1-ubyte.gz") == sums["train-labels-idx1-ubyte.gz"]
    assert len(load_split("mnist", "train", dest)) == 12


def test_404_names_the_url(http_server: Any, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as info:
        download("mnist", dest, mirror=http_server.url)
    assert f"{http_server.url}train-images-idx3-ubyte.gz" in str(info.value) and "404" in str(info.value)
    assert list(dest.iterdir()) == []


def test_broken_transfer(http_server: Any, writers: SimpleNamespace, tmp_path: Path) -> None:
    sums = _serve_fake_mnist(http_server, writers)
    http_server.special["/train-images-idx3-ubyte.gz"] = ("truncate", 5000)
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as info:
        download("mnist", dest, mirror=http_server.url, checksums=sums)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert list(dest.iterdir()) == []


def test_unreachable_server(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"127\.0\.0\.1:9"):
        download("mnist", tmp_path, mirror="http://127.0.0.1:9/", timeout=5)


def test_mirror_from_environment(
    http_server: Any, writers: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (http_server.root / "fashion-mnist").mkdir()
    writers.make_idx(http_server.root / "fashion-mnist")
    sums = {n: checksum_file(http_server.root / "fashion-mnist" / n) for n in MNIST_FILES}
    monkeypatch.setenv("ERC_DATA_MIRROR", http_server.url + "{name}")
    download("fashion-mnist", tmp_path, checksums=sums)
    assert "/fashion-mnist/t10k-labels-idx1-ubyte.gz" in http_server.requests
    assert len(load_split("fashion-mnist", "test", tmp_path)) == 7


def test_checksums_for_unknown_files_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz"):
        download("cifar10", tmp_path, checksums={"cifar10.tgz": "0" * 32})


# ------------------------------------------------------------------------------- archives ---


def _archive(kind: str, http_server: Any, writers: SimpleNamespace, tmp_path: Path) -> tuple[str, str, str]:
    """Build a small archive of ``kind`` in the served folder; returns (dataset, file name, md5)."""
    src = tmp_path / "src"
    if kind == "cifar10":
        writers.make_cifar(src / "cifar-10-batches-py")
        name = "cifar-10-python.tar.gz"
        writers.tar_gz(http_server.root / name, src / "cifar-10-batches-py", "cifar-10-batches-py")
    elif kind == "stl10":
        writers.make_stl(src / "stl10_binary")
        name = "stl10_binary.tar.gz"
        writers.tar_gz(http_server.root / name, src / "stl10_binary", "stl10_binary")
    else:
        writers.make_tiny(src / "tiny-imagenet-200", n_val=3)
        name = "tiny-imagenet-200.zip"
        writers.zip_dir(http_server.root / name, src / "tiny-imagenet-200", "tiny-imagenet-200")
    return kind, name, checksum_file(http_server.root / name)


@pytest.mark.parametrize("kind", ["cifar10", "stl10", "tiny-imagenet"])
def test_archive_download_and_extract(
    http_server: Any, writers: SimpleNamespace, tmp_path: Path, kind: str
) -> None:
    dataset, name, md5 = _archive(kind, http_server, writers, tmp_path)
    dest = tmp_path / "data" / dataset
    paths = download(dataset, dest, mirror=http_server.url, checksums={name: md5})
    folder = datasets.get_spec(dataset).folder
    assert folder is not None
    assert paths == [dest / name, dest / folder]
    assert _leftovers(dest) == []
    for split in ("train", "test"):
        s = load_split(dataset, split, dest)
        assert len(s) > 0 and s.images.shape[1:] == s.info.shape
    # Already unpacked: the next call neither downloads nor unpacks.
    before = len(http_server.requests)
    assert download(dataset, dest, mirror=http_server.url, checksums={name: md5}) == [dest / folder]
    assert len(http_server.requests) == before


def test_incomplete_folder_is_replaced(http_server: Any, writers: SimpleNamespace, tmp_path: Path) -> None:
    _, name, md5 = _archive("cifar10", http_server, writers, tmp_path)
    dest = tmp_path / "dest"
    (dest / "cifar-10-batches-py").mkdir(parents=True)
    (dest / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"old partial extraction")
    download("cifar10", dest, mirror=http_server.url, checksums={name: md5})
    assert len(load_split("cifar10", "train", dest)) == 15
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-batches-py", name]


def test_archive_checksum_mismatch(http_server: Any, writers: SimpleNamespace, tmp_path: Path) -> None:
    _, name, _ = _archive("stl10", http_server, writers, tmp_path)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=re.escape(name)):
        download("stl10", dest, mirror=http_server.url, checksums={name: "0" * 32})
    assert list(dest.iterdir()) == []


def test_archive_without_the_folder(http_server: Any, writers: SimpleNamespace, tmp_path: Path) -> None:
    writers.make_cifar(tmp_path / "src")
    name = "cifar-10-python.tar.gz"
    writers.tar_gz(http_server.root / name, tmp_path / "src", "some-other-folder")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        download(
            "cifar10", dest, mirror=http_server.url, checksums={name: checksum_file(http_server.root / name)}
        )
    assert sorted(p.name for p in dest.iterdir()) == [name]  # the verified archive; nothing unpacked


def test_archive_missing_files(http_server: Any, writers: SimpleNamespace, tmp_path: Path) -> None:
    writers.make_cifar(tmp_path / "src" / "cifar-10-batches-py")
    (tmp_path / "src" / "cifar-10-batches-py" / "test_batch").unlink()
    name = "cifar-10-python.tar.gz"
    writers.tar_gz(http_server.root / name, tmp_path / "src" / "cifar-10-batches-py", "cifar-10-batches-py")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="lacks"):
        download(
            "cifar10", dest, mirror=http_server.url, checksums={name: checksum_file(http_server.root / name)}
        )
    assert not (dest / "cifar-10-batches-py").exists() and _leftovers(dest) == []


@pytest.mark.parametrize(
    ("member", "link"),
    [
        ("cifar-10-batches-py/../../evil", None),
        ("../evil", None),
        ("/tmp/evil-absolute", None),
        ("cifar-10-batches-py/link", "../../evil"),
        ("cifar-10-batches-py/abslink", "/etc/passwd"),
    ],
)
def test_tar_traversal_refused(
    http_server: Any, writers: SimpleNamespace, tmp_path: Path, member: str, link: str | None
) -> None:
    name = "cifar-10-python.tar.gz"
    writers.tar_with_member(http_server.root / name, member, symlink_to=link)
    dest = tmp_path / "a" / "b" / "dest"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DataError) as info:
        download(
            "cifar10", dest, mirror=http_server.url, checksums={name: checksum_file(http_server.root / name)}
        )
    assert "refusing" in str(info.value) and name in str(info.value)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # Only the destination folders and the verified archive are new; nothing was unpacked.
    new = set(after) - set(before)
    assert new == {Path("a"), Path("a/b"), Path("a/b/dest"), Path("a/b/dest") / name}
    assert not Path("/tmp/evil-absolute").exists()


@pytest.mark.parametrize("member", ["../evil", "tiny-imagenet-200/../../evil", "/abs/evil", "C:/evil"])
def test_zip_traversal_refused(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n0\n")
        zf.writestr(member, "evil")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="refusing"):
        extract(archive, dest, "tiny-imagenet-200")
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_zip_symlink_outside_refused(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("tiny-imagenet-200/link")
        info.external_attr = 0o120777 << 16  # a symlink entry
        zf.writestr(info, "../../outside")
    with pytest.raises(DataError, match="points outside"):
        extract(archive, tmp_path / "dest", "tiny-imagenet-200")


def test_tar_hardlink_outside_refused(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("cifar-10-batches-py/hard")
        link.type, link.linkname = tarfile.LNKTYPE, "../outside"
        tar.addfile(link)
    with pytest.raises(DataError, match="points outside"):
        extract(archive, tmp_path / "dest", "cifar-10-batches-py")


def test_corrupt_archive(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00 definitely not a tarball")
    with pytest.raises(DataError, match=r"broken.tar.gz: corrupt"):
        extract(archive, tmp_path / "dest", "x")
    assert list((tmp_path / "dest").iterdir()) == []
