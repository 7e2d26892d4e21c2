#!/usr/bin/env python
"""What the per-request typicality score costs: ``InferenceEngine.forward`` on the same model and
the same batches with the score on and off, interleaved, median of ``--repeats`` rounds of
``--iters`` calls each. The last output line is JSON with every figure.

    python bench/typicality.py                       # model_store/mnist-er, batches 1 and 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, log, machine

from service.inference import InferenceEngine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "model_store" / "mnist-er"))
    p.add_argument("--batches", default="1,32")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = InferenceEngine.from_store(args.model)
    score = engine.typicality
    if score is None:
        raise SystemExit(f"{args.model} has no typicality score: erc typicality fit first")
    results = []
    for b in (int(v) for v in args.batches.split(",")):
        x = torch.rand(b, engine.spec.channels, engine.spec.height, engine.spec.width)
        times: dict[str, list[float]] = {"off": [], "on": []}
        engine.warmup([b])
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                engine.typicality = score if mode == "on" else None
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    engine.forward(x)
                times[mode].append((time.perf_counter() - t0) / args.iters)
        z = torch.randn(b, engine.card.embed_dim).numpy()
        t0 = time.perf_counter()
        for _ in range(args.iters * 10):
            score.scores(z)
        alone = (time.perf_counter() - t0) / (args.iters * 10)
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        row = {
            "batch": b,
            "forward_ms_without": round(1e3 * off, 3),
            "forward_ms_with": round(1e3 * on, 3),
            "added_ms": round(1e3 * (on - off), 3),
            "added_pct": round(100 * (on - off) / off, 1),
            "score_alone_ms": round(1e3 * alone, 4),
        }
        ms = f"{row['forward_ms_without']} ms -> {row['forward_ms_with']} ms"
        log(f"batch {b:>3}: {ms} ({row['added_pct']:+} %); the score alone {row['score_alone_ms']} ms")
        results.append(row)
    engine.typicality = score
    report = {
        "bench": "typicality",
        "model": engine.name,
        "machine": machine(),
        "threads": args.threads,
        "results": results,
        "command": "python bench/typicality.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
