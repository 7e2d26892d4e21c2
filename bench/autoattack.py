"""AutoAttack's standard suite, ours against torchattacks', on the same model and samples.

    python bench/autoattack.py --n 500                      # a trained slim model (trained here if absent)
    python bench/autoattack.py --model mnist-er --n 200     # the shipped paper-size model

Both sides run the standard suite with its published budgets, set explicitly (torchattacks'
AutoAttack class defaults APGD, APGD-T and FAB to 10 steps): APGD-CE 100 steps, APGD-T 100 steps x 9
target classes, FAB-T 100 steps x 9 targets, Square 5,000 queries with p_init 0.8, one restart each.

- **Per attack**: each attack alone on the same samples, robust accuracy and seconds for ours and for
  torchattacks' (parity of each implementation).
- **Cascade**: ours is the audit engine's ``autoattack`` preset (what ``erc audit --attack autoattack``
  runs: a channels-last copy of the model, each attack only on the (sample, eps) pairs the earlier ones
  failed on, early stop inside the attacks); torchattacks' is ``MultiAttack`` over its four attacks
  (also a cascade). Only the attacks are timed; robust accuracy is counted outside the clock.

The last line of output is the JSON result (docs/benchmarks.md keeps the runs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import REPO, log, machine

from service.audit.engine import AuditSpec, Engine
from training.attacks import build_attacks
from training.card import load_model
from training.data import load_split
from training.evaluate import robust_flags

EPS = 0.3


def train_slim(out: Path) -> Path:
    """The quickstart ER-Classifier (slim, PGD min-max, about a minute of CPU), exported to ``out``."""
    from training.config import load_config
    from training.export import export_run
    from training.train import run_training

    run = out / "run"
    cfg = load_config(
        REPO / "training/configs/quickstart.yaml", {"run.out_dir": str(run), "run.progress": False}
    )
    run_training(cfg)
    return export_run(run, "quickstart", out / "store", eval_n=2000, device="cpu", typicality_fit_n=0)


def torchattacks_suite(model: torch.nn.Module, eps: float, seed: int) -> dict[str, Callable]:
    import torchattacks

    return {
        "APGD-CE-100": torchattacks.APGD(model, eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed),
        "APGD-T9-100": torchattacks.APGDT(model, eps=eps, steps=100, n_restarts=1, n_classes=10, seed=seed),
        "FAB-T9-100": torchattacks.FAB(
            model, eps=eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=10, seed=seed
        ),
        "Square-5000": torchattacks.Square(
            model, eps=eps, n_queries=5000, p_init=0.8, n_restarts=1, seed=seed
        ),
    }


def batched(attack: Callable, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([attack(x[s : s + batch], y[s : s + batch]) for s in range(0, len(x), batch)])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="model store (default: train the quickstart model here)")
    ap.add_argument("--model", default="quickstart")
    ap.add_argument("--n", type=int, default=500, help="test images (seeded draw)")
    ap.add_argument("--eps", type=float, default=EPS)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-per-attack", action="store_true", help="only the cascades")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.store is None:
        path = train_slim(Path(tempfile.mkdtemp(prefix="erc-bench-aa-")))
        desc = f"quickstart (slim ER, PGD min-max, trained by this run) in {path}"
    else:
        path = Path(args.store) / args.model
        desc = f"{args.model} from {args.store}"
    model, card = load_model(path, device)
    data = load_split(card.dataset, "test", n=args.n, seed=args.seed)
    x, y = data.as_float(), data.labels
    eps = args.eps
    result: dict = {"machine": machine(), "device": str(device), "model": desc, "settings": vars(args)}
    result["clean"] = accuracy(model, x, y)
    log(f"model: {desc}; n {len(x)}, clean {result['clean']:.4f}, eps {eps}, {args.threads} threads")

    ours_attacks = build_attacks([("autoattack", {})]).attacks
    theirs = torchattacks_suite(model, eps, args.seed)
    if not args.skip_per_attack:
        per: dict[str, dict] = {}
        for ours in ours_attacks:
            gen = torch.Generator().manual_seed(args.seed)
            t0 = time.perf_counter()
            flags = torch.cat(
                [
                    robust_flags(model, x[s : s + args.batch], y[s : s + args.batch], eps, ours, gen)
                    for s in range(0, len(x), args.batch)
                ]
            )
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            adv = batched(theirs[ours.label], x, y, args.batch)
            t_theirs = time.perf_counter() - t0
            per[ours.label] = {
                "ours": round(float(flags.float().mean()), 4),
                "torchattacks": round(accuracy(model, adv, y), 4),
                "ours_s": round(t_ours, 1),
                "torchattacks_s": round(t_theirs, 1),
            }
            log(f"  {ours.label:12} {json.dumps(per[ours.label])}")
        result["per_attack"] = per

    import torchattacks

    spec = AuditSpec(
        eps=[eps], suite=build_attacks([("autoattack", {})]), checks=False, batch_size=args.batch
    )
    engine = Engine(model, spec, device=device)
    t0 = time.perf_counter()
    audit = engine.run(x, y)
    t_ours = time.perf_counter() - t0
    row = audit["per_eps"][-1]
    multi = torchattacks.MultiAttack(list(theirs.values()))
    t0 = time.perf_counter()
    adv = batched(multi, x, y, args.batch)
    t_theirs = time.perf_counter() - t0
    result["cascade"] = {
        "ours": row["union"]["accuracy"],
        "ours_after_each": {k: v["accuracy"] for k, v in row["attacks"].items()},
        "ours_attacked_pairs": {a["label"]: a["attacked_pairs"] for a in audit["attacks"]},
        "torchattacks": round(accuracy(model, adv, y), 4),
        "ours_s": round(t_ours, 1),
        "torchattacks_s": round(t_theirs, 1),
        "speedup": round(t_theirs / t_ours, 2),
    }
    gap = 100 * (result["cascade"]["ours"] - result["cascade"]["torchattacks"])
    result["cascade"]["gap_points"] = round(gap, 2)
    log(f"  cascade: {json.dumps(result['cascade'])}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
