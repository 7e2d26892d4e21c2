"""``erc``: one command line for the whole project, one module per subcommand.

Each module under this package has ``register(subparsers)``, which declares its parser, and
``run(args) -> int``, which does the work; :data:`COMMANDS` lists them in ``erc --help`` order. A
module imports what its command needs only inside ``run``, so ``erc --help`` is instant and the
serving process never imports training code it does not use.

Errors: anything the library raises about the user's inputs derives from
:class:`training.errors.ErcError` and is printed as one line ``erc: message`` with exit code 1;
a ``SystemExit`` raised by a command (usage errors) passes through unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Subcommand modules, in the order `erc --help` lists them.
COMMANDS = (
    "train",
    "eval",
    "export",
    "import_model",
    "typicality",
    "intrinsic_dim",
    "data",
    "audit",
    "serve",
    "audit_worker",
    "package",
    "stack",
    "listing",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erc", description="ER-Classifier: train, evaluate, export and serve robust models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"service.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from training.errors import ErcError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args) or 0)
    except ErcError as exc:
        sys.stderr.write(f"erc: {exc}\n")
        return 1


__all__ = ["COMMANDS", "build_parser", "main"]
