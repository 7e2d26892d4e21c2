"""The reproduction experiment (``python -m experiments.mnist_reproduction``): its plan, a
smoke-scale run of the default model's worker end to end on the CPU (train, export, evaluations,
embeddings, pack and unpack, every step through the real ``erc`` command line, recorded as it ran),
and the report's tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.mnist_reproduction.plan import FIGURE_EPS, MAIN_NAME, SCALES, TABLE1_EPS, plan
from experiments.mnist_reproduction.report import Point, attack_key, best, row, table1
from service.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
MODULE = "experiments.mnist_reproduction"


def test_plan_covers_table1_and_the_ablation_figures() -> None:
    workers = plan(SCALES["gpu"])
    jobs = {j.name: j for js in workers.values() for j in js}
    assert {"er", "madry", "none", "er-minus"} <= set(jobs)  # Table 1
    assert {"e-cla", "vae-cla", "prior-uniform", "prior-cauchy", "dim-2", "dim-8", "dim-13"} <= set(jobs)
    main = jobs["er"]
    assert main.export == MAIN_NAME and main.embeddings
    assert main.overrides["method.name"] == "er" and main.overrides["model.width"] == 1.0
    # The paper's attack comes first, on the whole test set, at every Table 1 eps.
    first = main.evals[0]
    assert (first.attack, first.params) == ("pgd", {"steps": 40, "keep_best": False})
    assert first.n is None and first.eps == TABLE1_EPS
    # Every evaluation is a valid `erc eval` command line.
    for job in jobs.values():
        for ev in job.evals:
            args = build_parser().parse_args(ev.argv("model", "out"))
            assert args.cmd == "eval" and args.attack[0][0] == ev.attack
    # The ablations of Figures 3-5 are trained without min-max, as in the paper.
    for name in ("e-cla", "vae-cla", "prior-uniform", "prior-cauchy", "dim-2", "er-minus"):
        assert jobs[name].overrides.get("run.compile") is None
        assert jobs[name].overrides["method.name"] in ("e-cla", "vae-cla", "er-minus")
    assert jobs["dim-13"].overrides["model.embed_dim"] == 13
    assert all(e.eps == FIGURE_EPS for e in jobs["e-cla"].evals)


def test_second_stage_plan_continues_the_default_model() -> None:
    workers = plan(SCALES["gpu"], 20, init_from="somewhere/mnist-er")
    assert set(workers) == {"main", "ablations-a"}
    main = workers["main"][0]
    assert main.overrides["run.init_from"] == "somewhere/mnist-er"
    assert main.overrides["data.batch_size"] == 512 and main.overrides["run.compile"] is False
    assert main.overrides["optim.step_size"] == 12 and "Two stages" in main.notes


def test_smoke_run_of_the_default_model_worker(tmp_path: Path) -> None:
    out, packed, unpacked = tmp_path / "r", tmp_path / "packed", tmp_path / "u"
    cmd = [sys.executable, "-m", MODULE, "run", "--out", str(out), "--scale", "smoke"]
    cmd += ["--budget-s", "300", "--workers", "main", "--pack", str(packed)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rec = json.loads((out / "jobs" / "er" / "job.json").read_text())
    assert rec["status"] == "done", rec
    assert rec["summary"]["epochs_done"] == 1
    evals = rec["evals"]
    assert {"fp32-checkpoint", "fp16-stored", "pgd40", "apgd-ce", "square", "apgd-dlr"} <= set(evals)
    for ev in evals.values():
        assert ev["status"] == "done"
        accs = [p["accuracy"] for p in ev["points"]]
        assert all(0 <= a <= accs[0] + 1e-9 for a in accs)  # never above the clean accuracy
    assert evals["pgd40"]["command"].startswith("erc eval ")
    assert "pgd:steps=3,keep_best=false" in evals["pgd40"]["command"]
    assert evals["pgd40"]["attack"]["keep_best"] is False
    assert rec["commands"][0].startswith(f"erc train --config {REPO}/training/configs/mnist-er.yaml")
    assert any(c.startswith("erc export ") for c in rec["commands"])
    assert rec["embeddings"]["status"] == "done"
    card = json.loads((out / "model_store" / MAIN_NAME / "card.json").read_text())
    assert card["weights_dtype"] == "float16" and card["notes"].startswith("SMOKE-SCALE")
    robust = [m for m in card["metrics"] if m["metric"] == "robust_accuracy"]
    assert robust and robust[0]["attack"]["restarts"] == SCALES["smoke"].strong_restarts
    assert {p.name for p in packed.iterdir()} == {"results.tar.gz", "model.tar.part0"}
    subprocess.run(
        [sys.executable, "-m", MODULE, "unpack", str(packed), str(unpacked)],
        cwd=REPO,
        check=True,
    )
    assert (unpacked / "model_store" / MAIN_NAME / "weights.safetensors").read_bytes() == (
        out / "model_store" / MAIN_NAME / "weights.safetensors"
    ).read_bytes()
    assert json.loads((unpacked / "jobs" / "er" / "job.json").read_text())["status"] == "done"
    assert not list(unpacked.rglob("*.pt"))  # checkpoints stay behind
    report = subprocess.run(
        [sys.executable, "-m", MODULE, "report", str(unpacked), "--out", str(tmp_path / "doc")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "ER-Classifier (shipped mnist-er)" in report.stdout
    assert (tmp_path / "doc" / "figure7.png").stat().st_size > 1000


def _p(model: str, attack: str, eps: float, acc: float, n: int) -> Point:
    return Point(model, attack, eps, acc, round(acc * n), n, (acc, acc), "t")


def test_report_cells_take_the_largest_n_and_say_it() -> None:
    pts = [
        _p("m", "clean", 0.0, 0.99, 10000),
        _p("m", "pgd40x1-last", 0.3, 0.91, 10000),
        _p("m", "pgd100x5", 0.3, 0.905, 10000),
        _p("m", "pgd100x5", 0.3, 0.80, 500),
        _p("m", "pgd100x5", 0.1, 0.97, 500),
    ]
    assert best(pts, "m", "pgd100x5", 0.3).n == 10000
    assert best(pts, "m", "pgd100x5", 0.0).accuracy == 0.99  # eps 0 is the clean accuracy
    assert best(pts, "m", "apgd-ce", 0.3) is None
    line = row(pts, "m", "M", "pgd100x5", "PGD-100", [0.0, 0.1, 0.3])
    assert line == "| M | PGD-100, n=10000 | 99.0 | 97.0 <sub>n=500</sub> | 90.5 |"
    table = table1(pts, [("m", "M")], [0.0, 0.3])
    assert "paper's claim" in table and "| M | APGD-CE-100, n=10000 | 99.0 | – |" in table


@pytest.mark.parametrize(
    ("attack", "key"),
    [
        (None, "clean"),
        ({"name": "pgd", "steps": 40, "restarts": 1, "keep_best": False}, "pgd40x1-last"),
        ({"name": "pgd", "steps": 100, "restarts": 5, "keep_best": True}, "pgd100x5"),
        ({"name": "apgd", "loss": "dlr"}, "apgd-dlr"),
        ({"name": "square", "queries": 5000}, "square"),
    ],
)
def test_attack_keys(attack: dict | None, key: str) -> None:
    assert attack_key(attack) == key


def test_import_figures_adds_the_runs_stored_weight_figures_to_the_card(tmp_path: Path) -> None:
    """The GPU run's figures on the weights it exported join that entry's card: APGD-CE at eps 0.3
    on all 10,000 test images is among them, and it is the worst, so it becomes the headline; the
    float32-checkpoint figures stay out; a run of other weights is refused."""
    import shutil

    from experiments.mnist_reproduction.figures import import_figures
    from training.card import read_card

    # The card the run exported with its weights (shipped until issue 31 recomputed their BatchNorm
    # statistics); the figures are matched to it by sha256, so the card is all the test needs.
    results = REPO / "docs" / "reproduction" / "results"
    model = tmp_path / "mnist-er"
    model.mkdir()
    shutil.copyfile(results / "h200-run1" / "card-mnist-er.json", model / "card.json")
    before = len(read_card(model).metrics)
    assert import_figures(results / "h200-run1", model) == 7
    card = read_card(model)
    new = card.metrics[-7:]
    assert all(m["weights_sha256"] == card.weights_sha256 and m["device"] == "cuda:0" for m in new)
    assert all("float32" not in (m["measured_on"] or "") for m in new)
    apgd = [m for m in new if (m["attack"] or {}).get("label") == "APGD-CE-100"]
    assert len(apgd) == 1 and apgd[0]["n"] == 10000 and apgd[0]["value"] == 0.8847
    assert apgd[0]["command"].startswith("erc eval ")
    assert card.to_dict()["headline"]["value"] <= 0.8847
    assert len(card.metrics) <= before + 7
    with pytest.raises(ValueError, match="exported weights"):
        import_figures(results / "h200-run2", model)  # the second stage's weights were not shipped
