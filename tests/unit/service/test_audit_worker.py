"""The audit process refuses weights other than those served, and reports how it ended."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from service.audit import worker
from service.audit.engine import AuditSpec
from training.attacks import build_attacks
from training.config import load_config
from training.export import export_run
from training.train import run_training


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs, store = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("store")
    run_training(
        load_config(
            overrides={
                "method.name": "er-minus",
                "model.width": 0.125,
                "data.train_subset": 500,
                "data.eval_subset": 100,
                "data.batch_size": 50,
                "run.epochs": 1,
                "run.progress": False,
                "run.out_dir": str(runs / "m"),
            }
        )
    )
    export_run(runs / "m", "m", store, eval_n=100, device="cpu")
    return store


def _job(store: Path, out: Path, sha: str) -> dict:
    return {
        "id": "a" * 32,
        "out_dir": str(out),
        "model_dir": str(store / "m"),
        "weights_sha256": sha,
        "device": "cpu",
        "threads": None,
        "niceness": 0,
        "data": {"source": "test", "dataset": None, "n": 40, "seed": 0},
        "spec": {
            "eps": [0, 0.2],
            "attacks": [{"name": "fgsm", "params": {}}],
            "norm": "linf",
            "precision": "fp32",
            "seed": 0,
            "checks": False,
        },
    }


def _messages(job: dict) -> list:
    parent, child = multiprocessing.Pipe(duplex=False)
    worker.main(job, child)  # in-process: the same code the spawned process runs
    out = []
    while True:
        try:
            out.append(parent.recv())
        except EOFError:  # the worker closed its end: everything has been read
            return out


def test_refuses_other_weights_than_those_served(store: Path, tmp_path: Path) -> None:
    msgs = _messages(_job(store, tmp_path, "0" * 64))
    assert msgs[-1][0] == "failed" and "changed on disk" in msgs[-1][1]
    assert not list(tmp_path.glob("*.json")), "nothing written for a refused audit"


def test_writes_json_and_html(store: Path, tmp_path: Path) -> None:
    import json

    from training.card import read_card

    msgs = _messages(_job(store, tmp_path, read_card(store / "m").weights_sha256))
    kind, paths = msgs[-1][0], msgs[-1][1]
    assert kind == "done", msgs[-1]
    result = json.loads(Path(paths["json"]).read_text())
    assert result["id"] == "a" * 32 and result["clean"]["n"] == 40
    assert Path(paths["html"]).read_text().startswith("<!doctype html>")


def test_audit_work_counts_eps_levels_and_attack_costs() -> None:
    spec = AuditSpec(eps=[0, 0.1, 0.2], suite=build_attacks([("pgd", {"steps": 10}), ("fgsm", {})]))
    assert spec.work(100) == 100 * 2 * (10 + 1)
