#!/usr/bin/env python
"""Audit benchmark, side by side in one run on one model and one machine:

1. attack throughput (image-steps per second) of PGD: torchattacks' ``PGD`` against our audit
   engine (eps levels stacked into batches with a per-sample eps, channels-last; fp32 and bf16
   autocast running every step, and fp32 with early stop: a sample fooled once is not attacked
   further, which only pays on a trained model), on the same model, eps grid, steps and samples;
   the robust accuracies each finds;
2. prediction latency of the HTTP service with and without an audit running in the background,
   wrk at N clients; the audit runs in the API's own niced child process (``--audit-on api``,
   the embedded mode) or on a separate ``erc audit-worker`` process (``--audit-on worker``, the
   scaled-out mode; on one host it still shares the CPUs, see docs/benchmarks.md).

The last output line is JSON with every figure.

    python bench/audit.py                     # ~3 minutes on 2 CPU cores
    python bench/audit.py --skip-serving --n 256 --steps 10
    python bench/audit.py --skip-attacks --audit-on worker --seconds 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    bench_model,
    log,
    machine,
    mnist_pngs,
    run_wrk,
    start_audit_server,
    start_background_audit,
    wrk_available,
)

from service.audit.engine import AuditSpec, Engine, predict_labels
from training.attacks import build_attacks
from training.card import load_model
from training.data import load_split


def robust_accuracy(
    model: torch.nn.Module, adv: torch.Tensor, y: torch.Tensor, eps_levels: list[float], batch: int, device
) -> dict[float, float]:
    """Accuracy on ``adv`` (``[levels, N, C, H, W]``) per eps level; outside every timed section."""
    with torch.no_grad():
        return {
            e: float((predict_labels(model, adv[i].to(device), batch).cpu() == y).float().mean())
            for i, e in enumerate(eps_levels)
        }


def torchattacks_pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_levels: list[float],
    steps: int,
    batch: int,
    device: torch.device,
) -> tuple[float, dict[float, float]]:
    import torchattacks

    adv = torch.empty(len(eps_levels), *x.shape)
    t0 = time.perf_counter()
    for i, e in enumerate(eps_levels):
        atk = torchattacks.PGD(model, eps=e, alpha=2.5 * e / steps, steps=steps, random_start=True)
        for s in range(0, len(x), batch):
            adv[i, s : s + batch] = atk(x[s : s + batch].to(device), y[s : s + batch].to(device)).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, robust_accuracy(model, adv, y, eps_levels, batch, device)


def ours_pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_levels: list[float],
    steps: int,
    batch: int,
    device: torch.device,
    precision: str,
    early_stop: bool,
    compile: str = "off",
) -> tuple[float, dict[float, float]]:
    spec = AuditSpec(
        eps=eps_levels,
        suite=build_attacks([("pgd", {"steps": steps, "early_stop": early_stop})]),
        precision=precision,
        compile=compile,
        batch_size=batch,
        checks=False,
    )
    engine = Engine(model, spec, device=device)
    t0 = time.perf_counter()
    adv = engine.attack_stacked(spec.attacks[0], x, y, eps_levels, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, robust_accuracy(model, adv, y, eps_levels, batch, device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(REPO / "model_store"))
    ap.add_argument("--model", default="mnist-er")
    ap.add_argument("--n", type=int, default=256, help="samples")
    ap.add_argument("--eps", default="0.1,0.2,0.3")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (always on CUDA)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per attack path (median)")
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--skip-attacks", action="store_true", help="only the serving part")
    ap.add_argument(
        "--audit-on",
        choices=["api", "worker"],
        default="api",
        help="where the background audit runs: the API's own child (embedded) or an erc audit-worker",
    )
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting of the server, e.g. ERC_AUDIT_SCHED_IDLE=1 (repeatable)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    store, desc = bench_model(Path(args.store), args.model)
    model, card = load_model(store / args.model, device)
    data = load_split(card.dataset, "test", n=args.n, seed=0, folder=card.folder_options())
    x, y = data.as_float(), data.labels
    eps = [float(e) for e in args.eps.split(",")]
    work = len(x) * len(eps) * args.steps
    result: dict = {"machine": machine(), "device": str(device), "model": desc, "settings": vars(args)}
    log(f"model: {desc}; {len(x)} samples x {len(eps)} eps x PGD-{args.steps} on {device}")

    if not args.skip_attacks:
        # Warm-up of every path (allocator, oneDNN kernels), then the measured runs, interleaved
        # --repeats times; each row reports its median time.
        paths = {
            "torchattacks_fp32": lambda xs, ys, e, k: torchattacks_pgd(
                model, xs, ys, e, k, args.batch, device
            ),
            "ours_fp32": lambda xs, ys, e, k: ours_pgd(
                model, xs, ys, e, k, args.batch, device, "fp32", False
            ),
            "ours_bf16": lambda xs, ys, e, k: ours_pgd(
                model, xs, ys, e, k, args.batch, device, "bf16", False
            ),
            "ours_fp32_early_stop": lambda xs, ys, e, k: ours_pgd(
                model, xs, ys, e, k, args.batch, device, "fp32", True
            ),
        }
        if args.compile or device.type == "cuda":
            # Each call builds a new engine, but torch.compile's caches carry over (measured on the CPU:
            # 20.8 s for the first call, 0.36 s for the next), so the warm-up below pays the compile.
            paths["ours_bf16_compiled"] = lambda xs, ys, e, k: ours_pgd(
                model, xs, ys, e, k, args.batch, device, "bf16", False, "on"
            )
        for run in paths.values():
            run(x[:32], y[:32], eps[:1], 2)
        times: dict[str, list[float]] = {k: [] for k in paths}
        robust: dict[str, dict[float, float]] = {}
        for _ in range(args.repeats):
            for k, run in paths.items():
                t, robust[k] = run(x, y, eps, args.steps)
                times[k].append(t)
        rows = {}
        for k in paths:
            t = sorted(times[k])[len(times[k]) // 2]
            rows[k] = {"seconds": round(t, 2), "image_steps_per_s": round(work / t), "robust": robust[k]}
        for k, r in rows.items():
            log(f"  {k:18} {r['image_steps_per_s']:>8} image-steps/s  robust {json.dumps(r['robust'])}")
        base = rows["torchattacks_fp32"]["image_steps_per_s"]
        result["attack_throughput"] = rows
        result["ratios"] = {
            "ours_fp32_vs_torchattacks": round(rows["ours_fp32"]["image_steps_per_s"] / base, 3),
            "ours_bf16_vs_torchattacks": round(rows["ours_bf16"]["image_steps_per_s"] / base, 3),
            **(
                {
                    "ours_bf16_compiled_vs_torchattacks": round(
                        rows["ours_bf16_compiled"]["image_steps_per_s"] / base, 3
                    )
                }
                if "ours_bf16_compiled" in rows
                else {}
            ),
            "early_stop_vs_all_steps_fp32": round(
                rows["ours_fp32_early_stop"]["image_steps_per_s"] / rows["ours_fp32"]["image_steps_per_s"], 3
            ),
            "bf16_vs_fp32_max_robust_gap_points": round(
                100 * max(abs(rows["ours_bf16"]["robust"][e] - rows["ours_fp32"]["robust"][e]) for e in eps),
                2,
            ),
            "ours_fp32_vs_torchattacks_max_robust_gap_points": round(
                100
                * max(
                    abs(rows["ours_fp32"]["robust"][e] - rows["torchattacks_fp32"]["robust"][e]) for e in eps
                ),
                2,
            ),
        }

    if not args.skip_serving:
        if not wrk_available():
            log("wrk is needed for the serving part: apt-get install wrk")
            return 2
        pngs, _ = mnist_pngs(64)
        token = "bench-token"
        srv, worker = start_audit_server(
            store, args.model, token, args.threads, args.server_env, worker=args.audit_on == "worker"
        )
        path = f"/v1/models/{args.model}:predict"
        try:
            run_wrk(srv.url, path, pngs, args.clients, 3)
            quiet = run_wrk(srv.url, path, pngs, args.clients, args.seconds)
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as c:
                audit_id = start_background_audit(c, args.model)
                busy = run_wrk(srv.url, path, pngs, args.clients, args.seconds)
                status = c.get(f"/admin/audits/{audit_id}").json()
                c.delete(f"/admin/audits/{audit_id}")
        finally:
            srv.stop()
            if worker is not None:
                worker.stop()
        result["serving_during_audit"] = {
            "audit_on": args.audit_on,
            "quiet": {k: getattr(quiet, k) for k in ("rps", "p50_ms", "p99_ms", "errors")},
            "audit_running": {k: getattr(busy, k) for k in ("rps", "p50_ms", "p99_ms", "errors")},
            "audit_progress_at_end": status.get("progress"),
        }
        log(
            f"  serving, quiet: {quiet.rps} req/s p50 {quiet.p50_ms} p99 {quiet.p99_ms} ms | "
            f"during an audit: {busy.rps} req/s p50 {busy.p50_ms} p99 {busy.p99_ms} ms"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
