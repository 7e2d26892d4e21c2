"""Reproduce the paper's MNIST results (Table 1, Figures 3, 4, 5 and 7) within a wall-clock budget.

One command trains every model the comparison needs, exports the default model, attacks each
model with the paper's attack and with stronger ones, and writes one JSON file per figure::

    python -m training.reproduce run --out runs/repro --budget-s 540     # one GPU, ~9 minutes
    python -m training.reproduce run --out /tmp/r --scale smoke          # CPU plumbing check
    python -m training.reproduce report runs/repro                       # tables + PNG plots

``run`` is a scheduler: it times the training step (``bench/train.py``) while the GPU is idle,
then starts worker processes side by side (the default model, Madry's baseline, and queues of
the cheap ablations trained without min-max, as the paper's Figures 3-5 are). Every worker runs
its jobs in-process: train, export, then its evaluations in priority order, each skipped (and
recorded as skipped) when it would not finish before the deadline. What a killed worker finished
stays on disk: every result file is written atomically as soon as it exists.

Each job records the ``erc`` commands that reproduce it one at a time (``erc train``, ``erc
export``, ``erc eval``); ``report`` prints them next to the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("reproduce")

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = "training/configs/mnist-er.yaml"
TABLE1_EPS = [0.0, 0.1, 0.2, 0.3, 0.4]
FIGURE_EPS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
MAIN_NAME = "mnist-er"


# -- the plan -------------------------------------------------------------------------------------
@dataclass
class EvalJob:
    """One robust-accuracy curve: ``attack`` (pgd/apgd/square) at ``eps`` on ``n`` test images;
    ``steps`` are Square's queries."""

    tag: str
    attack: str
    eps: list[float]
    n: int | None  # None: the whole test split
    steps: int
    restarts: int = 1
    loss: str = "ce"
    last_iterate: bool = False  # the original PGD: judge each restart's last iterate only
    batch_size: int = 1000

    def spec(self) -> Any:
        from training.evaluate import AttackSpec

        return AttackSpec(
            name=self.attack,
            steps=self.steps,
            restarts=self.restarts,
            loss=self.loss,
            keep_best=not self.last_iterate,
        )

    def command(self, model_ref: str) -> str:
        parts = ["erc", "eval", model_ref, "--attack", self.attack, "--steps", str(self.steps)]
        parts += ["--restarts", str(self.restarts), "--loss", self.loss]
        parts += ["--eps", ",".join(f"{e:g}" for e in self.eps)]
        if self.n is not None:
            parts += ["--n", str(self.n)]
        if self.last_iterate:
            parts.append("--last-iterate")
        parts += ["--batch-size", str(self.batch_size)]
        return " ".join(shlex.quote(p) for p in parts)


@dataclass
class Job:
    name: str
    label: str  # how the report names it
    overrides: dict[str, Any]
    evals: list[EvalJob] = field(default_factory=list)
    export: str | None = None  # store name: export (float16) and evaluate the stored weights
    embeddings: bool = False  # Figure 7: clean and adversarial test embeddings, t-SNE
    eval_reserve_s: float = 60.0  # time kept free after training for the evaluations
    notes: str = ""  # for the exported model's card


@dataclass
class Scale:
    """Sizes of one plan: ``gpu`` is the real one, ``smoke`` checks the plumbing on a CPU."""

    main_epochs: int
    madry_epochs: int
    ablation_epochs: int
    batch: int
    width: float
    train_subset: int | None
    full_n: int | None  # None: all 10,000 test images
    table_n: int
    figure_n: int
    strong_steps: int
    strong_restarts: int
    paper_steps: int
    apgd_steps: int
    square_queries: int
    square_n: int
    embed_n: int
    fast: bool  # bf16 autocast, channels_last, torch.compile for the min-max runs


SCALES = {
    "gpu": Scale(
        main_epochs=40,
        madry_epochs=20,
        ablation_epochs=10,
        batch=256,
        width=1.0,
        train_subset=None,
        full_n=None,
        table_n=2000,
        figure_n=2000,
        strong_steps=100,
        strong_restarts=5,
        paper_steps=40,
        apgd_steps=100,
        square_queries=5000,
        square_n=500,
        embed_n=1000,
        fast=True,
    ),
    "smoke": Scale(
        main_epochs=1,
        madry_epochs=1,
        ablation_epochs=1,
        batch=64,
        width=0.25,
        train_subset=256,
        full_n=64,
        table_n=32,
        figure_n=32,
        strong_steps=3,
        strong_restarts=2,
        paper_steps=3,
        apgd_steps=4,
        square_queries=20,
        square_n=16,
        embed_n=40,
        fast=False,
    ),
}


def plan(scale: Scale, main_epochs: int | None = None, init_from: str | None = None) -> dict[str, list[Job]]:
    """Worker name -> the jobs it runs in order.

    With ``init_from`` (a stored default model), the second stage only: the default model is
    trained further from those weights (bf16, channels_last, batch 512, eager: the fastest path
    ``bench/train.py`` measured) and re-exported, beside E-CLA.
    """
    s = scale
    common: dict[str, Any] = {
        "data.batch_size": s.batch,
        "model.width": s.width,
        "data.train_subset": s.train_subset,
        "data.eval_subset": 2000 if s.full_n is None else s.full_n,
        "run.progress": False,
    }
    fast = {"run.amp": "bf16", "run.channels_last": True} if s.fast else {}
    paper = EvalJob("pgd40", "pgd", TABLE1_EPS, s.table_n, s.paper_steps, last_iterate=True)
    strong = EvalJob("pgd100x5", "pgd", TABLE1_EPS, s.table_n, s.strong_steps, s.strong_restarts)
    apgd = EvalJob("apgd-ce", "apgd", TABLE1_EPS, s.table_n, s.apgd_steps)
    figure = EvalJob("pgd40-curve", "pgd", FIGURE_EPS, s.figure_n, s.paper_steps, last_iterate=True)
    figure_strong = EvalJob("pgd100x5-curve", "pgd", FIGURE_EPS, s.table_n, s.strong_steps, s.strong_restarts)

    def sized(e: EvalJob, n: int | None, tag: str | None = None, eps: list[float] | None = None) -> EvalJob:
        return EvalJob(
            tag or e.tag,
            e.attack,
            eps or e.eps,
            n,
            e.steps,
            e.restarts,
            e.loss,
            e.last_iterate,
            e.batch_size,
        )

    epochs = main_epochs or s.main_epochs
    main = Job(
        "er",
        "ER-Classifier",
        {
            **common,
            **fast,
            "method.name": "er",
            "run.compile": s.fast,
            "run.epochs": epochs,
            "run.eval_adv_n": 1000 if s.full_n is None else s.full_n,
            "adv.warmup_epochs": 1.0,
            "optim.step_size": max(1, round(0.7 * epochs)),
            "optim.gamma": 0.2,
        },
        evals=[
            # The card's target first: PGD-100 x 5 restarts at eps 0.3 on the whole test set
            # (done by the export, on the stored float16 weights), then the Table 1 rows.
            sized(paper, s.full_n),
            sized(apgd, s.full_n, eps=[0.0, 0.3]),
            sized(strong, s.figure_n, tag="pgd100x5", eps=[0.0, 0.1, 0.2, 0.4]),
            sized(apgd, s.figure_n, tag="apgd-ce-all", eps=[0.0, 0.1, 0.2, 0.4]),
            EvalJob("square", "square", [0.0, 0.3], s.square_n, s.square_queries, loss="margin"),
            EvalJob("apgd-dlr", "apgd", [0.0, 0.3], s.figure_n, s.apgd_steps, loss="dlr"),
            sized(figure, s.figure_n),
        ],
        export=MAIN_NAME,
        embeddings=True,
        eval_reserve_s=170.0,
    )
    madry = Job(
        "madry",
        "Madry's Adv",
        {
            **common,
            **fast,
            "method.name": "madry",
            "run.compile": s.fast,
            "run.epochs": s.madry_epochs,
            "adv.warmup_epochs": 1.0,
            "optim.step_size": max(1, round(0.7 * s.madry_epochs)),
            "optim.gamma": 0.2,
        },
        evals=[sized(paper, s.full_n), strong, apgd, figure],
        eval_reserve_s=120.0,
    )

    def ablation(name: str, label: str, extra: dict[str, Any], evals: list[EvalJob], **kw: Any) -> Job:
        over = {**common, **fast, "run.epochs": s.ablation_epochs, **extra}
        return Job(name, label, over, evals=evals, eval_reserve_s=60.0, **kw)

    curves = [figure, figure_strong]
    e_cla = ablation("e-cla", "E-CLA", {"method.name": "e-cla"}, curves, embeddings=True)
    if init_from:
        stage2 = {
            **main.overrides,
            "run.init_from": init_from,
            "run.compile": False,
            "data.batch_size": 512 if s.fast else s.batch,
            "optim.lr": 5e-4,
            "optim.step_size": max(1, round(0.6 * epochs)),
            "adv.warmup_epochs": 0.0,
        }
        main.overrides = stage2
        main.eval_reserve_s = 100.0
        main.notes = (
            f"Two stages: {epochs} epochs from the weights of a first run (method er, batch 256, "
            "lr 1e-3, 13 epochs, see docs/reproduction.md), fresh optimizers and critic."
        )
        return {"main": [main], "ablations-a": [e_cla]}
    table = [sized(paper, s.full_n), strong, apgd, figure, figure_strong]
    return {
        "main": [main],
        "madry": [madry],
        "ablations-a": [
            ablation("er-minus", "ER-Classifier-minus", {"method.name": "er-minus"}, table, embeddings=True),
            ablation("none", "No defense", {"method.name": "none"}, table),
            e_cla,
        ],
        "ablations-b": [
            ablation("vae-cla", "VAE-CLA", {"method.name": "vae-cla"}, curves),
            ablation(
                "prior-uniform",
                "uniform prior",
                {"method.name": "er-minus", "model.prior": "uniform"},
                curves,
            ),
            ablation(
                "prior-cauchy", "Cauchy prior", {"method.name": "er-minus", "model.prior": "cauchy"}, curves
            ),
        ],
        "ablations-c": [
            ablation(f"dim-{k}", f"k = {k}", {"method.name": "er-minus", "model.embed_dim": k}, curves)
            for k in (2, 8, 13)
        ],
    }


# -- small helpers --------------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def train_command(job: Job, out_dir: str) -> str:
    sets = [f"{k}={'null' if v is None else v}" for k, v in job.overrides.items() if k != "run.progress"]
    parts = ["erc", "train", "--config", BASE_CONFIG, "--out", out_dir, "--no-progress"]
    for s in sets:
        parts += ["--set", s]
    return " ".join(shlex.quote(p) for p in parts)


# -- one job, in a worker process -------------------------------------------------------------------
class Deadline:
    def __init__(self, at: float) -> None:
        self.at = at

    def left(self) -> float:
        return self.at - time.time()


def run_job(job: Job, out: Path, deadline: Deadline, scale: Scale, data_dir: str | None) -> dict[str, Any]:
    import torch

    from training.checkpoint import load_checkpoint
    from training.config import load_config
    from training.export import export_run, model_from_checkpoint
    from training.train import CHECKPOINT, run_training

    job_dir = out / "jobs" / job.name
    run_dir = out / "runs" / job.name
    record: dict[str, Any] = {"job": asdict(job), "status": "training", "evals": {}, "commands": []}
    status_path = job_dir / "job.json"

    def save() -> None:
        write_json(status_path, record)

    over = dict(job.overrides)
    over["run.out_dir"] = str(run_dir)
    if data_dir:
        over["data.data_dir"] = data_dir
    over["run.time_limit_s"] = max(10.0, deadline.left() - job.eval_reserve_s)
    record["commands"].append(train_command(job, f"runs/{job.name}"))
    save()
    cfg = load_config(REPO / BASE_CONFIG, over)
    t0 = time.time()
    try:
        summary = run_training(cfg)
    except Exception as exc:  # a failed compile must not cost the whole plan
        if not cfg.run.compile:
            raise
        log.exception("%s: training with torch.compile failed; again without it", job.name)
        record["compile_failed"] = repr(exc)
        shutil.rmtree(run_dir, ignore_errors=True)
        over["run.compile"] = False
        over["run.time_limit_s"] = max(10.0, deadline.left() - job.eval_reserve_s)
        cfg = load_config(REPO / BASE_CONFIG, over)
        summary = run_training(cfg)
    record["train_seconds"] = round(time.time() - t0, 1)
    record["summary"] = summary
    for name in ("metrics.jsonl", "config.yaml", "summary.json"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, job_dir / name)
    record["status"] = "evaluating"
    save()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_ref = f"runs/{job.name}"
    if job.export:
        t0 = time.time()
        store = out / "model_store"
        notes = (
            "The paper's MNIST ER-Classifier (Figure 9, k = 4), trained by "
            f"`python -m training.reproduce run` ({summary['epochs_done']} epochs of PGD-10 min-max "
            f"training at eps 0.3 on the 60,000 training images, on {summary['device_name']}). "
            "Weights stored in float16; every metric below was measured on these stored weights."
        )
        if job.notes:
            notes += " " + job.notes
        if scale.width != 1.0 or scale.train_subset is not None:
            notes = "SMOKE-SCALE model (slim, few images): not for use. " + notes
        path = export_run(
            run_dir,
            job.export,
            store,
            dtype="float16",
            eval_n=scale.full_n,
            robust_steps=scale.strong_steps,
            robust_restarts=scale.strong_restarts,
            robust_eps=0.3,
            data_dir=data_dir,
            notes=notes,
        )
        model_ref = str(path)
        record["export"] = {"path": str(path), "seconds": round(time.time() - t0, 1)}
        record["commands"].append(
            f"erc export runs/{job.name} --name {job.export} --dtype float16 "
            f"--robust-steps {scale.strong_steps} --robust-restarts {scale.strong_restarts} --robust-eps 0.3"
        )
        save()
        from training.card import load_model

        model, _ = load_model(path, device)
        # float16 round trip: the same figures on the float32 checkpoint, to compare.
        ref = model_from_checkpoint(load_checkpoint(run_dir / CHECKPOINT))
        record["evals"]["fp32-checkpoint"] = _evaluate(
            ref.to(device),
            EvalJob("fp32-checkpoint", "pgd", [0.0, 0.3], scale.full_n, scale.paper_steps, last_iterate=True),
            deadline,
            data_dir,
            job.name,
            f"{model_ref} (float32 checkpoint)",
        )
        record["evals"]["fp16-stored"] = _evaluate(
            model,
            EvalJob("fp16-stored", "pgd", [0.0, 0.3], scale.full_n, scale.paper_steps, last_iterate=True),
            deadline,
            data_dir,
            job.name,
            model_ref,
        )
        save()
    else:
        model = model_from_checkpoint(load_checkpoint(run_dir / CHECKPOINT)).to(device)
    for i, ev in enumerate(job.evals):
        record["evals"][ev.tag] = _evaluate(model, ev, deadline, data_dir, job.name, model_ref)
        save()
        if i == 0 and job.embeddings:
            record["embeddings"] = _embeddings(model, job_dir, scale, deadline, data_dir)
            save()
    record["status"] = "done"
    save()
    return record


def _evaluate(
    model: Any, ev: EvalJob, deadline: Deadline, data_dir: str | None, job: str, model_ref: str
) -> dict[str, Any]:
    """One curve, or a record of why it was skipped."""
    import torch

    from training.data import load_split
    from training.evaluate import robust_curve

    if deadline.left() < 15.0:
        return {"status": "skipped", "reason": f"deadline ({deadline.left():.0f} s left)", **asdict(ev)}
    test = load_split("mnist", "test", data_dir, n=ev.n, seed=0)
    device = next(model.parameters()).device
    t0 = time.time()
    try:
        result = robust_curve(
            model,
            test.images,
            test.labels,
            ev.eps,
            ev.spec(),
            batch_size=ev.batch_size,
            device=device,
            seed=0,
            model_name=job,
        ).to_dict()
    except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
        return {"status": "failed", "reason": repr(exc), **asdict(ev)}
    out = {"status": "done", "seconds": round(time.time() - t0, 1), "command": ev.command(model_ref)}
    out.update(result)
    return out


def _embeddings(
    model: Any, job_dir: Path, scale: Scale, deadline: Deadline, data_dir: str | None
) -> dict[str, Any]:
    """Figure 7: embeddings of ``embed_n`` test images, clean and under PGD-40 at eps 0.3, with a
    joint 2-D t-SNE of both (scikit-learn when present, else PCA, and the file says which)."""
    import numpy as np
    import torch

    from training.attacks import pgd
    from training.data import load_split
    from training.evaluate import to_unit

    if deadline.left() < 20.0:
        return {"status": "skipped", "reason": "deadline"}
    test = load_split("mnist", "test", data_dir, n=scale.embed_n, seed=0)
    device = next(model.parameters()).device
    model.eval()
    x = to_unit(test.images, device)
    y = test.labels.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    adv = pgd(model, x, y, eps=0.3, steps=scale.paper_steps, keep_best=False, generator=gen)
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
    return {"status": "done", "method": method, "n": len(y), "attack": "PGD-40 linf eps 0.3, last iterate"}


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


# -- the scheduler ----------------------------------------------------------------------------------
def _env_report(out: Path) -> dict[str, Any]:
    import platform

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cuda": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
        "cpus": os.cpu_count(),
    }
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout
    write_json(out / "env.json", env)
    return env


def _start_mps() -> bool:
    """NVIDIA MPS lets the workers' kernels share the GPU instead of time-slicing it. Started only
    if the daemon exists and a CUDA process then works; otherwise left off."""
    if not shutil.which("nvidia-cuda-mps-control"):
        return False
    try:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True, timeout=20)
        probe = subprocess.run(
            [sys.executable, "-c", "import torch; x = torch.ones(4, device='cuda'); print(float(x.sum()))"],
            capture_output=True,
            text=True,
            timeout=90,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "4.0":
            return True
        log.warning("MPS probe failed: %s", probe.stderr[-500:])
    except (subprocess.SubprocessError, OSError) as exc:
        log.warning("MPS not started: %s", exc)
    _stop_mps()
    return False


def _stop_mps() -> None:
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, timeout=20)


def _main_epochs(bench: dict[str, Any] | None, window_s: float, mps: bool) -> int | None:
    """Epochs of the default model that fit ``window_s`` beside the other workers, from the
    measured seconds per epoch of its configuration (None: keep the plan's)."""
    if not bench:
        return None
    rows = [r for r in bench.get("results", []) if r["variant"] == "bf16-cl-compile" and r["batch"] == 256]
    if not rows:
        return None
    contention = 2.0 if mps else 3.0
    per_epoch = rows[0]["s_per_epoch"] * contention + 1.0  # + the per-epoch evaluation
    return int(max(8, min(60, math.floor(window_s / per_epoch))))


def run_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s scheduler %(levelname)s %(message)s")
    t_start = time.time()
    deadline = t_start + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = _env_report(out)
    cuda = bool(env["cuda"])
    state: dict[str, Any] = {"started": t_start, "budget_s": args.budget_s, "scale": args.scale}
    state["mps"] = _start_mps() if cuda and args.mps else False
    log.info("env: %s, torch %s, MPS %s", env["device_name"], env["torch"], state["mps"])
    bench = None
    if args.bench and cuda:
        t0 = time.time()
        bench_out = out / "bench_train.json"
        cmd = [sys.executable, str(REPO / "bench/train.py"), "--device", "cuda", "--out", str(bench_out)]
        cmd += ["--variants", "fp32-eager:128,bf16-cl:256,bf16-cl:512,bf16-cl-compile:256"]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        try:
            subprocess.run(cmd, timeout=args.bench_timeout_s, check=True)
            bench = json.loads(bench_out.read_text())
        except (subprocess.SubprocessError, OSError, json.JSONDecodeError) as exc:
            log.warning("bench/train.py failed: %s", exc)
        state["bench_seconds"] = round(time.time() - t0, 1)
    main_window = deadline - time.time() - 170.0 - 25.0
    epochs = args.main_epochs or _main_epochs(bench, main_window, state["mps"])
    state["main_epochs"] = epochs
    log.info("default model: %s epochs planned (window %.0f s)", epochs, main_window)
    workers = list(plan(SCALES[args.scale], epochs, args.init_from))
    if args.workers:
        workers = [w for w in workers if w in args.workers.split(",")]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    env_vars = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for w in workers:
        cmd = [sys.executable, "-m", "training.reproduce", "worker", w, "--out", str(out)]
        cmd += ["--scale", args.scale, "--deadline", str(deadline - 25.0)]
        if epochs:
            cmd += ["--main-epochs", str(epochs)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        if args.only:
            cmd += ["--only", args.only]
        if args.init_from:
            cmd += ["--init-from", args.init_from]
        logf = open(out / f"worker-{w}.log", "wb")  # noqa: SIM115 - closed with the process
        procs[w] = subprocess.Popen(cmd, cwd=REPO, env=env_vars, stdout=logf, stderr=subprocess.STDOUT)
    state["workers"] = workers
    write_json(out / "scheduler.json", state)
    while procs and time.time() < deadline - 20.0:
        for w, p in list(procs.items()):
            if p.poll() is not None:
                log.info("worker %s finished (rc %s) at +%.0f s", w, p.returncode, time.time() - t_start)
                state.setdefault("finished", {})[w] = {
                    "rc": p.returncode,
                    "at_s": round(time.time() - t_start),
                }
                del procs[w]
        time.sleep(1.0)
    for w, p in procs.items():
        log.warning("worker %s still running at the deadline: stopped", w)
        p.send_signal(signal.SIGTERM)
        state.setdefault("finished", {})[w] = {"rc": "stopped at deadline"}
    for p in procs.values():
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
    if state["mps"]:
        _stop_mps()
    state["seconds"] = round(time.time() - t_start, 1)
    write_json(out / "scheduler.json", state)
    if args.pack:
        pack(out, Path(args.pack))
    return 0


def pack(out: Path, dest: Path, part_mb: int = 15) -> None:
    """results.tar.gz (everything but checkpoints) and the exported model as <=15 MB parts."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "results.tar.gz", "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            rel = path.relative_to(out)
            if path.is_file() and rel.parts[0] not in ("runs", "model_store"):
                tar.add(path, arcname=str(rel))
    store = out / "model_store"
    if store.is_dir():
        tmp = dest / "model.tar"
        with tarfile.open(tmp, "w") as tar:
            tar.add(store, arcname="model_store")
        data = tmp.read_bytes()
        tmp.unlink()
        size = part_mb * 1024 * 1024
        for i in range(0, len(data), size):
            (dest / f"model.tar.part{i // size}").write_bytes(data[i : i + size])


def unpack(src: Path, out: Path) -> None:
    """Inverse of :func:`pack`."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / "results.tar.gz") as tar:
        tar.extractall(out, filter="data")
    parts = sorted(src.glob("model.tar.part*"), key=lambda p: int(p.name.removeprefix("model.tar.part")))
    if parts:
        tmp = out / "model.tar"
        tmp.write_bytes(b"".join(p.read_bytes() for p in parts))
        with tarfile.open(tmp) as tar:
            tar.extractall(out, filter="data")
        tmp.unlink()


def unpack_main(args: argparse.Namespace) -> int:
    unpack(Path(args.src), Path(args.out))
    return 0


def report_main(args: argparse.Namespace) -> int:
    from training.reproduce_report import report

    text = report([Path(d) for d in args.results], Path(args.card) if args.card else None, Path(args.out))
    sys.stdout.write(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.reproduce", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train, export and evaluate everything within --budget-s")
    r.add_argument("--out", default="runs/repro")
    r.add_argument("--scale", default="gpu", choices=sorted(SCALES))
    r.add_argument("--budget-s", type=float, default=540.0)
    r.add_argument("--data-dir")
    r.add_argument("--main-epochs", type=int, help="default: as many as the measured speed fits")
    r.add_argument("--workers", help="comma-separated subset of the workers")
    r.add_argument("--init-from", help="second stage: continue the default model from this stored model")
    r.add_argument("--only", help="comma-separated subset of the jobs")
    r.add_argument("--no-mps", dest="mps", action="store_false")
    r.add_argument("--no-bench", dest="bench", action="store_false")
    r.add_argument("--bench-timeout-s", type=float, default=150.0)
    r.add_argument("--pack", help="also write results.tar.gz and the model parts here")
    r.set_defaults(func=run_main)
    w = sub.add_parser("worker", help="(internal) run one worker's jobs")
    w.add_argument("worker")
    w.add_argument("--out", required=True)
    w.add_argument("--scale", default="gpu", choices=sorted(SCALES))
    w.add_argument("--deadline", type=float, required=True, help="unix time")
    w.add_argument("--main-epochs", type=int)
    w.add_argument("--data-dir")
    w.add_argument("--only")
    w.add_argument("--init-from")
    w.set_defaults(func=worker_main)
    rep = sub.add_parser("report", help="tables (tables.md) and PNG plots from result folders")
    rep.add_argument("results", nargs="+", help="result folders of `run`, the shipped model's first")
    rep.add_argument("--card", help="the shipped model's card.json (its metrics join the tables)")
    rep.add_argument("--out", default="docs/reproduction")
    rep.set_defaults(func=report_main)
    u = sub.add_parser("unpack", help="results.tar.gz + model parts -> a results folder")
    u.add_argument("src")
    u.add_argument("out")
    u.set_defaults(func=unpack_main)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
