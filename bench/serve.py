#!/usr/bin/env python
"""Serving benchmark, side by side in one run on one model and one machine:

1. in-process forward throughput at the service's max batch (the limit) and batch-1 latency;
2. the HTTP service (``erc serve``) at 1 and at N concurrent clients (wrk, loopback), cold start,
   resident memory (RSS, and PSS: shared pages split among processes) at rest and its peak under load;
3. ``erc serve`` with ``ERC_HTTP_PROCESSES=N`` (``--http-processes``: one model process batching for
   N HTTP processes, service/multiproc), for each N asked;
4. TorchServe serving the same weights through the project's handler, in the best of its
   configurations on this machine (one worker with all torch threads, or one worker per core
   with one thread each; batches of up to 32, 5 ms delay), picked by a first run of each.

Each server is warmed up at N clients (``--warmup`` s) before the repeats, so that TorchServe's JVM
is level; every run reports where the CPU went (ms of CPU per request: the event loop, the
inference threads, TorchServe's frontend and workers, the load generator, idle).

Every HTTP request carries one of 64 real MNIST test PNGs, round-robin, as a raw ``image/png``
body; before the load each server's labels are checked against the in-process model's.
The last output line is JSON with all figures and the ratios.

    python bench/serve.py                    # ~7 minutes on 2 cores
    python bench/serve.py --seconds 10 --repeats 1 --skip-torchserve   # quick look
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    CpuMeter,
    RssSampler,
    bench_model,
    check_labels,
    free_port,
    in_process_labels,
    log,
    machine,
    mnist_pngs,
    process_roles,
    pss_bytes,
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


def wait_workers(ts, name: str, workers: int, timeout: float = 180.0) -> None:
    """Until all ``workers`` of the model are READY (``wait_ready`` returns with the first)."""
    ts.wait_ready(name)
    deadline = time.perf_counter() + timeout
    while sum(w.get("status") == "READY" for w in ts.model_status(name)) < workers:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"TorchServe: {workers} workers not ready in {timeout:.0f} s")
        time.sleep(0.5)


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
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds at N clients per server, before")
    ap.add_argument("--skip-torchserve", action="store_true")
    ap.add_argument(
        "--http-processes",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[2],
        help="also measure erc serve with ERC_HTTP_PROCESSES=N (one model process), for each N of this "
        "comma-separated list (empty: skip)",
    )
    ap.add_argument(
        "--model-threads", type=int, default=0, help="torch threads of the model process (0: --threads)"
    )
    ap.add_argument("--more-clients", type=int, default=64, help="a further load level per repeat (0: skip)")
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
    atexit.register(srv.stop)  # also when a later step fails (stopping twice is harmless)
    ours: dict = {
        "cold_start_s": round(srv.started_s, 2),
        "rss_ready_mb": round(rss_bytes(srv.proc.pid) / 2**20, 1),
        "pss_ready_mb": round(pss_bytes(srv.proc.pid) / 2**20, 1),
    }
    ours["label_mismatches"] = check_labels(srv.url, f"/v1/models/{name}:predict", pngs, expected)
    servers["erc"] = {
        "url": srv.url,
        "path": f"/v1/models/{name}:predict",
        "auth": "",
        "info": ours,
        "pid": srv.proc.pid,
        "stop": srv.stop,
    }

    # -- erc serve with ERC_HTTP_PROCESSES=N: N HTTP processes, one model process (service/multiproc) --
    for n_http in args.http_processes:
        layout_env = {**env, "ERC_HTTP_PROCESSES": str(n_http)}
        if args.model_threads:
            layout_env["ERC_TORCH_THREADS"] = str(args.model_threads)
        mp = start_erc(store, layout_env, workdir / f"http{n_http}")
        atexit.register(mp.stop)
        roles = process_roles(mp.proc.pid)
        info: dict = {
            "cold_start_s": round(mp.started_s, 2),
            "config": {"http_processes": n_http, "model_torch_threads": int(layout_env["ERC_TORCH_THREADS"])},
            "rss_ready_mb": round(rss_bytes(mp.proc.pid) / 2**20, 1),
            "pss_ready_mb": round(pss_bytes(mp.proc.pid) / 2**20, 1),
        }
        info["label_mismatches"] = check_labels(mp.url, f"/v1/models/{name}:predict", pngs, expected)
        servers[f"erc_http{n_http}"] = {
            "url": mp.url,
            "path": f"/v1/models/{name}:predict",
            "auth": "",
            "info": info,
            "pid": mp.proc.pid,
            "loop_pids": tuple(p for p, role in roles.items() if role.startswith("http")),
            "model_pids": tuple(p for p, role in roles.items() if role == "model"),
            "stop": mp.stop,
        }

    # -- TorchServe ------------------------------------------------------------------------------
    if not args.skip_torchserve:
        from service import torchserve
        from service.packaging import package_model

        mar_store = workdir / "mar"
        package_model(store, name, out_dir=mar_store)
        cores = os.cpu_count() or 1
        configs = [(1, args.threads)] + ([(cores, 1)] if cores > 1 else [])

        def tmp_dir(workers: int) -> Path:
            path = workdir / f"torchserve-{workers}w-tmp-{time.monotonic_ns()}"
            path.mkdir(parents=True)
            return path

        def start_torchserve(workers: int, threads: int) -> tuple[Any, dict, str]:
            t0 = time.perf_counter()
            ts = torchserve.start(
                workdir / f"torchserve-{workers}w",
                model_store=mar_store,
                models={
                    name: {
                        "batchSize": args.max_batch,
                        "maxBatchDelay": int(args.wait_ms),
                        "minWorkers": workers,
                        "maxWorkers": workers,
                    }
                },
                ports=(free_port(), free_port(), free_port()),
                # TorchServe refuses to start while the pid file of the last one (in TMPDIR) names a
                # live process: the previous configuration's JVM may still be exiting.
                env={"ERC_TORCH_THREADS": str(threads), "TMPDIR": str(tmp_dir(workers))},
            )
            atexit.register(ts.stop)
            wait_workers(ts, name, workers)
            info: dict = {
                "cold_start_s": round(time.perf_counter() - t0, 2),
                "config": {
                    "workers": workers,
                    "batchSize": args.max_batch,
                    "maxBatchDelay_ms": args.wait_ms,
                    "torch_threads": threads,
                },
            }
            auth = ts.inference_headers()["Authorization"]
            info["label_mismatches"] = check_labels(
                ts.inference_url, f"/predictions/{name}", pngs, expected, auth
            )
            info["rss_ready_mb"] = round(rss_bytes(ts.proc.pid) / 2**20, 1)
            info["pss_ready_mb"] = round(pss_bytes(ts.proc.pid) / 2**20, 1)
            run_wrk(ts.inference_url, f"/predictions/{name}", pngs, args.clients, args.warmup, auth)
            return ts, info, auth

        # TorchServe runs one instance per machine: each configuration in turn, then the best again.
        trials = []
        for workers, threads in configs:
            ts, info, auth = start_torchserve(workers, threads)
            trial = run_wrk(ts.inference_url, f"/predictions/{name}", pngs, args.clients, args.seconds, auth)
            ts.stop()
            log(f"  TorchServe {workers} worker(s) x {threads} thread(s): {trial.rps} req/s")
            trials.append((trial.rps, workers, threads, info["label_mismatches"]))
        result["torchserve_configs"] = [
            {"workers": w, "torch_threads": t, "rps": rps, "label_mismatches": bad}
            for rps, w, t, bad in trials
        ]
        _, workers, threads, _ = max(trials)
        ts, ts_info, auth = start_torchserve(workers, threads)
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
    runs: dict[str, dict[str, list]] = {k: {"1": [], "n": [], "cpu": [], "more": []} for k in servers}
    limits: list[dict] = []
    try:
        for key, s in servers.items():
            if key != "torchserve":  # TorchServe was warmed up as it started (start_torchserve)
                run_wrk(s["url"], s["path"], pngs, args.clients, args.warmup, s["auth"])
        for rep in range(args.repeats):
            limits.append(in_process(engine, args.max_batch, args.threads, 6.0))
            log(f"  repeat {rep + 1} in-process: {limits[-1]}")
            for key, s in servers.items():
                run_wrk(s["url"], s["path"], pngs, args.clients, 3, s["auth"])  # warm
                loop_pids = s.get("loop_pids", (s["pid"],) if key == "erc" else ())
                with RssSampler(s["pid"]) as rss:
                    one = run_wrk(s["url"], s["path"], pngs, 1, args.seconds / 2, s["auth"])
                    with CpuMeter(s["pid"], loop_pids, s.get("model_pids", ())) as cpu:
                        many = run_wrk(s["url"], s["path"], pngs, args.clients, args.seconds, s["auth"])
                runs[key]["cpu"].append(cpu.per_request_ms(many.requests))
                if args.more_clients:
                    more = run_wrk(s["url"], s["path"], pngs, args.more_clients, args.seconds / 2, s["auth"])
                    runs[key]["more"].append(more)
                s["info"]["rss_peak_mb"] = max(s["info"].get("rss_peak_mb", 0), round(rss.peak / 2**20, 1))
                # Resident memory after each repeat: growth from repeat to repeat would be a leak.
                s["info"].setdefault("rss_after_repeat_mb", []).append(round(rss_bytes(s["pid"]) / 2**20, 1))
                runs[key]["1"].append(one)
                runs[key]["n"].append(many)
                more_txt = (
                    f" | {args.more_clients} clients {runs[key]['more'][-1].rps} req/s"
                    if args.more_clients
                    else ""
                )
                log(
                    f"  repeat {rep + 1} {key}: 1 client {one.rps} req/s p50 {one.p50_ms} ms | "
                    f"{args.clients} clients {many.rps} req/s p50 {many.p50_ms} p99 {many.p99_ms} ms"
                    f"{more_txt} | CPU ms/request {runs[key]['cpu'][-1]}"
                )
        for s in servers.values():
            s["info"]["rss_after_mb"] = round(rss_bytes(s["pid"]) / 2**20, 1)
            s["info"]["pss_after_mb"] = round(pss_bytes(s["pid"]) / 2**20, 1)
    finally:
        for s in servers.values():
            s["stop"]()

    def median_run(rs: list, cpu: list | None = None) -> dict:
        i = sorted(range(len(rs)), key=lambda j: rs[j].rps)[len(rs) // 2]
        d = asdict(rs[i])
        d["rps_all"] = [r.rps for r in rs]
        # Level repeats: the spread of the three, relative to their median.
        d["rps_spread"] = round((max(d["rps_all"]) - min(d["rps_all"])) / rs[i].rps, 3)
        if cpu:
            d["cpu_ms_per_request"] = cpu[i]
        return d

    for key, s in servers.items():
        result[key] = {
            **s["info"],
            "one_client": median_run(runs[key]["1"]),
            f"{args.clients}_clients": median_run(runs[key]["n"], runs[key]["cpu"]),
        }
        if runs[key]["more"]:
            result[key][f"{args.more_clients}_clients"] = median_run(runs[key]["more"])
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
        if runs["torchserve"]["more"]:
            ratios[f"erc_vs_torchserve_{args.more_clients}_clients"] = med(
                [o.rps / t.rps for o, t in zip(runs["erc"]["more"], runs["torchserve"]["more"], strict=True)]
            )
    for n_http in args.http_processes:
        key = f"erc_http{n_http}"
        key_n = [r.rps for r in runs[key]["n"]]
        ratios[f"{key}_vs_in_process_limit"] = med(
            [o / lim["images_per_s"] for o, lim in zip(key_n, limits, strict=True)]
        )
        ratios[f"{key}_one_client_p50_vs_batch1_forward"] = med(
            [r.p50_ms / lim["batch1_median_ms"] for r, lim in zip(runs[key]["1"], limits, strict=True)]
        )
        ratios[f"{key}_vs_erc"] = med([m / o for m, o in zip(key_n, ours_n, strict=True)])
        if "torchserve" in runs:
            ratios[f"{key}_vs_torchserve"] = med([m / t for m, t in zip(key_n, ts_n, strict=True)])
            if runs["torchserve"]["more"]:
                ratios[f"{key}_vs_torchserve_{args.more_clients}_clients"] = med(
                    [
                        m.rps / t.rps
                        for m, t in zip(runs[key]["more"], runs["torchserve"]["more"], strict=True)
                    ]
                )
    result["ratios"] = ratios
    result["targets"] = {
        "http_vs_in_process_limit": ">= 0.85",
        "erc_vs_torchserve": ">= 1.2",
        "one_client_p50_vs_batch1_forward": "<= 1.2",
        f"{args.clients}_clients_p99_ms": "<= 43",
        "rss_mb": "< 1024, no growth over the repeats",
        "cold_start_s": "< 10",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
