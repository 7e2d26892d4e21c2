"""ER-Classifier (Algorithm 1 / Listing 1) and its ablations: ER-Classifier-minus (no min-max),
E-CLA (no discriminator) and VAE-CLA (KL-regularized variational encoder).

Sign convention (Algorithm 1): the critic D scores prior samples high. Step 7 ascends
``lambda * mean(D(z) - D(Q(x)))`` (we descend its negative), step 8 descends the cross-entropy of
``C(Q(x))``, step 9 ascends ``lambda * mean(D(Q(x)))``. Listing 1 writes the same game with the
opposite sign for D; the two are equivalent. Unlike Listing 1, gradients are zeroed before every
phase: the listing's step 9 reuses encoder gradients left over from step 8, which reads as an
accident of the pseudocode rather than part of the algorithm.

``er-trades`` keeps steps 7 and 9 (the critic's prior matching on the codes of the adversarial
batch) and replaces step 8's objective by TRADES's (Zhang et al. 2019, "Theoretically Principled
Trade-off between Robustness and Accuracy"): ``CE(C(Q(x)), y) + beta * KL(p(x) || p(x'))``, with
``x'`` the point of the eps ball that maximizes that KL, found by sign-gradient ascent from a small
Gaussian start. Meant for fine-tuning a trained ER model (``run.init_from``), see
docs/reproduction.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from training.config import ConfigError
from training.methods.base import Method, _Features, accuracy, freeze_batchnorm, frozen, register_method
from training.models import build_discriminator
from training.priors import get_prior


@register_method
class ERMethod(Method):
    name: ClassVar[str] = "er"
    family: ClassVar[str] = "er"
    minmax_default: ClassVar[bool] = True
    use_discriminator: ClassVar[bool] = True
    variational: ClassVar[bool] = False
    description: ClassVar[str] = (
        "ER-Classifier: encoder + WGAN latent discriminator + classifier, PGD min-max"
    )

    def build(self) -> None:
        cfg = self.cfg
        self.features = self.wrap(_Features(self.model, distribution=self.variational))
        self.head = self.wrap(self.model.classifier)
        self.add_optimizer("encoder", self.adam(self.model.encoder.parameters(), cfg.optim.lr))
        self.add_optimizer(
            "classifier", self.adam(self.model.classifier.parameters(), cfg.optim.lr * cfg.optim.cls_lr_mult)
        )
        self.prior = get_prior(cfg.model.prior)
        if self.use_discriminator:
            # The critic keeps the paper's size whatever the width multiplier: it is cheap (an MLP on
            # k numbers) and a narrow critic under weight clipping is too weak to regularize anything.
            self.discriminator = self._place(build_discriminator(self.model.embed_dim))
            self.critic = self.wrap(self.discriminator)
            self.modules["discriminator"] = self.discriminator
            self.add_optimizer(
                "discriminator",
                self.adam(self.discriminator.parameters(), cfg.optim.lr * cfg.optim.disc_lr_mult),
            )

    def discriminator_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Algorithm 1 step 7, then WGAN weight clipping."""
        m = self.cfg.method
        with torch.no_grad(), self.autocast():
            z_q = self.model.forward_features(x).float()
        z_p = self.prior.sample(x.shape[0], self.model.embed_dim, self.device, None)
        with self.autocast():
            gap = self.critic(z_p).float().mean() - self.critic(z_q).float().mean()
        self.descend(-m.lambda_disc * gap, "discriminator")
        with torch.no_grad():
            for p in self.discriminator.parameters():
                p.clamp_(-m.clip, m.clip)
        return {"critic_gap": gap.detach()}

    def classification_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Algorithm 1 step 8: encoder and classifier descend the cross-entropy."""
        with self.autocast():
            logits = self.head(self.features(x))
        loss = self.cfg.method.lambda_cls * F.cross_entropy(logits.float(), y)
        self.descend(loss, "encoder", "classifier")
        return {"loss": loss.detach(), "acc": accuracy(logits, y)}

    def encoder_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Algorithm 1 step 9: the encoder ascends the critic's score of its codes."""
        with frozen(self.discriminator):
            with self.autocast():
                score = self.discriminator(self.features(x)).float().mean()
            self.descend(-self.cfg.method.lambda_enc * score, "encoder")
        return {"enc_score": score.detach()}

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.adversarial(x, y)
        out: dict[str, torch.Tensor] = {}
        if self.use_discriminator:
            out.update(self.discriminator_step(x))
        out.update(self.classification_step(x, y))
        if self.use_discriminator:
            out.update(self.encoder_step(x))
        return out


@register_method
class ERMinusMethod(ERMethod):
    name: ClassVar[str] = "er-minus"
    minmax_default: ClassVar[bool] = False
    description: ClassVar[str] = "ER-Classifier without min-max robust optimization (ER-Classifier-minus)"


@register_method
class EClaMethod(ERMethod):
    name: ClassVar[str] = "e-cla"
    minmax_default: ClassVar[bool] = False
    use_discriminator: ClassVar[bool] = False
    description: ClassVar[str] = "E-CLA: the same encoder and classifier, no discriminator (Section 4.2)"


@register_method
class VAEClaMethod(ERMethod):
    name: ClassVar[str] = "vae-cla"
    minmax_default: ClassVar[bool] = False
    use_discriminator: ClassVar[bool] = False
    variational: ClassVar[bool] = True
    description: ClassVar[str] = (
        "VAE-CLA: variational encoder with a KL term to N(0, I), classifier on samples"
    )

    def build_arch_kwargs(self) -> dict[str, Any]:
        if self.cfg.model.prior != "gaussian":
            raise ValueError("vae-cla regularizes with a KL term to N(0, I): use model.prior=gaussian")
        return {**super().build_arch_kwargs(), "variational": True}

    def classification_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast():
            mu, logvar = self.features(x)
            mu, logvar = mu.float(), logvar.float()
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            logits = self.head(z)
        ce = F.cross_entropy(logits.float(), y)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
        loss = self.cfg.method.lambda_cls * ce + self.cfg.method.kl_weight * kl
        self.descend(loss, "encoder", "classifier")
        return {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(), "acc": accuracy(logits, y)}


def trades_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p(clean) || p(adv))`` averaged over the batch (logits ``[B, classes]``, computed in
    float32); zero exactly when the two predictions agree."""
    return F.kl_div(
        F.log_softmax(adv_logits.float(), dim=1),
        F.log_softmax(clean_logits.float(), dim=1),
        reduction="batchmean",
        log_target=True,
    )


def trades_adversarial(
    net: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    start_std: float = 0.001,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> torch.Tensor:
    """TRADES's inner maximization: ``steps`` l_inf sign-gradient steps of size ``alpha`` that
    ascend ``KL(p(x) || p(x'))`` inside the ``eps`` ball and [0, 1], from ``x`` plus Gaussian noise
    of std ``start_std`` (the KL's gradient is zero at ``x'`` = ``x`` itself).

    ``x`` ``[B, C, H, W]`` in [0, 1]; the iterate, its gradient and the projection stay float32
    whatever ``autocast`` (entered around each network call only) does inside ``net``. The
    network's mode is left as it is. Returns ``x'`` detached, ``x``'s shape and dtype.
    """
    cast = autocast or contextlib.nullcontext
    x = x.detach()
    with torch.no_grad(), cast():
        p_log = F.log_softmax(net(x).float(), dim=1)
    x_adv = (x + start_std * torch.randn_like(x)).clamp_(0.0, 1.0) if start_std > 0 else x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with cast():
            logits = net(x_adv)
        kl = F.kl_div(F.log_softmax(logits.float(), dim=1), p_log, reduction="sum", log_target=True)
        (grad,) = torch.autograd.grad(kl, x_adv)
        with torch.no_grad():
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return x_adv.detach()


@register_method
class ERTradesMethod(ERMethod):
    name: ClassVar[str] = "er-trades"
    description: ClassVar[str] = (
        "ER-Classifier with TRADES's classification step: CE(clean) + beta * KL(p(clean) || p(adv)), "
        "critic as in Algorithm 1"
    )

    def build(self) -> None:
        super().build()
        if self.cfg.method.freeze_bn:
            freeze_batchnorm(self.model)
        adv = self.cfg.adv
        if self.minmax and self.step_size(self.eps) * adv.steps < self.eps:
            raise ConfigError(
                f"adv.alpha: {adv.steps} steps of {adv.alpha} cannot reach eps {self.eps} "
                "(TRADES's inner attack needs steps x alpha >= eps)"
            )

    def step_size(self, eps: float) -> float:
        """``adv.alpha``, else Madry's ``2.5 * eps / steps``."""
        adv = self.cfg.adv
        return adv.alpha if adv.alpha is not None else 2.5 * eps / adv.steps

    def adversarial(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """:func:`trades_adversarial` against the network (or ``model``) at the current eps; the
        labels are not used (the attack moves away from the network's own clean prediction)."""
        if not self.minmax or self.eps_now <= 0:
            return x
        adv = self.cfg.adv
        with self.crafting(model) as net:
            return trades_adversarial(
                net,
                x,
                eps=self.eps_now,
                alpha=self.step_size(self.eps_now),
                steps=adv.steps,
                start_std=0.001 if adv.random_start else 0.0,
                autocast=self.autocast,
            )

    def batchnorm_inputs(
        self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None
    ) -> torch.Tensor:
        """Clean and adversarial images together, as :meth:`trades_step` feeds them."""
        x_adv = self.adversarial(x, y, model)
        return x if x_adv is x else torch.cat([x, x_adv])

    def trades_step(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Algorithm 1 step 8 with TRADES's objective: encoder and classifier descend
        ``lambda_cls * (CE(C(Q(x)), y) + beta * KL(p(x) || p(x_adv)))``. One pass over
        ``[x; x_adv]``: BatchNorm normalizes the pair together, as its recalibration sees them.
        The critic is not in this graph: no gradient of this loss reaches it."""
        m, n = self.cfg.method, x.shape[0]
        with self.autocast():
            logits = self.head(self.features(torch.cat([x, x_adv]))).float()
        clean, adv = logits[:n], logits[n:]
        ce = F.cross_entropy(clean, y)
        kl = trades_kl(clean, adv)
        loss = m.lambda_cls * (ce + m.trades_beta * kl)
        self.descend(loss, "encoder", "classifier")
        return {
            "loss": loss.detach(),
            "ce": ce.detach(),
            "kl": kl.detach(),
            "acc": accuracy(clean, y),
            "adv_acc": accuracy(adv, y),
        }

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x_adv = self.adversarial(x, y)
        out: dict[str, torch.Tensor] = {}
        out.update(self.discriminator_step(x_adv))
        out.update(self.trades_step(x, x_adv, y))
        out.update(self.encoder_step(x_adv))
        return out
