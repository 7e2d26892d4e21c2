"""Every Prometheus metric of the service, defined once (names per the Prometheus naming guide:
``erc_`` prefix, base units, ``_seconds`` / ``_total`` suffixes, labels by route template and
model name, never by raw path or user input).

The default registry also carries the process collector (``process_resident_memory_bytes``, CPU
seconds, open fds), which the benchmarks read.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.audit.status import ACTIVE, JobStatus

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)

HTTP_REQUESTS = Counter("erc_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "erc_http_request_duration_seconds",
    "Time from request start to response end",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
IMAGES = Counter("erc_images_total", "Images (rows) classified or embedded", ["model", "endpoint"])
BATCH_SIZE = Histogram("erc_inference_batch_size", "Rows per forward pass", ["model"], buckets=BATCH_BUCKETS)
QUEUE_WAIT = Histogram(
    "erc_queue_wait_seconds", "Time a request waited in the batch queue", ["model"], buckets=LATENCY_BUCKETS
)
INFERENCE_DURATION = Histogram(
    "erc_inference_duration_seconds", "Forward pass time per batch", ["model"], buckets=LATENCY_BUCKETS
)
QUEUE_DEPTH = Gauge(
    "erc_queue_depth", "Rows waiting in the batch queue", ["model"], multiprocess_mode="livesum"
)
MODEL_INFO = Gauge(
    "erc_model_info",
    "Served model (value 1) with its identity; version = first 12 hex digits of the weights' sha256",
    ["model", "version", "arch", "dataset", "method", "sha256"],
    multiprocess_mode="livemax",
)
AUDITS = Counter("erc_audits_total", "Audits by final status (counted where they ended)", ["status"])
AUDIT_ATTEMPTS = Counter(
    "erc_audit_attempts_total",
    "Audit attempts this process's worker ran, by how they ended (lease_lost: another worker took over; "
    "released: handed back to the queue at shutdown)",
    ["outcome"],
)
# Registered only by a process that runs an audit worker (export_worker_gauges): an API replica
# exporting a heartbeat of 0 looked like a dead worker to every query without "> 0".
AUDIT_WORKER_HEARTBEAT = Gauge(
    "erc_audit_worker_heartbeat_timestamp_seconds",
    "Last heartbeat of this process's audit worker",
    registry=None,
    multiprocess_mode="livemax",
)
AUDIT_WORKER_BUSY = Gauge(
    "erc_audit_worker_busy",
    "1 while this process's audit worker runs an audit",
    registry=None,
    multiprocess_mode="livemax",
)
_worker_gauges_lock = threading.Lock()
_worker_gauges_exported = False


def export_worker_gauges() -> None:
    """Add the audit worker's two gauges to this process's /metrics (once; a worker calls it)."""
    global _worker_gauges_exported
    with _worker_gauges_lock:
        if not _worker_gauges_exported:
            REGISTRY.register(AUDIT_WORKER_HEARTBEAT)
            REGISTRY.register(AUDIT_WORKER_BUSY)
            _worker_gauges_exported = True


MODEL_READY = Gauge(
    "erc_model_ready", "1 when the model is loaded and warm, else 0", ["model"], multiprocess_mode="livemax"
)
MODELS_LOADED = Gauge(
    "erc_models_loaded", "Model versions this process serves (loaded and warm)", multiprocess_mode="livemax"
)
MODEL_LOAD_DURATION = Histogram(
    "erc_model_load_duration_seconds",
    "Time to load, verify and warm one model version",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
MODEL_LOAD_FAILURES = Counter(
    "erc_model_load_failures_total", "Model versions this process failed to load", ["model"]
)
TYPICALITY_MAHALANOBIS = Histogram(
    "erc_typicality_mahalanobis",
    "Minimum class-conditional Mahalanobis distance of each image's embedding (typicality score)",
    ["model"],
    buckets=(0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10, 15, 25, 50),
)
ATYPICAL = Counter(
    "erc_atypical_images_total",
    "Images whose embedding is atypical (Mahalanobis distance above the card's calibrated threshold)",
    ["model", "endpoint"],
)

# The per-request attack check (POST /v1/models/{name}:attack), in its own worker processes.
ATTACK_REQUESTS = Counter(
    "erc_attack_requests_total",
    "Attack-check requests by outcome (done, queue_full, timeout, failed)",
    ["model", "outcome"],
)
ATTACK_IMAGES = Counter("erc_attack_images_total", "Images attacked by the attack check", ["model"])
ATTACK_FLIPS = Counter(
    "erc_attack_flips_total",
    "Attacked images whose prediction the attack changed (decided on the returned 8-bit image)",
    ["model"],
)
ATTACK_DURATION = Histogram(
    "erc_attack_duration_seconds",
    "Time an attack-check request spent in its worker process (queue wait excluded)",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120),
)
ATTACK_QUEUE_WAIT = Histogram(
    "erc_attack_queue_wait_seconds",
    "Time an attack-check request waited for a worker process",
    buckets=LATENCY_BUCKETS,
)
ATTACK_IN_FLIGHT = Gauge(
    "erc_attack_in_flight", "Attack-check requests queued or running", multiprocess_mode="livesum"
)


def observe_typicality(model: str, endpoint: str, out: Any) -> None:
    """Record the typicality scores of one answered batch of rows (``service.inference.Outputs``)."""
    if out.mahalanobis is None:
        return
    hist = TYPICALITY_MAHALANOBIS.labels(model=model)
    for v in out.mahalanobis:
        hist.observe(float(v))
    flagged = int(out.atypical.sum())
    if flagged:
        ATYPICAL.labels(model=model, endpoint=endpoint).inc(flagged)


class AuditStoreCollector(Collector):
    """Gauges of the audit job store, so every API replica reports the same queue and the same last
    results (no replica has to have seen them happen): queue depth, running audits, live workers,
    and per model the figures of its last finished audit.

    The API's store thread refreshes them every ``ERC_AUDIT_HEARTBEAT_S`` (:meth:`update`); a scrape
    only formats the last snapshot, so ``/metrics`` never waits on the database (a scrape runs on
    the event loop that serves predictions). ``erc_audit_store_up`` is 0 while the store cannot be
    read; nothing is exported without a store (admin routes off)."""

    def __init__(self) -> None:
        self.snapshot: tuple[bool, Any, dict[str, tuple[float, dict[str, Any]]]] | None = None

    def update(self, stats: Any, latest: dict[str, tuple[float, dict[str, Any]]]) -> None:
        """``stats``: :class:`service.audit.store.Stats`; ``latest``: model -> (finished, summary)."""
        self.snapshot = (True, stats, latest)

    def down(self) -> None:
        old = self.snapshot
        self.snapshot = (False, None, old[2] if old else {})

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot
        return iter(()) if snap is None else iter(self._families(*snap))

    @staticmethod
    def _families(
        ok: bool, stats: Any, latest: dict[str, tuple[float, dict[str, Any]]]
    ) -> list[GaugeMetricFamily]:
        up = GaugeMetricFamily("erc_audit_store_up", "1 when the audit job store answers, else 0")
        up.add_metric([], 1 if ok else 0)
        families = [up]
        if ok:
            queued = GaugeMetricFamily("erc_audit_queue_depth", "Audits waiting for a worker (whole store)")
            queued.add_metric([], stats.by_status.get(JobStatus.QUEUED, 0))
            running = GaugeMetricFamily(
                "erc_audits_running", "Audits running or being cancelled (whole store)"
            )
            running.add_metric([], sum(stats.by_status.get(s, 0) for s in ACTIVE))
            alive = GaugeMetricFamily(
                "erc_audit_workers", "Audit workers whose lease heartbeat is current", labels=["state"]
            )
            alive.add_metric(["idle"], stats.workers_idle)
            alive.add_metric(["busy"], stats.workers_alive - stats.workers_idle)
            families += [queued, running, alive]
        robust = GaugeMetricFamily(
            "erc_audit_robust_accuracy",
            "Robust accuracy of the last finished audit, per eps and attack (attack=union: every attack "
            "failed)",
            labels=["model", "eps", "attack"],
        )
        clean = GaugeMetricFamily(
            "erc_audit_clean_accuracy", "Clean accuracy in the last finished audit", labels=["model"]
        )
        duration = GaugeMetricFamily(
            "erc_audit_duration_seconds", "Duration of the last finished audit", labels=["model"]
        )
        stamp = GaugeMetricFamily(
            "erc_audit_last_finished_timestamp_seconds", "When the last audit finished", labels=["model"]
        )
        for model, (finished, summary) in latest.items():
            clean.add_metric([model], summary["clean_accuracy"])
            duration.add_metric([model], summary["duration_s"])
            stamp.add_metric([model], finished)
            for r in summary["robust"]:
                robust.add_metric([model, r["eps"], r["attack"]], r["accuracy"])
        return [*families, robust, clean, duration, stamp]


AUDIT_STORE = AuditStoreCollector()
REGISTRY.register(AUDIT_STORE)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(_multiprocess_registry()), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


_WORKER_GAUGES = (AUDIT_WORKER_HEARTBEAT._name, AUDIT_WORKER_BUSY._name)


class _AllProcesses(Collector):
    """Every process of ``erc serve``'s layout (service/multiproc), from the shared directory:
    counters and histograms summed, gauges by their ``multiprocess_mode``. The audit worker's gauges
    only when a process runs a worker (its heartbeat is then above 0), as in one process."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client import multiprocess

        families = list(multiprocess.MultiProcessCollector(None).collect())
        beats = [s.value for f in families if f.name == _WORKER_GAUGES[0] for s in f.samples]
        for family in families:
            if family.name in _WORKER_GAUGES and not any(b > 0 for b in beats):
                continue
            yield family


def _multiprocess_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_AllProcesses())
    registry.register(AUDIT_STORE)  # this HTTP process's view of the shared store (the same for all)
    return registry
