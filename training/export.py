"""From a training run to the model store, and from any model reference to a loaded network.

``export_run`` keeps only what inference needs (normalization, encoder, classifier: the
discriminator is dropped, as at inference in the paper), stores it as safetensors in the chosen
dtype, then measures the card's metrics on the *stored* weights, reloaded.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.card import CARD_FILE, CardError, ModelCard, StagedModel, load_model, read_card, write_card
from training.checkpoint import load_checkpoint
from training.data import dataset_info, load_split
from training.distributed import pick_device
from training.evaluate import AttackSpec, RobustCurve, robust_curve
from training.methods import get_method
from training.models import EmbeddingClassifier, create_model
from training.train import CHECKPOINT, METRICS


@dataclass
class LoadedModel:
    """A network ready to evaluate, with what is known about it."""

    model: EmbeddingClassifier
    name: str
    dataset: str
    source: str  # "store" or "run"
    path: Path
    weights_sha256: str | None  # for store models: the verified hash of the weights evaluated
    train_eps: float


def model_from_checkpoint(state: dict[str, Any]) -> EmbeddingClassifier:
    model = create_model(state["arch"], **state["arch_kwargs"])
    assert isinstance(model, EmbeddingClassifier)
    model.load_state_dict(state["state"]["modules"]["model"])
    return model.eval()


def resolve_model(
    ref: str, store: str | os.PathLike[str] = "model_store", device: str = "auto"
) -> LoadedModel:
    """``ref`` is a model name in ``store``, a model directory (with card.json) or a run directory
    (with checkpoint.pt)."""
    dev = pick_device(device)
    candidates = [Path(store) / ref, Path(ref)]
    for path in candidates:
        if (path / CARD_FILE).is_file():
            model, card = load_model(path, dev)
            eps = card.train_config.get("adv", {}).get("eps") or dataset_info(card.dataset).train_eps
            return LoadedModel(model, card.name, card.dataset, "store", path, card.weights_sha256, float(eps))
    for path in candidates:
        if (path / CHECKPOINT).is_file():
            state = load_checkpoint(path / CHECKPOINT)
            eps = state["config"]["adv"]["eps"] or dataset_info(state["dataset"]).train_eps
            model = model_from_checkpoint(state).to(dev)
            return LoadedModel(model, path.name, state["dataset"], "run", path, None, float(eps))
    raise FileNotFoundError(
        f"no model {ref!r}: looked for {candidates[0]} and {candidates[1]} (a store model has card.json, "
        f"a run directory has {CHECKPOINT})"
    )


def command_line() -> str:
    """How this process was invoked, for the provenance of measured figures."""
    argv = sys.argv[:]
    if argv and argv[0].endswith(("erc", "cli.py", "__main__.py")):
        argv[0] = "erc"
    return " ".join(shlex.quote(a) for a in argv)


def curve_metrics(
    curve: RobustCurve, dataset: str, measured_on: str, sha: str | None
) -> list[dict[str, Any]]:
    """Card metric entries (one per eps) from a robust-accuracy curve."""
    out = []
    for p in curve.points:
        clean = p.eps == 0
        out.append(
            {
                "metric": "accuracy" if clean else "robust_accuracy",
                "value": round(p.accuracy, 6),
                "correct": p.correct,
                "n": p.n,
                "ci95": [round(p.ci95[0], 6), round(p.ci95[1], 6)],
                "eps": p.eps,
                "norm": curve.attack.norm,
                "attack": None if clean else {**asdict(curve.attack), "description": curve.attack.describe()},
                "dataset": dataset,
                "split": "test",
                "seed": curve.seed,
                "device": curve.device,
                "measured_on": measured_on,
                "weights_sha256": sha,
                "command": command_line(),
            }
        )
    return out


def evaluate_on_test(
    model: EmbeddingClassifier,
    dataset: str,
    eps_list: list[float],
    spec: AttackSpec,
    *,
    n: int | None,
    seed: int = 0,
    data_dir: str | None = None,
    batch_size: int = 500,
    progress: bool = False,
    model_name: str = "",
) -> RobustCurve:
    test = load_split(dataset, "test", data_dir, n=n, seed=seed)
    device = next(model.parameters()).device
    return robust_curve(
        model,
        test.images,
        test.labels,
        eps_list,
        spec,
        batch_size=batch_size,
        device=device,
        seed=seed,
        progress=progress,
        model_name=model_name,
    )


def export_run(
    run_dir: str | os.PathLike[str],
    name: str,
    store: str | os.PathLike[str] = "model_store",
    *,
    dtype: str = "float32",
    eval_n: int | None = None,
    robust_eps: float | None = None,
    robust_steps: int = 0,
    robust_restarts: int = 1,
    device: str = "auto",
    data_dir: str | None = None,
    notes: str = "",
    progress: bool = False,
    typicality_fit_n: int | None = 10000,
    typicality_fpr: float = 0.05,
) -> Path:
    """Write ``store/name/`` from the run's checkpoint and measure its card metrics.

    Clean test accuracy is always measured (on ``eval_n`` test images, all when None); with
    ``robust_steps > 0`` also PGD robust accuracy at ``robust_eps`` (default: the training eps).
    The embedding typicality score (:mod:`training.typicality`) is fitted on ``typicality_fit_n``
    training images (0: not at all; None: all) and calibrated to ``typicality_fpr``.
    """
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / CHECKPOINT)
    model = model_from_checkpoint(state)
    info = dataset_info(state["dataset"])
    method = get_method(state["method"])
    cfg = state["config"]
    stage = StagedModel(store, name)
    try:
        sha = stage.write_weights(model, dtype)
        card = ModelCard(
            name=name,
            arch=state["arch"],
            arch_kwargs=state["arch_kwargs"],
            dataset=info.name,
            input_shape=list(info.shape),
            label_names=list(state.get("label_names") or info.label_names),
            embed_dim=model.embed_dim,
            prior=cfg["model"]["prior"],
            method=method.name,
            method_description=method.description,
            weights_sha256=sha,
            weights_dtype=dtype,
            train_config=cfg,
            training=_training_summary(run_dir, state),
            num_parameters=sum(p.numel() for p in model.parameters()),
            notes=notes,
        )
        write_card(stage.dir, card)
        stored, _ = load_model(stage.dir, pick_device(device))
        eps_list = [0.0]
        spec = AttackSpec(steps=robust_steps, restarts=robust_restarts)
        train_eps = cfg["adv"]["eps"] or info.train_eps
        if robust_steps > 0:
            eps_list.append(float(robust_eps if robust_eps is not None else train_eps))
        curve = evaluate_on_test(
            stored, info.name, eps_list, spec, n=eval_n, data_dir=data_dir, progress=progress, model_name=name
        )
        card.metrics = curve_metrics(curve, info.name, f"stored weights ({dtype})", sha)
        if typicality_fit_n != 0:
            card.typicality = fit_typicality(stored, card, typicality_fit_n, typicality_fpr, data_dir)
        return stage.commit(card)
    except BaseException:
        stage.abort()
        raise


def _training_summary(run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    import json

    lines = []
    if (run_dir / METRICS).exists():
        lines = [json.loads(ln) for ln in (run_dir / METRICS).read_text().splitlines() if ln.strip()]
    seconds = [ln["seconds"] for ln in lines]
    return {
        "epochs": state["epoch"],
        "world_size": state.get("world_size", 1),
        "device": lines[-1]["device"] if lines else None,
        "seconds_per_epoch_mean": round(sum(seconds) / len(seconds), 2) if seconds else None,
        "last_epoch": lines[-1] if lines else None,
        "versions": state.get("versions", {}),
    }


def fit_typicality(
    model: EmbeddingClassifier, card: ModelCard, fit_n: int | None, fpr: float, data_dir: str | None
) -> dict[str, Any]:
    """The card's ``typicality`` entry for ``model`` (the stored weights)."""
    from training.typicality import fit_for_model

    typ = fit_for_model(
        model, card.dataset, card.prior, card.num_classes, fit_n=fit_n, fpr=fpr, data_dir=data_dir
    )
    return typ.to_dict()


def add_typicality(
    model_dir: str | os.PathLike[str],
    *,
    fit_n: int | None = None,
    fpr: float = 0.05,
    device: str = "auto",
    data_dir: str | None = None,
) -> ModelCard:
    """Fit (or refit) the typicality score of a store model and rewrite its card atomically; the
    weights are not touched."""
    model, card = load_model(model_dir, pick_device(device))
    card.typicality = fit_typicality(model, card, fit_n, fpr, data_dir)
    write_card(model_dir, card)
    return card


def append_card_metrics(model_dir: str | os.PathLike[str], metrics: list[dict[str, Any]]) -> ModelCard:
    """Add metrics measured on a store model's own weights to its card (atomic rewrite).

    Entries measured on other weights (different sha256) are refused.
    """
    card = read_card(model_dir)
    for m in metrics:
        if m.get("weights_sha256") != card.weights_sha256:
            raise CardError(f"metric measured on weights {m.get('weights_sha256')} is not for {card.name}")

    # A new figure replaces an older one measured with the same metric, eps and attack.
    def key(m: dict[str, Any]) -> tuple[Any, ...]:
        a = m.get("attack") or {}
        return (
            m["metric"],
            m["eps"],
            m.get("n"),
            a.get("name"),
            a.get("steps"),
            a.get("restarts"),
            a.get("norm"),
            a.get("loss"),
        )

    new_keys = {key(m) for m in metrics}
    card.metrics = [m for m in card.metrics if key(m) not in new_keys] + metrics
    write_card(model_dir, card)
    return card


__all__ = [
    "LoadedModel",
    "append_card_metrics",
    "curve_metrics",
    "evaluate_on_test",
    "export_run",
    "model_from_checkpoint",
    "resolve_model",
]
