"""What every training method shares: building the network from the config, the optional PGD
min-max inner loop, autocast, DDP wrapping, optimizers and schedulers, and checkpoint state.

A method's ``train_step(x, y)`` takes one batch (images ``[B, C, H, W]`` in [0, 1] on the device,
labels ``[B]``) and updates the networks; it returns detached scalar tensors (no host sync) for
logging. ``model`` is always the plain (non-DDP, non-compiled) :class:`EmbeddingClassifier` that
is evaluated and exported.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.attacks import pgd
from training.config import ConfigError, TrainConfig, training_eps
from training.data import DatasetInfo, is_folder
from training.models import EmbeddingClassifier, arch_for, create_model

# name -> method class, filled by @register_method in this package's modules (discovered by the
# package, as the attacks are); listed in registration order.
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a training method under its ``name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


class Method:
    name: ClassVar[str]
    family: ClassVar[str]  # "er" (encoder + classifier from Figures 9-10) or "baseline" (Figure 8)
    minmax_default: ClassVar[bool]  # PGD min-max training unless the config says otherwise
    description: ClassVar[str]

    def __init__(
        self,
        cfg: TrainConfig,
        info: DatasetInfo,
        device: torch.device,
        *,
        distributed: bool,
        steps_per_epoch: int = 1,
    ) -> None:
        self.cfg = cfg
        self.info = info
        self.device = device
        self.distributed = distributed
        self.steps_per_epoch = steps_per_epoch  # optimizer steps an epoch: the cosine schedule's unit
        self.arch = cfg.model.arch or arch_for(info.name, self.family, info.shape)
        self.arch_kwargs = self.build_arch_kwargs()
        try:
            model = create_model(self.arch, **self.arch_kwargs)
        except ValueError as exc:  # e.g. images too small for the network's downsampling
            raise ConfigError(f"model.arch: {self.arch} on {info.shape} inputs: {exc}") from None
        if not isinstance(model, EmbeddingClassifier):
            raise TypeError(f"architecture {self.arch!r} is not an EmbeddingClassifier")
        self.model: EmbeddingClassifier = self._place(model)
        self.minmax = cfg.method.minmax if cfg.method.minmax is not None else self.minmax_default
        self.eps = training_eps(cfg, info.name)
        self.eps_now = self.eps if cfg.adv.warmup_epochs <= 0 else 0.0
        # The network the inner maximisation differentiates; compiled separately when asked,
        # since most of a min-max step is spent there.
        self.attack_model: Any = torch.compile(self.model) if cfg.run.compile else self.model
        self.modules: dict[str, nn.Module] = {"model": self.model}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.build()

    # -- construction -------------------------------------------------------------------------
    def build_arch_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the architecture builder; stored in checkpoints and model cards."""
        kw: dict[str, Any] = {"num_classes": self.info.num_classes, "width": self.cfg.model.width}
        if self.info.mean is not None and self.info.std is not None:
            kw["mean"] = list(self.info.mean)
            kw["std"] = list(self.info.std)
        if self.family == "er" and self.cfg.model.embed_dim is not None:
            kw["embed_dim"] = self.cfg.model.embed_dim
        if is_folder(self.info.name):  # the paper's network of the closest geometry, fitted to these images
            kw["in_chans"] = self.info.channels
            kw["input_size"] = [self.info.height, self.info.width]
        for key in ("noise_init", "noise_inner", "ensemble"):
            value = getattr(self.cfg.model, key)
            if value is not None:
                kw[key] = value
        return kw

    def build(self) -> None:
        """Create optimizers, schedulers and any extra networks (subclasses)."""
        raise NotImplementedError

    def _place(self, module: nn.Module) -> Any:
        module = module.to(self.device)
        if self.cfg.run.channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return module

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``module`` when running under torchrun, else itself."""
        if not self.distributed:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def adam(self, params: Iterator[nn.Parameter], lr: float) -> torch.optim.Adam:
        o = self.cfg.optim
        return torch.optim.Adam(params, lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)

    def add_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        self.optimizers[name] = optimizer
        o = self.cfg.optim
        if o.schedule == "cosine":
            total = max(1, self.cfg.run.epochs * self.steps_per_epoch)
            floor = o.min_lr_mult

            def cosine(step: int) -> float:  # closed form: a resumed run lands on the same rates
                t = min(step, total) / total
                return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        else:
            self.schedulers[name] = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=o.step_size, gamma=o.gamma
            )

    @property
    def schedule_per_step(self) -> bool:
        """Whether the schedulers advance after every optimizer step (cosine) or every epoch."""
        return self.cfg.optim.schedule == "cosine"

    # -- per batch ----------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.run.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_progress(self, epochs: float) -> None:
        """Training progress in epochs (fractional): drives the eps warm-up ramp."""
        warmup = self.cfg.adv.warmup_epochs
        self.eps_now = self.eps if warmup <= 0 else self.eps * min(1.0, epochs / warmup)

    @contextlib.contextmanager
    def crafting(self, model: nn.Module | None = None) -> Iterator[Any]:
        """The network an inner attack differentiates (``model``, e.g. the weights' moving
        average, or the trained network, compiled when asked), in the mode ``adv.bn_mode`` says
        for the block; its mode is restored after."""
        target = self.model if model is None else model
        was_training = target.training
        if self.cfg.adv.bn_mode == "eval":
            target.eval()
        try:
            yield self.attack_model if model is None else model
        finally:
            target.train(was_training)

    def adversarial(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """PGD examples against ``C(Q(x))`` (or against ``model``, e.g. the weights' moving average)
        when min-max training is on, else ``x`` itself."""
        if not self.minmax or self.eps_now <= 0:
            return x
        adv = self.cfg.adv
        with self.crafting(model) as net, self.autocast():
            return pgd(
                net,
                x,
                y,
                eps=self.eps_now,
                alpha=adv.alpha,
                steps=adv.steps,
                random_start=adv.random_start,
                keep_best=False,
            )

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def batchnorm_inputs(
        self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None
    ) -> torch.Tensor:
        """The inputs whose statistics BatchNorm should hold: what the network trains on (its
        adversarial examples under min-max, at the current eps; crafted against ``model`` when
        given, else against the trained network)."""
        return self.adversarial(x, y, model)

    def descend(self, loss: torch.Tensor, *optimizers: str) -> None:
        """One optimizer step of ``loss`` for the named optimizers (gradients zeroed first)."""
        opts = [self.optimizers[name] for name in optimizers]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()

    def train(self, mode: bool = True) -> None:
        for m in self.modules.values():
            m.train(mode)

    def step_schedulers(self) -> None:
        """End of an epoch: advance the per-epoch schedulers (StepLR)."""
        if not self.schedule_per_step:
            for s in self.schedulers.values():
                s.step()

    def after_step(self) -> None:
        """After each training step: advance the per-step schedulers (cosine)."""
        if self.schedule_per_step:
            for s in self.schedulers.values():
                s.step()

    def learning_rates(self) -> dict[str, float]:
        return {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}

    # -- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for kind, table in (
            ("modules", self.modules),
            ("optimizers", self.optimizers),
            ("schedulers", self.schedulers),
        ):
            saved = state[kind]
            if set(saved) != set(table):
                raise ValueError(
                    f"checkpoint {kind} {sorted(saved)} do not match this method's {sorted(table)}"
                )
            for k, obj in table.items():
                obj.load_state_dict(saved[k])


class _Features(nn.Module):
    """``encoder(normalize(x))`` as its own module, so DDP can wrap the encoder without the head.

    With ``distribution=True`` (VAE encoders) it returns ``(mu, logvar)`` instead of the code.
    """

    def __init__(self, model: EmbeddingClassifier, distribution: bool = False) -> None:
        super().__init__()
        self.normalize = model.normalize
        self.encoder = model.encoder
        self.distribution = distribution

    def forward(self, x: torch.Tensor) -> Any:
        if self.distribution:
            return self.encoder.distribution(self.normalize(x))  # type: ignore[operator]
        return self.encoder(self.normalize(x))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of correct predictions in a batch, as a detached scalar tensor (no host sync)."""
    return (logits.detach().argmax(1) == y).float().mean()


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of ``modules`` take no gradient inside the block (Listing 1's ``frozen_params``)."""
    for m in modules:
        set_requires_grad(m, False)
    try:
        yield
    finally:
        for m in modules:
            set_requires_grad(m, True)


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``module`` that keep running statistics."""
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def freeze_batchnorm(module: nn.Module) -> int:
    """Put every BatchNorm layer of ``module`` in eval mode for good: ``train()`` (on it or on any
    parent) leaves it there, so it normalizes with its running statistics and never updates them
    (fine-tuning from weights whose statistics match them). Returns the number of layers."""
    layers = batchnorm_layers(module)
    for bn in layers:
        bn.eval()
        bn.train = types.MethodType(_stay_in_eval, bn)  # type: ignore[method-assign]
    return len(layers)


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return self


def recalibrate_batchnorm(model: nn.Module, batches: Iterator[torch.Tensor]) -> int:
    """Replace the BatchNorm running statistics of ``model`` by the average over ``batches`` of
    each batch's statistics (``torch.optim.swa_utils.update_bn``'s rule: each layer normalizes by
    the batch's own statistics on the way, in train mode). The batches may be crafted against the
    model as it was (adversarial examples): the statistics are collected by hooks and written only
    at the end. The model's mode is restored. Returns the number of images seen."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    sums: dict[nn.Module, list[torch.Tensor]] = {}
    recording = False

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not recording:
            return
        x = args[0].detach().float()
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=True)  # what BatchNorm's running_var averages
        acc = sums.setdefault(module, [torch.zeros_like(mean), torch.zeros_like(var)])
        acc[0] += mean
        acc[1] += var

    hooks = [bn.register_forward_pre_hook(record) for bn in layers]
    saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in layers]  # type: ignore[union-attr]
    was, seen, count = model.training, 0, 0
    try:
        for x in batches:  # drawn (and attacked) with the model as it is, outside the recording
            recording = True
            for bn in layers:
                bn.momentum = 0.0  # train-mode passes leave the running statistics as they are
            model.train()
            with torch.no_grad():
                model(x)
            model.train(was)
            recording = False
            for bn, (momentum, _) in zip(layers, saved, strict=True):
                bn.momentum = momentum
            seen, count = seen + len(x), count + 1
    finally:
        for h in hooks:
            h.remove()
        for bn, (momentum, tracked) in zip(layers, saved, strict=True):
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)  # type: ignore[union-attr]
        model.train(was)
    if count:
        with torch.no_grad():
            for bn in layers:
                mean, var = sums[bn]
                bn.running_mean.copy_(mean / count)  # type: ignore[union-attr]
                bn.running_var.copy_(var / count)  # type: ignore[union-attr]
    return seen
