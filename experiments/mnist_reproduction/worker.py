"""One worker process: its jobs in order, each trained, exported and evaluated through the real
``erc`` command line, called in-process (``service.cli.main(argv)``), so that every command
recorded in a job's ``job.json`` is the argv that actually ran. Result files are written
atomically as soon as they exist: what a killed worker finished stays on disk."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from experiments.mnist_reproduction.plan import BASE_CONFIG, SCALES, EvalJob, Job, Scale, attack_text, plan

log = logging.getLogger("reproduce")
REPO = Path(__file__).resolve().parents[2]


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def yaml_scalar(value: Any) -> str:
    """A config value as ``--set`` parses it back (YAML): null, true/false, numbers, strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


class Deadline:
    def __init__(self, at: float) -> None:
        self.at = at

    def left(self) -> float:
        return self.at - time.time()


def erc(argv: list[str], record: dict[str, Any]) -> None:
    """Run ``erc argv`` in this process and record the command; a non-zero exit raises."""
    from service.cli import main

    record.setdefault("commands", []).append(shlex.join(["erc", *argv]))
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"erc {shlex.join(argv)} exited with {rc}")


def run_job(job: Job, out: Path, deadline: Deadline, scale: Scale, data_dir: str | None) -> dict[str, Any]:
    job_dir = out / "jobs" / job.name
    run_dir = out / "runs" / job.name
    record: dict[str, Any] = {"job": asdict(job), "status": "training", "evals": {}, "commands": []}
    status_path = job_dir / "job.json"

    def save() -> None:
        write_json(status_path, record)

    over = dict(job.overrides)
    if data_dir:
        over["data.data_dir"] = data_dir

    def train_argv() -> list[str]:
        over["run.time_limit_s"] = round(max(10.0, deadline.left() - job.eval_reserve_s), 1)
        argv = ["train", "--config", str(REPO / BASE_CONFIG), "--out", str(run_dir), "--no-progress"]
        for k, v in over.items():
            argv += ["--set", f"{k}={yaml_scalar(v)}"]
        return argv

    save()
    t0 = time.time()
    try:
        erc(train_argv(), record)
    except Exception as exc:  # a failed compile must not cost the whole plan
        if not over.get("run.compile"):
            raise
        log.exception("%s: training with torch.compile failed; again without it", job.name)
        record["compile_failed"] = repr(exc)
        shutil.rmtree(run_dir, ignore_errors=True)
        over["run.compile"] = False
        erc(train_argv(), record)
    record["train_seconds"] = round(time.time() - t0, 1)
    summary = json.loads((run_dir / "summary.json").read_text())
    record["summary"] = summary
    for name in ("metrics.jsonl", "config.yaml", "summary.json"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, job_dir / name)
    record["status"] = "evaluating"
    save()

    model_ref = str(run_dir)
    if job.export:
        t0 = time.time()
        store = out / "model_store"
        notes = (
            "The paper's MNIST ER-Classifier (Figure 9, k = 4), trained by "
            f"`python -m experiments.mnist_reproduction run` ({summary['epochs_done']} epochs of PGD-10 "
            f"min-max training at eps 0.3 on the 60,000 training images, on {summary['device_name']}). "
            "Weights stored in float16; every metric below was measured on these stored weights."
        )
        if job.notes:
            notes += " " + job.notes
        if scale.width != 1.0 or scale.train_subset is not None:
            notes = "SMOKE-SCALE model (slim, few images): not for use. " + notes
        strong = attack_text("pgd", {"steps": scale.strong_steps, "restarts": scale.strong_restarts})
        argv = ["export", str(run_dir), "--name", job.export, "--store", str(store), "--dtype", "float16"]
        argv += ["--robust-attack", strong, "--robust-eps", "0.3", "--notes", notes, "--no-progress"]
        if scale.full_n is not None:
            argv += ["--eval-n", str(scale.full_n)]
        if data_dir:
            argv += ["--data-dir", data_dir]
        erc(argv, record)
        model_ref = str(store / job.export)
        record["export"] = {"path": model_ref, "seconds": round(time.time() - t0, 1)}
        save()
        # float16 round trip: the same figures on the float32 checkpoint, to compare.
        paper = EvalJob(
            "fp32-checkpoint",
            "pgd",
            {"steps": scale.paper_steps, "keep_best": False},
            [0.0, 0.3],
            scale.full_n,
        )
        record["evals"]["fp32-checkpoint"] = evaluate(paper, str(run_dir), job_dir, deadline, data_dir)
        record["evals"]["fp16-stored"] = evaluate(
            paper.resized(scale.full_n, tag="fp16-stored"), model_ref, job_dir, deadline, data_dir
        )
        save()
    for i, ev in enumerate(job.evals):
        record["evals"][ev.tag] = evaluate(ev, model_ref, job_dir, deadline, data_dir)
        save()
        if i == 0 and job.embeddings:
            record["embeddings"] = embeddings(model_ref, job_dir, scale, deadline, data_dir)
            save()
    record["status"] = "done"
    save()
    return record


def evaluate(
    ev: EvalJob, model_ref: str, job_dir: Path, deadline: Deadline, data_dir: str | None
) -> dict[str, Any]:
    """One curve through ``erc eval`` (its eval.json, with the command that made it), or a record
    of why it was skipped or failed."""
    if deadline.left() < 15.0:
        return {"status": "skipped", "reason": f"deadline ({deadline.left():.0f} s left)", **asdict(ev)}
    folder = job_dir / "evals" / ev.tag
    argv = ev.argv(model_ref, str(folder))
    if data_dir:
        argv += ["--data-dir", data_dir]
    t0 = time.time()
    rec: dict[str, Any] = {}
    try:
        erc(argv, rec)
    except Exception as exc:  # e.g. CUDA out of memory: one curve must not cost the rest
        log.exception("evaluation %s failed", ev.tag)
        return {"status": "failed", "reason": repr(exc), "command": rec["commands"][0], **asdict(ev)}
    result = json.loads((folder / "eval.json").read_text())
    out = {"status": "done", "seconds": round(time.time() - t0, 1), "command": rec["commands"][0]}
    out.update({k: v for k, v in result.items() if k not in ("metrics",)})
    return out


def embeddings(
    model_ref: str, job_dir: Path, scale: Scale, deadline: Deadline, data_dir: str | None
) -> dict[str, Any]:
    """Figure 7: embeddings of ``embed_n`` test images, clean and under PGD-40 at eps 0.3, with a
    joint 2-D t-SNE of both (scikit-learn when present, else PCA, and the file says which)."""
    import numpy as np
    import torch

    from training.attacks import build_attack
    from training.card import resolve_model
    from training.data import load_split
    from training.evaluate import to_unit

    if deadline.left() < 20.0:
        return {"status": "skipped", "reason": "deadline"}
    model = resolve_model(model_ref).model
    test = load_split("mnist", "test", data_dir, n=scale.embed_n, seed=0)
    device = next(model.parameters()).device
    x = to_unit(test.images, device)
    y = test.labels.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    attack = build_attack("pgd", {"steps": scale.paper_steps, "keep_best": False})
    adv = attack(model, x, y, eps=0.3, generator=gen)
    with torch.no_grad():
        z_clean = model.forward_features(x).float().cpu().numpy()
        z_adv = model.forward_features(adv).float().cpu().numpy()
        pred_adv = model(adv).argmax(1).cpu().numpy()
    both = np.concatenate([z_clean, z_adv])
    method = "pca"
    try:
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, perplexity=30.0, init="pca", random_state=0).fit_transform(both)
        method = "tsne"
    except ImportError:
        centred = both - both.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
    np.savez_compressed(
        job_dir / "embeddings.npz",
        z_clean=z_clean,
        z_adv=z_adv,
        labels=test.labels.numpy(),
        pred_adv=pred_adv,
        xy=xy.astype(np.float32),
    )
    return {"status": "done", "method": method, "n": len(y), "attack": f"{attack.description}, eps 0.3"}


def worker_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.worker} %(levelname)s %(message)s")
    out = Path(args.out)
    scale = SCALES[args.scale]
    jobs = plan(scale, args.main_epochs, args.init_from)[args.worker]
    deadline = Deadline(args.deadline)
    for job in jobs:
        if args.only and job.name not in args.only.split(","):
            continue
        if deadline.left() < job.eval_reserve_s * 0.5:
            write_json(
                out / "jobs" / job.name / "job.json", {"job": asdict(job), "status": "skipped (deadline)"}
            )
            continue
        try:
            run_job(job, out, deadline, scale, args.data_dir)
        except Exception as exc:  # one failed job must not stop the queue
            log.exception("%s failed", job.name)
            path = out / "jobs" / job.name / "job.json"
            rec = json.loads(path.read_text()) if path.exists() else {"job": asdict(job)}
            rec.update(status="failed", error=repr(exc))
            write_json(path, rec)
    return 0
