"""Every Prometheus metric of the service, defined once (names per the Prometheus naming guide:
``erc_`` prefix, base units, ``_seconds`` / ``_total`` suffixes, labels by route template and
model name, never by raw path or user input).

The default registry also carries the process collector (``process_resident_memory_bytes``, CPU
seconds, open fds), which the benchmarks read.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

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
QUEUE_DEPTH = Gauge("erc_queue_depth", "Rows waiting in the batch queue", ["model"])
MODEL_INFO = Gauge(
    "erc_model_info",
    "Served model (value 1) with its identity; version = first 12 hex digits of the weights' sha256",
    ["model", "version", "arch", "dataset", "method", "sha256"],
)
AUDIT_ROBUST_ACCURACY = Gauge(
    "erc_audit_robust_accuracy",
    "Robust accuracy of the last finished audit, per eps and attack (attack=union: every attack failed)",
    ["model", "eps", "attack"],
)
AUDIT_CLEAN_ACCURACY = Gauge(
    "erc_audit_clean_accuracy", "Clean accuracy in the last finished audit", ["model"]
)
AUDIT_DURATION = Gauge("erc_audit_duration_seconds", "Duration of the last finished audit", ["model"])
AUDIT_TIMESTAMP = Gauge(
    "erc_audit_last_finished_timestamp_seconds", "When the last audit finished", ["model"]
)
AUDITS = Counter("erc_audits_total", "Audits by final status", ["status"])
MODEL_READY = Gauge("erc_model_ready", "1 when the model is loaded and warm, else 0", ["model"])
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
ATTACK_IN_FLIGHT = Gauge("erc_attack_in_flight", "Attack-check requests queued or running")


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


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
