"""From a training run to the model store.

``export_run`` keeps only what inference needs (normalization, encoder, classifier: the
discriminator is dropped, as at inference in the paper), stores it as safetensors in the chosen
dtype, then measures the card's metrics on the *stored* weights, reloaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from training.attacks import Attack, Suite, build_attack
from training.card import (
    ModelCard,
    ModelNotFound,
    StagedModel,
    checkpoint_geometry,
    load_model,
    model_from_checkpoint,
    write_card,
)
from training.checkpoint import CHECKPOINT, METRICS, load_checkpoint
from training.config import training_eps
from training.data.imaging import InputSpec
from training.devices import resolve_device
from training.diagnostics import DegenerateModel, embedding_problems, learning_warnings
from training.evaluate import curve_metrics, evaluate_on_test
from training.methods import get_method
from training.models import EmbeddingClassifier
from training.typicality.fit import TypicalityFitError

log = logging.getLogger(__name__)


def export_run(
    run_dir: str | os.PathLike[str],
    name: str,
    store: str | os.PathLike[str] = "model_store",
    *,
    dtype: str = "float32",
    eval_n: int | None = None,
    robust: Sequence[Attack | Suite] = (),
    robust_eps: float | None = None,
    device: str = "auto",
    data_dir: str | None = None,
    notes: str = "",
    progress: bool = False,
    typicality_fit_n: int | None = 10000,
    typicality_fpr: float = 0.05,
    allow_degenerate: bool = False,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``store/name/`` from the run's checkpoint and measure its card metrics.

    Clean test accuracy is always measured (on ``eval_n`` test images, all when None), and robust
    accuracy at ``robust_eps`` (default: the training eps) under each attack or suite of ``robust``,
    one card figure each (a preset such as ``autoattack`` gives its cascade's worst case).
    The embedding typicality score (:mod:`training.typicality`) is fitted on ``typicality_fit_n``
    training images (0: not at all; None: all) and calibrated to ``typicality_fpr``.

    A model that learned nothing is exported with the card's ``warnings`` (and a log line each);
    one whose held-out embeddings are all the same point raises :class:`DegenerateModel` unless
    ``allow_degenerate``. ``verify(staged_dir)`` runs on the complete entry before it enters the
    store (``erc export`` loads it through the service's and the TorchServe handler's code); any
    failure leaves the store as it was.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise ModelNotFound(f"{run_dir} is not a training run: it holds no {CHECKPOINT}")
    state = load_checkpoint(run_dir / CHECKPOINT)
    model = model_from_checkpoint(state)
    dataset = state["dataset"]
    input_shape, label_names = checkpoint_geometry(state)
    method = get_method(state["method"])
    cfg = state["config"]
    stage = StagedModel(store, name)
    try:
        sha = stage.write_weights(model, dtype)
        card = ModelCard(
            name=name,
            arch=state["arch"],
            arch_kwargs=state["arch_kwargs"],
            dataset=dataset,
            input_shape=input_shape,
            label_names=label_names,
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
            preprocessing=dict(InputSpec.from_shape(input_shape).policy),
            data={**(state.get("data") or {}), **_embed_dim_note(state)},
        )
        write_card(stage.dir, card)
        stored, _ = load_model(stage.dir, resolve_device(device))
        eps = float(robust_eps if robust_eps is not None else training_eps(cfg, dataset))
        measured_on = f"stored weights ({dtype})"
        # The clean figure comes with the first curve (eps 0 attacks nothing).
        plans: list[tuple[Attack | Suite, list[float]]] = [(a, [eps]) for a in robust]
        plans = [(plans[0][0], [0.0, eps]), *plans[1:]] if plans else [(build_attack("pgd"), [0.0])]
        card.metrics = []
        for attack, eps_list in plans:
            curve = evaluate_on_test(
                stored,
                dataset,
                eps_list,
                attack,
                n=eval_n,
                data_dir=data_dir,
                progress=progress,
                model_name=name,
                folder=card.folder_options(),
            )
            card.metrics += curve_metrics(curve, dataset, measured_on, sha)
        card.warnings = _model_warnings(stored, card, data_dir, allow_degenerate)
        for w in card.warnings:
            log.warning("%s: %s", name, w)
        if typicality_fit_n != 0:
            try:
                card.typicality = fit_typicality(stored, card, typicality_fit_n, typicality_fpr, data_dir)
            except TypicalityFitError as exc:  # a class without training images: served without it
                log.warning("%s: no typicality score: %s", name, exc)
        return stage.commit(card, verify)
    except BaseException:
        stage.abort()
        raise


def _model_warnings(
    model: EmbeddingClassifier,
    card: ModelCard,
    data_dir: str | None,
    allow_degenerate: bool,
) -> list[str]:
    """:mod:`training.diagnostics` on the stored weights: the clean figure against chance and the
    training accuracy, and the embeddings of up to 1,000 test images (the card's seeded draw)."""
    from training.data import load_split
    from training.typicality.fit import embed

    clean = next((m for m in card.metrics if m.get("eps") == 0.0), None)
    last = card.training.get("last_epoch") or {}
    train_acc = (last.get("train") or {}).get("acc")
    warnings = learning_warnings(clean["value"], clean["n"], card.num_classes, train_acc) if clean else []
    test = load_split(card.dataset, "test", data_dir, n=1000, seed=0, folder=card.folder_options())
    z = embed(model, test.images)
    with torch.no_grad():
        pred = model.forward_head(z.to(next(model.parameters()).device)).argmax(1).cpu()
    found, degenerate = embedding_problems(z, pred, card.num_classes)
    if degenerate and not allow_degenerate:
        raise DegenerateModel(
            f"{card.name}: not exported: {found[0]} (export it anyway with --allow-degenerate)"
        )
    return warnings + found


def _embed_dim_note(state: dict[str, Any]) -> dict[str, Any]:
    """``embed_dim: auto`` runs: the intrinsic-dimension estimate the embedding size came from."""
    est = state.get("embed_dim_estimate")
    return {"embed_dim_auto": est} if est else {}


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
    from training.typicality.fit import fit_for_model

    typ = fit_for_model(
        model,
        card.dataset,
        card.prior,
        card.num_classes,
        fit_n=fit_n,
        fpr=fpr,
        data_dir=data_dir,
        folder=card.folder_options(),
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
    model, card = load_model(model_dir, resolve_device(device))
    card.typicality = fit_typicality(model, card, fit_n, fpr, data_dir)
    write_card(model_dir, card)
    return card


__all__ = ["add_typicality", "export_run", "fit_typicality"]
