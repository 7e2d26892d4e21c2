"""The training loop end to end on real MNIST subsets (CPU): learning, logging, resume after
kill -9, and DistributedDataParallel with two gloo processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.config import load_config
from training.distributed import DistInfo
from training.train import crop_flip, epoch_batches, run_training

SMALL = {
    "model.width": 0.25,
    "data.train_subset": 3000,
    "data.eval_subset": 1000,
    "data.batch_size": 64,
    "run.progress": False,
}


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_short_cpu_training_learns(tmp_path: Path) -> None:
    cfg = load_config(
        overrides={
            **SMALL,
            "method.name": "er",
            "adv.steps": 3,
            "adv.eps": 0.1,
            "run.epochs": 2,
            "run.eval_adv_n": 100,
            "run.out_dir": str(tmp_path / "run"),
        }
    )
    summary = run_training(cfg)
    log = _lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[-1]["test_acc"] > 0.6, log[-1]  # chance is 0.1
    assert 0 <= log[-1]["robust_acc"] <= log[-1]["test_acc"]
    assert "PGD-20" in log[-1]["robust_attack"]
    assert {"critic_gap", "loss", "acc", "enc_score"} <= set(log[-1]["train"])
    assert summary["last"]["epoch"] == 2 and summary["params_in_sync"]
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 2 and set(state["state"]["modules"]) == {"model", "discriminator"}
    assert state["config"]["model"]["width"] == 0.25


def _train_cmd(out: Path, epochs: int, extra: list[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "service.cli",
        "train",
        "--method",
        "er-minus",
        "--width",
        "0.25",
        "--train-subset",
        "6000",
        "--eval-subset",
        "200",
        "--batch-size",
        "50",
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
        *extra,
    ]


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path: Path, erc_env: dict) -> None:
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, 3), check=True, env=erc_env, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(killed, 3),
        env=erc_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    metrics = killed / "metrics.jsonl"
    # Kill in the middle of epoch 2: after epoch 1's checkpoint exists.
    while time.time() < deadline and not (metrics.exists() and (killed / "checkpoint.pt").exists()):
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = load_checkpoint(killed / "checkpoint.pt")["epoch"]
    assert done in (1, 2), f"kill landed after epoch {done}; the test needs it mid-run"

    subprocess.run(
        _train_cmd(killed, 3, ["--resume"]), check=True, env=erc_env, capture_output=True, timeout=600
    )
    log = _lines(metrics)
    assert [r["epoch"] for r in log] == [1, 2, 3], "each epoch logged exactly once"
    a = load_checkpoint(straight / "checkpoint.pt")
    b = load_checkpoint(killed / "checkpoint.pt")
    assert b["epoch"] == 3
    for k, v in a["state"]["modules"]["model"].items():
        assert torch.equal(v, b["state"]["modules"]["model"][k]), f"{k} differs after resume"
    assert [r["test_acc"] for r in _lines(straight / "metrics.jsonl")] == [r["test_acc"] for r in log]


def test_ddp_two_gloo_processes(tmp_path: Path, erc_env: dict) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "service.cli",
        "train",
        "--method",
        "er",
        "--pgd-steps",
        "2",
        "--width",
        "0.125",
        "--train-subset",
        "1200",
        "--eval-subset",
        "300",
        "--batch-size",
        "60",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
    ]
    env = {**erc_env, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["params_in_sync"] is True
    # The workers leave with os._exit (training.distributed.exit_worker): rank 0's line still arrives.
    assert json.loads(res.stdout.strip().splitlines()[-1]) == summary
    log = _lines(out / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [1, 2] and all(r["world_size"] == 2 for r in log)
    assert log[-1]["test_n"] == 300, "evaluation shards cover the whole eval subset once"


def test_epoch_batches_shard_one_permutation() -> None:
    d0 = list(epoch_batches(100, 20, epoch=3, seed=1, dist=DistInfo(0, 2, 0)))
    d1 = list(epoch_batches(100, 20, epoch=3, seed=1, dist=DistInfo(1, 2, 0)))
    assert len(d0) == len(d1) == 5 and all(len(b) == 10 for b in d0)
    seen = torch.cat(d0 + d1)
    assert sorted(seen.tolist()) == list(range(100)), "ranks see disjoint halves of every batch"
    again = list(epoch_batches(100, 20, epoch=3, seed=1, dist=DistInfo(0, 2, 0)))
    assert all(torch.equal(a, b) for a, b in zip(d0, again, strict=True))
    other = list(epoch_batches(100, 20, epoch=4, seed=1, dist=DistInfo(0, 2, 0)))
    assert not all(torch.equal(a, b) for a, b in zip(d0, other, strict=True))
    with pytest.raises(ValueError, match="divisible"):
        list(epoch_batches(100, 21, epoch=0, seed=0, dist=DistInfo(0, 2, 0)))


def test_crop_flip_keeps_shape_and_content() -> None:
    x = torch.rand(8, 3, 32, 32)
    y = crop_flip(x)
    assert y.shape == x.shape
    # Each output is a shifted (and maybe mirrored) copy: its centre pixels come from the input.
    assert torch.isin(y[:, :, 8:24, 8:24].flatten(), x.flatten()).all()


def test_time_limit_stops_between_epochs(tmp_path: Path) -> None:
    """An epoch that would end past ``run.time_limit_s`` is not started; the summary says why."""
    cfg = load_config(
        overrides={
            **SMALL,
            "data.train_subset": 640,
            "data.eval_subset": 100,
            "method.name": "e-cla",
            "run.epochs": 5,
            "run.time_limit_s": 0.05,
            "run.out_dir": str(tmp_path / "run"),
        }
    )
    summary = run_training(cfg)
    assert summary["epochs_done"] == 1 and summary["epochs"] == 5
    assert "time limit" in summary["stopped_early"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in _lines(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_init_from_a_run_or_a_store_model(tmp_path: Path) -> None:
    """``run.init_from`` starts a run from another run's (or a stored model's) network weights, with
    fresh optimizers; a different architecture is refused by name."""
    from training.export import export_run
    from training.methods import create_method
    from training.train import Trainer, initial_weights

    base = {**SMALL, "data.train_subset": 320, "data.eval_subset": 50, "method.name": "er-minus"}
    run_training(load_config(overrides={**base, "run.epochs": 1, "run.out_dir": str(tmp_path / "a")}))
    saved = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["state"]["modules"]["model"]
    cfg = load_config(
        overrides={**base, "run.init_from": str(tmp_path / "a"), "run.out_dir": str(tmp_path / "b")}
    )
    trainer = Trainer(cfg, DistInfo(), torch.device("cpu"))
    now = trainer.method.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())
    assert all(not s for s in (o.state for o in trainer.method.optimizers.values()))

    store = export_run(tmp_path / "a", "m", tmp_path / "store", dtype="float16", eval_n=50, device="cpu")
    from_store = initial_weights(str(store), trainer.method)
    assert all(
        torch.allclose(from_store[k], v.float(), atol=1e-2) for k, v in saved.items() if v.is_floating_point()
    )

    other = load_config(overrides={**base, "model.embed_dim": 8})
    method = create_method(other, trainer.info, torch.device("cpu"))
    with pytest.raises(ValueError, match="this run builds"):
        initial_weights(str(tmp_path / "a"), method)
    with pytest.raises(ValueError, match="neither"):
        initial_weights(str(tmp_path), method)
