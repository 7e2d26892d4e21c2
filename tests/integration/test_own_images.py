"""Your own images, end to end, as the README's three commands run them: ``erc train`` on an image
folder -> ``erc export`` -> ``erc serve`` answers with the folder's class names -> ``erc audit`` and
the admin audits (the folder's test split, uploaded images) -> the report renders in Chromium.

Two folders the test writes: Fashion-MNIST (Debian's dataset-fashion-mnist) saved as PNG class
folders without a test folder (the seeded split, ``--embed-dim auto``), and a synthetic RGB 32x32
set whose three classes differ in colour and shape, with train/ and test/ folders.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from training.card import load_model
from training.data import load_split

TOKEN = "own-images-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHAPES = {"circle": (220, 50, 50), "square": (50, 200, 60), "triangle": (60, 80, 230)}


def _erc(args: list[str], env: dict, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    exe = shutil.which("erc", path=env["PATH"])
    assert exe, "the erc console script is installed"
    res = subprocess.run([exe, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"erc {' '.join(args)}\n{res.stderr[-3000:]}"
    return res


def _fashion_pngs(root: Path) -> None:
    """1,300 Fashion-MNIST training images as PNGs, one folder per class ('/' is no file name)."""
    data = load_split("fashion-mnist", "train", n=1300, seed=1)
    names = [n.replace("/", "-") for n in data.info.label_names]
    for i, (img, y) in enumerate(zip(data.images[:, 0].numpy(), data.labels.tolist(), strict=True)):
        (root / names[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / names[y] / f"{i:05d}.png")


def _shape_pngs(root: Path, n_train: int = 150, n_test: int = 40, size: int = 32) -> None:
    """Noisy dark backgrounds with one filled shape of the class's colour at a random place."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for name, colour in SHAPES.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 60, (size, size, 3), dtype=np.uint8))
                draw = ImageDraw.Draw(img)
                r = int(rng.integers(7, 12))
                cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
                fill = tuple(int(v) for v in np.clip(np.array(colour) + rng.integers(-30, 31, 3), 0, 255))
                box = (cx - r, cy - r, cx + r, cy + r)
                if name == "circle":
                    draw.ellipse(box, fill=fill)
                elif name == "square":
                    draw.rectangle(box, fill=fill)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
                img.save(root / split / name / f"{i:04d}.png")


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory, erc_module_env: dict) -> dict:
    """Both folders written, trained on, and exported into one store."""
    base = tmp_path_factory.mktemp("own")
    env = {**erc_module_env, "ERC_CACHE_DIR": str(base / "cache")}
    fashion, shapes, store = base / "fashion", base / "shapes", base / "store"
    _fashion_pngs(fashion)
    _shape_pngs(shapes)
    slim = ["--width", "0.25", "--pgd-steps", "2", "--no-progress", "--threads", "2"]
    runs = {}
    # The network and the batch size are the ones a user gets: chosen by erc train for the data.
    runs["fashion"] = _erc(
        ["train", "--dataset", f"folder:{fashion}", "--eps", "0.1", "--embed-dim", "auto",
         "--epochs", "2", "--eval-subset", "200", "--out", str(base / "run-f"), *slim],
        env, base,
    )  # fmt: skip
    runs["shapes"] = _erc(
        ["train", "--dataset", f"folder:{shapes}", "--eps", "0.03",
         "--epochs", "3", "--out", str(base / "run-s"), *slim],
        env, base,
    )  # fmt: skip
    for name, run in (("fashion", "run-f"), ("shapes", "run-s")):
        _erc(
            ["export", str(base / run), "--name", name, "--store", str(store), "--eval-n", "200",
             "--typicality-fit-n", "1000", "--no-progress"],
            env, base,
        )  # fmt: skip
    summaries = {k: json.loads(r.stdout.strip().splitlines()[-1]) for k, r in runs.items()}
    return {"base": base, "env": env, "store": store, "fashion": fashion, "shapes": shapes, "runs": summaries}


def _card(own: dict, name: str) -> dict:
    return json.loads((own["store"] / name / "card.json").read_text())


def test_training_picks_the_network_and_the_embedding(own: dict) -> None:
    fashion, shapes = own["runs"]["fashion"], own["runs"]["shapes"]
    assert fashion["arch"] == "er_mnist" and fashion["dataset"] == f"folder:{own['fashion']}"
    assert shapes["arch"] == "er_mnist" and shapes["last"]["test_n"] == 120
    card = _card(own, "fashion")
    auto = card["data"]["embed_dim_auto"]
    assert card["embed_dim"] == auto["embed_dim"] == max(2, round(auto["estimate"]))
    assert 8 <= card["embed_dim"] <= 16  # Fashion-MNIST's intrinsic dimension is about 12


def test_cards_carry_what_serving_needs(own: dict) -> None:
    card = _card(own, "fashion")
    names = sorted(p.name for p in own["fashion"].iterdir())
    assert card["label_names"] == names and "T-shirt-top" in names
    assert card["input_shape"] == [1, 28, 28] and card["channels"] == 1 and card["train_eps"] == 0.1
    assert card["dataset"] == f"folder:{own['fashion']}"
    assert "seeded split: 0.2 of each class held out" in card["data"]["split"]
    assert (
        sum(card["data"]["counts"]["train"].values()) + sum(card["data"]["counts"]["test"].values()) == 1300
    )
    assert card["preprocessing"]["resize"].startswith("antialiased bilinear stretch to 28x28")
    assert card["typicality"]["fit_n"] > 0
    shapes = _card(own, "shapes")
    assert shapes["label_names"] == ["circle", "square", "triangle"] and shapes["input_shape"] == [3, 32, 32]
    assert shapes["arch_kwargs"]["in_chans"] == 3 and shapes["arch_kwargs"]["input_size"] == [32, 32]
    assert shapes["data"]["split"] == "test/ folder" and shapes["train_eps"] == 0.03
    assert shapes["preprocessing"]["color"].startswith("converted to RGB")


@pytest.fixture(scope="module")
def own_server(own: dict, tmp_path_factory: pytest.TempPathFactory, start_server_fn):
    srv = start_server_fn(
        own["store"],
        tmp_path_factory.mktemp("logs"),
        ERC_ADMIN_TOKEN=TOKEN,
        ERC_AUDIT_DB=f"sqlite:///{own['base']}/audits.db",
        ERC_CACHE_DIR=own["env"]["ERC_CACHE_DIR"],
        ERC_MAX_INSTANCES="32",
    )
    yield srv
    assert srv.stop(), srv.log.read_text()[-3000:]


def _predict(c, model: str, files: list[Path]) -> list[dict]:
    out = []
    for s in range(0, len(files), 32):
        body = {
            "instances": [{"b64": base64.b64encode(f.read_bytes()).decode()} for f in files[s : s + 32]],
            "parameters": {"return_embedding": True},
        }
        r = c.post(f"/v1/models/{model}:predict", json=body)
        assert r.status_code == 200, r.text
        out += r.json()["predictions"]
    return out


def test_serve_answers_with_the_folders_class_names_and_pixels(own: dict, own_server) -> None:
    """Served predictions use the folder's names, and equal the stored model's outputs on the
    decoded training cache: the service decodes the PNG files to the same pixels training saw."""
    names = ["circle", "square", "triangle"]
    files = sorted((own["shapes"] / "test").rglob("*.png"))  # class folders in label order, files sorted
    truth = [names.index(f.parent.name) for f in files]
    with own_server.client() as c:
        preds = _predict(c, "shapes", files)
        listing = c.get("/v1/models/shapes").json()
        meta = c.get("/v2/models/shapes").json()
        bag = sorted((own["fashion"] / "Bag").iterdir())[0]
        r = c.post(
            "/v1/models/fashion:predict", content=bag.read_bytes(), headers={"content-type": "image/png"}
        )
    assert listing["labels"] == names and listing["input_shape"] == [3, 32, 32]
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert all(p["label_name"] == names[p["label"]] for p in preds)
    accuracy = np.mean([p["label"] == t for p, t in zip(preds, truth, strict=True)])
    assert accuracy >= 0.9, accuracy  # colour alone separates the classes
    model, card = load_model(own["store"] / "shapes")
    test = load_split(card.dataset, "test", folder=card.folder_options())
    assert test.labels.tolist() == truth
    with torch.no_grad():
        local = torch.softmax(model(test.as_float()), 1).numpy()
    served = np.array([p["probabilities"] for p in preds])
    assert np.allclose(served, local, atol=1e-5)
    assert all(len(p["embedding"]) == card.embed_dim for p in preds)
    fashion = r.json()["predictions"][0]
    assert r.status_code == 200 and fashion["label_name"] in _card(own, "fashion")["label_names"]


def test_fashion_served_accuracy(own: dict, own_server) -> None:
    """The seeded test split, as PNG files sent to the server, is classified far above chance."""
    card = _card(own, "fashion")
    _, stored = load_model(own["store"] / "fashion")
    test = load_split(stored.dataset, "test", folder=stored.folder_options())
    # The files of the held-out split, found by their pixels (the split is stated in the card, not listed).
    by_pixels: dict[bytes, Path] = {}
    for f in sorted(own["fashion"].rglob("*.png")):
        by_pixels.setdefault(np.asarray(Image.open(f)).tobytes(), f)
    files = [by_pixels[img[0].numpy().tobytes()] for img in test.images[:120]]
    with own_server.client() as c:
        preds = _predict(c, "fashion", files)
    truth = [card["label_names"].index(f.parent.name) for f in files]
    accuracy = np.mean([p["label"] == t for p, t in zip(preds, truth, strict=True)])
    assert accuracy >= 0.45, accuracy  # ten classes, two slim epochs: chance is 0.1


def _wait_done(c, audit_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while (body := c.get(f"/admin/audits/{audit_id}", headers=AUTH).json())["status"] not in (
        "done",
        "failed",
    ):
        assert time.time() < deadline, body
        time.sleep(0.3)
    assert body["status"] == "done", body
    return body


def test_admin_audits_on_the_test_folder_and_on_uploads(own: dict, own_server) -> None:
    files = sorted((own["shapes"] / "test").rglob("*.png"))[::10]
    upload = {
        "source": "upload",
        "instances": [{"b64": base64.b64encode(f.read_bytes()).decode()} for f in files],
        "labels": [list(SHAPES).index(f.parent.name) for f in files],
    }
    with own_server.client() as c:
        a = c.post("/admin/audits", headers=AUTH, json={"model": "shapes", "data": {"n": 60},
                                                        "attacks": [{"name": "fgsm"}]})  # fmt: skip
        assert a.status_code == 202, a.text
        folder = _wait_done(c, a.json()["id"])["result"]
        b = c.post("/admin/audits", headers=AUTH, json={"model": "shapes", "data": upload,
                                                        "attacks": [{"name": "pgd", "params": {"steps": 3}}]})  # fmt: skip
        assert b.status_code == 202, b.text
        uploaded = _wait_done(c, b.json()["id"])["result"]
        report = c.get(f"/admin/audits/{a.json()['id']}/report", headers=AUTH).text
        other = c.post(
            "/admin/audits", headers=AUTH, json={"model": "shapes", "data": {"dataset": "folder:/etc"}}
        )
    assert folder["data"] == {
        "source": "test", "dataset": f"folder:{own['shapes']}", "split": "test", "n": 60, "seed": 0,
    }  # fmt: skip
    assert [row["eps"] for row in folder["per_eps"]] == [0.0, 0.015, 0.03]  # from the card's training eps
    assert folder["model"]["label_names"] == list(SHAPES) and folder["clean"]["accuracy"] >= 0.9
    assert uploaded["data"] == {"source": "upload", "n": len(files)}
    assert "Classes (3): circle, square, triangle." in report
    assert other.status_code == 422 and "not this model's image folder" in other.json()["error"]["message"]


def test_erc_audit_on_the_folder_and_the_report_renders(own: dict, tmp_path: Path, screenshot_html) -> None:
    out = tmp_path / "audit"
    res = _erc(
        ["audit", "fashion", "--store", str(own["store"]), "--n", "100", "--attack", "pgd:steps=3",
         "--out", str(out), "--no-progress"],
        own["env"], tmp_path,
    )  # fmt: skip
    result = json.loads((out / "audit.json").read_text())
    assert result["data"]["dataset"] == f"folder:{own['fashion']}" and result["clean"]["n"] == 100
    assert [row["eps"] for row in result["per_eps"]] == [0.0, 0.05, 0.1]
    assert result["model"]["label_names"] == _card(own, "fashion")["label_names"]
    assert f"folder:{own['fashion']} test n=100" in res.stdout
    html = (out / "report.html").read_text()
    assert "Ankle boot" in html and "data:image/png;base64," in html
    screenshot_html(html, tmp_path)


def test_torchserve_answers_like_the_service_on_the_folder_model(
    own: dict, own_server, tmp_path_factory: pytest.TempPathFactory, torchserve_for
) -> None:
    """The TorchServe handler works from the card too: RGB 32x32 input, the folder's class names,
    the same probabilities and embeddings as the FastAPI service."""
    files = sorted((own["shapes"] / "test").rglob("*.png"))[::15]
    body = {"instances": [{"b64": base64.b64encode(f.read_bytes()).decode()} for f in files],
            "parameters": {"return_embedding": True}}  # fmt: skip
    with torchserve_for(own["store"], "shapes", tmp_path_factory, 4) as ts:
        theirs = httpx.post(
            f"{ts.inference_url}/predictions/shapes", json=body, headers=ts.inference_headers(), timeout=60
        )
    with own_server.client() as c:
        ours = c.post("/v1/models/shapes:predict", json=body)
    assert theirs.status_code == 200, theirs.text
    a, b = theirs.json()["predictions"], ours.json()["predictions"]
    assert [p["label_name"] for p in a] == [p["label_name"] for p in b]
    assert {p["label_name"] for p in a} <= set(SHAPES)
    for p, q in zip(a, b, strict=True):
        assert np.allclose(p["probabilities"], q["probabilities"], atol=1e-5)
        assert np.allclose(p["embedding"], q["embedding"], atol=1e-5)
