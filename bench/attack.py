#!/usr/bin/env python
"""Prediction latency with :attack requests mixed in, one model, one machine, one run:

1. ``quiet``: wrk sends PNGs to ``:predict`` at N clients; no attack;
2. ``attacks, isolated``: the same while attack clients send ``:attack`` requests back to back (the
   console's default: one image, PGD-40, eps = the training eps), with the attack-check children as
   shipped: a separate process under ``SCHED_IDLE`` at nice 10 (``ERC_ATTACK_SCHED_IDLE``);
3. ``attacks, same priority``: the same with ``ERC_ATTACK_SCHED_IDLE=false ERC_ATTACK_NICENESS=0``,
   i.e. what running the attacks beside the batcher at the predictions' own priority costs.

For each: prediction requests/s, p50 and p99, and the attacks answered (200), refused with 429
(queue full) or timed out (503), with their median latency. The last output line is JSON.

    python bench/attack.py                        # ~2 minutes on 2 CPU cores
    python bench/attack.py --seconds 30 --clients 32 --attack-clients 2
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, bench_model, log, machine, mnist_pngs, run_wrk, start_erc, wrk_available

FIGURES = ("rps", "p50_ms", "p99_ms", "errors")
VARIANTS = {
    "isolated": {"ERC_ATTACK_SCHED_IDLE": "true", "ERC_ATTACK_NICENESS": "10"},
    "same_priority": {"ERC_ATTACK_SCHED_IDLE": "false", "ERC_ATTACK_NICENESS": "0"},
}


class AttackLoad:
    """``clients`` threads sending ``:attack`` back to back until stopped; outcomes and latencies."""

    def __init__(self, url: str, model: str, pngs: list[bytes], clients: int, steps: int) -> None:
        self.url, self.model, self.pngs, self.steps = url, model, pngs, steps
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: dict[str, int] = {}
        self.seconds: list[float] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            k = i
            while not self.stop.is_set():
                body = {
                    "instances": [{"b64": base64.b64encode(self.pngs[k % len(self.pngs)]).decode()}],
                    "parameters": {"steps": self.steps, "seed": k},
                }
                t0 = time.perf_counter()
                r = c.post(f"/v1/models/{self.model}:attack", json=body)
                dt = time.perf_counter() - t0
                with self.lock:
                    self.outcomes[str(r.status_code)] = self.outcomes.get(str(r.status_code), 0) + 1
                    if r.status_code == 200:
                        self.seconds.append(dt)
                if r.status_code == 429:  # as a client should: wait as told
                    self.stop.wait(float(r.headers.get("retry-after", "1")))
                k += len(self.threads)

    def __enter__(self) -> AttackLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(150)

    def summary(self) -> dict[str, Any]:
        return {
            "outcomes": dict(sorted(self.outcomes.items())),
            "median_s": round(statistics.median(self.seconds), 2) if self.seconds else None,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(REPO / "model_store"))
    ap.add_argument("--model", default="mnist-er")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=16, help="wrk connections sending :predict")
    ap.add_argument("--attack-clients", type=int, default=2, help="threads sending :attack back to back")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    args = ap.parse_args()
    if not wrk_available():
        log("wrk is needed: apt-get install wrk (make bench-attack installs it)")
        return 2
    store, desc = bench_model(Path(args.store), args.model)
    pngs, _ = mnist_pngs(64)
    path = f"/v1/models/{args.model}:predict"
    result: dict[str, Any] = {"machine": machine(), "model": desc, "settings": vars(args), "runs": {}}
    log(f"model: {desc}; {args.clients} prediction clients, {args.attack_clients} attack clients")
    for variant, env in VARIANTS.items():
        srv = start_erc(
            store,
            {
                "ERC_MODELS": args.model,
                "ERC_DEFAULT_MODEL": args.model,
                "ERC_TORCH_THREADS": str(args.threads),
                **env,
            },
            Path(f"/tmp/erc-bench-attack-{variant}"),
        )
        try:
            run_wrk(srv.url, path, pngs, args.clients, 3)  # warm-up
            if variant == "isolated":
                quiet = run_wrk(srv.url, path, pngs, args.clients, args.seconds)
                result["runs"]["quiet"] = {k: getattr(quiet, k) for k in FIGURES}
                log(f"  quiet:          {quiet.rps} req/s p50 {quiet.p50_ms} p99 {quiet.p99_ms} ms")
            with httpx.Client(base_url=srv.url, timeout=120) as c:  # start the attack-check child
                one = {"b64": base64.b64encode(pngs[0]).decode()}
                body = {"instances": [one], "parameters": {"steps": 2}}
                c.post(f"/v1/models/{args.model}:attack", json=body).raise_for_status()
            with AttackLoad(srv.url, args.model, pngs, args.attack_clients, args.steps) as attacks:
                busy = run_wrk(srv.url, path, pngs, args.clients, args.seconds)
            row = {k: getattr(busy, k) for k in FIGURES}
            row["attacks"] = attacks.summary()
            result["runs"][f"attacks_{variant}"] = row
            log(
                f"  attacks, {variant:13} {busy.rps} req/s p50 {busy.p50_ms} p99 {busy.p99_ms} ms; "
                f"attacks {row['attacks']}"
            )
        finally:
            srv.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
