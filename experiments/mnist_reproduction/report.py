"""Tables and plots of docs/reproduction.md from the result folders of ``run`` (and the metrics of
the shipped model's card).

    python -m experiments.mnist_reproduction report docs/reproduction/results/h200-run1 \\
        docs/reproduction/results/h200-run2 --card model_store/mnist-er/card.json --out docs/reproduction

Every number comes from a result file; each table cell is the evaluation with the largest ``n``
for that model, attack and eps, and the cell says ``n`` when it is not the whole test set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.mnist_reproduction.plan import FIGURE_EPS, TABLE1_EPS

PAPER_TABLE1 = {  # the paper's Table 1, MNIST, PGD (its attack settings are not stated beyond "PGD")
    "Madry's Adv": [98.7, 97.5, 93.8, 85.5, 20.8],
    "ER-Classifier": [99.1, 98.7, 97.2, 94.9, 71.1],
}
ATTACK_ROWS = [
    ("pgd40x1-last", "PGD-40, 1 start (the paper's)"),
    ("pgd100x5", "PGD-100, 5 restarts"),
    ("apgd-ce", "APGD-CE-100"),
]
FULL_N = 10000


@dataclass
class Point:
    model: str
    attack: str
    eps: float
    accuracy: float
    correct: int
    n: int
    ci95: tuple[float, float]
    source: str


def attack_key(a: dict[str, Any] | None) -> str:
    if not a:
        return "clean"
    name = a.get("name")
    if name == "pgd":
        last = "" if a.get("keep_best", True) else "-last"
        return f"pgd{a['steps']}x{a['restarts']}{last}"
    if name == "apgd":
        return f"apgd-{a.get('loss', 'ce')}"
    return str(name)


def load_runs(dirs: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Job name -> job.json record (+ ``dir``); a name already taken gets ``@<run folder>``."""
    jobs: dict[str, dict[str, Any]] = {}
    for d in dirs:
        for path in sorted((d / "jobs").glob("*/job.json")):
            rec = json.loads(path.read_text())
            rec["dir"] = path.parent
            name = path.parent.name
            jobs[name if name not in jobs else f"{name}@{d.name}"] = rec
    return jobs


ROUND_TRIP_TAGS = ("fp32-checkpoint", "fp16-stored")  # storage checks, not table rows


def points_from_job(name: str, rec: dict[str, Any]) -> list[Point]:
    out = []
    for tag, ev in rec.get("evals", {}).items():
        if ev.get("status") != "done" or tag in ROUND_TRIP_TAGS:
            continue
        key = attack_key(ev.get("attack"))
        for p in ev["points"]:
            attack = "clean" if p["eps"] == 0 else key
            out.append(
                Point(name, attack, p["eps"], p["accuracy"], p["correct"], p["n"], tuple(p["ci95"]), tag)
            )
    return out


def points_from_card(name: str, card: dict[str, Any]) -> list[Point]:
    out = []
    for m in card.get("metrics", []):
        attack = "clean" if m["eps"] == 0 else attack_key(m.get("attack"))
        out.append(Point(name, attack, m["eps"], m["value"], m["correct"], m["n"], tuple(m["ci95"]), "card"))
    return out


def best(points: Sequence[Point], model: str, attack: str, eps: float) -> Point | None:
    """The point with the largest n for (model, attack, eps); eps 0 is the clean accuracy."""
    want = "clean" if eps == 0 else attack
    cands = [p for p in points if p.model == model and p.attack == want and abs(p.eps - eps) < 1e-9]
    return max(cands, key=lambda p: p.n) if cands else None


def row(points: Sequence[Point], model: str, label: str, key: str, desc: str, eps: Sequence[float]) -> str:
    """One table row: the attack column names the n most cells share; other cells name theirs."""
    found = [best(points, model, key, e) for e in eps]
    ns = [p.n for p, e in zip(found, eps, strict=True) if p is not None and e > 0]
    common = max(set(ns), key=lambda n: (ns.count(n), n)) if ns else FULL_N
    cells = []
    for p in found:
        if p is None:
            cells.append("–")
        else:
            text = f"{100 * p.accuracy:.1f}"
            cells.append(text if p.n == common else f"{text} <sub>n={p.n}</sub>")
    return f"| {label} | {desc}, n={common} | " + " | ".join(cells) + " |"


def table1(points: Sequence[Point], models: Sequence[tuple[str, str]], eps: Sequence[float]) -> str:
    head = "| model | attack | " + " | ".join(f"eps {e:g}" for e in eps) + " |"
    lines = [head, "|" + " --- |" * (len(eps) + 2)]
    for label, claimed in PAPER_TABLE1.items():
        lines.append(f"| {label} | paper's claim (PGD) | " + " | ".join(f"{v:.1f}" for v in claimed) + " |")
    for model, label in models:
        for key, desc in ATTACK_ROWS:
            lines.append(row(points, model, label, key, desc, eps))
    return "\n".join(lines)


def curve(points: Sequence[Point], model: str, attack: str, eps: Sequence[float]) -> list[float | None]:
    out: list[float | None] = []
    for e in eps:
        p = best(points, model, attack, e)
        out.append(None if p is None else 100 * p.accuracy)
    return out


def plot_figure(
    points: Sequence[Point], models: Sequence[tuple[str, str]], eps: Sequence[float], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, (model, label) in enumerate(models):
        color = f"C{i}"
        for attack, style, suffix in (("pgd40x1-last", "-", "PGD-40"), ("pgd100x5", "--", "PGD-100x5")):
            ys = curve(points, model, attack, eps)
            xs = [e for e, y in zip(eps, ys, strict=True) if y is not None]
            ys2 = [y for y in ys if y is not None]
            if ys2:
                ax.plot(xs, ys2, style, color=color, marker="o", ms=3, label=f"{label} ({suffix})")
    ax.set_xlabel("l_inf eps")
    ax.set_ylabel("test accuracy under attack (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_embeddings(jobs: dict[str, dict[str, Any]], models: Sequence[tuple[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [(m, label) for m, label in models if (jobs[m]["dir"] / "embeddings.npz").exists()]
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 3.6 * len(rows)), dpi=110, squeeze=False)
    for r, (model, label) in enumerate(rows):
        data = np.load(jobs[model]["dir"] / "embeddings.npz")
        xy, y = data["xy"], data["labels"]
        n = len(y)
        fooled = float((data["pred_adv"] != y).mean())
        method = jobs[model].get("embeddings", {}).get("method", "tsne")
        for c, (part, name) in enumerate(((slice(0, n), "clean"), (slice(n, 2 * n), "PGD-40, eps 0.3"))):
            ax = axes[r][c]
            ax.scatter(xy[:, 0], xy[:, 1], s=2, c="0.88")
            pts = xy[part]
            sc = ax.scatter(pts[:, 0], pts[:, 1], s=3, c=y, cmap="tab10", vmin=-0.5, vmax=9.5)
            extra = f", {100 * fooled:.0f} % fooled" if c == 1 else ""
            ax.set_title(f"{label}: {name}{extra}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        if r == 0:
            fig.colorbar(sc, ax=axes[r].tolist(), ticks=range(10), shrink=0.8, label="true label")
        axes[r][0].set_ylabel(f"{method.upper()} of the {data['z_clean'].shape[1]}-d embedding", fontsize=8)
    fig.savefig(path)
    plt.close(fig)


def bench_table(bench: dict[str, Any]) -> str:
    lines = [
        "| variant | batch | images/s | s per epoch (60k) | speed-up | warm-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in bench["results"]:
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['images_per_s']:.0f} | {r['s_per_epoch']:.2f} | "
            f"{r['speedup_vs_first']:.2f}x | {r['warmup_s']:.1f} s |"
        )
    return "\n".join(lines)


def report(dirs: Sequence[Path], card_path: Path | None, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    jobs = load_runs(dirs)
    points: list[Point] = []
    for name, rec in jobs.items():
        points += points_from_job(name, rec)
    if card_path is not None:
        points += points_from_card("er", json.loads(card_path.read_text()))
    for d in dirs:
        card = d / "card-mnist-er.json"
        if card.exists() and d != dirs[0]:
            stage2 = next((k for k in jobs if k.startswith("er@") and d.name in k), None)
            if stage2:
                points += points_from_card(stage2, json.loads(card.read_text()))
    table_models = [
        ("none", "No defense"),
        ("madry", "Madry's Adv"),
        ("er-minus", "ER-Classifier-minus"),
        ("er", "ER-Classifier (shipped mnist-er)"),
    ] + [(k, "ER-Classifier, stage 2") for k in jobs if k.startswith("er@")]
    parts = ["## Table 1 analogue\n", table1(points, table_models, TABLE1_EPS), ""]
    figures = {
        "figure3.png": (
            "Figure 3 analogue: no min-max",
            [("e-cla", "E-CLA"), ("vae-cla", "VAE-CLA"), ("er-minus", "ER-Classifier-minus")],
        ),
        "figure4.png": (
            "Figure 4 analogue: priors (no min-max)",
            [("er-minus", "Gaussian"), ("prior-uniform", "Uniform(-3, 3)"), ("prior-cauchy", "Cauchy(0, 1)")],
        ),
        "figure5.png": (
            "Figure 5 analogue: embedding dimension (no min-max)",
            [("dim-2", "k = 2"), ("er-minus", "k = 4"), ("dim-8", "k = 8"), ("dim-13", "k = 13")],
        ),
    }
    for fname, (title, models) in figures.items():
        present = [(m, label) for m, label in models if m in jobs]
        plot_figure(points, present, FIGURE_EPS, out / fname, title)
        parts += [f"## {title} ({fname})\n", _curve_table(points, present, FIGURE_EPS), ""]
    emb_models = [
        (m, label)
        for m, label in (("e-cla", "E-CLA"), ("er-minus", "ER-Classifier-minus"), ("er", "ER-Classifier"))
        if m in jobs
    ]
    plot_embeddings(jobs, emb_models, out / "figure7.png")
    bench = dirs[0] / "bench_train.json"
    if bench.exists():
        parts += ["## Training speed\n", bench_table(json.loads(bench.read_text())), ""]
    text = "\n".join(parts)
    (out / "tables.md").write_text(text + "\n")
    return text


def _curve_table(points: Sequence[Point], models: Sequence[tuple[str, str]], eps: Sequence[float]) -> str:
    lines = [
        "| model | attack | " + " | ".join(f"{e:g}" for e in eps) + " |",
        "|" + " --- |" * (len(eps) + 2),
    ]
    for model, label in models:
        for key, desc in ATTACK_ROWS[:2]:
            lines.append(row(points, model, label, key, desc, eps))
    return "\n".join(lines)
