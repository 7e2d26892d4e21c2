#!/usr/bin/env python
"""Training-speed benchmark: seconds per epoch of the paper's MNIST ER-Classifier under 10-step PGD
min-max training (Algorithm 1: PGD examples, critic step, classification step, encoder step), for
several execution paths side by side in one process, on the same data and device:

- ``fp32-eager``: the reference, plain fp32 eager at the paper's batch size 128;
- ``bf16-cl``: bf16 autocast + channels_last at a larger batch;
- ``bf16-cl-compile``: the same with the attacked network under ``torch.compile``.

Each variant builds a fresh method from ``training/configs/mnist-er.yaml`` (plus its overrides),
runs ``--warmup`` training steps (compilation happens there and is timed separately), then times
``--steps`` steps with the device synchronised before and after. Seconds per epoch are projected as
``(60000 // batch) * seconds per step``: the data indexing and the end-of-epoch evaluation of the
trainer are not in it. The last output line is JSON with every figure.

    python bench/train.py --device cuda                  # about a minute on an H100/H200
    python bench/train.py --device cpu --width 0.25 --steps 3 --variants fp32-eager:64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, log, machine

from training.config import load_config
from training.data import dataset_info, load_split
from training.devices import resolve_device
from training.methods import create_method

VARIANTS: dict[str, dict[str, Any]] = {
    "fp32-eager": {"run.amp": "none", "run.channels_last": False, "run.compile": False},
    "bf16-cl": {"run.amp": "bf16", "run.channels_last": True, "run.compile": False},
    "bf16-cl-compile": {"run.amp": "bf16", "run.channels_last": True, "run.compile": True},
}
DEFAULT = "fp32-eager:128,bf16-cl:512,bf16-cl-compile:512"


def parse_variants(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, batch = item.strip().partition(":")
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        out.append((name, int(batch or 128)))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(
    name: str,
    batch: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    overrides = {
        **VARIANTS[name],
        "data.batch_size": batch,
        "model.width": args.width,
        "adv.steps": args.pgd_steps,
        "run.device": str(device),
    }
    cfg = load_config(REPO / "training/configs/mnist-er.yaml", overrides)
    torch.manual_seed(0)
    info = dataset_info("mnist")
    method = create_method(cfg, info, device)
    method.train(True)
    method.set_progress(1e9)  # full eps: no warm-up ramp
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(images), (batch,), generator=gen).to(device)
        x = images[idx].float().div_(255.0)
        if cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        method.train_step(x, labels[idx])

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    per_step = (time.perf_counter() - t0) / args.steps
    steps_per_epoch = args.epoch_images // batch
    out = {
        "variant": name,
        "batch": batch,
        "amp": cfg.run.amp,
        "channels_last": cfg.run.channels_last,
        "compile": cfg.run.compile,
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "timed_steps": args.steps,
        "s_per_step": round(per_step, 5),
        "images_per_s": round(batch / per_step, 1),
        "s_per_epoch": round(steps_per_epoch * per_step, 2),
    }
    log(
        f"{name:>16} b{batch:<4} {out['images_per_s']:>9.0f} img/s  {out['s_per_epoch']:>7.2f} s/epoch "
        f"(warm-up {warmup_s:.1f} s)"
    )
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", default=DEFAULT, help=f"name:batch,... (default {DEFAULT})")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--width", type=float, default=1.0, help="1.0 is the paper's size")
    p.add_argument("--epoch-images", type=int, default=60000)
    p.add_argument("--data-dir")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    train = load_split("mnist", "train", args.data_dir)
    images, labels = train.images.to(device), train.labels.to(device)
    results = [time_variant(n, b, images, labels, args, device) for n, b in parse_variants(args.variants)]
    ref = results[0]["s_per_epoch"]
    for r in results:
        r["speedup_vs_first"] = round(ref / r["s_per_epoch"], 2)
    report = {
        "bench": "train",
        "model": f"er_mnist width {args.width}, embed 4, method er, PGD-{args.pgd_steps} min-max at eps 0.3",
        "device": str(device),
        "machine": machine(),
        "results": results,
        "command": "python bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
