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
    "attack_access": "attack_access",
}


def register(sub: Any) -> None:
    from service.settings import Settings

    sv = sub.add_parser("serve", help="serve the model store over HTTP (settings from ERC_* variables)")
    for flag, field in FLAGS.items():
        info = Settings.model_fields[field]
        default = "" if info.default is None else f", default {info.default}"
        sv.add_argument(
            "--" + flag.replace("_", "-"),
            dest=field,
            metavar=field.split("_")[-1].upper(),
            help=f"{info.description} [ERC_{field.upper()}{default}]",
        )
    sv.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.server import serve
    from service.settings import Settings

    overrides = {field: getattr(args, field) for field in FLAGS.values() if getattr(args, field) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise SystemExit(f"erc: invalid settings: {problems}") from None
    if not settings.model_store.is_dir():
        raise SystemExit(f"erc: model store {settings.model_store} does not exist (--store, ERC_MODEL_STORE)")
    logging.getLogger().setLevel(settings.log_level.upper())
    serve(settings)
    return 0
