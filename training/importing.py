"""``erc import``: a classifier users already have (torch.export ``.pt2``, TorchScript, ONNX) ->
``model_store/NAME`` with a card measured on a dataset they name.

Nothing is written before the model passes every check (:func:`check_model`), each refused with
one line naming the check and why:

- ``input_shape``: the model accepts a batch of the declared ``[C, H, W]``;
- ``output_shape``: logits are ``[N, classes]`` (classes = the label names given);
- ``finite``: logits (and the embedding) are finite;
- ``deterministic``: two runs on the same batch agree (dropout or a model left in train mode do not);
- ``batch_independent``: each image alone gives what it gives in a batch (a static batch
  dimension, BatchNorm in train mode do not);
- ``gradients`` (white-box formats): input gradients of the margin loss are finite and non-zero
  on every probe image (a rounding or otherwise gradient-masking model is refused unless imported
  ``--black-box``, which audits it with query attacks only);
- ``served_equals_file`` (the ``verify`` hook of the staged entry): the store entry, loaded by
  the service and the TorchServe handler, answers as the file run directly.

The entry is staged (:class:`training.card.StagedModel`): the model file copied and hashed, the
clean accuracy measured on the stored file, the embedding's typicality fitted on the dataset's
train split when an embedding output is named, then one rename into the store.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.card import ModelCard, StagedModel, sha256_file
from training.checkpoint import READABLE_FILE
from training.data.imaging import InputSpec
from training.errors import ErcError
from training.formats import BLACK_BOX_NOTE as BLACK_BOX
from training.formats import Format, ModelFileError, ServedNet, format_of, load_served
from training.formats.onnx import WHY_NO_GRADIENTS

log = logging.getLogger(__name__)

# Tolerances of the determinism and batch checks: float32 kernels may reorder sums by batch size.
ATOL, RTOL = 1e-4, 1e-4


class ImportRefused(ModelFileError):
    """A model file that failed one of the import checks; the message names the check and why."""


@dataclass
class ImportSpec:
    """What ``erc import`` was told about the model file."""

    path: Path
    name: str
    input_shape: list[int]  # [C, H, W] of images in [0, 1]
    label_names: list[str]
    dataset: str  # where clean accuracy and typicality are measured: mnist, folder:DIR, ...
    mean: list[float] | None = None  # applied by the service inside the model: (x - mean) / std
    std: list[float] | None = None
    embedding: str | None = None  # pt2 / TorchScript: output:K; ONNX: an output name (or output:K)
    eps: float | None = None  # the l_inf radius of audits and :attack (default: the dataset's)
    format: str | None = None  # default: from the file name's ending
    black_box: bool = False  # serve a white-box format without gradients (query attacks only)
    eval_n: int | None = 1000
    typicality_fit_n: int | None = 10000
    data_dir: str | None = None
    notes: str = ""


def check(name: str, ok: bool, why: str) -> dict[str, Any]:
    if not ok:
        raise ImportRefused(f"import refused: check {name}: {why}")
    return {"check": name, "status": "pass"}


def _call(net: ServedNet, x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        with torch.no_grad():
            return net.forward_with_embedding(x)
    except ErcError as exc:
        raise ImportRefused(f"import refused: check {what}: {exc}") from None
    except Exception as exc:  # the model's own failure on this input
        raise ImportRefused(
            f"import refused: check {what}: the model fails ({type(exc).__name__}: {exc})"
        ) from None


def check_model(net: ServedNet, spec: ImportSpec, probe: torch.Tensor) -> list[dict[str, Any]]:
    """Every check of the module doc on ``probe`` ``[n >= 2, C, H, W]`` (floats in [0, 1]); returns
    the record of the checks for the card, or raises :class:`ImportRefused`."""
    c, h, w = spec.input_shape
    m = len(spec.label_names)
    n = len(probe)
    done = []
    try:
        logits, z = _call(net, probe, "input_shape")
    except ImportRefused as exc:
        raise ImportRefused(
            f"{exc} on a batch [{n}, {c}, {h}, {w}] (the declared shape with a batch of {n}: a static "
            "batch dimension? export with dynamic_shapes={'x': {0: torch.export.Dim('batch')}})"
        ) from None
    done.append(check("input_shape", True, ""))
    shape = list(logits.shape)
    done.append(
        check(
            "output_shape",
            logits.ndim == 2 and shape == [n, m],
            f"the model maps [{n}, {c}, {h}, {w}] to {shape}, expected [{n}, {m}] "
            f"(one logit per label of the {m} given)",
        )
    )
    bad = "logits" if not torch.isfinite(logits).all() else None
    if bad is None and z is not None and not torch.isfinite(z).all():
        bad = "embedding"
    done.append(
        check("finite", bad is None, f"the model gives non-finite {bad} (NaN or inf) on probe images")
    )
    again, _ = _call(net, probe, "deterministic")
    diff = float((again - logits).abs().max())
    done.append(
        check(
            "deterministic",
            torch.allclose(again, logits, atol=ATOL, rtol=RTOL),
            f"two runs on the same images differ by up to {diff:.3g}: dropout or noise is active (was the "
            "model exported in train mode? call model.eval() before exporting)",
        )
    )
    try:
        alone = torch.cat([_call(net, probe[i : i + 1], "batch_independent")[0] for i in range(n)])
    except ImportRefused as exc:
        raise ImportRefused(
            f"{exc} (one image at a time; export with a dynamic batch dimension, "
            "e.g. dynamic_shapes={'x': {0: torch.export.Dim('batch')}})"
        ) from None
    diff = float((alone - logits).abs().max())
    done.append(
        check(
            "batch_independent",
            torch.allclose(alone, logits, atol=ATOL, rtol=RTOL),
            f"an image alone gives logits up to {diff:.3g} away from the same image in a batch: the "
            "output depends on the rest of the batch (BatchNorm in train mode?)",
        )
    )
    if net.capabilities.gradients:
        done.append(gradient_probe(net, probe, logits.argmax(1)))
    return done


def gradient_probe(net: ServedNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Input gradients of the margin ``z_y - max_{j != y} z_j`` (non-zero wherever the logits
    depend smoothly on the pixels, also for saturated softmax): finite and non-zero per image."""
    hint = "; import it with --black-box to audit it with query attacks only"
    xg = x.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = net(xg)
            true = logits.gather(1, y[:, None]).squeeze(1)
            other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
            (g,) = torch.autograd.grad((true - other).sum(), xg)
    except Exception as exc:
        why = f"no input gradients through the model ({type(exc).__name__}: {str(exc)[:200]})"
        raise ImportRefused(f"import refused: check gradients: {why}{hint}") from None
    check("gradients", bool(torch.isfinite(g).all()), f"input gradients are not finite{hint}")
    zero = int((g.flatten(1).abs().amax(1) == 0).sum())
    return check(
        "gradients",
        zero == 0,
        f"input gradients are exactly zero on {zero} of {len(x)} probe images: the model masks gradients "
        f"(rounding, argmax or another piecewise-constant step), so white-box attacks would be blind{hint}",
    )


def imported_section(spec: ImportSpec, fmt: Format, *, gradients: bool) -> dict[str, Any]:
    why = ""
    if not gradients:
        why = WHY_NO_GRADIENTS if fmt.name == "onnx" else "imported --black-box: gradients not used"
    return {
        "source_file": spec.path.name,
        "format_description": fmt.description,
        "mean": spec.mean,
        "std": spec.std,
        "embedding": spec.embedding,
        "logits_output": 0 if fmt.name != "onnx" else None,
        "gradients": gradients,
        "why_no_gradients": why,
    }


def import_model(
    spec: ImportSpec,
    store: str | os.PathLike[str] = "model_store",
    *,
    verify: Callable[[Path, torch.nn.Module], None] | None = None,
    progress: bool = False,
) -> Path:
    """Check ``spec.path`` and write ``store/spec.name`` (see the module doc); returns its path."""
    from training.attacks import build_attack
    from training.data import load_split
    from training.data.folder import FolderOptions
    from training.evaluate import curve_metrics, evaluate_on_test

    path = Path(spec.path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    fmt = format_of(path, spec.format)
    if len(spec.input_shape) != 3 or any(int(v) < 1 for v in spec.input_shape):
        raise ModelFileError(f"--input-shape must be C,H,W, got {spec.input_shape}")
    if spec.input_shape[0] not in (1, 3):
        raise ModelFileError(f"--input-shape: images have 1 or 3 channels, got {spec.input_shape[0]}")
    if len(spec.label_names) < 2 or len(set(spec.label_names)) != len(spec.label_names):
        raise ModelFileError("--labels: at least two label names, all different")
    for what, v in (("mean", spec.mean), ("std", spec.std)):
        if v is not None and len(v) != spec.input_shape[0]:
            raise ModelFileError(f"--{what}: one value per channel ({spec.input_shape[0]}), got {len(v)}")
    if (spec.mean is None) != (spec.std is None):
        raise ModelFileError("--mean and --std go together")
    if spec.std is not None and any(s <= 0 for s in spec.std):
        raise ModelFileError("--std: every value must be positive")
    if spec.eps is not None and not (0 < spec.eps <= 1 and math.isfinite(spec.eps)):
        raise ModelFileError(f"--eps is an l_inf radius in (0, 1], got {spec.eps}")
    gradients = fmt.white_box and not spec.black_box
    imported = imported_section(spec, fmt, gradients=gradients)
    direct = fmt.load(path, imported, torch.device("cpu")).eval()  # the file run directly
    folder = FolderOptions.for_model(None, spec.input_shape, spec.label_names)
    test = load_split(spec.dataset, "test", spec.data_dir, n=8, seed=0, folder=folder)
    if list(test.images.shape[1:]) != list(spec.input_shape):
        raise ModelFileError(
            f"{spec.dataset} images are {list(test.images.shape[1:])}, the model takes {spec.input_shape}"
        )
    probe = torch.cat(
        [test.as_float(), torch.rand(4, *spec.input_shape, generator=torch.Generator().manual_seed(0))]
    )
    checks = check_model(direct, spec, probe)
    _, z = direct.forward_with_embedding(probe[:2])
    embed_dim = 0 if z is None else int(z.shape[1])
    caps = direct.capabilities
    imported["capabilities"] = caps.to_dict()
    imported["checks"] = checks
    eps = spec.eps
    train_config: dict[str, Any] = {"adv": {"eps": eps}} if eps is not None else {}
    card = ModelCard(
        name=spec.name,
        arch=fmt.name,
        arch_kwargs={},
        dataset=spec.dataset,
        input_shape=[int(v) for v in spec.input_shape],
        label_names=list(spec.label_names),
        embed_dim=embed_dim,
        prior="gaussian",
        method="imported",
        method_description=f"imported from {path.name} ({fmt.description})",
        weights_sha256="",
        weights_dtype="as stored in the model file",
        weights_file=fmt.file_name,
        train_config=train_config,
        notes=spec.notes,
        preprocessing=dict(InputSpec.from_shape(spec.input_shape).policy),
        model_format=fmt.name,
        imported=imported,
    )
    card.train_eps  # noqa: B018  (a folder without --eps is refused here, before anything is written)
    stage = StagedModel(store, spec.name)
    try:
        target = stage.dir / fmt.file_name
        (fmt.store or shutil.copyfile)(path, target)
        target.chmod(READABLE_FILE)
        card.weights_sha256 = sha256_file(target)
        card.num_parameters = sum(p.numel() for p in direct.parameters())
        from training.card import write_card

        write_card(stage.dir, card)
        stored, _ = load_served(stage.dir)
        measured_on = f"stored model file ({fmt.name})"
        curve = evaluate_on_test(
            stored,
            spec.dataset,
            [0.0],
            build_attack("pgd"),
            n=spec.eval_n,
            data_dir=spec.data_dir,
            progress=progress,
            model_name=spec.name,
            folder=folder,
        )
        card.metrics = curve_metrics(curve, spec.dataset, measured_on, card.weights_sha256)
        if caps.embedding and spec.typicality_fit_n != 0:
            from training.typicality.fit import TypicalityFitError, fit_for_model

            try:
                typ = fit_for_model(
                    stored,
                    spec.dataset,
                    card.prior,
                    card.num_classes,
                    fit_n=spec.typicality_fit_n,
                    calibration_n=spec.eval_n,
                    data_dir=spec.data_dir,
                    folder=folder,
                )
                card.typicality = typ.to_dict()
            except TypicalityFitError as exc:
                log.warning("%s: no typicality score: %s", spec.name, exc)
        if not caps.gradients:
            card.warnings.append(f"{BLACK_BOX}: only query attacks (square) run on this model")
        final_verify = None if verify is None else (lambda d: verify(d, direct))
        return stage.commit(card, final_verify)
    except BaseException:
        stage.abort()
        raise


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ModelFileError(f"--{what}: comma-separated numbers, got {text!r}") from None


def read_labels(labels: str | None, labels_file: str | None) -> list[str]:
    if (labels is None) == (labels_file is None):
        raise ModelFileError("give the label names with --labels a,b,c or --labels-file FILE (one per line)")
    if labels is not None:
        return [t.strip() for t in labels.split(",") if t.strip()]
    try:
        text = Path(str(labels_file)).read_text()
    except OSError as exc:
        raise ModelFileError(f"--labels-file {labels_file}: unreadable ({exc.strerror or exc})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


__all__: Sequence[str] = ["ImportRefused", "ImportSpec", "check_model", "import_model", "read_labels"]
