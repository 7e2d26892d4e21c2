"""Model cards and the model store: ``model_store/NAME/{weights.safetensors, card.json}``.

The card travels with the weights (timm's pretrained cfg, nanoGPT's checkpoint dict): architecture
and its arguments, dataset, input shape and channels, label names, the preprocessing of image
files, the training eps, embedding size and prior, the training method and config, how the data
was read (an image folder's layout, split, counts and skipped files), the metrics measured *on the
stored weights* with the attack that produced them, and the sha256 of the weights file. An
imported model (``erc import``: torch.export, TorchScript, ONNX) has ``model_format`` set, its
model file in ``weights_file`` (sha256-verified the same way) and what the import declared and
measured in ``imported`` (mean/std, embedding output, capabilities, checks); it is loaded through
:func:`training.formats.load_served`. Nothing
downstream (service, audits, evaluation) needs a dataset registry entry: the card is enough.
Loading refuses weights whose sha256 differs from the card's, and builds the network from the card
alone. Only safetensors are read: nothing
from the store can execute code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training import __version__
from training.checkpoint import (
    CHECKPOINT,
    READABLE_DIR,
    READABLE_FILE,
    atomic_write_text,
    load_checkpoint,
    network_weights,
)
from training.config import training_eps
from training.data import FolderOptions
from training.devices import resolve_device
from training.errors import ErcError
from training.models import EmbeddingClassifier, create_model

CARD_FORMAT = "erc-model-card/1"
CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CardError(ErcError):
    """A model in the store that must not be served: bad card, unknown architecture, wrong hash."""


class ModelNotFound(ErcError, FileNotFoundError):
    """No store model and no run directory by the name given."""


@dataclass
class ModelCard:
    name: str
    arch: str
    arch_kwargs: dict[str, Any]
    dataset: str
    input_shape: list[int]  # [C, H, W] the network expects; images are floats in [0, 1]
    label_names: list[str]
    embed_dim: int
    prior: str
    method: str
    weights_sha256: str
    weights_dtype: str = "float32"
    weights_file: str = WEIGHTS_FILE
    method_description: str = ""
    train_config: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # epochs, seconds per epoch, device, last log line
    metrics: list[dict[str, Any]] = field(default_factory=list)  # each with its attack settings and n
    num_parameters: int = 0
    input_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    typicality: dict[str, Any] = field(default_factory=dict)  # training.typicality.Typicality.to_dict()
    # How image files become the input: training.data.imaging.InputSpec.policy (the service reports it).
    preprocessing: dict[str, str] = field(default_factory=dict)
    # How the training data was read: an image folder's root, layout, split, counts, skipped files.
    data: dict[str, Any] = field(default_factory=dict)
    # What export found wrong with the model (training.diagnostics): accuracy at chance, far below
    # train accuracy, one class for every image.
    warnings: list[str] = field(default_factory=list)
    # The worst robust accuracy measured at the training eps (derived from metrics on every write).
    headline: dict[str, Any] = field(default_factory=dict)
    # "er": this project's EmbeddingClassifier + safetensors; else an imported format
    # (training.formats: "pt2", "torchscript", "onnx") whose model file is ``weights_file``.
    model_format: str = "er"
    # Imported models: source file, mean/std applied inside the model, embedding output,
    # capabilities (gradients, embedding) and the import's checks (training.importing).
    imported: dict[str, Any] = field(default_factory=dict)
    format: str = CARD_FORMAT

    @property
    def channels(self) -> int:
        return int(self.input_shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def capabilities(self) -> dict[str, Any]:
        """What the model can do (training.formats.base.Capabilities as a dict)."""
        if self.model_format == "er":
            return {"gradients": True, "embedding": True, "head": True}
        return dict(self.imported.get("capabilities") or {})

    @property
    def white_box(self) -> bool:
        return bool(self.capabilities.get("gradients", False))

    @property
    def has_embedding(self) -> bool:
        return bool(self.capabilities.get("embedding", False))

    @property
    def train_eps(self) -> float:
        """The l_inf radius the model was trained at (the default eps of its audits)."""
        return training_eps(self.train_config, self.dataset)

    def folder_options(self) -> FolderOptions:
        """How to read an image folder for this model: its input shape, its classes in label order,
        and the held-out split it was trained with (:mod:`training.data.folder`)."""
        return FolderOptions.for_model(self.train_config.get("data"), self.input_shape, self.label_names)

    def to_dict(self) -> dict[str, Any]:
        self.headline = headline(self.metrics, self.train_eps) or {}
        d = asdict(self)
        d["channels"] = self.channels
        d["num_classes"] = self.num_classes
        d["train_eps"] = self.train_eps
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "card") -> ModelCard:
        if d.get("format") != CARD_FORMAT:
            raise CardError(f"{source}: format is {d.get('format')!r}, expected {CARD_FORMAT!r}")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise CardError(f"{source}: missing field(s) {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in known})


def headline(metrics: list[dict[str, Any]], train_eps: float) -> dict[str, Any] | None:
    """The card's one robust figure: the lowest robust accuracy among every figure measured at the
    training eps (every attack, every n), with its n, 95 % interval and attack, and how many
    figures it is the worst of. None when nothing was measured at that eps.

    Users compare robust models by one number; taking the minimum over everything measured keeps
    that number from ever being the flattering one.
    """
    at = [
        m
        for m in metrics
        if m.get("metric") == "robust_accuracy" and math.isclose(float(m["eps"]), train_eps, abs_tol=1e-9)
    ]
    if not at:
        return None
    worst = min(at, key=lambda m: (m["value"], -int(m.get("n") or 0)))
    attack = worst.get("attack") or {}
    return {
        "metric": "robust_accuracy",
        "value": worst["value"],
        "n": worst.get("n"),
        "ci95": worst.get("ci95"),
        "eps": worst["eps"],
        "norm": worst.get("norm") or attack.get("norm"),
        "attack": attack.get("label") or attack.get("name"),
        "attack_description": attack.get("description"),
        "measured_on": worst.get("measured_on"),
        "weights_sha256": worst.get("weights_sha256"),
        "worst_of": len(at),
        "rule": "the lowest robust accuracy among every figure measured at the training eps",
    }


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_card(model_dir: str | os.PathLike[str]) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CardError(f"{path}: no card") from None
    except OSError as exc:
        raise CardError(f"{path}: unreadable ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise CardError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CardError(f"{path}: top level must be an object")
    return ModelCard.from_dict(data, str(path))


def write_card(model_dir: str | os.PathLike[str], card: ModelCard) -> None:
    atomic_write_text(Path(model_dir) / CARD_FILE, json.dumps(card.to_dict(), indent=2) + "\n")


def build_model(card: ModelCard) -> EmbeddingClassifier:
    try:
        model = create_model(card.arch, **card.arch_kwargs)
    except KeyError as exc:
        raise CardError(f"card {card.name!r}: {exc.args[0]}") from None
    except TypeError as exc:
        raise CardError(f"card {card.name!r}: bad arguments for {card.arch!r}: {exc}") from None
    if not isinstance(model, EmbeddingClassifier):
        raise CardError(f"card {card.name!r}: {card.arch!r} is not a servable EmbeddingClassifier")
    return model


def verified_file(model_dir: str | os.PathLike[str], card: ModelCard) -> Path:
    """The card's weights (or model) file, after checking that its sha256 is the card's."""
    model_dir = Path(model_dir)
    weights = model_dir / card.weights_file
    if Path(card.weights_file).name != card.weights_file:
        raise CardError(f"{model_dir / CARD_FILE}: weights_file must be a plain file name")
    if not weights.is_file():
        raise CardError(f"{weights}: weights file missing")
    try:
        actual = sha256_file(weights)
    except OSError as exc:
        raise CardError(f"{weights}: unreadable ({exc.strerror or exc})") from None
    if actual != card.weights_sha256:
        raise CardError(f"{weights}: sha256 {actual} does not match the card's {card.weights_sha256}")
    return weights


def load_model(
    model_dir: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[EmbeddingClassifier, ModelCard]:
    """Verify and load a stored ER model; returns it in eval mode, float32, on ``device``.
    (Any store entry, imported ones included: :func:`training.formats.load_served`.)"""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    if card.model_format != "er":
        raise CardError(
            f"{model_dir}: an imported {card.model_format} model, not an ER checkpoint "
            "(this command needs the network's weights; the service and audits serve it)"
        )
    weights = verified_file(model_dir, card)
    model = build_model(card)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CardError(f"{weights}: unreadable safetensors file ({exc})") from None
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CardError(f"{weights}: does not fit {card.arch}: {exc}") from None
    return model.to(device).eval(), card


def save_weights(model: torch.nn.Module, path: Path, dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    target = STORAGE_DTYPES[dtype]
    state = {
        k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(path), metadata={"format": "pt", "dtype": dtype})
    path.chmod(READABLE_FILE)


class StagedModel:
    """A model directory being written: weights first (so metrics can be measured on the stored
    weights), the card last, then one rename into the store. Nothing appears under the final name
    until ``commit``; an abandoned stage is removed."""

    def __init__(self, store: str | os.PathLike[str], name: str) -> None:
        if not name or "/" in name or name.startswith(".") or name != Path(name).name:
            raise ValueError(f"invalid model name {name!r}")
        self.store = Path(store)
        self.name = name
        self.store.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=self.store))
        self.dir.chmod(READABLE_DIR)  # mkdtemp makes it 0700; the model must be readable by services

    def write_weights(self, model: torch.nn.Module, dtype: str) -> str:
        """Store the weights in ``dtype``; returns their sha256 for the card."""
        path = self.dir / WEIGHTS_FILE
        save_weights(model, path, dtype)
        return sha256_file(path)

    def commit(self, card: ModelCard, verify: Callable[[Path], None] | None = None) -> Path:
        """Write the card, check that the staged entry loads (and passes ``verify``, which gets
        its directory), then move it into the store in one rename."""
        card.created = card.created or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        card.versions = card.versions or {"erc": __version__, "torch": str(torch.__version__)}
        write_card(self.dir, card)
        from training.formats import load_served

        load_served(self.dir)  # the staged directory must load before it replaces anything
        if verify is not None:
            verify(self.dir)
        final = self.store / self.name
        old = None
        if final.exists():
            old = self.store / f".{self.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(self.dir, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def append_card_metrics(model_dir: str | os.PathLike[str], metrics: list[dict[str, Any]]) -> ModelCard:
    """Add metrics measured on a store model's own weights to its card (atomic rewrite).

    Entries measured on other weights (different sha256) are refused. A new figure replaces an
    older one measured with the same metric, eps, n and attack settings.
    """
    card = read_card(model_dir)
    for m in metrics:
        if m.get("weights_sha256") != card.weights_sha256:
            raise CardError(f"metric measured on weights {m.get('weights_sha256')} is not for {card.name}")

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


# -- any model reference -> a loaded network ------------------------------------------------------
@dataclass
class LoadedModel:
    """A network ready to evaluate, with what is known about it. ``model`` is the ER network
    itself for ER entries and runs, the served model (:class:`training.formats.ServedNet`, same
    call contract: [0, 1] images -> logits, ``forward_features``) for imported entries."""

    model: EmbeddingClassifier
    name: str
    dataset: str
    source: str  # "store" or "run"
    path: Path
    weights_sha256: str | None  # for store models: the verified hash of the weights evaluated
    train_eps: float
    input_shape: list[int]  # [C, H, W]
    label_names: list[str]
    folder: FolderOptions  # how an image folder is read for this model (any folder:PATH it is run on)
    card: ModelCard | None = None  # store entries: the card (model_format, capabilities)


def model_from_checkpoint(state: dict[str, Any]) -> EmbeddingClassifier:
    """The network of a training checkpoint (``load_checkpoint``'s dict), in eval mode, on the CPU."""
    model = create_model(state["arch"], **state["arch_kwargs"])
    assert isinstance(model, EmbeddingClassifier)
    model.load_state_dict(network_weights(state))
    return model.eval()


def checkpoint_geometry(state: dict[str, Any]) -> tuple[list[int], list[str]]:
    """Input shape [C, H, W] and label names of a training checkpoint (older checkpoints, which
    predate image folders, take them from the dataset registry)."""
    shape, names = state.get("input_shape"), state.get("label_names")
    if not shape or not names:
        from training.data import dataset_info

        info = dataset_info(state["dataset"])
        shape, names = shape or list(info.shape), names or list(info.label_names)
    return list(shape), list(names)


def resolve_model(
    ref: str, store: str | os.PathLike[str] = "model_store", device: str = "auto"
) -> LoadedModel:
    """``ref`` is a model name in ``store``, a model directory (with card.json) or a run directory
    (with checkpoint.pt)."""
    dev = resolve_device(device)
    candidates = [Path(store) / ref, Path(ref)]
    for path in candidates:
        if (path / CARD_FILE).is_file():
            card = read_card(path)
            if card.model_format == "er":
                model, card = load_model(path, dev)
            else:
                from training.formats import build_served

                # Same call contract as the ER network ([0, 1] images -> logits); typed as one
                # for the evaluation code, which only calls it and its forward_features.
                model = build_served(card, path, dev)  # type: ignore[assignment]
            sha = card.weights_sha256
            return LoadedModel(
                model,
                card.name,
                card.dataset,
                "store",
                path,
                sha,
                card.train_eps,
                list(card.input_shape),
                list(card.label_names),
                card.folder_options(),
                card,
            )
    for path in candidates:
        if (path / CHECKPOINT).is_file():
            state = load_checkpoint(path / CHECKPOINT)
            model = model_from_checkpoint(state).to(dev)
            eps = training_eps(state["config"], state["dataset"])
            shape, names = checkpoint_geometry(state)
            folder = FolderOptions.for_model(state["config"].get("data"), shape, names)
            return LoadedModel(
                model, path.name, state["dataset"], "run", path, None, eps, shape, names, folder
            )
    raise ModelNotFound(
        f"no model {ref!r}: looked for {candidates[0]} and {candidates[1]} (a store model has card.json, "
        f"a run directory has {CHECKPOINT})"
    )
