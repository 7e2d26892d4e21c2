"""`erc` end to end on MNIST on the CPU, through the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest


def _erc(args: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("erc", path=env["PATH"])
    assert exe, "the erc console script is installed"
    return subprocess.run([exe, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands(erc_env: dict, tmp_path: Path) -> None:
    res = _erc(["--help"], erc_env, tmp_path)
    assert res.returncode == 0
    for cmd in ("train", "eval", "export", "intrinsic-dim", "data"):
        assert cmd in res.stdout


def test_train_eval_export_end_to_end(erc_env: dict, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "tiny"
    res = _erc(
        [
            "train",
            "--method",
            "er",
            "--width",
            "0.125",
            "--pgd-steps",
            "2",
            "--train-subset",
            "2000",
            "--eval-subset",
            "500",
            "--batch-size",
            "50",
            "--epochs",
            "1",
            "--out",
            str(run),
            "--no-progress",
            "--set",
            "method.clip=0.02",
        ],
        erc_env,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["method"] == "er" and summary["last"]["test_n"] == 500
    assert "clip: 0.02" in (run / "config.yaml").read_text()

    res = _erc(
        [
            "eval",
            str(run),
            "--eps",
            "0,0.1,0.3",
            "--steps",
            "5",
            "--restarts",
            "2",
            "--n",
            "200",
            "--out",
            str(tmp_path / "ev"),
            "--no-progress",
        ],
        erc_env,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    accs = [p["accuracy"] for p in ev["points"]]
    assert [p["eps"] for p in ev["points"]] == [0.0, 0.1, 0.3]
    assert accs[0] == pytest.approx(ev["clean_accuracy"])
    assert accs[0] >= accs[1] >= accs[2]
    assert ev["attack"]["steps"] == 5 and ev["attack"]["restarts"] == 2 and ev["n"] == 200
    png = (tmp_path / "ev" / "accuracy_vs_eps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    res = _erc(
        [
            "export",
            str(run),
            "--name",
            "tiny",
            "--store",
            str(tmp_path / "store"),
            "--eval-n",
            "300",
            "--no-progress",
        ],
        erc_env,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    card = json.loads((tmp_path / "store" / "tiny" / "card.json").read_text())
    assert card["metrics"][0]["n"] == 300

    res = _erc(
        [
            "eval",
            "tiny",
            "--store",
            str(tmp_path / "store"),
            "--eps",
            "0.3",
            "--steps",
            "3",
            "--n",
            "100",
            "--update-card",
            "--no-progress",
        ],
        erc_env,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    card = json.loads((tmp_path / "store" / "tiny" / "card.json").read_text())
    assert [m["metric"] for m in card["metrics"]] == ["accuracy", "robust_accuracy"]
    assert card["metrics"][1]["attack"]["steps"] == 3 and card["metrics"][1]["n"] == 100

    # APGD with the DLR loss: a second figure at the same eps, steps and n, kept beside PGD's.
    store = ["--store", str(tmp_path / "store"), "--n", "100", "--no-progress"]
    res = _erc(
        [
            "eval",
            "tiny",
            *store,
            "--attack",
            "apgd",
            "--loss",
            "dlr",
            "--steps",
            "3",
            "--eps",
            "0.3",
            "--update-card",
        ],
        erc_env,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "APGD-DLR-3" in res.stdout
    card = json.loads((tmp_path / "store" / "tiny" / "card.json").read_text())
    attacks = [(m["attack"] or {}).get("name") for m in card["metrics"]]
    assert attacks == [None, "pgd", "apgd"] and card["metrics"][2]["attack"]["loss"] == "dlr"
    for bad, why in (
        (
            ["--attack", "apgd", "--loss", "margin"],
            "attack 'apgd': loss must be one of ce, dlr, got 'margin'",
        ),
        (["--attack", "pgd", "--loss", "dlr"], "attack 'pgd': loss must be one of ce, margin, got 'dlr'"),
    ):
        res = _erc(["eval", "tiny", *store, *bad], erc_env, tmp_path)
        assert res.returncode == 1 and res.stderr == f"erc: {why}\n"

    # Typicality: refit into the card, then measure it (tiny budgets: this checks the plumbing).
    where = ["--store", str(tmp_path / "store")]
    res = _erc(["typicality", "fit", "tiny", *where, "--fit-n", "500", "--fpr", "0.1"], erc_env, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fitted on 500 training embeddings" in res.stdout
    assert json.loads((tmp_path / "store" / "tiny" / "card.json").read_text())["typicality"]["fpr"] == 0.1
    out = tmp_path / "typ.json"
    args = [
        "--n",
        "200",
        "--adv-n",
        "10",
        "--steps",
        "2",
        "--eps",
        "0.3",
        "--lambdas",
        "1",
        "--out",
        str(out),
    ]
    res = _erc(["typicality", "eval", "tiny", *where, *args], erc_env, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["ood"]["dataset"] == "fashion-mnist test" and doc["ood"]["n"] == 200
    assert 0 <= doc["ood"]["mahalanobis"]["auroc"] <= 1 and 0 <= doc["measured_fpr_of_served_threshold"] <= 1
    assert [r["eps"] for r in doc["pgd"]] == [0.3] and doc["adaptive"][0]["lambda"] == 1.0
    assert doc["adaptive"][0]["all_attacked"]["n"] == 10


def test_intrinsic_dim_of_mnist_is_near_table_3(erc_env: dict, tmp_path: Path) -> None:
    out = tmp_path / "id.json"
    res = _erc(
        ["intrinsic-dim", "--dataset", "mnist", "--n", "1000", "--k", "6-12", "--out", str(out)],
        erc_env,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["n"] == 1000 and r["k1"] == 6 and r["k2"] == 12
    assert 10 <= r["estimate"] <= 16  # Table 3 reports 13 for MNIST


def test_errors_are_clear(erc_env: dict, tmp_path: Path) -> None:
    res = _erc(["train", "--set", "run.epoch=3"], erc_env, tmp_path)
    assert res.returncode != 0 and "unknown config key run.epoch" in res.stderr
    res = _erc(["eval", "no-such-model", "--store", str(tmp_path)], erc_env, tmp_path)
    assert res.returncode != 0 and "no model 'no-such-model'" in res.stderr
    res = _erc(
        ["train", "--method", "boosting", "--epochs", "1", "--out", str(tmp_path / "r")], erc_env, tmp_path
    )
    assert res.returncode != 0 and "method.name: unknown value 'boosting'" in res.stderr


def test_data_list_and_info(erc_env: dict, tmp_path: Path) -> None:
    res = _erc(["data", "list"], erc_env, tmp_path)
    lines = res.stdout.splitlines()
    assert lines[:-1] == ["mnist", "fashion-mnist", "cifar10", "stl10", "tiny-imagenet"]
    assert lines[-1].startswith("folder:PATH (your own images")
    res = _erc(["data", "info", "mnist"], erc_env, tmp_path)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["name"] == "mnist" or info.get("dataset") == "mnist"


def test_attack_arguments_parse_to_typed_values() -> None:
    from service.cli._common import attack_arg as _attack_arg

    assert _attack_arg("cw:c=1e-2,steps=50,abort_early=false,lr=0.1") == (
        "cw",
        {"c": 0.01, "steps": 50, "abort_early": False, "lr": 0.1},
    )
    assert _attack_arg("pgd:loss=margin") == ("pgd", {"loss": "margin"})
    assert _attack_arg(" fgsm ") == ("fgsm", {})
