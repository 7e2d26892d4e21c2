"""``erc stack``: the compose topology on 127.0.0.1, without containers: API replicas behind nginx,
audit workers and their job store, TorchServe, Prometheus."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from service.cli._common import out


def register(sub: Any) -> None:
    st = sub.add_parser(
        "stack", help="API replicas behind nginx, audit workers, TorchServe, Prometheus on 127.0.0.1"
    )
    st.add_argument("--store", default="model_store")
    st.add_argument("--model", default="mnist-er", help="the model TorchServe serves (the API serves all)")
    st.add_argument("--replicas", type=int, default=2, help="API replicas behind the proxy [2]")
    st.add_argument("--workers", type=int, default=1, help="audit workers [1]")
    st.add_argument(
        "--db",
        default="auto",
        help="audit job store: postgresql (a private cluster of Debian's PostgreSQL, gone when the "
        "stack stops), sqlite (a file in the stack's folder), a database URL to keep the history, or "
        "auto: postgresql when installed [auto]",
    )
    st.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from service.stack import start_stack

    if args.replicas < 1 or args.workers < 0:
        raise SystemExit("erc: --replicas must be at least 1 and --workers at least 0")
    # SIGTERM stops the stack as Ctrl-C does, while it starts too (start_stack then stops what had
    # started): with SIGTERM's default action the children (nginx, Prometheus, TorchServe, the
    # replicas) outlived a killed `erc stack`.
    stopping = _Stopping()
    previous = signal.signal(signal.SIGTERM, stopping.handler)
    try:
        stack = start_stack(
            Path(args.store), args.model, replicas=args.replicas, workers=args.workers, db=args.db
        )
    except _Stop:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    ts = stack.torchserve
    assert ts is not None
    out(f"API          {stack.url}  (docs: {stack.url}/docs; nginx in front of {len(stack.apis)} replicas)")
    for api in stack.apis:
        out(f"  replica    {api.url}")
    for worker in stack.workers:
        out(f"audit worker metrics {worker.url}/metrics")
    out(f"audit store  {stack.postgres.url.split('@')[-1] if stack.postgres else stack.audit_db}")
    out(f"admin token  {stack.admin_token}  (Authorization: Bearer ...)")
    out(f"TorchServe   {ts.inference_url}  management {ts.management_url}  metrics {ts.metrics_url}")
    out(f"             keys: {ts.workdir / 'key_file.json'}")
    out(f"Prometheus   {stack.prometheus_url}")
    out(f"logs in {stack.workdir}; Ctrl-C (or SIGTERM) stops the stack")
    signal.signal(signal.SIGTERM, stopping.handler)
    try:
        while not stopping.requested:
            signal.pause()
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
        stack.stop()
    return 0


class _Stop(BaseException):
    """Raised by the SIGTERM handler; a BaseException so that no ``except Exception`` swallows it."""


class _Stopping:
    requested = False

    def handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        raise _Stop
