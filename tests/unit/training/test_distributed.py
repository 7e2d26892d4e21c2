"""The DDP weight-sync check must be able to say "no": two gloo ranks with equal and unequal weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from training.distributed import DistInfo, weights_in_sync


def test_weights_in_sync_detects_divergence(erc_env: dict) -> None:
    script = Path(__file__).with_name("sync_worker.py")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env=erc_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [True, False, False]


def test_single_process_is_trivially_in_sync() -> None:
    assert weights_in_sync(torch.nn.Linear(2, 2), DistInfo())
