#!/usr/bin/env python
"""Serving benchmark, side by side in one run on one model and one machine:

1. in-process forward throughput at the service's max batch (the limit) and batch-1 latency;
2. the HTTP service (``erc serve``) at 1 and at N concurrent clients (wrk, loopback), cold start,
   resident memory at rest and its peak under load;
3. TorchServe serving the same weights through the project's handler, in its best measured
   configuration (one worker, batches of up to 32, 5 ms delay, 2 torch threads), same load.

Every HTTP request carries one of 64 real MNIST test PNGs, round-robin, as a raw ``image/png``
body; before the load each server's labels are checked against the in-process model's.
The last output line is JSON with all figures and the ratios.

    python bench/serve.py                    # ~4 minutes on 2 cores
    python bench/serve.py --seconds 10 --repeats 1 --skip-torchserve   # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    RssSampler,
    bench_model,
    check_labels,
    free_port,
    in_process_labels,
    log,
    machine,
    mnist_pngs,
    rss_bytes,
    run_wrk,
    start_erc,
    wrk_available,
)

from service.inference import InferenceEngine


def in_process(engine: InferenceEngine, max_batch: int, threads: int, seconds: float) -> dict:
    """The limit: ``InferenceEngine.forward`` (what the servers run) back to back at the max batch."""
    torch.set_num_threads(threads)
    x = torch.rand(max_batch, *engine.card.input_shape)
    one = x[:1]
    for _ in range(5):
        engine.forward(x)
        engine.forward(one)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.forward(x)
        n += max_batch
    rate = n / (time.perf_counter() - t0)
    lat = []
    for _ in range(200):
        t = time.perf_counter()
        engine.forward(one)
        lat.append(time.perf_counter() - t)
    return {
        "batch": max_batch,
        "threads": threads,
        "images_per_s": round(rate, 1),
        "batch1_median_ms": round(statistics.median(lat) * 1e3, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(REPO / "model_store"))
    ap.add_argument("--model", default="mnist-er")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (both servers and in-process)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0, help="per load run at N clients (1 client: half)")
    ap.add_argument("--repeats", type=int, default=3, help="load runs per server; medians reported")
    ap.add_argument("--skip-torchserve", action="store_true")
    args = ap.parse_args()
    if not wrk_available():
        log("wrk is needed: apt-get install wrk")
        return 2
    store, model_desc = bench_model(Path(args.store), args.model)
    name = args.model
    log(f"model: {model_desc}")
    pngs, images = mnist_pngs(64)
    expected = in_process_labels(store, name, images)
    result: dict = {"machine": machine(), "model": model_desc, "settings": vars(args)}

    engine = InferenceEngine.from_store(store / name, "cpu")

    workdir = Path(tempfile.mkdtemp(prefix="erc-bench-"))
    env = {
        "ERC_MAX_BATCH_SIZE": str(args.max_batch),
        "ERC_BATCH_WAIT_MS": str(args.wait_ms),
        "ERC_TORCH_THREADS": str(args.threads),
        "ERC_MODELS": name,
        "ERC_DEFAULT_MODEL": name,
        "ERC_MAX_QUEUE": "1024",
    }
    servers: dict[str, dict] = {}

    # -- ours ----------------------------------------------------------------------------------
    srv = start_erc(store, env, workdir)
    ours: dict = {
        "cold_start_s": round(srv.started_s, 2),
        "rss_ready_mb": round(rss_bytes(srv.proc.pid) / 2**20, 1),
    }
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        ours["label_mismatches"] = check_labels(
            lambda png: c.post(
                f"/v1/models/{name}:predict", content=png, headers={"content-type": "image/png"}
            ),
            pngs,
            expected,
        )
    servers["erc"] = {
        "url": srv.url,
        "path": f"/v1/models/{name}:predict",
        "auth": "",
        "info": ours,
        "pid": srv.proc.pid,
        "stop": srv.stop,
    }

    # -- TorchServe ------------------------------------------------------------------------------
    if not args.skip_torchserve:
        from service import torchserve
        from service.packaging import package_model

        mar_store = workdir / "mar"
        package_model(store, name, out_dir=mar_store)
        ts_ports = (free_port(), free_port(), free_port())
        t0 = time.perf_counter()
        ts = torchserve.start(
            workdir / "torchserve",
            model_store=mar_store,
            models={name: {"batchSize": args.max_batch, "maxBatchDelay": int(args.wait_ms)}},
            ports=ts_ports,
            env={"ERC_TORCH_THREADS": str(args.threads)},
        )
        ts.wait_ready(name)
        ts_info: dict = {
            "cold_start_s": round(time.perf_counter() - t0, 2),
            "config": {
                "workers": 1,
                "batchSize": args.max_batch,
                "maxBatchDelay_ms": args.wait_ms,
                "torch_threads": args.threads,
            },
        }
        auth = ts.inference_headers()["Authorization"]
        with httpx.Client(base_url=ts.inference_url, timeout=30, headers={"Authorization": auth}) as c:
            ts_info["label_mismatches"] = check_labels(
                lambda png: c.post(
                    f"/predictions/{name}", content=png, headers={"content-type": "image/png"}
                ),
                pngs,
                expected,
            )
        ts_info["rss_ready_mb"] = round(rss_bytes(ts.proc.pid) / 2**20, 1)
        servers["torchserve"] = {
            "url": ts.inference_url,
            "path": f"/predictions/{name}",
            "auth": auth,
            "info": ts_info,
            "pid": ts.proc.pid,
            "stop": ts.stop,
        }

    # -- load: every repeat measures the in-process limit and then each server, so that the drift of
    # a shared machine hits all of them; ratios are taken within a repeat, then the median.
    runs: dict[str, dict[str, list]] = {k: {"1": [], "n": []} for k in servers}
    limits: list[dict] = []
    try:
        for rep in range(args.repeats):
            limits.append(in_process(engine, args.max_batch, args.threads, 6.0))
            log(f"  repeat {rep + 1} in-process: {limits[-1]}")
            for key, s in servers.items():
                run_wrk(s["url"], s["path"], pngs, args.clients, 3, s["auth"])  # warm
                with RssSampler(s["pid"]) as rss:
                    one = run_wrk(s["url"], s["path"], pngs, 1, args.seconds / 2, s["auth"])
                    many = run_wrk(s["url"], s["path"], pngs, args.clients, args.seconds, s["auth"])
                s["info"]["rss_peak_mb"] = max(s["info"].get("rss_peak_mb", 0), round(rss.peak / 2**20, 1))
                # Resident memory after each repeat: growth from repeat to repeat would be a leak.
                s["info"].setdefault("rss_after_repeat_mb", []).append(round(rss_bytes(s["pid"]) / 2**20, 1))
                runs[key]["1"].append(one)
                runs[key]["n"].append(many)
                log(
                    f"  repeat {rep + 1} {key}: 1 client {one.rps} req/s p50 {one.p50_ms} ms | "
                    f"{args.clients} clients {many.rps} req/s p50 {many.p50_ms} p99 {many.p99_ms} ms"
                )
        for s in servers.values():
            s["info"]["rss_after_mb"] = round(rss_bytes(s["pid"]) / 2**20, 1)
    finally:
        for s in servers.values():
            s["stop"]()

    def median_run(rs: list) -> dict:
        best = sorted(rs, key=lambda r: r.rps)[len(rs) // 2]
        d = asdict(best)
        d["rps_all"] = [r.rps for r in rs]
        return d

    for key, s in servers.items():
        result[key] = {
            **s["info"],
            "one_client": median_run(runs[key]["1"]),
            f"{args.clients}_clients": median_run(runs[key]["n"]),
        }
    result["in_process"] = {
        **limits[len(limits) // 2],
        "images_per_s_all": [lim["images_per_s"] for lim in limits],
        "batch1_median_ms_all": [lim["batch1_median_ms"] for lim in limits],
    }

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    ours_n = [r.rps for r in runs["erc"]["n"]]
    ratios = {
        "http_vs_in_process_limit": med(
            [o / lim["images_per_s"] for o, lim in zip(ours_n, limits, strict=True)]
        ),
        "one_client_p50_vs_batch1_forward": med(
            [r.p50_ms / lim["batch1_median_ms"] for r, lim in zip(runs["erc"]["1"], limits, strict=True)]
        ),
    }
    if "torchserve" in runs:
        ts_n = [r.rps for r in runs["torchserve"]["n"]]
        ratios["erc_vs_torchserve"] = med([o / t for o, t in zip(ours_n, ts_n, strict=True)])
    result["ratios"] = ratios
    result["targets"] = {
        "http_vs_in_process_limit": ">= 0.8",
        "erc_vs_torchserve": ">= 1.2",
        "one_client_p50_vs_batch1_forward": "<= 1.2",
        "rss_mb": "< 1024",
        "cold_start_s": "< 10",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
