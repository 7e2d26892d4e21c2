"""The scheduler of ``run``: time the training step on the idle GPU (``bench/train.py``), plan the
default model's epochs from it, then run the workers side by side (under NVIDIA MPS when it
starts) until the deadline; optionally pack the results."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from experiments.mnist_reproduction.packing import pack
from experiments.mnist_reproduction.plan import SCALES, plan
from experiments.mnist_reproduction.worker import REPO, write_json

log = logging.getLogger("reproduce")


def env_report(out: Path) -> dict[str, Any]:
    import platform

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cuda": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
        "cpus": os.cpu_count(),
    }
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout
    write_json(out / "env.json", env)
    return env


def start_mps() -> bool:
    """NVIDIA MPS lets the workers' kernels share the GPU instead of time-slicing it. Started only
    if the daemon exists and a CUDA process then works; otherwise left off."""
    if not shutil.which("nvidia-cuda-mps-control"):
        return False
    try:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True, timeout=20)
        probe = subprocess.run(
            [sys.executable, "-c", "import torch; x = torch.ones(4, device='cuda'); print(float(x.sum()))"],
            capture_output=True,
            text=True,
            timeout=90,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "4.0":
            return True
        log.warning("MPS probe failed: %s", probe.stderr[-500:])
    except (subprocess.SubprocessError, OSError) as exc:
        log.warning("MPS not started: %s", exc)
    stop_mps()
    return False


def stop_mps() -> None:
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, timeout=20)


def main_epochs(bench: dict[str, Any] | None, window_s: float, mps: bool) -> int | None:
    """Epochs of the default model that fit ``window_s`` beside the other workers, from the
    measured seconds per epoch of its configuration (None: keep the plan's)."""
    if not bench:
        return None
    rows = [r for r in bench.get("results", []) if r["variant"] == "bf16-cl-compile" and r["batch"] == 256]
    if not rows:
        return None
    contention = 2.0 if mps else 3.0
    per_epoch = rows[0]["s_per_epoch"] * contention + 1.0  # + the per-epoch evaluation
    return int(max(8, min(60, math.floor(window_s / per_epoch))))


def run_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s scheduler %(levelname)s %(message)s")
    t_start = time.time()
    deadline = t_start + args.budget_s
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = env_report(out)
    cuda = bool(env["cuda"])
    state: dict[str, Any] = {"started": t_start, "budget_s": args.budget_s, "scale": args.scale}
    state["mps"] = start_mps() if cuda and args.mps else False
    log.info("env: %s, torch %s, MPS %s", env["device_name"], env["torch"], state["mps"])
    bench = None
    if args.bench and cuda:
        t0 = time.time()
        bench_out = out / "bench_train.json"
        cmd = [sys.executable, str(REPO / "bench/train.py"), "--device", "cuda", "--out", str(bench_out)]
        cmd += ["--variants", "fp32-eager:128,bf16-cl:256,bf16-cl:512,bf16-cl-compile:256"]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        try:
            subprocess.run(cmd, timeout=args.bench_timeout_s, check=True)
            bench = json.loads(bench_out.read_text())
        except (subprocess.SubprocessError, OSError, json.JSONDecodeError) as exc:
            log.warning("bench/train.py failed: %s", exc)
        state["bench_seconds"] = round(time.time() - t0, 1)
    main_window = deadline - time.time() - 170.0 - 25.0
    epochs = args.main_epochs or main_epochs(bench, main_window, state["mps"])
    state["main_epochs"] = epochs
    log.info("default model: %s epochs planned (window %.0f s)", epochs, main_window)
    workers = list(plan(SCALES[args.scale], epochs, args.init_from))
    if args.workers:
        workers = [w for w in workers if w in args.workers.split(",")]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    env_vars = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for w in workers:
        cmd = [sys.executable, "-m", "experiments.mnist_reproduction", "worker", w, "--out", str(out)]
        cmd += ["--scale", args.scale, "--deadline", str(deadline - 25.0)]
        if epochs:
            cmd += ["--main-epochs", str(epochs)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        if args.only:
            cmd += ["--only", args.only]
        if args.init_from:
            cmd += ["--init-from", args.init_from]
        logf = open(out / f"worker-{w}.log", "wb")  # noqa: SIM115 - closed with the process
        procs[w] = subprocess.Popen(cmd, cwd=REPO, env=env_vars, stdout=logf, stderr=subprocess.STDOUT)
    state["workers"] = workers
    write_json(out / "scheduler.json", state)
    while procs and time.time() < deadline - 20.0:
        for w, p in list(procs.items()):
            if p.poll() is not None:
                log.info("worker %s finished (rc %s) at +%.0f s", w, p.returncode, time.time() - t_start)
                state.setdefault("finished", {})[w] = {
                    "rc": p.returncode,
                    "at_s": round(time.time() - t_start),
                }
                del procs[w]
        time.sleep(1.0)
    for w, p in procs.items():
        log.warning("worker %s still running at the deadline: stopped", w)
        p.send_signal(signal.SIGTERM)
        state.setdefault("finished", {})[w] = {"rc": "stopped at deadline"}
    for p in procs.values():
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
    if state["mps"]:
        stop_mps()
    state["seconds"] = round(time.time() - t_start, 1)
    write_json(out / "scheduler.json", state)
    if args.pack:
        pack(out, Path(args.pack))
    return 0
