"""``python -m experiments.mnist_reproduction run|worker|report|unpack`` (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.mnist_reproduction import __doc__ as DOC
from experiments.mnist_reproduction.figures import import_figures
from experiments.mnist_reproduction.packing import unpack
from experiments.mnist_reproduction.plan import SCALES
from experiments.mnist_reproduction.report import report
from experiments.mnist_reproduction.scheduler import run_main
from experiments.mnist_reproduction.worker import worker_main


def report_main(args: argparse.Namespace) -> int:
    text = report([Path(d) for d in args.results], Path(args.card) if args.card else None, Path(args.out))
    sys.stdout.write(text + "\n")
    return 0


def import_main(args: argparse.Namespace) -> int:
    count = import_figures(Path(args.results), Path(args.model))
    sys.stdout.write(f"{count} figures measured on the stored weights added to {args.model}/card.json\n")
    return 0


def unpack_main(args: argparse.Namespace) -> int:
    unpack(Path(args.src), Path(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.mnist_reproduction", description=(DOC or "").split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train, export and evaluate everything within --budget-s")
    r.add_argument("--out", default="runs/repro")
    r.add_argument("--scale", default="gpu", choices=sorted(SCALES))
    r.add_argument("--budget-s", type=float, default=540.0)
    r.add_argument("--data-dir")
    r.add_argument("--main-epochs", type=int, help="default: as many as the measured speed fits")
    r.add_argument("--workers", help="comma-separated subset of the workers")
    r.add_argument("--init-from", help="second stage: continue the default model from this stored model")
    r.add_argument("--only", help="comma-separated subset of the jobs")
    r.add_argument("--no-mps", dest="mps", action="store_false")
    r.add_argument("--no-bench", dest="bench", action="store_false")
    r.add_argument("--bench-timeout-s", type=float, default=150.0)
    r.add_argument("--pack", help="also write results.tar.gz and the model parts here")
    r.set_defaults(func=run_main)
    w = sub.add_parser("worker", help="(internal) run one worker's jobs")
    w.add_argument("worker")
    w.add_argument("--out", required=True)
    w.add_argument("--scale", default="gpu", choices=sorted(SCALES))
    w.add_argument("--deadline", type=float, required=True, help="unix time")
    w.add_argument("--main-epochs", type=int)
    w.add_argument("--data-dir")
    w.add_argument("--only")
    w.add_argument("--init-from")
    w.set_defaults(func=worker_main)
    rep = sub.add_parser("report", help="tables (tables.md) and PNG plots from result folders")
    rep.add_argument("results", nargs="+", help="result folders of `run`, the shipped model's first")
    rep.add_argument("--card", help="the shipped model's card.json (its metrics join the tables)")
    rep.add_argument("--out", default="docs/reproduction")
    rep.set_defaults(func=report_main)
    im = sub.add_parser(
        "import-figures",
        help="add a run's figures measured on the exported weights to the store model's card",
    )
    im.add_argument("results", help="a result folder of `run` (with card-NAME.json)")
    im.add_argument("model", help="the store model directory whose weights the run exported")
    im.set_defaults(func=import_main)
    u = sub.add_parser("unpack", help="results.tar.gz + model parts -> a results folder")
    u.add_argument("src")
    u.add_argument("out")
    u.set_defaults(func=unpack_main)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
