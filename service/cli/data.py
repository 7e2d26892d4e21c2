"""``erc data list|info|check|download``: the datasets, where they are found, what an image folder
holds, fetching them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from service.cli._common import out


def register(sub: Any) -> None:
    data = sub.add_parser("data", help="datasets: list, info, check, download")
    dsub = data.add_subparsers(dest="data_cmd", required=True, metavar="ACTION")
    dsub.add_parser("list", help="known datasets")
    info = dsub.add_parser(
        "info",
        help="where a dataset is found and whether its files check out; for an image folder (DIR or "
        "folder:DIR): classes, counts, sizes, modes, formats, unreadable files (headers only)",
    )
    info.add_argument("name", help="dataset name, or an image folder DIR / folder:DIR")
    info.add_argument("--data-dir")
    check = dsub.add_parser(
        "check",
        help="an image folder before training: everything info shows, with every image decoded as "
        "training will decode it; exit status 1 when something would be skipped or refused",
    )
    check.add_argument(
        "folder", help="DIR or folder:DIR (DIR/<class>/<images> or DIR/train|test/<class>/...)"
    )
    check.add_argument("--size", help="N or WIDTHxHEIGHT to decode to (default: the images' common size)")
    check.add_argument("--channels", type=int, choices=[1, 3], help="1 or 3 (default: inferred)")
    check.add_argument("--no-progress", action="store_true")
    dl = dsub.add_parser("download", help="fetch from the canonical source and verify checksums")
    dl.add_argument("name")
    dl.add_argument("--data-dir", required=True)
    dl.add_argument("--mirror", help="base URL to fetch the same file names from")
    data.set_defaults(run=run)


def _folder_arg(name: str) -> Path | None:
    """The folder an argument names (``folder:DIR``, or a directory that is no dataset's name)."""
    from training.data import is_folder, list_datasets
    from training.data.folder import folder_root

    if is_folder(name):
        return folder_root(name)
    if name.lower() not in list_datasets() and Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    return None


def _summary(report: dict[str, Any]) -> str:
    counts = report["counts"]["train"]
    where = f"{report['root']}: {len(report['classes'])} classes, {report['images']} image files"
    bad = len(report["unreadable"])
    geometry = report["inferred"] or {}
    shape = f"{geometry['size']} x {geometry['channels']} channel(s)" if geometry else "no common size"
    sizes = ", ".join(f"{n} {c}" for c, n in counts.items())
    return f"{where} ({sizes}); {shape}; {bad} unreadable, {len(report['ignored'])} ignored"


def run(args: argparse.Namespace) -> int:
    from training.data import DataError, describe, list_datasets
    from training.data.folder import check_folder, parse_size

    if args.data_cmd == "list":
        for name in list_datasets():
            out(name)
        out("folder:PATH (your own images: PATH/<class>/*.png|jpg|... or PATH/train|test/<class>/...)")
        return 0
    if args.data_cmd in ("info", "check"):
        name = args.name if args.data_cmd == "info" else args.folder
        root = _folder_arg(name)
        if root is None:
            if args.data_cmd == "check":
                raise DataError(f"{name}: not a folder (erc data check takes DIR or folder:DIR)")
            out(json.dumps(describe(args.name, args.data_dir), indent=2, default=str))
            return 0
        decode = args.data_cmd == "check"
        report = check_folder(
            root,
            decode=decode,
            size=parse_size(getattr(args, "size", None)),
            channels=getattr(args, "channels", None),
            progress=False if getattr(args, "no_progress", False) else None,
        )
        out(json.dumps(report, indent=2))
        out(_summary(report))
        if decode and not report["ok"]:
            first = (report["problems"] or [f"{u['path']}: {u['why']}" for u in report["unreadable"]])[0]
            raise DataError(
                f"{report['root']}: {len(report['problems'])} problem(s), {len(report['unreadable'])} "
                f"unreadable file(s); first: {first}"
            )
        return 0
    from training.data.download import download

    for p in download(args.name, args.data_dir, mirror=args.mirror):
        out(str(p))
    return 0
