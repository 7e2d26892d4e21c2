#!/usr/bin/env python
"""Load benchmark (bounded, loopback only): N concurrent clients of mixed valid and invalid
requests against ``erc serve`` for a fixed time, every response checked:

- valid requests (KServe v1 JSON with base64 images, v1 raw PNG bodies, v2 FP32 tensors, v2 BYTES;
  1 to 4 images each) must answer 200 with, per image, the label (and probabilities or logits,
  within 1e-3) the server gave for that image alone before the load started; the in-process
  model's labels are reported too;
- invalid requests (corrupt PNG, bad base64, unknown model, wrong v2 shape, malformed JSON) must
  answer their documented 4xx status and error code.

Counted per phase: requests, 5xx, lost (exceptions: timeouts, resets), mismatched (wrong status,
code, label or values); throughput and p50/p99 latency. Phases: ``quiet``, then ``audit_running``
(the same load while an admin audit attacks the model in its background process).

The last output line is JSON with every figure; the exit status is 1 when any phase had a 5xx, a
lost or a mismatched response.

    python bench/load.py                          # 2 x 60 s at 32 clients
    python bench/load.py --seconds 20 --skip-audit
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    bench_model,
    in_process_labels,
    log,
    machine,
    mnist_pngs,
    start_audit_server,
    start_background_audit,
)

TOKEN = "bench-load-token"
JSON = {"content-type": "application/json"}
PNG = {"content-type": "image/png"}
TOL = 1e-3


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Request:
    kind: str
    path: str
    body: bytes
    headers: dict[str, str]
    images: list[int] = field(default_factory=list)  # indices of the images (valid requests)
    status: int = 200  # expected
    code: str | None = None  # expected error code (invalid requests)


@dataclass
class Reference:
    """The server's own answer for each image alone, sent one at a time before the load."""

    labels: list[int]
    probabilities: np.ndarray  # [N, m]
    logits: np.ndarray  # [N, m]


class Workload:
    """Prebuilt request bodies (encoding them under load would measure the client, not the server)."""

    VALID: ClassVar[dict[str, int]] = {"v1_json": 30, "v1_raw": 25, "v2_fp32": 15, "v2_bytes": 10}
    INVALID: ClassVar[dict[str, int]] = {
        "corrupt_png": 5,
        "bad_base64": 4,
        "unknown_model": 4,
        "v2_wrong_shape": 4,
        "bad_json": 3,
    }

    def __init__(self, model: str, pngs: list[bytes], images: np.ndarray, invalid_pct: float) -> None:
        self.model, self.pngs, self.images = model, pngs, images
        self.floats = images.astype(np.float32) / 255.0  # [N, 1, 28, 28]
        scale = (100 - invalid_pct) / sum(self.VALID.values())
        iscale = invalid_pct / sum(self.INVALID.values())
        self.kinds = [*self.VALID, *self.INVALID]
        self.weights = [
            *(w * scale for w in self.VALID.values()),
            *(w * iscale for w in self.INVALID.values()),
        ]
        self._cache: dict[tuple[str, tuple[int, ...]], Request] = {}
        for kind in self.kinds:  # every request draw() can pick, built before the clock starts
            for start in range(len(pngs)):
                for k in range(1, self.max_images(kind) + 1):
                    self.build(kind, self.indices(start, k))

    def max_images(self, kind: str) -> int:
        return 4 if kind in ("v1_json", "v2_fp32", "v2_bytes") else 1

    def indices(self, start: int, k: int) -> tuple[int, ...]:
        return tuple((start + j * 7) % len(self.pngs) for j in range(k))

    def predict_path(self, model: str | None = None) -> str:
        return f"/v1/models/{model or self.model}:predict"

    def build(self, kind: str, idx: tuple[int, ...]) -> Request:
        key = (kind, idx)
        if key in self._cache:
            return self._cache[key]
        ids = list(idx)
        m = self.model
        if kind == "v1_json":
            body = {"instances": [{"b64": b64(self.pngs[i])} for i in ids]}
            req = Request(kind, self.predict_path(), json.dumps(body).encode(), JSON, ids)
        elif kind == "v1_raw":
            req = Request(kind, self.predict_path(), self.pngs[ids[0]], PNG, ids[:1])
        elif kind == "v2_fp32":
            x = self.floats[ids]
            inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
            body = {"inputs": [inp], "outputs": [{"name": "label"}, {"name": "logits"}]}
            req = Request(kind, f"/v2/models/{m}/infer", json.dumps(body).encode(), JSON, ids)
        elif kind == "v2_bytes":
            inp = {
                "name": "input",
                "shape": [len(ids)],
                "datatype": "BYTES",
                "data": [b64(self.pngs[i]) for i in ids],
            }
            body = {"inputs": [inp], "outputs": [{"name": "label"}, {"name": "logits"}]}
            req = Request(kind, f"/v2/models/{m}/infer", json.dumps(body).encode(), JSON, ids)
        elif kind == "corrupt_png":
            png = self.pngs[ids[0]]
            bad = png[:8] + bytes(b ^ 0x5A for b in png[8:40]) + png[40 : len(png) // 2]
            req = Request(kind, self.predict_path(), bad, PNG, status=422, code="invalid_image")
        elif kind == "bad_base64":
            body = {"instances": [{"b64": "!!not*base64" + b64(self.pngs[ids[0]])[:40]}]}
            req = Request(
                kind, self.predict_path(), json.dumps(body).encode(), JSON, status=422, code="invalid_input"
            )
        elif kind == "unknown_model":
            body = {"instances": [{"b64": b64(self.pngs[ids[0]])}]}
            path = self.predict_path("no-such-model")
            req = Request(kind, path, json.dumps(body).encode(), JSON, status=404, code="model_not_found")
        elif kind == "v2_wrong_shape":
            x = self.floats[ids[0]]
            inp = {
                "name": "input",
                "shape": [1, 1, 27, 28],
                "datatype": "FP32",
                "data": x.ravel()[:756].tolist(),
            }
            path = f"/v2/models/{m}/infer"
            req = Request(
                kind, path, json.dumps({"inputs": [inp]}).encode(), JSON, status=422, code="invalid_input"
            )
        elif kind == "bad_json":
            req = Request(
                kind, self.predict_path(), b'{"instances": [{"b64": ', JSON, status=400, code="bad_request"
            )
        else:
            raise ValueError(kind)
        self._cache[key] = req
        return req

    def draw(self, rng: random.Random) -> Request:
        kind = rng.choices(self.kinds, self.weights)[0]
        k = rng.randint(1, self.max_images(kind))
        return self._cache[(kind, self.indices(rng.randrange(len(self.pngs)), k))]


def check(req: Request, status: int, body: bytes, ref: Reference) -> str | None:
    """None when the response is the expected one; else what is wrong."""
    if status != req.status:
        return f"status {status}, expected {req.status}"
    try:
        doc = json.loads(body)
    except ValueError:
        return "body is not JSON"
    if req.code is not None:
        code = (doc.get("error") or {}).get("code")
        return None if code == req.code else f"error code {code!r}, expected {req.code!r}"
    if req.kind.startswith("v1"):
        preds = doc.get("predictions") or []
        if len(preds) != len(req.images):
            return f"{len(preds)} predictions for {len(req.images)} images"
        for p, i in zip(preds, req.images, strict=True):
            if p["label"] != ref.labels[i]:
                return f"image {i}: label {p['label']}, expected {ref.labels[i]}"
            if not np.allclose(p["probabilities"], ref.probabilities[i], atol=TOL, rtol=TOL):
                return f"image {i}: probabilities differ"
        return None
    outputs = {o["name"]: o for o in doc.get("outputs") or []}
    labels = outputs.get("label", {}).get("data")
    expected = [ref.labels[i] for i in req.images]
    if labels != expected:
        return f"labels {labels}, expected {expected}"
    logits = np.asarray(outputs["logits"]["data"], dtype=np.float64).reshape(len(req.images), -1)
    if not np.allclose(logits, ref.logits[req.images], atol=TOL, rtol=TOL):
        return "logits differ"
    return None


@dataclass
class PhaseStats:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    valid_latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)  # exception type -> count
    mismatched: int = 0
    examples: list[str] = field(default_factory=list)
    images: int = 0

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies) + sum(self.lost.values())
        lat = np.asarray(self.latencies) * 1000
        vlat = np.asarray(self.valid_latencies) * 1000

        def pct(a: np.ndarray, q: float) -> float | None:
            return round(float(np.percentile(a, q)), 2) if len(a) else None

        return {
            "seconds": round(self.seconds, 2),
            "requests": n,
            "rps": round(n / self.seconds, 1) if self.seconds else 0.0,
            "images_per_s": round(self.images / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "valid_p50_ms": pct(vlat, 50),
            "valid_p99_ms": pct(vlat, 99),
            "max_ms": round(float(lat.max()), 2) if len(lat) else None,
            "status_5xx": sum(v for k, v in self.statuses.items() if k >= 500),
            "lost": sum(self.lost.values()),
            "lost_by_error": dict(self.lost),
            "mismatched": self.mismatched,
            "mismatch_examples": self.examples[:5],
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "kinds": dict(sorted(self.kinds.items())),
        }


async def run_load(
    url: str, work: Workload, ref: Reference, clients: int, seconds: float, seed: int
) -> PhaseStats:
    stats = PhaseStats()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:

        async def worker(w: int, deadline: float) -> None:
            rng = random.Random(seed * 1000 + w)
            while time.perf_counter() < deadline:
                req = work.draw(rng)
                stats.kinds[req.kind] += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(req.path, content=req.body, headers=req.headers)
                except Exception as exc:  # a lost request: timeout, reset, refused
                    stats.lost[type(exc).__name__] += 1
                    continue
                dt = time.perf_counter() - t0
                stats.latencies.append(dt)
                stats.statuses[r.status_code] += 1
                if req.code is None:
                    stats.valid_latencies.append(dt)
                    stats.images += len(req.images)
                problem = check(req, r.status_code, r.content, ref)
                if problem is not None:
                    stats.mismatched += 1
                    if len(stats.examples) < 5:
                        stats.examples.append(f"{req.kind} {req.path}: {problem}: {r.text[:200]}")

        t0 = time.perf_counter()
        deadline = t0 + seconds
        await asyncio.gather(*(worker(w, deadline) for w in range(clients)))
        stats.seconds = time.perf_counter() - t0
    return stats


def reference(c: httpx.Client, work: Workload) -> Reference:
    """Each image alone, one request at a time: v1 for the probabilities, v2 for the logits."""
    labels, probs, logits = [], [], []
    for i in range(len(work.pngs)):
        r = c.post(work.predict_path(), content=work.pngs[i], headers=PNG)
        r.raise_for_status()
        p = r.json()["predictions"][0]
        r2 = c.post(f"/v2/models/{work.model}/infer", content=work.build("v2_fp32", (i,)).body, headers=JSON)
        r2.raise_for_status()
        out = {o["name"]: o for o in r2.json()["outputs"]}
        if out["label"]["data"] != [p["label"]]:
            raise RuntimeError(f"image {i}: v1 says {p['label']}, v2 says {out['label']['data']}")
        labels.append(p["label"])
        probs.append(p["probabilities"])
        logits.append(out["logits"]["data"])
    return Reference(labels, np.asarray(probs), np.asarray(logits))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(REPO / "model_store"))
    ap.add_argument("--model", default="mnist-er")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    ap.add_argument("--images", type=int, default=64, help="distinct MNIST test images")
    ap.add_argument("--invalid-pct", type=float, default=20.0, help="percent of invalid requests")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-audit", action="store_true", help="no second phase with an audit running")
    ap.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE", help="extra server setting"
    )
    args = ap.parse_args()

    store, desc = bench_model(Path(args.store), args.model)
    pngs, images = mnist_pngs(args.images)
    work = Workload(args.model, pngs, images, args.invalid_pct)
    result: dict[str, Any] = {"bench": "load", "machine": machine(), "model": desc, "settings": vars(args)}
    log(f"model: {desc}; {args.clients} clients, {args.seconds:g} s per phase, {args.invalid_pct:g}% invalid")

    srv = start_audit_server(store, args.model, TOKEN, args.threads, args.server_env)
    phases: dict[str, PhaseStats] = {}
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            ref = reference(c, work)
        own = in_process_labels(store, args.model, images)
        agree = sum(a == b for a, b in zip(own, ref.labels, strict=True))
        result["reference"] = {"images": len(pngs), "server_agrees_with_in_process": agree}
        log(f"reference: server and in-process labels agree on {agree}/{len(pngs)} images")
        if args.warmup > 0:
            asyncio.run(run_load(srv.url, work, ref, args.clients, args.warmup, args.seed + 99))
        phases["quiet"] = asyncio.run(run_load(srv.url, work, ref, args.clients, args.seconds, args.seed))
        if not args.skip_audit:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as c:
                audit_id = start_background_audit(c, args.model)
                phases["audit_running"] = asyncio.run(
                    run_load(srv.url, work, ref, args.clients, args.seconds, args.seed + 1)
                )
                status = c.get(f"/admin/audits/{audit_id}").json()
                result["audit"] = {"status": status.get("status"), "progress": status.get("progress")}
                if status.get("status") in ("queued", "running"):
                    c.delete(f"/admin/audits/{audit_id}")
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            result["ready_after"] = c.get("/readyz").status_code == 200
    finally:
        result["clean_shutdown"] = srv.stop()

    ok = result["ready_after"] and result["clean_shutdown"]
    result["phases"] = {}
    for name, st in phases.items():
        s = st.summary()
        result["phases"][name] = s
        ok = ok and s["status_5xx"] == 0 and s["lost"] == 0 and s["mismatched"] == 0
        log(
            f"  {name:14} {s['requests']:>7} requests {s['rps']:>8} req/s  p50 {s['p50_ms']} ms  "
            f"p99 {s['p99_ms']} ms  5xx {s['status_5xx']}  lost {s['lost']}  mismatched {s['mismatched']}"
        )
        for ex in s["mismatch_examples"]:
            log(f"    {ex}")
    result["ok"] = bool(ok)
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
