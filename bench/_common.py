"""Helpers shared by the benchmarks: a model to serve, servers as subprocesses, wrk load, RSS.

Benchmarks are bounded and loopback-only. Each prints human-readable lines and, last, one JSON
line with every figure it measured.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.launch import ServerProcess, free_port, start_server, start_worker  # noqa: E402, F401
from training.card import ModelCard, StagedModel, load_model  # noqa: E402
from training.data import dataset_info, load_split  # noqa: E402
from training.models import create_model  # noqa: E402


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def bench_model(store: Path, name: str) -> tuple[Path, str]:
    """``store/name`` when it exists; else an untrained paper-size MNIST ER-Classifier (Figure 9,
    11.2 M parameters) written to a temporary store: throughput does not depend on the weights."""
    if (store / name / "card.json").exists():
        return store, f"{name} from {store}"
    tmp = Path(tempfile.mkdtemp(prefix="erc-bench-store-"))
    torch.manual_seed(0)
    model = create_model("er_mnist").eval()
    info = dataset_info("mnist")
    stage = StagedModel(tmp, name)
    sha = stage.write_weights(model, "float32")
    card = ModelCard(
        name=name,
        arch="er_mnist",
        arch_kwargs={"num_classes": 10, "width": 1.0},
        dataset="mnist",
        input_shape=list(info.shape),
        label_names=list(info.label_names),
        embed_dim=4,
        prior="gaussian",
        method="untrained",
        weights_sha256=sha,
        num_parameters=sum(p.numel() for p in model.parameters()),
        notes="untrained weights for throughput benchmarks only",
    )
    stage.commit(card)
    return tmp, f"untrained er_mnist (paper size) in {tmp}"


def mnist_pngs(n: int) -> tuple[list[bytes], np.ndarray]:
    test = load_split("mnist", "test", n=n, seed=7)
    out = []
    for img in test.images[:, 0].numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, test.images.numpy()


def _tree(pid: int | list[int]) -> list[int]:
    """``pid`` (or each of several) and all its descendants."""
    roots = pid if isinstance(pid, list) else [pid]
    return [p for root in roots for p in (root, *children(root))]


def _proc_bytes(pid: int | list[int], file: str, field: str, *, tree: bool = True) -> int:
    total = 0
    for p in _tree(pid) if tree else ([pid] if isinstance(pid, int) else pid):
        try:
            with open(f"/proc/{p}/{file}") as fh:
                m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE)
                total += int(m.group(1)) * 1024 if m else 0
        except FileNotFoundError:
            pass
    return total


def rss_bytes(pid: int | list[int], *, tree: bool = True) -> int:
    """Resident memory of a process tree (or of the processes alone), each process counted whole:
    pages that several of its processes share (torch's libraries, mapped by each) are counted once
    per process."""
    return _proc_bytes(pid, "status", "VmRSS", tree=tree)


def pss_bytes(pid: int | list[int], *, tree: bool = True) -> int:
    """Proportional set size of a process tree (or of the processes alone): each shared page split
    among the processes that map it, so the sum is the memory the tree really holds (what a host
    sizing needs)."""
    return _proc_bytes(pid, "smaps_rollup", "Pss", tree=tree)


def children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    except FileNotFoundError:
        return []
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in children(k)]


class RssSampler:
    """Peak RSS (or, with ``reader=pss_bytes``, PSS) of a process tree, sampled every ``interval``
    seconds in a thread."""

    def __init__(
        self,
        pid: int | list[int],
        interval: float = 0.5,
        reader: Callable[[int | list[int]], int] = rss_bytes,
    ) -> None:
        self.pid, self.interval, self.peak, self.reader = pid, interval, 0, reader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.reader(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _thread_cpu(pid: int | list[int]) -> dict[tuple[int, int], tuple[str, float]]:
    """CPU seconds (user + system) of every thread of ``pid`` and its descendants:
    (process id, thread id) -> (process name, seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for p in _tree(pid):
        try:
            comm = Path(f"/proc/{p}/comm").read_text().strip()
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{p}/task/{tid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses
            out[(p, int(tid))] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    return out


class CpuMeter:
    """Where the CPU went during a load run: seconds of CPU per request, split by consumer.

    The server's process tree is read from /proc per thread; the main thread of each of
    ``loop_pids`` (``erc serve`` processes: the thread running the event loop) is reported apart
    from their other threads (the inference thread and torch's OpenMP threads); other processes by
    name (TorchServe: ``java`` frontend, ``python`` workers). The load generator is this process's
    waited-for children (wrk). ``idle`` is what is left of all cores over the run's wall time.
    """

    def __init__(
        self, pid: int | list[int], loop_pids: tuple[int, ...] = (), model_pids: tuple[int, ...] = ()
    ) -> None:
        self.pid, self.loop_pids, self.model_pids = pid, loop_pids, model_pids

    def __enter__(self) -> CpuMeter:
        self._t0 = time.perf_counter()
        self._threads0 = _thread_cpu(self.pid)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._wrk0 = ru.ru_utime + ru.ru_stime
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        after = _thread_cpu(self.pid)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.split: dict[str, float] = {"load_generator": ru.ru_utime + ru.ru_stime - self._wrk0}
        for (p, tid), (comm, secs) in after.items():
            used = secs - self._threads0.get((p, tid), (comm, 0.0))[1]
            key = comm  # erc serve: the event loop's thread apart from the others
            if p in self.loop_pids:
                key = (
                    "event_loop" if tid == p else ("http_threads" if self.model_pids else "inference_threads")
                )
            elif p in self.model_pids:  # erc serve's model process: its socket loop, its batcher
                key = "model_process_loop" if tid == p else "inference_threads"
            self.split[key] = self.split.get(key, 0.0) + used

    def per_request_ms(self, requests: int) -> dict[str, float]:
        capacity = self.wall * (os.cpu_count() or 1)
        used = sum(self.split.values())
        out = {k: round(v / requests * 1e3, 3) for k, v in sorted(self.split.items())}
        out["idle"] = round(max(0.0, capacity - used) / requests * 1e3, 3)
        return out


def process_roles(pid: int) -> dict[int, str]:
    """The children of an ``erc serve`` supervisor by role (``model``, ``http-1``, ...)."""
    roles = {}
    for child in children(pid):
        try:
            with open(f"/proc/{child}/environ", "rb") as fh:
                env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
        except FileNotFoundError:
            continue
        role = env.get(b"ERC_PROCESS_ROLE")
        if role:
            roles[child] = role.decode()
    return roles


def start_erc(store: Path, env: dict[str, str], log_dir: Path) -> ServerProcess:
    return start_server(store, log_dir / "erc-serve.log", env=env)


def start_audit_server(
    store: Path, model: str, token: str, threads: int, extra_env: list[str], *, worker: bool = False
) -> tuple[ServerProcess, ServerProcess | None]:
    """``erc serve`` of one model with the admin routes on (``token``) and no audit size limit;
    ``extra_env`` holds ``KEY=VALUE`` settings from the command line. ``worker``: audits run on a
    separate ``erc audit-worker`` process (returned second) instead of the API's own child."""
    workdir = Path(tempfile.mkdtemp(prefix="erc-bench-"))
    env = {
        "ERC_ADMIN_TOKEN": token,
        "ERC_MODELS": model,
        "ERC_DEFAULT_MODEL": model,
        "ERC_AUDIT_DB": f"sqlite:///{workdir}/audits.db",
        "ERC_AUDIT_LOCAL_WORKER": "off" if worker else "on",
        "ERC_AUDIT_MAX_WORK": "1e9",
        "ERC_TORCH_THREADS": str(threads),
        **dict(kv.split("=", 1) for kv in extra_env),
    }
    srv = start_erc(store, env, workdir)
    if not worker:
        return srv, None
    try:
        return srv, start_worker(store, workdir / "audit-worker.log", env=env)
    except BaseException:
        srv.stop()
        raise


# The background audit of the "while an audit runs" measurements: long enough to outlast them.
BACKGROUND_AUDIT = {
    "data": {"n": 1000},
    "eps": [0.1, 0.2, 0.3],
    "attacks": [{"name": "pgd", "params": {"steps": 100}}],
    "checks": False,
}


def start_background_audit(client: Any, model: str, timeout: float = 120) -> str:
    """POST ``BACKGROUND_AUDIT`` with ``client`` (an httpx client carrying the token) and wait until
    the audit process is attacking (progress above zero); returns the audit id."""
    r = client.post("/admin/audits", json={"model": model, **BACKGROUND_AUDIT})
    r.raise_for_status()
    audit_id: str = r.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = client.get(f"/admin/audits/{audit_id}").json().get("progress") or {}
        if progress.get("fraction", 0) > 0:
            break
        time.sleep(0.2)
    return audit_id


WRK_SCRIPT = r"""
local reqs = {}
local path, auth = "%(path)s", "%(auth)s"
local i = 0
function init(args)
  local headers = {["Content-Type"] = "image/png"}
  if auth ~= "" then headers["Authorization"] = auth end
  for n = 0, %(count)d - 1 do
    local f = io.open(string.format("%(dir)s/%%d.png", n), "rb")
    reqs[n + 1] = wrk.format("POST", path, headers, f:read("*a"))
    f:close()
  end
end
function request()
  i = i %% #reqs + 1
  return reqs[i]
end
function done(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "errors_status": %%d, '
    .. '"errors_connect": %%d, "errors_read": %%d, "errors_write": %%d, "errors_timeout": %%d, '
    .. '"p50_ms": %%.3f, "p90_ms": %%.3f, "p99_ms": %%.3f, "max_ms": %%.3f, "mean_ms": %%.3f}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, latency.mean / 1000))
end
"""


@dataclass
class WrkResult:
    clients: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str, path: str, pngs: list[bytes], clients: int, seconds: float, auth: str = ""
) -> WrkResult:
    """Closed-loop load: ``clients`` connections, each sending the MNIST PNGs round-robin."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, png in enumerate(pngs):
            Path(tmp, f"{i}.png").write_bytes(png)
        script = Path(tmp, "load.lua")
        script.write_text(WRK_SCRIPT % {"path": path, "auth": auth, "count": len(pngs), "dir": tmp})
        cmd = [
            "wrk",
            "-t1",
            f"-c{clients}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("WRKJSON ")]
    if not lines:
        raise RuntimeError(f"wrk printed no summary: {out[-1000:]}")
    line = lines[0]
    d = json.loads(line[len("WRKJSON ") :])
    secs = d["duration_us"] / 1e6
    errors = {k[len("errors_") :]: v for k, v in d.items() if k.startswith("errors_")}
    return WrkResult(
        clients,
        round(secs, 2),
        d["requests"],
        round(d["requests"] / secs, 1),
        d["p50_ms"],
        d["p90_ms"],
        d["p99_ms"],
        d["max_ms"],
        errors,
    )


def check_labels(url: str, path: str, pngs: list[bytes], expected: list[int], auth: str = "") -> int:
    """POST each image once as a raw ``image/png`` body to ``url + path``; return how many labels
    differ from the in-process ones."""
    import httpx

    headers = {"content-type": "image/png", **({"Authorization": auth} if auth else {})}
    wrong = 0
    with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
        for png, label in zip(pngs, expected, strict=True):
            r = client.post(path, content=png)
            r.raise_for_status()
            wrong += int(r.json()["predictions"][0]["label"] != label)
    return wrong


def in_process_labels(store: Path, name: str, images: np.ndarray) -> list[int]:
    model, _ = load_model(store / name)
    with torch.inference_mode():
        x = torch.from_numpy(images).float().div(255)
        return model(x).argmax(1).tolist()
