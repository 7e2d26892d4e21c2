"""Running real TorchServe next to the service: config, start, readiness, keys, stop.

Used by the integration tests, the benchmarks and the native (container-free) stack script, so
all three run TorchServe the same way, from the shipped ``torchserve.properties``
(:mod:`service.deploy`, package data; the TorchServe image starts from it too).

Readiness is asked of the management API (a worker in state READY): TorchServe's ``/ping`` says
Healthy even while a worker crash-loops.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from service.deploy import TORCHSERVE_CONFIG, Traversable


@dataclass
class TorchServe:
    workdir: Path
    inference_url: str
    management_url: str
    metrics_url: str
    proc: subprocess.Popen[bytes] | None = None

    def keys(self) -> dict[str, str]:
        """The bearer tokens TorchServe wrote at start (token authorization is on)."""
        doc = json.loads((self.workdir / "key_file.json").read_text())
        return {"inference": doc["inference"]["key"], "management": doc["management"]["key"]}

    def inference_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()['inference']}"}

    def management_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()['management']}"}

    def model_status(self, model: str) -> list[dict[str, object]]:
        """The model's workers as the management API reports them (needs the management key)."""
        req = urllib.request.Request(
            f"{self.management_url}/models/{model}", headers=self.management_headers()
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            workers: list[dict[str, object]] = json.load(resp)[0].get("workers", [])
        return workers

    def wait_ready(self, model: str, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if (self.workdir / "key_file.json").exists():
                    workers = self.model_status(model)
                    last = str(workers)
                    if any(w.get("status") == "READY" for w in workers):
                        return
            except (OSError, urllib.error.URLError, json.JSONDecodeError, KeyError, IndexError) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise TimeoutError(
            f"TorchServe model {model} not READY in {timeout:.0f} s: {last[-500:]}\n{self.log_tail()}"
        )

    def log_tail(self, n: int = 3000) -> str:
        log = self.workdir / "torchserve.log"
        return log.read_text(errors="replace")[-n:] if log.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the whole process group, then wait until every member is gone: the launcher
        exits before the Java frontend and the Python workers it started have finished stopping."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the launcher leads its own group
        deadline = time.time() + timeout
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        while _group_alive(pgid):
            if time.time() > deadline:
                os.killpg(pgid, signal.SIGKILL)
                break
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_config(
    dest: Path,
    *,
    model_store: Path,
    models: dict[str, dict[str, int]],
    ports: tuple[int, int, int],
    host: str = "127.0.0.1",
    base: Traversable | Path = TORCHSERVE_CONFIG,
) -> Path:
    """The shipped config.properties with this run's ports, model store and model table.

    ``models`` maps a name (``NAME.mar`` in the store) to settings such as ``batchSize``,
    ``maxBatchDelay``, ``minWorkers``.
    """
    inf, mgmt, met = ports
    lines = []
    for line in base.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in {
            "inference_address",
            "management_address",
            "metrics_address",
            "model_store",
            "load_models",
            "models",
        }:
            continue
        lines.append(line)
    table = {
        name: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{name}.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": 1,
                "maxBatchDelay": 5,
                "responseTimeout": 120,
                **opts,
            }
        }
        for name, opts in models.items()
    }
    lines += [
        f"inference_address=http://{host}:{inf}",
        f"management_address=http://{host}:{mgmt}",
        f"metrics_address=http://{host}:{met}",
        f"model_store={model_store}",
        f"load_models={','.join(f'{n}.mar' for n in models)}",
        f"models={json.dumps(table)}",
    ]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(lines) + "\n")
    return dest


def start(
    workdir: Path,
    *,
    model_store: Path,
    models: dict[str, dict[str, int]],
    ports: tuple[int, int, int],
    env: dict[str, str] | None = None,
) -> TorchServe:
    """Start TorchServe in the foreground (as a child process group) with its files in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "config.properties", model_store=model_store, models=models, ports=ports)
    exe = shutil.which("torchserve") or str(Path(sys.executable).with_name("torchserve"))
    bin_dir = str(Path(sys.executable).parent)
    environ = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "LOG_LOCATION": str(workdir / "logs"),
        "METRICS_LOCATION": str(workdir / "logs"),
        **(env or {}),
    }
    log = (workdir / "torchserve.log").open("wb")
    proc = subprocess.Popen(
        [
            exe,
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(config),
            "--model-store",
            str(model_store),
        ],
        cwd=workdir,
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    inf, mgmt, met = ports
    return TorchServe(
        workdir, f"http://127.0.0.1:{inf}", f"http://127.0.0.1:{mgmt}", f"http://127.0.0.1:{met}", proc
    )


def java_available() -> bool:
    java = shutil.which("java")
    if java is None:
        return False
    out = subprocess.run([java, "-version"], capture_output=True, text=True)
    m = re.search(r'version "(\d+)', out.stderr + out.stdout)
    return bool(m and int(m.group(1)) >= 11)
