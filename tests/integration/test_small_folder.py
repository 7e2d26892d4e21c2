"""A small image folder as a new user trains it first (issue 25): the README's commands with the
defaults a user gets, on three RGB classes of 60 training and 15 test images, then export, serve
(with typicality) and audit, each with an accuracy floor. Also what happens to the models that
go wrong: a degenerate model is refused by export (or exported with its warnings when asked), and
a card whose typicality is unusable is served without it, saying so."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from training.card import load_model
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import load_split

NAMES = ["bar", "cross", "disc"]


def _erc(args: list[str], env: dict, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("erc", path=env["PATH"])
    assert exe, "the erc console script is installed"
    res = subprocess.run([exe, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    if ok:
        assert res.returncode == 0, f"erc {' '.join(args)}\n{res.stderr[-3000:]}"
    return res


def _summary(res: subprocess.CompletedProcess) -> dict:
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, erc_module_env: dict, small_shapes_fn) -> dict:
    """The issue's commands as written (relative paths, run in the folder's parent)."""
    base = tmp_path_factory.mktemp("small")
    env = {**erc_module_env, "ERC_CACHE_DIR": str(base / "cache")}
    small_shapes_fn(base / "ds")
    check = _erc(["data", "check", "folder:ds"], env, base)
    none = _erc(
        ["train", "--dataset", "folder:ds", "--method", "none", "--width", "0.25", "--epochs", "3",
         "--out", "run-none", "--eps", "0.03", "--no-progress", "--eval-adv-n", "0"],
        env, base,
    )  # fmt: skip
    er = _erc(
        ["train", "--dataset", "folder:ds", "--method", "er", "--width", "0.25", "--epochs", "2",
         "--out", "run", "--eps", "0.03", "--pgd-steps", "2", "--no-progress", "--eval-adv-n", "0"],
        env, base,
    )  # fmt: skip
    export = _erc(
        ["export", "run", "--name", "shapes", "--store", "store", "--eval-n", "45", "--robust-steps", "2"],
        env,
        base,
    )
    return {"base": base, "env": env, "check": check, "none": _summary(none), "er": _summary(er),
            "export": export, "store": base / "store"}  # fmt: skip


def test_the_defaults_train_the_small_folder(small: dict) -> None:
    none, er = small["none"], small["er"]
    assert "3 classes, 225 image files" in small["check"].stdout
    assert none["arch"] == "vgg19_cifar10" and none["last"]["test_n"] == 45
    assert none["last"]["test_acc"] >= 0.95, none["last"]
    # The ER family picks its compact encoder for 180 images and says why (in the log and the config).
    assert er["arch"] == "er_mnist" and er["last"]["test_acc"] >= 0.9, er["last"]
    assert none["warnings"] == [] and er["warnings"] == []
    config = (small["base"] / "run" / "config.yaml").read_text()
    assert "batch_size: 16" in config and "arch: er_mnist" in config


def test_export_measures_a_useful_robust_model(small: dict) -> None:
    card = json.loads((small["store"] / "shapes" / "card.json").read_text())
    clean = next(m for m in card["metrics"] if m["eps"] == 0.0)
    robust = next(m for m in card["metrics"] if m["eps"] == 0.03)
    assert clean["value"] >= 0.9 and clean["n"] == 45
    assert robust["value"] >= 0.6, robust  # PGD-2 at eps 0.03; chance is 1/3
    assert card["warnings"] == [] and "warning" not in small["export"].stdout
    t = card["typicality"]
    assert t["fit_n"] == 180 and "Ledoit-Wolf" in t["covariance"] and np.isfinite(t["threshold"])
    assert not list(small["store"].glob(".*"))  # no staging directory left behind


def _zero_the_embedding(run: Path, out: Path) -> Path:
    """A copy of the run whose encoder maps every image to the same point (its last layer zeroed)."""
    shutil.copytree(run, out)
    state = load_checkpoint(out / "checkpoint.pt")
    weights = state["state"]["modules"]["model"]
    last = [k for k, v in weights.items() if k.startswith("encoder.") and v.dim() == 2][-1]
    weights[last].zero_()
    if last.replace("weight", "bias") in weights:
        weights[last.replace("weight", "bias")].fill_(0.5)
    save_checkpoint(out / "checkpoint.pt", state)
    return out


@pytest.fixture(scope="module")
def degenerate(small: dict) -> dict:
    base, env = small["base"], small["env"]
    _zero_the_embedding(base / "run", base / "run-zero")
    refused = _erc(
        ["export", "run-zero", "--name", "zero", "--store", "store", "--eval-n", "45"], env, base, ok=False
    )
    allowed = _erc(
        ["export", "run-zero", "--name", "zero", "--store", "store", "--eval-n", "45", "--allow-degenerate"],
        env, base,
    )  # fmt: skip
    return {"refused": refused, "allowed": allowed}


def test_export_refuses_a_degenerate_model_in_one_line(small: dict, degenerate: dict) -> None:
    refused = degenerate["refused"]
    assert refused.returncode == 1
    lines = [ln for ln in refused.stderr.splitlines() if ln.startswith("erc:")]
    assert len(lines) == 1 and "same embedding" in lines[0] and "--allow-degenerate" in lines[0], (
        refused.stderr
    )
    assert "Traceback" not in refused.stderr
    # Told otherwise, it is exported with its warnings, and its typicality fit is finite.
    card = json.loads((small["store"] / "zero" / "card.json").read_text())
    assert any("same embedding" in w for w in card["warnings"])
    assert any("chance level" in w for w in card["warnings"])
    assert "warning: " in degenerate["allowed"].stdout
    assert np.isfinite(card["typicality"]["threshold"])


@pytest.fixture(scope="module")
def served(small: dict, degenerate: dict, tmp_path_factory: pytest.TempPathFactory, start_server_fn):
    """``erc serve`` on the store, plus a copy of ``shapes`` whose typicality section was broken by
    hand (covariances that are not positive definite)."""
    store = small["store"]
    shutil.copytree(store / "shapes", store / "shapes-bad-typicality")
    card_path = store / "shapes-bad-typicality" / "card.json"
    card = json.loads(card_path.read_text())
    k = card["embed_dim"]
    card["typicality"]["class_covariances"] = [[[0.0] * k for _ in range(k)] for _ in NAMES]
    card_path.write_text(json.dumps(card))
    srv = start_server_fn(
        store,
        tmp_path_factory.mktemp("logs"),
        ERC_DEFAULT_MODEL="shapes",
        ERC_CACHE_DIR=small["env"]["ERC_CACHE_DIR"],
    )
    yield srv
    assert srv.stop(), srv.log.read_text()[-3000:]


def test_the_served_model_answers_as_the_stored_file_with_typicality(small: dict, served) -> None:
    files = sorted((small["base"] / "ds" / "test").rglob("*.png"))
    body = {"instances": [{"b64": base64.b64encode(f.read_bytes()).decode()} for f in files],
            "parameters": {"return_embedding": True}}  # fmt: skip
    with served.client() as c:
        ready = c.get("/readyz").json()
        r = c.post("/v1/models/shapes:predict", json=body)
    assert ready["ready"] and ready["models"]["shapes"]["ready"], ready
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    truth = [NAMES.index(f.parent.name) for f in files]
    assert np.mean([p["label"] == t for p, t in zip(preds, truth, strict=True)]) >= 0.9
    for p in preds:
        t = p["typicality"]
        assert np.isfinite(t["mahalanobis"]) and np.isfinite(t["prior_log_density"])
    model, card = load_model(small["store"] / "shapes")
    test = load_split(card.dataset, "test", folder=card.folder_options())
    assert test.labels.tolist() == truth
    with torch.no_grad():
        local = torch.softmax(model(test.as_float()), 1).numpy()
    assert np.allclose([p["probabilities"] for p in preds], local, atol=1e-5)


def test_an_unusable_typicality_section_is_left_out_and_said(small: dict, served) -> None:
    png = next((small["base"] / "ds" / "test" / "disc").iterdir()).read_bytes()
    with served.client() as c:
        listing = c.get("/v1/models/shapes-bad-typicality").json()
        ready = c.get("/readyz").json()
        r = c.post(
            "/v1/models/shapes-bad-typicality:predict", content=png, headers={"content-type": "image/png"}
        )
        v2 = c.get("/v2/models/shapes-bad-typicality").json()
    assert listing["ready"] and listing["typicality"] is False
    assert "not positive definite" in listing["missing"]["typicality"]
    assert ready["models"]["shapes-bad-typicality"]["ready"]
    assert "typicality" in ready["models"]["shapes-bad-typicality"]["missing"]
    assert r.status_code == 200 and "typicality" not in r.json()["predictions"][0]
    assert r.json()["predictions"][0]["label_name"] == "disc"
    assert "mahalanobis" not in {o["name"] for o in v2["outputs"]}
    log = served.log.read_text()
    lines = [ln for ln in log.splitlines() if "shapes-bad-typicality" in ln and "without typicality" in ln]
    assert len(lines) == 1 and "Traceback" not in log


def test_erc_audit_of_the_small_folder_model(small: dict, tmp_path: Path) -> None:
    _erc(
        ["audit", "shapes", "--store", str(small["store"]), "--n", "45", "--attack", "pgd:steps=10",
         "--out", str(tmp_path / "audit"), "--no-progress"],
        small["env"], tmp_path,
    )  # fmt: skip
    result = json.loads((tmp_path / "audit" / "audit.json").read_text())
    at_eps = {row["eps"]: row for row in result["per_eps"]}
    assert result["clean"]["accuracy"] >= 0.9
    assert at_eps[0.03]["union"]["accuracy"] >= 0.5, at_eps[0.03]  # PGD-10 at the training eps


def test_export_verifies_the_entry_through_the_server_before_it_enters_the_store(
    small: dict, tmp_path: Path
) -> None:
    """check_servable (erc export's verify hook) refuses an entry the server would serve without
    a part, and a refused export leaves the store as it was (no entry, no staging directory)."""
    from service.servable import NotServable, check_servable
    from training.export import export_run

    good = small["store"] / "shapes"
    check_servable(good)  # the service and the TorchServe handler answer the probe images alike
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    card = json.loads((bad / "card.json").read_text())
    card["typicality"]["threshold"] = "not a number"
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(NotServable, match="without typicality"):
        check_servable(bad)

    def refuse(staged: Path) -> None:
        raise NotServable(f"refused {staged.name}")

    store = tmp_path / "store"
    with pytest.raises(NotServable, match="refused"):
        export_run(small["base"] / "run", "again", store, eval_n=45, device="cpu", verify=refuse)
    assert list(store.iterdir()) == []
