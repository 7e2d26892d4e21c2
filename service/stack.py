"""The deployment stack without containers, for quick local runs: the API (``erc serve``),
TorchServe serving the same model, and Debian's ``prometheus`` scraping both, all on 127.0.0.1,
from the same config files as docker-compose (``docker/torchserve/config.properties``,
``docker/prometheus/prometheus.yml``; only addresses and ports differ).

    erc stack --store model_store --model mnist-er        # Ctrl-C stops everything
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from service import torchserve
from service.launch import REPO, ServerProcess, free_port, http_status, start_server
from service.packaging import package_model
from training.card import read_card

log = logging.getLogger(__name__)

PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
JOB_TARGETS = {"erc-api": "api", "torchserve": "torchserve"}


def prometheus_config(dest: Path, targets: dict[str, str], base: Path = PROMETHEUS_CONFIG) -> Path:
    """The compose Prometheus config with each job's targets replaced (``{"erc-api": "host:port"}``)."""
    doc = yaml.safe_load(base.read_text())
    for job in doc["scrape_configs"]:
        if job["job_name"] in targets:
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


@dataclass
class NativeStack:
    workdir: Path
    api: ServerProcess | None = None
    torchserve: torchserve.TorchServe | None = None
    prometheus: subprocess.Popen[bytes] | None = None
    prometheus_url: str = ""
    started: dict[str, float] = field(default_factory=dict)

    def stop(self) -> None:
        if self.prometheus is not None and self.prometheus.poll() is None:
            self.prometheus.send_signal(signal.SIGTERM)
            try:
                self.prometheus.wait(20)
            except subprocess.TimeoutExpired:
                self.prometheus.kill()
        if self.torchserve is not None:
            self.torchserve.stop()
        if self.api is not None:
            self.api.stop()


def start_stack(store: Path, model: str, workdir: Path | None = None, **api_env: str) -> NativeStack:
    """Start the three services; returns when all are ready (API /readyz, a READY TorchServe
    worker, Prometheus /-/ready). Stops whatever started if any of them fails."""
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        raise FileNotFoundError("prometheus is not installed: apt-get install prometheus")
    read_card(store / model)  # a missing or bad model fails here, before anything starts
    workdir = workdir or Path(tempfile.mkdtemp(prefix="erc-stack-"))
    stack = NativeStack(workdir)
    try:
        t0 = time.perf_counter()
        stack.api = start_server(store, workdir / "api.log", env={"ERC_DEFAULT_MODEL": model, **api_env})
        stack.started["api_s"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        mar_store = workdir / "mar"
        package_model(store, model, out_dir=mar_store)
        ports = (free_port(), free_port(), free_port())
        stack.torchserve = torchserve.start(
            workdir / "torchserve",
            model_store=mar_store,
            models={model: {"batchSize": 32, "maxBatchDelay": 5}},
            ports=ports,
        )
        stack.torchserve.wait_ready(model)
        stack.started["torchserve_s"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        api_port = stack.api.url.rsplit(":", 1)[1]
        config = prometheus_config(
            workdir / "prometheus.yml",
            {"erc-api": f"127.0.0.1:{api_port}", "torchserve": f"127.0.0.1:{ports[2]}"},
        )
        prom_port = free_port()
        stack.prometheus_url = f"http://127.0.0.1:{prom_port}"
        stack.prometheus = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=(workdir / "prometheus.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.perf_counter() + 60
        while http_status(stack.prometheus_url + "/-/ready") != 200:
            if stack.prometheus.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(
                    f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)
        stack.started["prometheus_s"] = round(time.perf_counter() - t0, 2)
    except BaseException:
        stack.stop()
        raise
    return stack
