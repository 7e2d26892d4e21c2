"""Which BatchNorm statistics keep a stored ER model robust? (issue 31's CPU fine-tune)

Recomputes the running statistics of a store model's BatchNorm layers (``update_bn``'s rule,
:func:`training.methods.base.recalibrate_batchnorm`) over training images fed in different ways,
without training, and measures PGD-20 robust accuracy (eps 0.3, bf16 autocast as the fine-tune's
per-epoch evaluation) on the first ``--n`` test images after each:

- ``shipped``: the statistics as stored;
- ``trades``: ``[clean; TRADES-KL examples]`` (what er-trades feeds when it recalibrates);
- ``ce``: PGD-10 cross-entropy examples only (what the shipped model was trained on);
- ``clean``: clean images only.

    python -m experiments.bn_statistics --model model_store/mnist-er --n 500 --images 2048

With ``--write RUN_DIR`` (one feed), the recomputed model is written as a training checkpoint
that ``erc export RUN_DIR`` turns into a store entry (the card's training config is the stored
model's; its notes should say how the statistics were made):

    python -m experiments.bn_statistics --feeds ce --n 0 --images 4096 --write runs/mnist-er-bn-ce
    erc export runs/mnist-er-bn-ce --name mnist-er-bn-ce --store runs/store --dtype float16

Measured 2026-12-06 on the 2-core VM (mnist-er, 500 test images, 2,048 training images):
shipped 90.60 %, trades 85.60 %, ce 91.40 % (docs/reproduction.md, "CPU fine-tune").
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from training.attacks import build_attack, pgd
from training.checkpoint import CHECKPOINT, save_checkpoint
from training.data.datasets import load_split
from training.evaluate import robust_flags, to_unit
from training.formats import load_served
from training.formats.er import ERNet
from training.methods.base import recalibrate_batchnorm
from training.methods.er import trades_adversarial

EPS = 0.3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="model_store/mnist-er")
    ap.add_argument("--n", type=int, default=500, help="test images attacked")
    ap.add_argument("--images", type=int, default=2048, help="training images the statistics are computed on")
    ap.add_argument("--feeds", default="trades,ce,clean")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--write", metavar="RUN_DIR", help="write the recomputed model (one feed) as a checkpoint"
    )
    args = ap.parse_args()
    if args.write and "," in args.feeds:
        ap.error("--write takes one feed")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    net, card = load_served(args.model, cpu)
    net.eval()
    test, train = load_split("mnist", "test"), load_split("mnist", "train")
    x_test, y_test = to_unit(test.images[: args.n], cpu), test.labels[: args.n]
    pgd20 = build_attack("pgd", {"steps": 20})
    idx = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(1))[: args.images]
    stored = {k: v.clone() for k, v in net.state_dict().items()}

    def bf16() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def robust(tag: str) -> None:
        if args.n == 0:
            return
        t0 = time.time()
        with bf16():
            flags = robust_flags(net, x_test, y_test, EPS, pgd20)
        acc = 100 * float(flags.float().mean())
        sys.stdout.write(f"{tag}: PGD-20 robust {acc:.2f} % on {args.n} ({time.time() - t0:.0f} s)\n")

    def batches(feed: str) -> Iterator[torch.Tensor]:
        for s in range(0, len(idx), 128):
            i = idx[s : s + 128]
            x, y = to_unit(train.images[i], cpu), train.labels[i]
            if feed == "trades":
                yield torch.cat(
                    [x, trades_adversarial(net, x, eps=EPS, alpha=0.075, steps=10, autocast=bf16)]
                )
            elif feed == "ce":
                with bf16():
                    yield pgd(net, x, y, eps=EPS, alpha=0.075, steps=10, early_stop=False)
            else:
                yield x

    robust("shipped statistics")
    for feed in args.feeds.split(","):
        net.load_state_dict(stored)
        seen = recalibrate_batchnorm(net, batches(feed))
        net.eval()
        robust(f"statistics recomputed over {feed}")
        if args.write:
            write_run(Path(args.write), net, card, feed, seen)


def write_run(run_dir: Path, net: torch.nn.Module, card: Any, feed: str, seen: int) -> None:
    """``net`` as a training checkpoint of ``card``'s run, for ``erc export``."""
    assert isinstance(net, ERNet), "--write takes a model this project trained (an ER store entry)"
    network = net.net
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": card.training.get("epochs", 0),
        "config": card.train_config,
        "method": card.method,
        "arch": card.arch,
        "arch_kwargs": card.arch_kwargs,
        "dataset": card.dataset,
        "label_names": card.label_names,
        "input_shape": card.input_shape,
        "data": {
            "batchnorm_statistics": f"recomputed over {feed} ({seen} training images), weights of "
            f"{card.name} sha256 {card.weights_sha256[:12]}"
        },
        "state": {"modules": {"model": {k: v.detach().clone() for k, v in network.state_dict().items()}}},
        "versions": {"torch": str(torch.__version__)},
    }
    save_checkpoint(run_dir / CHECKPOINT, state)
    sys.stdout.write(f"wrote {run_dir / CHECKPOINT}\n")


if __name__ == "__main__":
    main()
