"""What the reproduction trains and evaluates: jobs per worker, at a ``gpu`` or ``smoke`` scale."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BASE_CONFIG = "training/configs/mnist-er.yaml"
TABLE1_EPS = [0.0, 0.1, 0.2, 0.3, 0.4]
FIGURE_EPS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
MAIN_NAME = "mnist-er"


def attack_text(name: str, params: dict[str, Any]) -> str:
    """``("pgd", {"steps": 40})`` -> ``"pgd:steps=40"``, the ``--attack`` syntax of ``erc``."""
    if not params:
        return name
    values = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items())
    return f"{name}:{values}"


@dataclass
class EvalJob:
    """One robust-accuracy curve: an attack of the registry (``training.attacks``) with ``params``
    at ``eps`` on ``n`` seeded test images (None: all)."""

    tag: str
    attack: str
    params: dict[str, Any]
    eps: list[float]
    n: int | None
    batch_size: int = 1000

    def argv(self, model_ref: str, out_dir: str) -> list[str]:
        """The ``erc`` arguments that run this evaluation and write ``out_dir/eval.json``."""
        argv = ["eval", model_ref, "--attack", attack_text(self.attack, self.params)]
        argv += ["--eps", ",".join(f"{e:g}" for e in self.eps), "--batch-size", str(self.batch_size)]
        if self.n is not None:
            argv += ["--n", str(self.n)]
        return [*argv, "--out", out_dir, "--no-progress"]

    def resized(self, n: int | None, tag: str | None = None, eps: list[float] | None = None) -> EvalJob:
        return EvalJob(tag or self.tag, self.attack, dict(self.params), eps or self.eps, n, self.batch_size)


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
    paper_params = {"steps": s.paper_steps, "keep_best": False}  # the original PGD: last iterate
    strong_params = {"steps": s.strong_steps, "restarts": s.strong_restarts}
    paper = EvalJob("pgd40", "pgd", paper_params, TABLE1_EPS, s.table_n)
    strong = EvalJob("pgd100x5", "pgd", strong_params, TABLE1_EPS, s.table_n)
    apgd = EvalJob("apgd-ce", "apgd", {"steps": s.apgd_steps}, TABLE1_EPS, s.table_n)
    figure = EvalJob("pgd40-curve", "pgd", paper_params, FIGURE_EPS, s.figure_n)
    figure_strong = EvalJob("pgd100x5-curve", "pgd", strong_params, FIGURE_EPS, s.table_n)

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
            paper.resized(s.full_n),
            apgd.resized(s.full_n, eps=[0.0, 0.3]),
            strong.resized(s.figure_n, tag="pgd100x5", eps=[0.0, 0.1, 0.2, 0.4]),
            apgd.resized(s.figure_n, tag="apgd-ce-all", eps=[0.0, 0.1, 0.2, 0.4]),
            EvalJob(
                "square", "square", {"queries": s.square_queries, "loss": "margin"}, [0.0, 0.3], s.square_n
            ),
            EvalJob("apgd-dlr", "apgd", {"steps": s.apgd_steps, "loss": "dlr"}, [0.0, 0.3], s.figure_n),
            figure.resized(s.figure_n),
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
        evals=[paper.resized(s.full_n), strong, apgd, figure],
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
    table = [paper.resized(s.full_n), strong, apgd, figure, figure_strong]
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
