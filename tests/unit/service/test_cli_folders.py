"""``erc`` on bad image folders: every one is a clear one-line error (``erc: ...``, exit 1) naming
what is wrong, never a traceback; ``erc data info|check DIR`` report what a folder holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main


def _png(path: Path, size: tuple[int, int] = (20, 20), value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = ((np.arange(size[0] * size[1]).reshape(size[1], size[0]) + 13 * value) % 256).astype(np.uint8)
    Image.fromarray(arr).save(path)


def _good(root: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 3, size=(20, 20)) -> Path:
    for k, name in enumerate(classes):
        for i in range(n):
            _png(root / name / f"{i}.png", size, 10 * k + i)
    return root


def _mixed(root: Path) -> None:
    _good(root)
    _png(root / "b" / "wide.png", (40, 20))


def _empty_class(root: Path) -> None:
    _good(root)
    (root / "c").mkdir()


def _corrupt(root: Path) -> None:
    _good(root)
    (root / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")


def _tiny(root: Path) -> None:
    _good(root, size=(12, 12))


TRAIN = ["train", "--width", "0.125", "--epochs", "1", "--batch-size", "2", "--no-progress"]
# name -> (build the folder, extra arguments, what the one line must say)
CASES = {
    "mixed-sizes": (_mixed, ["--eps", "0.1"], "disagree in size: 20x20 (6 files"),
    "one-class": (lambda r: _good(r, ("cats",)), ["--eps", "0.1"], "only one class folder ('cats')"),
    "empty-class": (_empty_class, ["--eps", "0.1"], "class 'c' holds no image files"),
    "no-eps": (_good, [], "adv.eps: required for an image folder"),
    "strict": (_corrupt, ["--eps", "0.1", "--strict"], "bad.png: unreadable image header"),
    "missing": (lambda r: None, ["--eps", "0.1"], "no such folder"),
    "too-small": (_tiny, ["--eps", "0.1"], "12x12 input is too small"),
    "bad-size": (_good, ["--eps", "0.1", "--size", "big"], "data.image_size"),
    "bad-channels": (_good, ["--eps", "0.1", "--channels", "2"], "data.channels: 1 (greyscale) or 3"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_folders_fail_with_one_line(case: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ERC_CACHE_DIR", str(tmp_path / "cache"))
    build, extra, says = CASES[case]
    root = tmp_path / "images"
    build(root)
    rc = main([*TRAIN, "--dataset", f"folder:{root}", "--out", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err and err[-1].startswith("erc: "), err
    assert says in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_folder_options_are_refused_for_named_datasets(tmp_path: Path, capsys) -> None:
    rc = main([*TRAIN, "--dataset", "mnist", "--size", "32", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 1
        and err[-1] == "erc: data.image_size: applies to image folders (data.dataset: folder:PATH) only"
    )


def _damaged(root: Path) -> None:
    _good(root)
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "a" / "fake.png").write_text("text, not pixels")
    (root / "b" / "readme.txt").write_text("hello")
    os.symlink(".", root / "b" / "again")


def test_data_info_and_check(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ERC_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "images"
    _damaged(root)
    assert main(["data", "info", str(root)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["counts"] == {"train": {"a": 3, "b": 3}} and report["sizes"] == {"20x20": 6}
    assert report["inferred"] == {"size": "20x20", "channels": 1} and not report["decoded"]
    assert {u["path"] for u in report["unreadable"]} == {"a/zero.png", "a/fake.png", "b/again"}
    assert report["ignored"] == [{"path": "b/readme.txt", "why": "not an image file name (.txt)"}]
    assert (
        out.strip()
        .splitlines()[-1]
        .endswith("6 image files (3 a, 3 b); 20x20 x 1 channel(s); 3 unreadable, 1 ignored")
    )

    assert main(["data", "check", f"folder:{root}", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out[: captured.out.rindex("}") + 1])["decoded"] is True
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"erc: {root}: 0 problem(s), 3 unreadable file(s); first: ")

    clean = _good(tmp_path / "clean")
    assert main(["data", "check", str(clean), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.rsplit("\n", 2)[0])["ok"] is True
    assert not (tmp_path / "cache").exists()  # checking writes no cache


def test_data_check_of_a_dataset_name_is_refused(capsys) -> None:
    assert main(["data", "check", "mnist"]) == 1
    assert (
        capsys.readouterr().err.strip() == "erc: mnist: not a folder (erc data check takes DIR or folder:DIR)"
    )
