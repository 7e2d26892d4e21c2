"""``erc intrinsic-dim``: Levina-Bickel MLE of a dataset's intrinsic dimension (the paper's Table 3)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from service.cli._common import out


def k_range(text: str) -> tuple[int, int]:
    """``6-12`` -> (6, 12); ``10`` -> (10, 10)."""
    try:
        if "-" in text:
            a, b = text.split("-", 1)
            return int(a), int(b)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or K1-K2, got {text!r}") from None


def register(sub: Any) -> None:
    d = sub.add_parser("intrinsic-dim", help="Levina-Bickel MLE of a dataset's intrinsic dimension (Table 3)")
    d.add_argument("--dataset", default="mnist", help="dataset name, or folder:DIR (your own images)")
    d.add_argument("--size", help="image folders: N or WIDTHxHEIGHT (default: the size the images share)")
    d.add_argument("--channels", type=int, choices=[1, 3], help="image folders: 1 or 3 (default: inferred)")
    d.add_argument("--split", default="train", choices=["train", "test"])
    d.add_argument("--data-dir")
    d.add_argument("--n", type=int, default=1000, help="sample size (the paper: 1000)")
    d.add_argument("--k", type=k_range, action="append", help="K or K1-K2, repeatable (default 6-12)")
    d.add_argument("--averaging", default="levina", choices=["levina", "mackay"])
    d.add_argument("--normalization", default="k-2", choices=["k-2", "k-1"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", help="write the results as JSON here")
    d.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from training.data import FolderOptions, load_split
    from training.data.folder import parse_size
    from training.intrinsic_dim import levina_bickel

    folder = FolderOptions(size=parse_size(args.size), channels=args.channels)
    data = load_split(args.dataset, args.split, args.data_dir, n=args.n, seed=args.seed, folder=folder)
    x = data.as_float().reshape(len(data), -1)
    results = []
    for k1, k2 in args.k or [(6, 12)]:
        r = levina_bickel(x, k1, k2, averaging=args.averaging, normalization=args.normalization)
        results.append(r.to_dict())
        where = f"{args.dataset} {args.split} n={r.n} k={k1}..{k2} {args.averaging}"
        out(f"{where}: intrinsic dim {r.estimate:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"dataset": args.dataset, "seed": args.seed, "results": results}, indent=2)
        )
    return 0
