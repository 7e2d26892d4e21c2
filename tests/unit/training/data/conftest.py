"""Writers of tiny datasets in the exact on-disk formats, and a local HTTP server for downloads.

The writers are plain functions gathered in the ``writers`` fixture (so the tests work under any
pytest import mode); each returns the arrays it wrote so tests can check exact round trips.
"""

from __future__ import annotations

import gzip
import http.server
import io
import pickle
import struct
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# --------------------------------------------------------------------------- IDX (MNIST) ----


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None) -> Path:
    """Write a uint8 array as IDX (gzipped when the name ends in .gz); ``magic`` overrides the header."""
    if magic is None:
        magic = 0x00000800 | array.ndim
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
    return path


def make_idx(root: Path, *, n_train: int = 12, n_test: int = 7, gz: bool = True) -> dict[str, np.ndarray]:
    """A small MNIST-format set whose pixels follow a known pattern; returns the arrays written."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)  # a per-image marker, so order mistakes show
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"] = images, labels
    return arrays


# --------------------------------------------------------------------------- CIFAR-10 -------


def _str(b: bytes) -> bytes:
    """A Python 2 ``str`` in pickle protocol 2: SHORT_BINSTRING or BINSTRING."""
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch exactly as the original files are: Python 2 cPickle, protocol 2, numpy.core globals.

    Written opcode by opcode because Python 3 cannot produce Python 2 ``str`` objects.
    """
    n, d = data.shape
    out = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
    out += _str(b"batch_label") + _str(b"training batch 1 of 5")
    out += _str(b"data")
    out += (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + b"K\x00\x85"
        + _str(b"b")
        + b"\x87R"
    )
    out += b"(K\x01" + _int(n) + _int(d) + b"\x86"  # state: version, shape
    out += b"cnumpy\ndtype\n" + _str(b"u1") + b"K\x00K\x01\x87R"  # dtype('u1', False, True)
    out += b"(K\x03" + _str(b"|") + b"NNN" + _int(-1) + _int(-1) + b"K\x00tb"  # dtype state
    out += b"\x89" + _str(data.tobytes()) + b"tb"  # not fortran, raw bytes; BUILD the array
    out += _str(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    out += b"u."  # SETITEMS, STOP
    return bytes(out)


CIFAR_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def make_cifar(root: Path, *, per_batch: int = 3, style: str = "py2") -> dict[str, np.ndarray]:
    """``cifar-10-batches-py`` in ``root`` with ``per_batch`` images per batch.

    ``style`` "py2" writes the original format; an int writes a Python 3 pickle of that protocol
    (str keys, numpy._core globals). Returns train/test images [N, 3, 32, 32] and labels.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out: dict[str, list[np.ndarray]] = {
        "train_images": [],
        "train_labels": [],
        "test_images": [],
        "test_labels": [],
    }
    names = [*(("train", f"data_batch_{i}") for i in range(1, 6)), ("test", "test_batch")]
    for k, (split, fname) in enumerate(names):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(k + j) % 10 for j in range(per_batch)]
        if style == "py2":
            blob = py2_cifar_pickle(data, labels)
        else:
            blob = pickle.dumps({"batch_label": fname, "data": data, "labels": labels}, protocol=int(style))
        (root / fname).write_bytes(blob)
        out[f"{split}_images"].append(data.reshape(-1, 3, 32, 32))
        out[f"{split}_labels"].append(np.asarray(labels))
    meta = {"label_names": list(CIFAR_NAMES), "num_cases_per_batch": per_batch, "num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {k: np.concatenate(v) for k, v in out.items()}


# --------------------------------------------------------------------------- STL-10 ---------

STL_NAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def make_stl(root: Path, *, n_train: int = 4, n_test: int = 3) -> dict[str, np.ndarray]:
    """``stl10_binary`` files in ``root``; returns the upright images [N, 3, 96, 96] and labels 0..9."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        # On disk each plane is column-major: write the transpose of every plane in C order.
        (root / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        (root / f"{split}_y.bin").write_bytes((labels + 1).tobytes())
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    (root / "class_names.txt").write_text("\n".join(STL_NAMES) + "\n")
    return out


# --------------------------------------------------------------------------- Tiny ImageNet --


def tiny_wnids(count: int = 200) -> list[str]:
    # Deliberately not in sorted order on disk, so the sorted-wnid label mapping is exercised.
    return [f"n{(i * 7919) % 100000:08d}" for i in range(count)]


def make_tiny(
    root: Path, *, per_class: int = 1, n_val: int = 6, gray: tuple[str, ...] = ()
) -> dict[str, object]:
    """``tiny-imagenet-200`` in ``root``: 200 classes x ``per_class`` train JPEGs and ``n_val`` val JPEGs.

    Every image is one flat colour (JPEG keeps flat colours within a couple of levels), chosen from
    its class so labels can be checked from pixels. ``gray`` lists val file names to write as
    single-channel JPEGs. Returns wnids (as written), the expected colours and the val labels.
    """
    from PIL import Image

    wnids = tiny_wnids()
    order = sorted(wnids)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    words = [f"{w}\tclass {order.index(w)}, synonym" for w in wnids]
    # Two classes share a first name, as ImageNet's "crane" does: the names must stay unique.
    words[0] = f"{wnids[0]}\tcrane, bird"
    words[1] = f"{wnids[1]}\tcrane, machine"
    words.append("n99999999\tunrelated, not a class")
    (root / "words.txt").write_text("\n".join(words) + "\n")

    def colour(label: int) -> tuple[int, int, int]:
        return (label, 255 - label, (label * 37) % 256)

    for w in wnids:
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (64, 64), colour(order.index(w))).save(folder / f"{w}_{j}.JPEG", quality=95)
    val_dir = root / "val" / "images"
    val_dir.mkdir(parents=True)
    lines, val_labels = [], []
    for i in range(n_val):
        w = wnids[(i * 13) % len(wnids)]
        label = order.index(w)
        name = f"val_{i}.JPEG"
        if name in gray:
            Image.new("L", (64, 64), 100 + i).save(val_dir / name, quality=95)
        else:
            Image.new("RGB", (64, 64), colour(label)).save(val_dir / name, quality=95)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
        val_labels.append(label)
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {"wnids": wnids, "sorted": order, "colour": colour, "val_labels": val_labels}


# --------------------------------------------------------------------------- archives -------


def tar_gz(path: Path, src: Path, arcname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=arcname)
    return path


def zip_dir(path: Path, src: Path, arcname: str) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, f"{arcname}/{p.relative_to(src).as_posix()}")
    return path


def tar_with_member(path: Path, name: str, *, data: bytes = b"evil", symlink_to: str | None = None) -> Path:
    """A tar.gz with one harmless folder and one member called ``name`` (a file or a symlink)."""
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        bad = tarfile.TarInfo(name)
        if symlink_to is not None:
            bad.type, bad.linkname = tarfile.SYMTYPE, symlink_to
            tar.addfile(bad)
        else:
            bad.size = len(data)
            tar.addfile(bad, io.BytesIO(data))
    return path


@pytest.fixture
def writers() -> SimpleNamespace:
    return SimpleNamespace(
        write_idx=write_idx,
        make_idx=make_idx,
        py2_cifar_pickle=py2_cifar_pickle,
        make_cifar=make_cifar,
        make_stl=make_stl,
        make_tiny=make_tiny,
        tar_gz=tar_gz,
        zip_dir=zip_dir,
        tar_with_member=tar_with_member,
    )


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads or writes the real user cache or follows the caller's data settings (nor the
    ``./data`` of the folder pytest runs in)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ERC_CACHE_DIR", raising=False)
    monkeypatch.delenv("ERC_DATA_DIR", raising=False)
    (tmp_path / "cwd").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("ERC_DATA_MIRROR", raising=False)


# --------------------------------------------------------------------------- HTTP server ----


@dataclass
class Server:
    """A loopback HTTP server over ``root``; ``special`` maps URL paths to canned misbehaviours."""

    root: Path
    url: str = ""
    requests: list[str] = field(default_factory=list)
    # path -> ("truncate", bytes promised) : send Content-Length larger than the body, then close
    special: dict[str, tuple[str, int]] = field(default_factory=dict)


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    state = Server(root)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            state.requests.append(self.path)
            if self.path in state.special:
                _, promised = state.special[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(promised))
                self.end_headers()
                self.wfile.write(b"x" * (promised // 2))
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval keeps shutdown() (which waits for the next poll) fast in teardown.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
