#!/usr/bin/env python
"""Memory of one ``erc serve`` replica per process layout, side by side in one run.

For each layout (``--http-processes``: 1 is the single-process server; N > 1 is the supervisor,
N HTTP processes and one model process, service/multiproc), start ``erc serve`` on the model,
send ``--requests`` predictions (so that every HTTP process has served), then read each process's

- RSS (``VmRSS``): pages counted whole in every process that maps them, so torch's libraries,
  mapped by each process, count N + 1 times;
- PSS (``Pss`` of ``smaps_rollup``): each shared page split among the processes that map it; the
  sum over the tree is the memory the replica really holds, the figure to size a host by.

Then ``--clients`` closed-loop clients (wrk) for ``--seconds``: the peak of both sums under load,
sampled twice a second.

    python bench/memory.py --http-processes 1,2,3       # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    RssSampler,
    bench_model,
    children,
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

MB = 2**20


def measure(store: Path, name: str, n_http: int, args: argparse.Namespace, pngs: list[bytes]) -> dict:
    env = {
        "ERC_MODELS": name,
        "ERC_DEFAULT_MODEL": name,
        "ERC_TORCH_THREADS": str(args.threads),
        "ERC_HTTP_PROCESSES": str(n_http),
    }
    srv = start_erc(store, env, Path(tempfile.mkdtemp(prefix="erc-bench-memory-")))
    try:
        url = f"{srv.url}/v1/models/{name}:predict"

        def predict(i: int) -> int:
            body = pngs[i % len(pngs)]
            r = httpx.post(url, content=body, headers={"content-type": "image/png"}, timeout=30)
            return r.status_code

        with ThreadPoolExecutor(8) as pool:  # new connections: SO_REUSEPORT spreads them
            codes = list(pool.map(predict, range(args.requests)))
        assert codes.count(200) == args.requests, codes
        pid = srv.proc.pid
        roles = {pid: "supervisor" if n_http > 1 else "server", **process_roles(pid)}
        for child in children(pid):  # any other child, named by its command line
            if child not in roles:
                with open(f"/proc/{child}/cmdline", "rb") as fh:
                    roles[child] = fh.read().replace(b"\0", b" ").decode()[:80].strip()
        per_role = {
            role: {
                "rss_mb": round(rss_bytes(p, tree=False) / MB, 1),
                "pss_mb": round(pss_bytes(p, tree=False) / MB, 1),
            }
            for p, role in sorted(roles.items(), key=lambda kv: kv[1])
        }
        row = {
            "http_processes": n_http,
            "rss_mb": round(rss_bytes(pid) / MB, 1),
            "pss_mb": round(pss_bytes(pid) / MB, 1),
            "processes": per_role,
        }
        if args.seconds > 0:
            with RssSampler(pid) as rss, RssSampler(pid, reader=pss_bytes) as pss:
                load = run_wrk(srv.url, f"/v1/models/{name}:predict", pngs, args.clients, args.seconds)
            row["under_load"] = {
                "clients": args.clients,
                "rps": load.rps,
                "rss_peak_mb": round(rss.peak / MB, 1),
                "pss_peak_mb": round(pss.peak / MB, 1),
            }
        return row
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(REPO / "model_store"))
    ap.add_argument("--model", default="mnist-er")
    ap.add_argument("--http-processes", type=lambda v: [int(x) for x in v.split(",") if x], default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the (model) process")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=64, help="closed-loop clients of the load phase")
    ap.add_argument("--seconds", type=float, default=10.0, help="load phase (0: none)")
    args = ap.parse_args()
    if args.seconds > 0 and not wrk_available():
        log("wrk is needed for the load phase: apt-get install wrk (or --seconds 0)")
        return 2
    store, model_desc = bench_model(Path(args.store), args.model)
    pngs, _ = mnist_pngs(64)
    result: dict = {"machine": machine(), "model": model_desc, "settings": vars(args), "layouts": []}
    for n in args.http_processes:
        row = measure(store, args.model, n, args, pngs)
        log(f"http_processes={n}: RSS {row['rss_mb']} MB, PSS {row['pss_mb']} MB; {row['processes']}")
        log(f"  under load: {row.get('under_load')}")
        result["layouts"].append(row)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
