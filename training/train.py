"""The training loop: epochs over in-memory uint8 tensors, DDP under torchrun, autocast,
per-epoch JSONL metrics, crash-safe checkpoints and ``resume``.

Determinism: the data order of epoch ``e`` and every random number drawn during it come from
``(seed, e, rank)``, so a run resumed from the checkpoint of epoch ``e - 1`` replays epoch ``e``
exactly as an uninterrupted run would (on deterministic kernels).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm

from training import __version__
from training.attacks import build_attack
from training.checkpoint import (
    CHECKPOINT,
    METRICS,
    atomic_write_text,
    load_checkpoint,
    network_weights,
    save_checkpoint,
)
from training.config import ConfigError, TrainConfig, auto_batch_size, dump_config, from_dict
from training.data import DatasetInfo, FolderOptions, ImageSet, is_folder, load_split
from training.diagnostics import learning_warnings
from training.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown_distributed,
    weights_in_sync,
)
from training.ema import WeightEMA
from training.evaluate import robust_flags, to_unit
from training.methods import Method, create_method
from training.methods.base import batchnorm_layers, recalibrate_batchnorm

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
SUMMARY = "summary.json"
PROGRESS_LOG_S = 60.0  # at most one progress log line (speed, ETAs) a minute during an epoch


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**63)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, dist: DistInfo) -> Iterator[torch.Tensor]:
    """Index tensors for this rank: one seeded permutation per epoch, identical on every rank,
    cut into global batches (the last incomplete one dropped) and sharded by rank."""
    if batch_size % dist.world_size:
        raise ValueError(f"batch size {batch_size} is not divisible by the {dist.world_size} ranks")
    per_rank = batch_size // dist.world_size
    gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch, 0))
    order = torch.randperm(n, generator=gen)
    for step in range(n // batch_size):
        start = step * batch_size + dist.rank * per_rank
        yield order[start : start + per_rank]


def crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel translation (reflect padding) and horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, None, :]
    out = padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(x.shape[1], device=x.device)[None, :, None, None],
        rows,
        cols,
    ]
    flip = torch.rand(n, device=x.device) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def initial_weights(ref: str, method: Method) -> dict[str, torch.Tensor]:
    """Encoder + classifier weights for ``run.init_from``: a store model (card.json) or a run
    directory (checkpoint.pt) of the same architecture."""
    from training.card import CARD_FILE, load_model

    path = Path(ref)
    if (path / CARD_FILE).is_file():
        model, card = load_model(path, torch.device("cpu"))
        arch, kwargs = card.arch, card.arch_kwargs
        state = model.state_dict()
    elif (path / CHECKPOINT).is_file():
        saved = load_checkpoint(path / CHECKPOINT)
        arch, kwargs = saved["arch"], saved["arch_kwargs"]
        state = network_weights(saved)
    else:
        raise ValueError(f"run.init_from: {ref} holds neither a card.json nor a {CHECKPOINT}")
    if arch != method.arch or kwargs != method.arch_kwargs:
        raise ValueError(
            f"run.init_from: {ref} is {arch} {kwargs}, this run builds {method.arch} {method.arch_kwargs}"
        )
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_training_data(
    cfg: TrainConfig, *, progress: bool = True
) -> tuple[ImageSet, ImageSet, dict[str, Any]]:
    """The train subset and the per-epoch evaluation subset of ``cfg.data``, and how the data was
    read (an image folder's layout, split and skipped files; empty for the paper's datasets)."""
    d, seed = cfg.data, cfg.run.seed
    if is_folder(d.dataset):
        from training.data.folder import load_folder

        options = dataclasses.replace(FolderOptions.from_config(d), progress=None if progress else False)
        data = load_folder(d.dataset, options)
        return (
            data.train.subset(d.train_subset, seed),
            data.test.subset(d.eval_subset, seed),
            data.description,
        )
    train = load_split(d.dataset, "train", d.data_dir, n=d.train_subset, seed=seed)
    test = load_split(d.dataset, "test", d.data_dir, n=d.eval_subset, seed=seed)
    return train, test, {}


class Trainer:
    """One training run. Use :func:`run_training` unless you need the pieces."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, device: torch.device) -> None:
        self.cfg = cfg
        self.dist = dist
        self.device = device
        self.run_dir = Path(cfg.run.out_dir)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick the fastest kernels
        train, test, self.data_description = load_training_data(
            cfg, progress=cfg.run.progress and dist.is_main
        )
        self.info: DatasetInfo = train.info
        self.embed_dim_estimate: dict[str, Any] | None = None
        if cfg.model.embed_dim == "auto":
            cfg = self.cfg = self._auto_embed_dim(cfg, train)
        # Whole datasets live on the device as uint8: no loader workers, no host->device copies.
        self.train_x = train.images.to(device)
        self.train_y = train.labels.to(device)
        self.test = ImageSet(test.images.to(device), test.labels.to(device), test.info)
        cfg = self.cfg = self._resolve_sizes(cfg, train)
        if len(train) < self.batch_size:
            raise ConfigError(
                f"data.batch_size: the train set has {len(train)} images, fewer than one batch of "
                f"{cfg.data.batch_size}; give a smaller --batch-size"
            )
        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank (DDP also broadcasts them)
        self.method: Method = create_method(
            cfg, self.info, device, distributed=dist.enabled, steps_per_epoch=len(train) // self.batch_size
        )
        if cfg.run.init_from:
            self.method.model.load_state_dict(initial_weights(cfg.run.init_from, self.method))
            log.info("network weights from %s (optimizers and critic start fresh)", cfg.run.init_from)
        # The moving average starts from the initial weights (those of run.init_from when given).
        self.ema = WeightEMA(self.method.model, cfg.run.ema_decay) if cfg.run.ema_decay > 0 else None
        self.start_epoch = 0

    @property
    def batch_size(self) -> int:
        """The global batch size (``data.batch_size`` once resolved)."""
        size = self.cfg.data.batch_size
        if size is None:
            raise RuntimeError("data.batch_size is resolved when the data is read")
        return size

    def _resolve_sizes(self, cfg: TrainConfig, train: ImageSet) -> TrainConfig:
        """The choices left to the data: ``data.batch_size: null`` (:func:`auto_batch_size`) and an
        image folder's network (:func:`~training.models.folder_arch`), logged and written into the
        run's config, so that the run states them and a resume rebuilds the same."""
        from training.methods import get_method
        from training.models import folder_arch

        n = len(train)
        if cfg.data.batch_size is None:
            size = auto_batch_size(n, self.dist.world_size)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=size))
            steps, dropped = n // size, n % size
            log.info(
                "batch size %d for %d training images: %d steps an epoch, %d images (a different "
                "draw each epoch) left out of each",
                size,
                n,
                steps,
                dropped,
            )
        if cfg.model.arch is None and is_folder(cfg.data.dataset):
            arch, why = folder_arch(get_method(cfg.method.name).family, train.info.shape, n)
            log.info("network %s: %s", arch, why)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=arch))
        return cfg

    @property
    def eval_model(self) -> torch.nn.Module:
        """The network evaluated, saved for export and exported: the weights' moving average
        when the run keeps one, else the trained network."""
        return self.ema.module if self.ema is not None else self.method.model

    def recalibrate_batchnorm(self, epoch: int, model: torch.nn.Module | None = None) -> None:
        """Recompute BatchNorm's running statistics of the trained network (or of ``model``, the
        weights' moving average) over ``run.bn_recalibration_n`` training images (a seeded draw),
        fed as the method trains on them (adversarial examples crafted against that network);
        the same on every rank, and outside the training random stream (resumed runs stay exact)."""
        target = self.method.model if model is None else model
        n = min(self.cfg.run.bn_recalibration_n, len(self.train_x))
        if n == 0 or not batchnorm_layers(target):
            return
        bs = self.batch_size
        gen = torch.Generator().manual_seed(_epoch_seed(self.cfg.run.seed, epoch, 7))
        idx = torch.randperm(len(self.train_x), generator=gen)[:n].to(self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_epoch_seed(self.cfg.run.seed, epoch, 13))

            def inputs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return self.method.batchnorm_inputs(x, y, model)

            batches = (self._train_inputs(idx[s : s + bs], inputs) for s in range(0, n, bs))
            recalibrate_batchnorm(target, batches)

    def _train_inputs(self, idx: torch.Tensor, transform: Any = None) -> torch.Tensor:
        """The images of ``idx`` as a training step sees them (augmented, in the memory format),
        passed through ``transform(x, y)`` when given."""
        x = self.train_x[idx].float().div_(255.0)
        if self.cfg.data.augment == "crop-flip":
            x = crop_flip(x)
        if self.cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x if transform is None else transform(x, self.train_y[idx])

    def _auto_embed_dim(self, cfg: TrainConfig, train: ImageSet) -> TrainConfig:
        """``model.embed_dim: auto``: the intrinsic dimension of the training images (the same
        seeded draw on every rank, so every rank builds the same network)."""
        from training.intrinsic_dim import embedding_size
        from training.methods import get_method

        if get_method(cfg.method.name).family != "er":  # a baseline's "embedding" is its penultimate layer
            log.info("embed_dim auto: %s has no embedding size to choose; ignored", cfg.method.name)
            return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embed_dim=None))

        k, result = embedding_size(train, seed=cfg.run.seed)
        self.embed_dim_estimate = {**result.to_dict(), "embed_dim": k}
        log.info("embed_dim auto: intrinsic dimension %.2f -> k = %d", result.estimate, k)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embed_dim=k))

    # -- persistence ----------------------------------------------------------------------------
    def checkpoint_state(self, epochs_done: int) -> dict[str, Any]:
        m = self.method
        return {
            "epoch": epochs_done,
            "config": self.cfg.to_dict(),
            "method": m.name,
            "arch": m.arch,
            "arch_kwargs": m.arch_kwargs,
            "dataset": self.info.name,
            "label_names": list(self.info.label_names),
            "input_shape": list(self.info.shape),
            "data": self.data_description,
            "embed_dim_estimate": self.embed_dim_estimate,
            "state": m.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "world_size": self.dist.world_size,
            "versions": {"torch": str(torch.__version__), "erc": __version__},
        }

    def resume(self) -> None:
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            log.warning("no checkpoint in %s: starting from scratch", self.run_dir)
            return
        state = load_checkpoint(path)
        if state["method"] != self.method.name or state["arch"] != self.method.arch:
            saved = f"{state['method']}/{state['arch']}"
            raise ValueError(f"{path} holds {saved}, this run is {self.method.name}/{self.method.arch}")
        self.method.load_state_dict(state["state"])
        saved_ema = state.get("ema")
        if (saved_ema is None) != (self.ema is None):
            raise ValueError(
                f"{path} was saved {'with' if saved_ema else 'without'} a moving average of the weights; "
                f"resume with the same run.ema_decay"
            )
        if self.ema is not None and saved_ema is not None:
            self.ema.load_state_dict(saved_ema)
        self.start_epoch = int(state["epoch"])
        log.info("resumed %s after epoch %d", self.run_dir, self.start_epoch)

    def _trim_metrics(self) -> None:
        """Drop log lines of epochs the checkpoint does not hold (a kill between log and save), and
        a line torn by a kill or a full disk in the middle of its append."""
        path = self.run_dir / METRICS
        if not path.exists():
            return
        keep = []
        for ln in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(ln)
            except json.JSONDecodeError:
                continue
            epoch = record.get("epoch") if isinstance(record, dict) else None
            if isinstance(epoch, int) and epoch <= self.start_epoch:
                keep.append(ln)
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Clean accuracy on the eval subset (and PGD-20 robust accuracy on ``run.eval_adv_n``)."""
        model = self.eval_model
        was = model.training
        model.eval()
        out: dict[str, Any] = {}
        try:
            n = len(self.test)
            shard = torch.arange(self.dist.rank, n, self.dist.world_size, device=self.device)
            counts = torch.zeros(2, device=self.device)
            with torch.no_grad(), self.method.autocast():
                for s in range(0, len(shard), 500):
                    idx = shard[s : s + 500]
                    pred = model(to_unit(self.test.images[idx], self.device)).argmax(1)
                    counts[0] += (pred == self.test.labels[idx]).sum()
                    counts[1] += len(idx)
            all_reduce_sum(counts, self.dist)
            out["test_acc"] = float(counts[0] / counts[1].clamp_min(1))
            out["test_n"] = int(counts[1])
            n_adv = min(self.cfg.run.eval_adv_n, n)
            if n_adv:
                pgd20 = build_attack("pgd", {"steps": 20})
                adv_shard = shard[shard < n_adv]
                flags = robust_flags(
                    model,
                    to_unit(self.test.images[adv_shard], self.device),
                    self.test.labels[adv_shard],
                    self.method.eps,
                    pgd20,
                )
                c = all_reduce_sum(
                    torch.tensor([float(flags.sum()), float(len(adv_shard))], device=self.device), self.dist
                )
                out["robust_acc"] = float(c[0] / c[1].clamp_min(1))
                out["robust_attack"] = f"{pgd20.description}, eps={self.method.eps}, n={int(c[1])}"
        finally:
            model.train(was)
        return out

    def learning_warnings(self, record: dict[str, Any]) -> list[str]:
        """:func:`training.diagnostics.learning_warnings` on the last epoch's figures."""
        if "test_acc" not in record:
            return []
        train_acc = record.get("train", {}).get("acc")
        return learning_warnings(record["test_acc"], record["test_n"], self.info.num_classes, train_acc)

    # -- the loop -------------------------------------------------------------------------------
    def _log_progress(self, epoch: int, done: int, steps: int, seconds: float) -> None:
        """A log line with speed and ETAs (long CPU epochs run with progress bars off under nohup;
        the ETAs leave out the per-epoch BatchNorm recalibration and evaluation)."""
        rate = done / seconds
        left_epoch = (steps - done) / rate
        left_run = left_epoch + (self.cfg.run.epochs - epoch - 1) * steps / rate
        log.info(
            "epoch %d/%d: step %d/%d, %.1f img/s, epoch ETA %s, run ETA %s",
            epoch + 1,
            self.cfg.run.epochs,
            done,
            steps,
            rate * self.batch_size,
            _dt.timedelta(seconds=round(left_epoch)),
            _dt.timedelta(seconds=round(left_run)),
        )

    def _past_limit(self, projected_s: float, limit_s: float) -> bool:
        """Whether the next epoch would end past the time limit, on any rank (all ranks agree)."""
        flag = torch.tensor([1.0 if projected_s > limit_s else 0.0], device=self.device)
        return bool(all_reduce_sum(flag, self.dist).item() > 0)

    def fit(self) -> dict[str, Any]:
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / CONFIG, dump_config(cfg))
            self._trim_metrics()
        barrier(dist)
        # Epochs already done advance the LR schedule too (the scheduler state was restored).
        record: dict[str, Any] = {}
        started = time.perf_counter()
        longest = 0.0  # slowest epoch so far, with its evaluation
        stopped_early: str | None = None
        for epoch in range(self.start_epoch, cfg.run.epochs):
            limit = cfg.run.time_limit_s
            if limit is not None and self._past_limit(time.perf_counter() - started + longest, limit):
                stopped_early = (
                    f"time limit: {limit:g} s would be exceeded by epoch {epoch + 1} "
                    f"(slowest epoch so far {longest:.1f} s)"
                )
                log.warning("stopping after epoch %d: %s", epoch, stopped_early)
                break
            epoch_t0 = time.perf_counter()
            torch.manual_seed(_epoch_seed(cfg.run.seed, epoch + 1, dist.rank))
            self.method.train(True)
            steps = len(self.train_x) // self.batch_size
            sums: dict[str, torch.Tensor] = {}
            t0 = time.perf_counter()
            bar = tqdm(
                total=steps,
                desc=f"epoch {epoch + 1}/{cfg.run.epochs}",
                disable=not (cfg.run.progress and dist.is_main),
                dynamic_ncols=True,
                unit="batch",
            )
            last_note = t0
            for i, idx in enumerate(
                epoch_batches(len(self.train_x), self.batch_size, epoch, cfg.run.seed, dist)
            ):
                self.method.set_progress(epoch + i / steps)
                x = self._train_inputs(idx)
                metrics = self.method.train_step(x, self.train_y[idx])
                self.method.after_step()
                if self.ema is not None:
                    self.ema.update(self.method.model)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, torch.zeros((), device=self.device)) + v.float()
                bar.update(1)
                if bar.disable is False and (i % 10 == 9 or i == steps - 1):
                    bar.set_postfix({k: f"{float(v) / (i + 1):.4f}" for k, v in sums.items()})
                now = time.perf_counter()
                if dist.is_main and now - last_note >= PROGRESS_LOG_S and i + 1 < steps:
                    last_note = now
                    self._log_progress(epoch, i + 1, steps, now - t0)
            bar.close()
            self.method.step_schedulers()
            self.recalibrate_batchnorm(epoch + 1)
            if self.ema is not None:
                self.recalibrate_batchnorm(epoch + 1, self.ema.module)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            keys = sorted(sums)
            vec = torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0, device=self.device)
            all_reduce_sum(vec, dist)
            train_metrics = {k: float(v) / (steps * dist.world_size) for k, v in zip(keys, vec, strict=True)}
            record = {
                "epoch": epoch + 1,
                "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "seconds": round(seconds, 3),
                "images_per_s": round(steps * self.batch_size / seconds, 1),
                "train": train_metrics,
                "lr": self.method.learning_rates(),
                "train_eps": self.method.eps_now if self.method.minmax else None,
                **self.evaluate(),
                "device": str(self.device),
                "device_name": _device_name(self.device),
                "world_size": dist.world_size,
            }
            if dist.is_main:
                with open(self.run_dir / METRICS, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                save_checkpoint(self.run_dir / CHECKPOINT, self.checkpoint_state(epoch + 1))
                log.info(
                    "epoch %d: %s", epoch + 1, {k: record[k] for k in ("seconds", "test_acc") if k in record}
                )
            barrier(dist)
            longest = max(longest, time.perf_counter() - epoch_t0)
        warnings = self.learning_warnings(record)
        summary = {
            "run_dir": str(self.run_dir),
            "epochs": cfg.run.epochs,
            "epochs_done": int(record.get("epoch", self.start_epoch)),
            "stopped_early": stopped_early,
            "method": self.method.name,
            "arch": self.method.arch,
            "dataset": self.info.name,
            "last": record,
            "params_in_sync": weights_in_sync(self.method.model, dist),
            "device": str(self.device),
            "device_name": _device_name(self.device),
            "world_size": dist.world_size,
            "warnings": warnings,
        }
        if dist.is_main:
            for w in warnings:
                log.warning("%s", w)
            atomic_write_text(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return summary


CHOICES = {
    "data.augment": ("none", "crop-flip"),
    "run.amp": ("none", "bf16"),
    "optim.schedule": ("step", "cosine"),
    "adv.bn_mode": ("eval", "train"),
}


def validate(cfg: TrainConfig) -> None:
    """Check names against the registries before any data is read; raises ConfigError."""
    from training.data import list_datasets
    from training.methods import METHODS
    from training.models import list_models
    from training.priors import PRIORS

    folder = is_folder(cfg.data.dataset)
    checks: dict[str, tuple[Any, Any]] = {
        "method.name": (cfg.method.name, list(METHODS)),
        "model.prior": (cfg.model.prior, list(PRIORS)),
        **({} if folder else {"data.dataset": (cfg.data.dataset, [*list_datasets(), "folder:PATH"])}),
        **{k: (config_value(cfg, k), v) for k, v in CHOICES.items()},
    }
    if cfg.model.arch is not None:
        checks["model.arch"] = (cfg.model.arch, list_models())
    for key, (value, known) in checks.items():
        if value not in known:
            raise ConfigError(f"{key}: unknown value {value!r}; known: {', '.join(map(str, known))}")
    positive = {
        "run.epochs": cfg.run.epochs,
        "data.batch_size": cfg.data.batch_size,
        "model.width": cfg.model.width,
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if cfg.run.bn_recalibration_n < 0:
        raise ConfigError(f"run.bn_recalibration_n: must be >= 0, got {cfg.run.bn_recalibration_n}")
    if cfg.method.freeze_bn and cfg.run.bn_recalibration_n:
        raise ConfigError(
            "method.freeze_bn keeps BatchNorm's statistics as loaded: set run.bn_recalibration_n: 0 "
            f"(got {cfg.run.bn_recalibration_n})"
        )
    if not 0 <= cfg.run.ema_decay < 1:
        raise ConfigError(f"run.ema_decay: must lie in [0, 1) (0: off), got {cfg.run.ema_decay}")
    if not 0 <= cfg.optim.min_lr_mult <= 1:
        raise ConfigError(f"optim.min_lr_mult: must lie in [0, 1], got {cfg.optim.min_lr_mult}")
    if cfg.adv.steps < 1:
        raise ConfigError(f"adv.steps: must be >= 1, got {cfg.adv.steps}")
    k = cfg.model.embed_dim
    if k is not None and k != "auto" and not (isinstance(k, int) and k >= 1):
        raise ConfigError(f"model.embed_dim: a positive integer or 'auto', got {k!r}")
    _validate_folder_keys(cfg, folder)


def _validate_folder_keys(cfg: TrainConfig, folder: bool) -> None:
    """The image-folder keys: only for folders, well formed, and a training eps chosen by the user."""
    from training.config import EPS_HELP
    from training.data import DataError
    from training.data.folder import parse_size

    d = cfg.data
    given = [k for k in ("image_size", "channels", "strict") if getattr(d, k) not in (None, False)]
    if not folder:
        if given:
            raise ConfigError(f"data.{given[0]}: applies to image folders (data.dataset: folder:PATH) only")
        return
    if cfg.adv.eps is None:
        raise ConfigError(
            f"adv.eps: required for an image folder (there is no default for unknown data): {EPS_HELP}"
        )
    if not 0 <= cfg.adv.eps <= 1:
        raise ConfigError(f"adv.eps: must lie in [0, 1] (pixel units), got {cfg.adv.eps}")
    if d.channels not in (None, 1, 3):
        raise ConfigError(f"data.channels: 1 (greyscale) or 3 (RGB), got {d.channels}")
    if not 0 < d.test_fraction < 1:
        raise ConfigError(f"data.test_fraction: must lie in (0, 1), got {d.test_fraction}")
    try:
        parse_size(d.image_size)
    except DataError as exc:
        raise ConfigError(f"data.image_size: {exc}") from None


def config_value(cfg: TrainConfig, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def run_training(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` (under torchrun: one process per rank); return the run summary."""
    validate(cfg)
    if is_folder(cfg.data.dataset):  # recorded with its absolute path: runs move, the data stays
        from training.data.folder import canonical_name

        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, dataset=canonical_name(cfg.data.dataset))
        )
    dist, device = init_distributed(cfg.run.device)
    try:
        trainer = Trainer(cfg, dist, device)
        if resume:
            trainer.resume()
        return trainer.fit()
    finally:
        shutdown_distributed()


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The resolved config a run saved (``config.yaml``)."""
    import yaml

    return from_dict(yaml.safe_load((Path(run_dir) / CONFIG).read_text()))
