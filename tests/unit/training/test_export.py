"""Export to the model store and verified loading: identical logits after the round trip, no
discriminator, sha256 enforced, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.attacks import build_attack
from training.card import (
    CARD_FILE,
    WEIGHTS_FILE,
    CardError,
    append_card_metrics,
    load_model,
    model_from_checkpoint,
    read_card,
    resolve_model,
)
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.export import export_run
from training.train import run_training
from training.typicality import Typicality


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "er"
    cfg = load_config(
        overrides={
            "method.name": "er",
            "model.width": 0.125,
            "adv.steps": 1,
            "data.train_subset": 600,
            "data.eval_subset": 200,
            "data.batch_size": 50,
            "run.epochs": 1,
            "run.progress": False,
            "run.out_dir": str(out),
        }
    )
    run_training(cfg)
    return out


def _x() -> torch.Tensor:
    return torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_round_trip_gives_identical_logits_and_drops_the_discriminator(run_dir: Path, tmp_path: Path) -> None:
    path = export_run(run_dir, "tiny", tmp_path, eval_n=100, device="cpu")
    assert sorted(p.name for p in path.iterdir()) == [CARD_FILE, WEIGHTS_FILE]
    keys = load_file(str(path / WEIGHTS_FILE)).keys()
    assert keys and not any("discriminator" in k for k in keys)
    assert {k.split(".")[0] for k in keys} == {"encoder", "classifier"}
    model, card = load_model(path)
    original = model_from_checkpoint(load_checkpoint(run_dir / "checkpoint.pt"))
    with torch.no_grad():
        assert torch.equal(model(_x()), original(_x()))
        assert torch.equal(model.forward_features(_x()), original.forward_features(_x()))
    assert card.arch == "er_mnist" and card.embed_dim == 4 and card.input_shape == [1, 28, 28]
    assert (
        card.label_names == [str(i) for i in range(10)] and card.prior == "gaussian" and card.method == "er"
    )
    assert card.train_config["model"]["width"] == 0.125 and card.training["epochs"] == 1
    (acc,) = card.metrics
    assert acc["metric"] == "accuracy" and acc["n"] == 100 and acc["eps"] == 0
    assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    assert acc["weights_sha256"] == card.weights_sha256 and acc["measured_on"] == "stored weights (float32)"


def test_float16_storage_and_robust_metric(run_dir: Path, tmp_path: Path) -> None:
    path = export_run(
        run_dir,
        "half",
        tmp_path,
        dtype="float16",
        eval_n=50,
        robust=[build_attack("pgd", {"steps": 3})],
        device="cpu",
    )
    assert all(v.dtype in (torch.float16, torch.int64) for v in load_file(str(path / WEIGHTS_FILE)).values())
    model, card = load_model(path)
    assert card.weights_dtype == "float16" and next(model.parameters()).dtype == torch.float32
    original = model_from_checkpoint(load_checkpoint(run_dir / "checkpoint.pt"))
    with torch.no_grad():
        assert torch.allclose(model(_x()), original(_x()), atol=5e-2)
    robust = [m for m in card.metrics if m["metric"] == "robust_accuracy"]
    assert len(robust) == 1 and robust[0]["eps"] == pytest.approx(0.3)
    assert robust[0]["attack"]["steps"] == 3 and "PGD-3" in robust[0]["attack"]["description"]
    assert robust[0]["measured_on"] == "stored weights (float16)"


def _export(run_dir: Path, store: Path, name: str = "m") -> Path:
    return export_run(run_dir, name, store, eval_n=20, device="cpu")


def test_sha_mismatch_is_refused(run_dir: Path, tmp_path: Path) -> None:
    path = _export(run_dir, tmp_path)
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CardError, match="sha256"):
        load_model(path)


def test_truncated_weights_refused_even_with_matching_hash(run_dir: Path, tmp_path: Path) -> None:
    import hashlib

    path = _export(run_dir, tmp_path)
    truncated = (path / WEIGHTS_FILE).read_bytes()[:1000]
    (path / WEIGHTS_FILE).write_bytes(truncated)
    card = json.loads((path / CARD_FILE).read_text())
    card["weights_sha256"] = hashlib.sha256(truncated).hexdigest()
    (path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CardError, match="unreadable safetensors"):
        load_model(path)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(arch="resnet_imagenet"), "unknown architecture"),
        (lambda c: c.pop("weights_sha256"), "missing field"),
        (lambda c: c.update(format="other/9"), "format"),
        (lambda c: c["arch_kwargs"].update(embed_dim=7), "does not fit"),
        (lambda c: c.update(weights_file="../x.safetensors"), "plain file name"),
    ],
)
def test_bad_cards_are_refused(run_dir: Path, tmp_path: Path, edit, match: str) -> None:
    path = _export(run_dir, tmp_path)
    card = json.loads((path / CARD_FILE).read_text())
    edit(card)
    (path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CardError, match=match):
        load_model(path)


def test_failed_export_leaves_nothing_behind(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    good = _export(run_dir, tmp_path, "keep")
    before = (good / WEIGHTS_FILE).read_bytes()
    import training.export as export

    def boom(*a, **kw):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(export, "evaluate_on_test", boom)
    with pytest.raises(RuntimeError, match="crashed"):
        export_run(run_dir, "keep", tmp_path, eval_n=20, dtype="float16", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"], "no staging folders left"
    assert (good / WEIGHTS_FILE).read_bytes() == before, "the existing model is untouched"
    load_model(good)


def test_append_card_metrics_only_for_the_same_weights(run_dir: Path, tmp_path: Path) -> None:
    path = _export(run_dir, tmp_path)
    card = read_card(path)
    m = {**card.metrics[0], "n": 7}
    append_card_metrics(path, [m])
    assert len(read_card(path).metrics) == 2
    append_card_metrics(path, [m])  # same metric/eps/n/attack replaces, does not pile up
    assert len(read_card(path).metrics) == 2
    with pytest.raises(CardError):
        append_card_metrics(path, [{**m, "weights_sha256": "0" * 64}])
    load_model(path)  # still verifies: the weights did not change


def test_resolve_model_by_name_path_and_run(run_dir: Path, tmp_path: Path) -> None:
    _export(run_dir, tmp_path, "named")
    by_name = resolve_model("named", tmp_path, device="cpu")
    by_path = resolve_model(str(tmp_path / "named"), "elsewhere", device="cpu")
    by_run = resolve_model(str(run_dir), tmp_path, device="cpu")
    assert by_name.source == by_path.source == "store" and by_run.source == "run"
    assert by_name.weights_sha256 == read_card(tmp_path / "named").weights_sha256
    assert by_run.train_eps == pytest.approx(0.3)
    with pytest.raises(FileNotFoundError, match=r"card\.json"):
        resolve_model("nope", tmp_path)


def test_stored_files_are_readable_by_other_users(run_dir: Path, tmp_path: Path) -> None:
    """A non-root service user (the API container's) must be able to read what export wrote."""
    path = _export(run_dir, tmp_path)
    assert path.stat().st_mode & 0o777 == 0o755
    for f in path.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_a_tiny_image_folder_exports_with_a_typicality_score(tmp_path: Path, monkeypatch) -> None:
    """Three training images a class, fewer than the embedding's 4 dimensions: the shrunk class
    covariances still give a finite score; the card describes the folder."""
    from PIL import Image

    monkeypatch.setenv("ERC_CACHE_DIR", str(tmp_path / "cache"))
    for k, name in enumerate(("ant", "bee")):
        for i in range(4):
            (tmp_path / "img" / name).mkdir(parents=True, exist_ok=True)
            arr = np.full((16, 16, 3), 60 * k + 10 * i, np.uint8)
            Image.fromarray(arr).save(tmp_path / "img" / name / f"{i}.png")
    cfg = load_config(
        overrides={
            "data.dataset": f"folder:{tmp_path / 'img'}",
            "data.test_fraction": 0.25,
            "data.batch_size": 2,
            "adv.eps": 0.05,
            "adv.steps": 1,
            "model.width": 0.125,
            "run.epochs": 1,
            "run.progress": False,
            "run.out_dir": str(tmp_path / "run"),
        }
    )
    run_training(cfg)
    path = export_run(tmp_path / "run", "bugs", tmp_path / "store", device="cpu")
    card = read_card(path)
    # Three embeddings a class in 4 dimensions: the shrinkage estimate still gives a usable score.
    typ = Typicality.from_dict(card.typicality)
    assert typ.info["fit_class_counts"] == [3, 3] and np.isfinite(typ.threshold)
    assert card.label_names == ["ant", "bee"] and card.input_shape == [3, 16, 16]
    assert card.arch == "er_mnist" and card.arch_kwargs["input_size"] == [16, 16] and card.train_eps == 0.05
    assert card.data["counts"] == {"train": {"ant": 3, "bee": 3}, "test": {"ant": 1, "bee": 1}}
    assert card.metrics[0]["dataset"] == f"folder:{tmp_path / 'img'}" and card.metrics[0]["n"] == 2
