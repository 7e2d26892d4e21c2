"""``erc stack``: API + TorchServe + Prometheus on 127.0.0.1, without containers."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from service.cli._common import out


def register(sub: Any) -> None:
    st = sub.add_parser("stack", help="API + TorchServe + Prometheus on 127.0.0.1, without containers")
    st.add_argument("--store", default="model_store")
    st.add_argument("--model", default="mnist-er", help="the model TorchServe serves (the API serves all)")
    st.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from service.stack import start_stack

    stack = start_stack(Path(args.store), args.model)
    ts = stack.torchserve
    assert stack.api is not None and ts is not None
    out(f"API          {stack.api.url}  (docs: {stack.api.url}/docs)")
    out(f"TorchServe   {ts.inference_url}  management {ts.management_url}  metrics {ts.metrics_url}")
    out(f"             keys: {ts.workdir / 'key_file.json'}")
    out(f"Prometheus   {stack.prometheus_url}")
    out(f"logs in {stack.workdir}; Ctrl-C stops the stack")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stack.stop()
    return 0
