"""``erc data list|info|download``: the datasets, where they are found, fetching them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from service.cli._common import out


def register(sub: Any) -> None:
    data = sub.add_parser("data", help="datasets: list, info, download")
    dsub = data.add_subparsers(dest="data_cmd", required=True, metavar="ACTION")
    dsub.add_parser("list", help="known datasets")
    info = dsub.add_parser("info", help="where a dataset is found and whether its files check out")
    info.add_argument("name")
    info.add_argument("--data-dir")
    dl = dsub.add_parser("download", help="fetch from the canonical source and verify checksums")
    dl.add_argument("name")
    dl.add_argument("--data-dir", required=True)
    dl.add_argument("--mirror", help="base URL to fetch the same file names from")
    data.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from training.data import describe, list_datasets

    if args.data_cmd == "list":
        for name in list_datasets():
            out(name)
        return 0
    if args.data_cmd == "info":
        out(json.dumps(describe(args.name, args.data_dir), indent=2, default=str))
        return 0
    from training.data.download import download

    for p in download(args.name, args.data_dir, mirror=args.mirror):
        out(str(p))
    return 0
