"""The deployment stack without containers, for quick local runs, in the same topology as
docker-compose: API replicas (``erc serve``) behind nginx, ``erc audit-worker`` processes sharing
a job store (a private PostgreSQL cluster from Debian's package, or a SQLite file), TorchServe
serving the same model, and Debian's ``prometheus`` scraping every replica, every worker and
TorchServe, all on 127.0.0.1, from the same config files as docker-compose (package data,
:mod:`service.deploy`: ``nginx.conf``, ``torchserve.properties``, ``prometheus.yml``; only
addresses and ports differ).

    erc stack --store model_store --model mnist-er --replicas 2 --workers 1   # Ctrl-C stops it
"""

from __future__ import annotations

import logging
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from service import torchserve
from service.deploy import NGINX_CONFIG, PROMETHEUS_CONFIG, Traversable
from service.launch import ServerProcess, free_port, http_status, start_server, start_worker
from service.packaging import package_model
from service.postgres import Postgres, start_postgres
from training.card import read_card

log = logging.getLogger(__name__)

__all__ = [
    "NGINX_CONFIG",
    "PROMETHEUS_CONFIG",
    "NativeStack",
    "nginx_config",
    "prometheus_config",
    "start_stack",
]


def prometheus_config(
    dest: Path, targets: dict[str, list[str]], base: Traversable | Path = PROMETHEUS_CONFIG
) -> Path:
    """The compose Prometheus config with each named job's discovery replaced by static targets
    (``{"erc-api": ["host:port", ...]}``); everything else is kept."""
    doc = yaml.safe_load(base.read_text())
    for job in doc["scrape_configs"]:
        if job["job_name"] in targets:
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": list(targets[job["job_name"]])}]
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def nginx_config(
    dest: Path, upstreams: list[str], listen: str, rundir: Path, base: Traversable | Path = NGINX_CONFIG
) -> Path:
    """The compose proxy's nginx config with loopback upstreams, address and scratch folder."""
    text = base.read_text()
    text = text.replace("@SERVERS@", "\n        ".join(f"server {u};" for u in upstreams))
    text = text.replace("@LISTEN@", listen).replace("@RUNDIR@", str(rundir))
    dest.write_text(text)
    return dest


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_http(
    url: str, proc: subprocess.Popen[bytes], log_file: Path, what: str, timeout: float = 60
) -> None:
    deadline = time.perf_counter() + timeout
    while http_status(url) != 200:
        if proc.poll() is not None or time.perf_counter() > deadline:
            raise RuntimeError(f"{what} did not start: {log_file.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)


@dataclass
class NativeStack:
    workdir: Path
    admin_token: str = ""
    audit_db: str = ""
    apis: list[ServerProcess] = field(default_factory=list)
    workers: list[ServerProcess] = field(default_factory=list)
    postgres: Postgres | None = None
    proxy: subprocess.Popen[bytes] | None = None
    url: str = ""  # the proxy: where clients go
    torchserve: torchserve.TorchServe | None = None
    prometheus: subprocess.Popen[bytes] | None = None
    prometheus_url: str = ""
    started: dict[str, float] = field(default_factory=dict)

    def stop(self) -> None:
        _stop_process(self.prometheus)
        if self.torchserve is not None:
            self.torchserve.stop()
        _stop_process(self.proxy)
        for p in [*self.apis, *self.workers]:
            p.stop()
        if self.postgres is not None:
            self.postgres.destroy()


def _audit_db(db: str, workdir: Path, stack: NativeStack) -> str:
    """``auto``: PostgreSQL when Debian's server is installed, else SQLite; ``postgresql`` or
    ``sqlite``: that engine, private to the stack; anything else is taken as a URL."""
    from service.postgres import PostgresUnavailable, bindir

    if db == "auto":
        try:
            bindir()
            db = "postgresql"
        except PostgresUnavailable:
            db = "sqlite"
    if db == "postgresql":
        stack.postgres = start_postgres()
        return stack.postgres.url
    if db == "sqlite":
        return f"sqlite:///{workdir / 'audits.db'}"
    return db


def start_stack(
    store: Path,
    model: str,
    workdir: Path | None = None,
    *,
    replicas: int = 2,
    workers: int = 1,
    db: str = "auto",
    **env: str,
) -> NativeStack:
    """Start the stack; returns when every part is ready (API /readyz, workers' metrics, nginx,
    a READY TorchServe worker, Prometheus /-/ready). Stops whatever started if any part fails.
    ``env`` adds ERC_* settings to the replicas and workers; without ``ERC_ADMIN_TOKEN`` one is
    generated (``stack.admin_token``)."""
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        raise FileNotFoundError("prometheus is not installed: apt-get install prometheus")
    nginx_bin = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx_bin is None:
        raise FileNotFoundError("nginx is not installed: apt-get install nginx")
    read_card(store / model)  # a missing or bad model fails here, before anything starts
    workdir = workdir or Path(tempfile.mkdtemp(prefix="erc-stack-"))
    stack = NativeStack(workdir, admin_token=env.get("ERC_ADMIN_TOKEN") or secrets.token_urlsafe(24))
    try:
        t0 = time.perf_counter()
        stack.audit_db = _audit_db(db, workdir, stack)
        stack.started["job_store_s"] = round(time.perf_counter() - t0, 2)
        common = {
            "ERC_DEFAULT_MODEL": model,
            "ERC_ADMIN_TOKEN": stack.admin_token,
            "ERC_AUDIT_DB": stack.audit_db,
            "ERC_AUDIT_LOCAL_WORKER": "off",
            **env,
        }
        t0 = time.perf_counter()
        for i in range(replicas):
            stack.apis.append(start_server(store, workdir / f"api-{i}.log", env=common))
        stack.started["api_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        for i in range(workers):
            stack.workers.append(start_worker(store, workdir / f"audit-worker-{i}.log", env=common))
        stack.started["audit_workers_s"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        proxy_port = free_port()
        rundir = workdir / "nginx"
        rundir.mkdir(exist_ok=True)
        upstreams = [a.url.removeprefix("http://") for a in stack.apis]
        conf = nginx_config(workdir / "nginx.conf", upstreams, f"127.0.0.1:{proxy_port}", rundir)
        stack.proxy = subprocess.Popen(
            [nginx_bin, "-e", "stderr", "-c", str(conf)],
            stdout=(workdir / "nginx.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        stack.url = f"http://127.0.0.1:{proxy_port}"
        _wait_http(stack.url + "/readyz", stack.proxy, workdir / "nginx.log", "nginx")
        stack.started["proxy_s"] = round(time.perf_counter() - t0, 2)

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
        config = prometheus_config(
            workdir / "prometheus.yml",
            {
                "erc-api": [a.url.removeprefix("http://") for a in stack.apis],
                "erc-audit-worker": [w.url.removeprefix("http://") for w in stack.workers],
                "torchserve": [f"127.0.0.1:{ports[2]}"],
            },
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
        _wait_http(
            stack.prometheus_url + "/-/ready", stack.prometheus, workdir / "prometheus.log", "prometheus"
        )
        stack.started["prometheus_s"] = round(time.perf_counter() - t0, 2)
    except BaseException:
        stack.stop()
        raise
    return stack
