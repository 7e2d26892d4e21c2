"""Training configuration: one frozen dataclass per concern, overridable from YAML and CLI flags.

Resolution order: dataclass defaults < YAML file < ``section.field=value`` overrides. The resolved
config is saved in the run directory (``config.yaml``) and inside every checkpoint, so a run can
always be reproduced or resumed from what it wrote.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.errors import ErcError


class ConfigError(ErcError, ValueError):
    """A config key or value that cannot be applied; the message names the key."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"  # dataset name (`erc data list`), or folder:PATH for your own images
    data_dir: str | None = None  # folder holding the dataset files; None searches the usual places
    train_subset: int | None = None  # train on n samples of a seeded permutation; None: the full train split
    eval_subset: int | None = 1000  # clean test accuracy after each epoch on this many test images
    # Global batch size, split evenly over DDP ranks. None: 128, or for a small train set the power
    # of two (at least 16) that gives an epoch at least 10 steps (auto_batch_size); the run's
    # config.yaml records the number used.
    batch_size: int | None = None
    augment: str = "none"  # "none" or "crop-flip" (4-pixel random crop + horizontal flip)
    # Image folders (folder:PATH) only:
    image_size: str | None = None  # N or WIDTHxHEIGHT every image is stretched to; None: their common size
    channels: int | None = None  # 1 (greyscale) or 3 (RGB); None: 1 when every image is greyscale
    test_fraction: float = 0.2  # without a test/ folder: share of each class held out as the test split
    split_seed: int = 0  # seed of that split (independent of run.seed, so the test set stays put)
    strict: bool = False  # refuse unreadable image files instead of skipping (and logging) them


@dataclass(frozen=True)
class ModelConfig:
    arch: str | None = None  # registry name; None picks the method family's architecture for the dataset
    # Embedding size k (ER family). None: Table 3's size for the network (mnist 4, cifar10 16, stl10 16,
    # tinyimagenet 20); "auto": the training images' intrinsic dimension (Levina-Bickel, n = 1000).
    embed_dim: int | str | None = None
    width: float = 1.0  # channel multiplier; 1.0 is the paper's size, 0.25 a slim CPU variant
    prior: str = "gaussian"  # embedding prior: gaussian N(0,1), uniform U(-3,3), cauchy C(0,1)
    noise_init: float | None = None  # RSE noise std before the first conv; None: method default
    noise_inner: float | None = None  # RSE noise std before the other convs; None: method default
    ensemble: int | None = None  # RSE: noisy passes averaged at inference; None: method default


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # encoder learning rate (the whole network's for baselines)
    disc_lr_mult: float = 0.5  # discriminator lr = 0.5 * lr (Listing 1)
    cls_lr_mult: float = 0.05  # classifier lr = 0.05 * lr (Listing 1)
    beta1: float = 0.9  # Adam betas (Listing 1 uses the defaults)
    beta2: float = 0.999
    weight_decay: float = 0.0
    step_size: int = 30  # StepLR period in epochs (Listing 1)
    gamma: float = 0.5  # StepLR decay (Listing 1)
    # Learning-rate schedule: "step" (StepLR above, stepped once an epoch, Listing 1) or "cosine"
    # (from lr down to min_lr_mult * lr over run.epochs, stepped after every optimizer step, so a
    # fine-tune of a few long epochs decays smoothly).
    schedule: str = "step"
    min_lr_mult: float = 0.0  # cosine: the final learning rate as a fraction of the initial one


@dataclass(frozen=True)
class MethodConfig:
    name: str = "er"  # er, er-trades, er-minus, e-cla, vae-cla, none, madry, rse
    minmax: bool | None = None  # PGD min-max training; None: the method's default (er, madry: on)
    lambda_disc: float = 1.0  # lambda of Algorithm 1 step 7 (LAMBDA in Listing 1)
    lambda_cls: float = 1.0  # weight of the classification loss (LAMBDA0)
    lambda_enc: float = 1.0  # weight of the encoder's prior-matching term, step 9 (LAMBDA1)
    clip: float = 0.01  # WGAN weight clipping of the discriminator's parameters
    kl_weight: float = 1.0  # vae-cla: weight of the KL term
    # er-trades: beta of the classification step CE(clean) + beta * KL(p(clean) || p(adv))
    # (Zhang et al. 2019, TRADES; their MNIST/CIFAR-10 choice is 6).
    trades_beta: float = 6.0
    # Keep BatchNorm's running statistics as loaded (init_from) and normalize with them while
    # training (fine-tuning): the layers stay in eval mode. run.bn_recalibration_n must be 0.
    freeze_bn: bool = False


@dataclass(frozen=True)
class AdvConfig:
    # l_inf radius for min-max training; None: the paper dataset's (0.3, 0.03, 0.03, 0.01); required for
    # image folders (no default fits unknown data).
    eps: float | None = None
    steps: int = 10  # PGD steps per training batch
    alpha: float | None = None  # PGD step size; None: 2.5 * eps / steps (Madry et al.)
    random_start: bool = True  # uniform start in the eps ball
    bn_mode: str = "eval"  # mode of the network while crafting examples: "eval" keeps BN statistics clean
    warmup_epochs: float = 0.0  # ramp eps linearly from 0 over this many epochs (0: full eps from the start)


@dataclass(frozen=True)
class RunConfig:
    epochs: int = 10
    seed: int = 0
    out_dir: str = "runs/default"  # run directory: config.yaml, metrics.jsonl, checkpoint.pt
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    amp: str = "none"  # "none" or "bf16" (autocast on the run's device, CUDA or CPU)
    channels_last: bool = False  # NHWC memory format (faster convolutions on recent GPUs)
    compile: bool = False  # torch.compile the network used to craft adversarial examples
    eval_adv_n: int = (
        0  # after each epoch, PGD-20 robust accuracy at the training eps on this many test images
    )
    progress: bool = True  # tqdm progress bars (rank 0 only)
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    time_limit_s: float | None = None  # stop early rather than start an epoch that would end past this
    # After each epoch, BatchNorm's running statistics are recomputed over this many training
    # images (a seeded draw), fed as the method trains on them (its adversarial examples under
    # min-max), so that the evaluated and saved statistics match the weights (0: keep the running
    # averages; they lag weights that move fast on small sets).
    bn_recalibration_n: int = 4096
    init_from: str | None = (
        None  # start from these network weights (store model or run dir); fresh optimizers
    )
    # Exponential moving average of the network's weights, updated after every training step
    # (0: off). With it on, the average is what is evaluated after each epoch, saved in the
    # checkpoint (``ema``) and exported; its BatchNorm statistics are recomputed for the averaged
    # weights after each epoch (run.bn_recalibration_n images, crafted against the average).
    ema_decay: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check (and gently convert) ``value`` against a field annotation like ``int | None``."""
    if isinstance(value, str) and annotation is not str:
        # CLI values arrive as strings: parse them the way YAML would ("0.3", "true", "null").
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse {value!r}: {exc}") from None
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: may not be null")
    for t in args:
        if t is type(None):
            continue
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    names = " | ".join(getattr(t, "__name__", str(t)) for t in args)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Return ``cfg`` with ``{"section.field": value}`` overrides applied (values may be strings)."""
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if "." not in dotted:
            raise ConfigError(f"override {dotted!r} must look like section.field (e.g. run.epochs)")
        section, name = dotted.split(".", 1)
        sections.setdefault(section, {})[name] = value
    return _merge(cfg, sections)


def _merge(cfg: TrainConfig, tree: Mapping[str, Any]) -> TrainConfig:
    top = {f.name: f for f in dataclasses.fields(TrainConfig)}
    replaced: dict[str, Any] = {}
    for section, values in tree.items():
        if section not in top:
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join(top)}")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        current = getattr(cfg, section)
        hints = _section_types(type(current))
        changes = {}
        for name, value in values.items():
            if name not in hints:
                raise ConfigError(f"unknown config key {section}.{name}; known: {', '.join(hints)}")
            changes[name] = _coerce(f"{section}.{name}", value, hints[name])
        replaced[section] = dataclasses.replace(current, **changes)
    return dataclasses.replace(cfg, **replaced)


def from_dict(tree: Mapping[str, Any]) -> TrainConfig:
    """Build a config from a nested mapping (as saved in ``config.yaml`` or a checkpoint)."""
    return _merge(TrainConfig(), tree)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``."""
    cfg = TrainConfig()
    if path is not None:
        text = Path(path).read_text()
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, Mapping):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        cfg = _merge(cfg, tree)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def auto_batch_size(n: int, world_size: int = 1) -> int:
    """``data.batch_size: null``: 128, or for fewer than 1,280 training images the largest power of
    two of at least 16 that gives an epoch of at least 10 steps (a 180-image set trains with 16:
    11 steps an epoch instead of one); under 16 images, all of them. Rounded down to a multiple
    of ``world_size`` (at least ``world_size``)."""
    if n >= 1280:
        size = 128
    elif n >= 16:
        size = max(16, 2 ** math.floor(math.log2(n / 10)))
    else:
        size = max(n, 1)
    return max(world_size, size - size % world_size)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def training_eps(config: TrainConfig | Mapping[str, Any] | None, dataset: str) -> float:
    """The l_inf radius a model is (or was) trained at: its config's ``adv.eps``, else the dataset's
    default. The one place this rule lives: training, run directories, cards and audit defaults.

    Args:
        config: a :class:`TrainConfig`, or its dict form as saved in checkpoints and cards.
        dataset: the dataset name, for the default.
    """
    eps = config.adv.eps if isinstance(config, TrainConfig) else ((config or {}).get("adv") or {}).get("eps")
    if eps is not None:
        return float(eps)
    from training.data import dataset_info, is_folder

    default = None if is_folder(dataset) else dataset_info(dataset).train_eps
    if default is None:
        raise ConfigError(
            f"adv.eps: {dataset} has no default training eps; choose one with --eps ({EPS_HELP})"
        )
    return float(default)


# How to choose the training eps of data the project does not know (erc train --help, errors).
EPS_HELP = (
    "the largest l_inf change, in [0, 1] pixel units, that must not change the class: 0.3 for "
    "MNIST-like digits, 0.1 for Fashion-MNIST-like textures, 0.03 (8/255) for natural photos, "
    "0.01 for fine detail at 64 pixels; look at a few images perturbed by it, and audit at several eps"
)
