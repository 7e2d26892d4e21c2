"""``erc audit-worker``: a dedicated audit worker. Claims queued audits from the shared job store
(``ERC_AUDIT_DB``), runs each in a child process on its device, one at a time, and writes the
results back; API replicas then never attack anything. Run one per device (GPU); any number on
any host that reaches the store and holds the same model store.

    ERC_AUDIT_DB=postgresql://erc:...@db:5432/erc erc audit-worker --store /models --device cuda:0

SIGTERM or Ctrl-C: the running audit is stopped and handed back to the queue (another worker, or
this one once restarted, runs it again), then the worker exits. Prometheus metrics (heartbeat,
busy, attempts by outcome) on ``--metrics-port``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from typing import Any

# flag -> Settings field (flags override ERC_* variables)
FLAGS = {
    "store": "model_store",
    "db": "audit_db",
    "device": "audit_device",
    "threads": "audit_threads",
    "metrics_port": "audit_worker_metrics_port",
    "host": "host",
}


def register(sub: Any) -> None:
    from service.cli._common import add_settings_flags

    w = sub.add_parser(
        "audit-worker", help="run queued robustness audits from the shared job store (one per device)"
    )
    add_settings_flags(w, FLAGS)
    w.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to keep trying an unreachable job store at start-up before giving up [60]",
    )
    w.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from service.audit.store import StoreError
    from service.audit.worker import AuditWorker
    from service.cli._common import settings_from_flags
    from training.errors import ErcError

    settings = settings_from_flags(args, FLAGS)
    logging.getLogger().setLevel(settings.log_level.upper())
    if not settings.model_store.is_dir():
        raise SystemExit(f"erc: model store {settings.model_store} does not exist (--store, ERC_MODEL_STORE)")
    from training.devices import resolve_device

    resolve_device(settings.audit_device)  # a missing GPU fails here, in one line, not in every audit
    store = settings.audit_store()
    deadline = time.monotonic() + args.wait
    while True:
        try:
            store.open()
            break
        except StoreError as exc:
            if time.monotonic() >= deadline:
                raise ErcError(f"{exc} (gave up after --wait {args.wait:g} s)") from None
            logging.getLogger("erc").warning("%s; retrying", exc)
            time.sleep(1.0)
    if settings.audit_worker_metrics_port:
        start_http_server(settings.audit_worker_metrics_port, addr=settings.host)
    worker = AuditWorker(store, settings)

    def stop(signum: int, _: Any) -> None:
        logging.getLogger("erc").info("signal %d: stopping audit worker %s", signum, worker.id)
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.run()
    finally:
        store.close()
    return 0
