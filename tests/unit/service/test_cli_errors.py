"""Every ``erc`` subcommand fails cleanly: a missing model, dataset, store or run directory gives
one line ``erc: ...`` on stderr and exit code 1 (the library's errors share one base, caught once in
``main``), never a traceback; and every (attack, norm) pair either runs in that norm or is refused,
in ``erc eval`` and ``erc audit`` alike."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from service.cli import main
from training.attacks import ATTACKS, list_attacks
from training.attacks.catalog import NORMS

NOWHERE = "/nonexistent-erc-test"
# subcommand arguments -> what the one line must say
CASES = {
    "eval-model": (["eval", "nope", "--store", "{store}"], "no model 'nope'"),
    "eval-data": (
        ["eval", "tiny", "--store", "{store}", "--dataset", "cifar10", "--data-dir", NOWHERE],
        "cifar10",
    ),
    "audit-model": (["audit", "nope", "--store", "{store}"], "no model 'nope'"),
    "audit-data": (
        ["audit", "tiny", "--store", "{store}", "--dataset", "cifar10", "--data-dir", NOWHERE],
        "cifar10",
    ),
    "typicality-model": (["typicality", "fit", "nope", "--store", "{store}"], "no model 'nope'"),
    "typicality-data": (["typicality", "fit", "tiny", "--store", "{store}", "--data-dir", NOWHERE], "mnist"),
    "intrinsic-dim-data": (["intrinsic-dim", "--dataset", "cifar10", "--data-dir", NOWHERE], "cifar10"),
    "train-data": (["train", "--dataset", "cifar10", "--data-dir", NOWHERE, "--out", "{tmp}/run"], "cifar10"),
    "export-run": (["export", NOWHERE, "--name", "x", "--store", "{tmp}/store"], "not a training run"),
    "package-model": (["package", "nope", "--store", "{store}"], "no card"),
    "serve-store": (["serve", "--store", NOWHERE], "model store"),
    "stack-model": (["stack", "--store", "{store}", "--model", "nope"], "no card"),
    "data-name": (["data", "info", "nope"], "unknown dataset 'nope'"),
    "download-name": (["data", "download", "nope", "--data-dir", "{tmp}/d"], "unknown dataset 'nope'"),
    "device": (["eval", "tiny", "--store", "{store}", "--device", "cuda:7"], "device 'cuda:7'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_line_and_a_nonzero_exit(case: str, model_store: Path, erc_env: dict, tmp_path: Path) -> None:
    args, says = CASES[case]
    argv = [a.format(store=model_store, tmp=tmp_path) for a in args]
    exe = shutil.which("erc", path=erc_env["PATH"])
    assert exe
    res = subprocess.run([exe, *argv], env=erc_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = res.stderr.splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("erc: "), res.stderr[-2000:]
    assert says in lines[0] and "Traceback" not in res.stderr
    assert res.stdout == ""


# Cheap settings per attack: the point is which norm runs, not the figure.
CHEAP = {
    "pgd": "pgd:steps=2",
    "fgsm": "fgsm",
    "apgd": "apgd:steps=2",
    "apgd-t": "apgd-t:steps=2,n_target_classes=1",
    "fab-t": "fab-t:steps=2,n_target_classes=1",
    "square": "square:queries=10",
    "cw": "cw:steps=2,binary_steps=1",
}
EPS = {"linf": 0.2, "l2": 1.5}


def test_cheap_settings_cover_every_public_attack() -> None:
    assert set(CHEAP) == set(list_attacks())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", sorted(CHEAP))
def test_eval_and_audit_run_the_norm_asked_for_or_refuse(
    name: str, norm: str, model_store: Path, tmp_path: Path, capsys
) -> None:
    common = ["tiny", "--store", str(model_store), "--attack", CHEAP[name], "--norm", norm, "--device", "cpu"]
    common += ["--n", "8", "--eps", f"0,{EPS[norm]}", "--no-progress"]
    ev = main(["eval", *common, "--out", str(tmp_path / "eval")])
    au = main(["audit", *common, "--no-checks", "--out", str(tmp_path / "audit")])
    err = capsys.readouterr().err
    if norm not in ATTACKS[name].norms:
        assert ev == au == 1
        assert err.count(f"erc: attack '{name}' works in {'/'.join(ATTACKS[name].norms)}, not {norm}") == 2
        assert not (tmp_path / "eval").exists() and not (tmp_path / "audit").exists()
        return
    assert ev == au == 0, err[-2000:]
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["attack"]["norm"] == norm and evaluated["attack"]["name"] == name
    assert all(m["norm"] == norm for m in evaluated["metrics"])
    audited = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audited["settings"]["norm"] == norm
    assert [a["name"] for a in audited["settings"]["attacks"]] == [name]
    if "norm" in audited["settings"]["attacks"][0]["params"]:
        assert audited["settings"]["attacks"][0]["params"]["norm"] == norm


def test_audit_default_attacks_follow_the_norm(model_store: Path, tmp_path: Path) -> None:
    """Without --attack, an l2 audit runs the default attacks that implement l2 (not FGSM)."""
    argv = ["audit", "tiny", "--store", str(model_store), "--norm", "l2", "--steps", "2", "--n", "8"]
    assert main([*argv, "--no-checks", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]) == 0
    audited = json.loads((tmp_path / "audit.json").read_text())
    assert [a["label"] for a in audited["settings"]["attacks"]] == ["PGD-2", "APGD-CE-2"]
