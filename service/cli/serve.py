"""``erc serve``: serve the model store over HTTP. Every setting is an ``ERC_*`` variable
(:class:`service.settings.Settings`); the common ones are flags too, with their help and defaults
taken from the settings' own fields."""

from __future__ import annotations

import argparse
import logging
from typing import Any

# flag -> Settings field (flags override ERC_* variables)
FLAGS = {
    "host": "host",
    "port": "port",
    "store": "model_store",
    "models": "models",
    "default_model": "default_model",
    "device": "device",
    "max_batch_size": "max_batch_size",
    "batch_wait_ms": "batch_wait_ms",
    "torch_threads": "torch_threads",
    "workers": "workers",
    "http_processes": "http_processes",
    "attack_access": "attack_access",
    "audit_db": "audit_db",
}


def register(sub: Any) -> None:
    from service.cli._common import add_settings_flags

    sv = sub.add_parser("serve", help="serve the model store over HTTP (settings from ERC_* variables)")
    add_settings_flags(sv, FLAGS)
    sv.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from service.cli._common import settings_from_flags

    settings = settings_from_flags(args, FLAGS)
    if not settings.model_store.is_dir():
        raise SystemExit(f"erc: model store {settings.model_store} does not exist (--store, ERC_MODEL_STORE)")
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.http_processes > 1:
        from service.multiproc.supervisor import supervise

        return supervise(settings)  # imports no torch: the supervisor holds only its children
    from service.server import serve

    serve(settings)
    return 0
