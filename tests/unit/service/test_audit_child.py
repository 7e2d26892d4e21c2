"""The audit child refuses weights other than those served, and reports how it ended in typed
messages."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from service.audit import child
from service.audit.child import AuditDone, AuditProgress
from service.audit.engine import AuditSpec
from service.child import ChildSetup, Failed
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


def _job(store: Path, sha: str) -> dict:
    return {
        "id": "a" * 32,
        "model_dir": str(store / "m"),
        "weights_sha256": sha,
        "device": "cpu",
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
    parent, conn = multiprocessing.Pipe(duplex=False)
    # In-process, in a thread: the same code the spawned process runs (not dying with this test's
    # parent, not niced). The result and the report travel through the pipe, far beyond its
    # buffer, so they are read while the child writes.
    how = ChildSetup(niceness=0, die_with_parent=False)
    run = threading.Thread(target=child.main, args=(conn, how, job))
    run.start()
    out = []
    while True:
        try:
            out.append(parent.recv())
        except EOFError:  # the child closed its end: everything has been read
            run.join()
            return out


def test_refuses_other_weights_than_those_served(store: Path) -> None:
    msgs = _messages(_job(store, "0" * 64))
    assert isinstance(msgs[-1], Failed) and "changed on disk" in msgs[-1].message, msgs
    assert msgs[-1].message.startswith("RuntimeError: weights of m changed on disk")
    assert "not auditing other weights than those served" in msgs[-1].message
    assert len(msgs) == 1, "no result for a refused audit"


def test_hands_back_the_result_and_the_report(store: Path) -> None:
    import json

    from training.card import read_card

    msgs = _messages(_job(store, read_card(store / "m").weights_sha256))
    done = msgs[-1]
    assert isinstance(done, AuditDone), done
    assert all(isinstance(m, AuditProgress) for m in msgs[:-1])
    result, html = json.loads(done.result_json), done.report_html
    assert result["id"] == "a" * 32 and result["clean"]["n"] == 40
    assert html.startswith("<!doctype html>") and len(html) > 65536, "larger than a pipe's buffer"


def test_audit_work_counts_eps_levels_and_attack_costs() -> None:
    spec = AuditSpec(eps=[0, 0.1, 0.2], suite=build_attacks([("pgd", {"steps": 10}), ("fgsm", {})]))
    assert spec.work(100) == 100 * 2 * (10 + 1)
