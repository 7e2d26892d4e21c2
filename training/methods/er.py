"""ER-Classifier (Algorithm 1 / Listing 1) and its ablations: ER-Classifier-minus (no min-max),
E-CLA (no discriminator) and VAE-CLA (KL-regularized variational encoder).

Sign convention (Algorithm 1): the critic D scores prior samples high. Step 7 ascends
``lambda * mean(D(z) - D(Q(x)))`` (we descend its negative), step 8 descends the cross-entropy of
``C(Q(x))``, step 9 ascends ``lambda * mean(D(Q(x)))``. Listing 1 writes the same game with the
opposite sign for D; the two are equivalent. Unlike Listing 1, gradients are zeroed before every
phase: the listing's step 9 reuses encoder gradients left over from step 8, which reads as an
accident of the pseudocode rather than part of the algorithm.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from training.methods.base import Method, _Features, accuracy, frozen, register_method
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
