"""Training methods by name: how one batch updates the networks.

==========  =======================================================  ========  =================
name        what                                                     network   min-max default
==========  =======================================================  ========  =================
er          ER-Classifier, Algorithm 1 (encoder, critic, classifier)  Fig 9-10  on
er-trades   Algorithm 1 with a TRADES classification step (CE + KL)  Fig 9-10  on
er-minus    ER-Classifier without min-max                            Fig 9-10  off
e-cla       encoder + classifier only (no discriminator)             Fig 9-10  off
vae-cla     variational encoder + KL to N(0, I) + classifier         Fig 9-10  off
none        baseline network, clean training                         Fig 8     off
madry       baseline network, PGD adversarial training               Fig 8     on
rse         baseline network with noise layers, ensemble at test     Fig 8     off
==========  =======================================================  ========  =================
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from training.config import TrainConfig
from training.data import DatasetInfo
from training.errors import UnknownName
from training.methods.base import METHODS, Method, register_method

# Every module of the package registers the methods it defines (@register_method), as the attacks
# do: a new method is one module (or one class in one), no line here. The ER family first.
for _name in ("er", *sorted(m.name for m in pkgutil.iter_modules(__path__))):
    importlib.import_module(f"{__name__}.{_name}")


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownName(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def create_method(
    cfg: TrainConfig,
    info: DatasetInfo,
    device: torch.device,
    *,
    distributed: bool = False,
    steps_per_epoch: int = 1,
) -> Method:
    return get_method(cfg.method.name)(
        cfg, info, device, distributed=distributed, steps_per_epoch=steps_per_epoch
    )


__all__ = ["METHODS", "Method", "create_method", "get_method", "register_method"]
