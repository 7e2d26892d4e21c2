"""``erc package``: ``model_store/NAME.mar`` for TorchServe (the same JSON answers as the API)."""

from __future__ import annotations

import argparse
from typing import Any

from service.cli._common import out


def register(sub: Any) -> None:
    pk = sub.add_parser("package", help="build model_store/NAME.mar for TorchServe")
    pk.add_argument("name")
    pk.add_argument("--store", default="model_store")
    pk.add_argument("--version", default="1.0", help="TorchServe model version")
    pk.add_argument("--out", help="folder for the .mar (default: the store)")
    pk.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from service.packaging import package_model

    try:
        path = package_model(args.store, args.name, version=args.version, out_dir=args.out)
    except (FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"erc: {exc}") from None
    out(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
