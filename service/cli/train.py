"""``erc train``: train a model from a YAML config and flags (also under torchrun for DDP)."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.cli._common import out

# CLI flag -> config key; every other key is reachable with --set section.field=value.
FLAGS: dict[str, tuple[str, type, str]] = {
    "dataset": (
        "data.dataset",
        str,
        "dataset name (erc data list), or folder:PATH for your own images (PATH/<class>/*.png|jpg|..., "
        "or PATH/train/<class>/... with PATH/test/<class>/...)",
    ),
    "data_dir": ("data.data_dir", str, "folder with the dataset files"),
    "train_subset": ("data.train_subset", int, "train on n images of the train split"),
    "eval_subset": ("data.eval_subset", int, "test images for the per-epoch accuracy"),
    "batch_size": (
        "data.batch_size",
        int,
        "global batch size (default 128; under 1,280 images the power of two giving >= 10 steps an epoch)",
    ),
    "size": (
        "data.image_size",
        str,
        "image folders: N or WIDTHxHEIGHT every image is stretched to (default: the size they share)",
    ),
    "channels": ("data.channels", int, "image folders: 1 or 3 (default: 1 when every image is greyscale)"),
    "test_fraction": (
        "data.test_fraction",
        float,
        "image folders without test/: share of each class held out as the test split (default 0.2)",
    ),
    "method": ("method.name", str, "er, er-trades, er-minus, e-cla, vae-cla, none, madry, rse"),
    "arch": (
        "model.arch",
        str,
        "architecture name (default: the method family's for the dataset; for an image folder the paper's "
        "network of the closest input size: 28 Figure 9, 32 CIFAR-10, 64 Tiny ImageNet, 96 STL-10)",
    ),
    "embed_dim": (
        "model.embed_dim",
        str,
        "embedding size k, or auto: the training images' intrinsic dimension (default: Table 3's size "
        "for the network: 4, 16, 20, 16)",
    ),
    "width": ("model.width", float, "channel multiplier (0.25 = slim CPU variant)"),
    "prior": ("model.prior", str, "gaussian, uniform or cauchy"),
    "lr": ("optim.lr", float, "encoder / network learning rate"),
    "eps": (
        "adv.eps",
        float,
        "l_inf training eps in [0, 1] pixel units (default: the paper dataset's; required for folder:PATH, "
        "see below)",
    ),
    "pgd_steps": ("adv.steps", int, "PGD steps per training batch"),
    "epochs": ("run.epochs", int, "number of epochs"),
    "seed": ("run.seed", int, "random seed"),
    "out": ("run.out_dir", str, "run directory"),
    "device": ("run.device", str, "auto, cpu, cuda, cuda:N"),
    "amp": ("run.amp", str, "none or bf16"),
    "eval_adv_n": ("run.eval_adv_n", int, "PGD-20 robust accuracy after each epoch on n test images"),
    "threads": ("run.threads", int, "torch CPU threads"),
}


def register(sub: Any) -> None:
    from training.config import EPS_HELP

    t = sub.add_parser(
        "train",
        help="train a model (also under torchrun for DDP)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="choosing --eps for your own images (required for folder:PATH, no silent default):\n  "
        + "\n  ".join(textwrap.wrap(EPS_HELP[0].upper() + EPS_HELP[1:] + ".", 96))
        + "\n\nunreadable image files are skipped, counted and named in the log; --strict refuses them. "
        "`erc data check DIR` shows them before training.",
    )
    t.add_argument("--config", help="YAML config (sections data, model, optim, method, adv, run)")
    for flag, (key, typ, text) in FLAGS.items():
        t.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, help=f"{text} [{key}]")
    t.add_argument("--channels-last", action="store_true", help="NHWC memory format [run.channels_last]")
    t.add_argument("--compile", action="store_true", help="torch.compile the attacked network [run.compile]")
    t.add_argument(
        "--strict", action="store_true", help="image folders: refuse unreadable image files [data.strict]"
    )
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. method.clip=0.02",
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(run=run)


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``["a.b=1"]`` -> ``{"a.b": "1"}``."""
    result = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"erc: --set takes section.field=value, got {item!r}")
        k, v = item.split("=", 1)
        result[k.strip()] = v
    return result


def run(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.train import CONFIG, run_training

    overrides: dict[str, Any] = {}
    for flag, (key, _, _) in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.channels_last:
        overrides["run.channels_last"] = True
    if args.compile:
        overrides["run.compile"] = True
    if args.no_progress:
        overrides["run.progress"] = False
    if args.strict:
        overrides["data.strict"] = True
    overrides.update(parse_sets(args.set))
    config_path = args.config
    if args.resume:
        out_dir = overrides.get("run.out_dir")
        if out_dir is None and config_path is None:
            raise SystemExit("erc: --resume needs the run directory (--out DIR)")
        saved = Path(out_dir or "") / CONFIG
        if out_dir is not None and saved.exists():
            config_path = saved  # the run's own resolved config; flags given now still apply on top
    cfg = load_config(config_path, overrides)
    summary = run_training(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line, from rank 0
        out(json.dumps(summary))
    if summary["world_size"] > 1:
        from training.distributed import exit_worker

        exit_worker(0)  # gloo's threads and the interpreter's shutdown race (see exit_worker)
    return 0
