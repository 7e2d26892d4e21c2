"""Algorithm 1, phase by phase: each step updates exactly the parameters it should."""

from __future__ import annotations

import pytest
import torch

from training.config import load_config
from training.data import dataset_info
from training.methods import METHODS, create_method


def _method(name: str, **overrides):
    cfg = load_config(overrides={"method.name": name, "model.width": 0.125, "adv.steps": 2, **overrides})
    torch.manual_seed(0)
    return create_method(cfg, dataset_info("mnist"), torch.device("cpu"))


def _batch(n: int = 8):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())}


@pytest.fixture
def er():
    m = _method("er")
    m.train(True)
    return m


def test_discriminator_phase_updates_only_the_critic_and_clips_it(er) -> None:
    x, _ = _batch()
    enc, cls, dis = _params(er.model.encoder), _params(er.model.classifier), _params(er.discriminator)
    er.discriminator_step(x)
    assert not _changed(enc, er.model.encoder)
    assert not _changed(cls, er.model.classifier)
    assert _changed(dis, er.discriminator) == set(dis), "every critic parameter takes an Adam step"
    clip = er.cfg.method.clip
    assert all(p.abs().max() <= clip for p in er.discriminator.parameters())


def test_classification_phase_updates_encoder_and_classifier_only(er) -> None:
    x, y = _batch()
    enc, cls, dis = _params(er.model.encoder), _params(er.model.classifier), _params(er.discriminator)
    er.classification_step(x, y)
    assert _changed(enc, er.model.encoder) == set(enc)
    assert _changed(cls, er.model.classifier) == set(cls)
    assert not _changed(dis, er.discriminator)


def test_encoder_phase_freezes_classifier_and_critic(er) -> None:
    x, _ = _batch()
    for p in [*er.model.classifier.parameters(), *er.discriminator.parameters()]:
        p.grad = None
    enc, cls, dis = _params(er.model.encoder), _params(er.model.classifier), _params(er.discriminator)
    er.encoder_step(x)
    assert _changed(enc, er.model.encoder) == set(enc)
    assert not _changed(cls, er.model.classifier)
    assert not _changed(dis, er.discriminator)
    assert all(p.grad is None for p in er.model.classifier.parameters()), "classifier took no gradient"
    assert all(p.grad is None for p in er.discriminator.parameters()), "critic took no gradient"
    assert all(p.requires_grad for p in er.discriminator.parameters()), "critic unfrozen afterwards"


def test_encoder_phase_moves_codes_toward_what_the_critic_scores_high(er) -> None:
    """Step 9 ascends D(Q(x)): with a fixed critic, the score of the batch's codes goes up."""
    x, _ = _batch(32)
    with torch.no_grad():
        for p in er.discriminator.parameters():  # a critic that is not flat, so the test can see it
            p.uniform_(-0.3, 0.3)
    er.optimizers["encoder"].param_groups[0]["lr"] = 1e-2
    er.model.eval()  # fixed BN statistics: compare the same function before and after
    with torch.no_grad():
        before = er.discriminator(er.model.forward_features(x)).mean()
    er.model.train()
    for _ in range(5):
        er.encoder_step(x)
    er.model.eval()
    with torch.no_grad():
        after = er.discriminator(er.model.forward_features(x)).mean()
    assert after > before


def test_full_step_runs_pgd_when_minmax(er, monkeypatch) -> None:
    calls = []
    import training.methods.base as base

    real = base.pgd

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(base, "pgd", spy)
    x, y = _batch()
    out = er.train_step(x, y)
    assert set(out) == {"critic_gap", "loss", "acc", "enc_score"}
    assert len(calls) == 1 and calls[0]["eps"] == pytest.approx(0.3) and calls[0]["steps"] == 2
    assert er.model.training, "mode restored after crafting examples in eval mode"


@pytest.mark.parametrize(
    "name,minmax,has_critic",
    [
        ("er", True, True),
        ("er-minus", False, True),
        ("e-cla", False, False),
        ("vae-cla", False, False),
        ("none", False, False),
        ("madry", True, False),
        ("rse", False, False),
    ],
)
def test_every_method_trains_one_step(name: str, minmax: bool, has_critic: bool) -> None:
    m = _method(name)
    m.train(True)
    assert m.minmax is minmax
    assert ("discriminator" in m.modules) is has_critic
    x, y = _batch()
    before = _params(m.model)
    out = m.train_step(x, y)
    assert torch.isfinite(torch.stack(list(out.values()))).all()
    assert _changed(before, m.model), "the network moved"


def test_listing_1_learning_rates() -> None:
    m = _method("er", **{"optim.lr": 2e-3})
    lrs = m.learning_rates()
    assert lrs == pytest.approx({"encoder": 2e-3, "classifier": 1e-4, "discriminator": 1e-3})
    for s in m.schedulers.values():
        assert s.step_size == 30 and s.gamma == 0.5


def test_vae_cla_rejects_non_gaussian_prior() -> None:
    with pytest.raises(ValueError, match="gaussian"):
        _method("vae-cla", **{"model.prior": "cauchy"})


def test_rse_defaults_and_override() -> None:
    m = _method("rse")
    assert (m.arch_kwargs["noise_init"], m.arch_kwargs["noise_inner"], m.arch_kwargs["ensemble"]) == (
        0.2,
        0.1,
        10,
    )
    m = _method("rse", **{"model.ensemble": 3})
    assert m.model.ensemble == 3


def test_registry_is_complete() -> None:
    assert set(METHODS) == {"er", "er-trades", "er-minus", "e-cla", "vae-cla", "none", "madry", "rse"}


def test_eps_warmup_ramps_linearly(monkeypatch) -> None:
    m = _method("madry", **{"adv.warmup_epochs": 2.0})
    import training.methods.base as base

    seen = []
    monkeypatch.setattr(base, "pgd", lambda *a, **kw: seen.append(kw["eps"]) or a[1])
    x, y = _batch()
    for progress in (0.0, 0.5, 2.0, 3.0):
        m.set_progress(progress)
        m.train_step(x, y)
    assert seen == pytest.approx([0.075, 0.3, 0.3]), "no attack at eps 0, then eps * progress / warmup"


def test_bf16_autocast_and_channels_last_step_on_cpu() -> None:
    """The GPU speed options take the same code path on the CPU (autocast on the method's device)."""
    m = _method("er", **{"run.amp": "bf16", "run.channels_last": True})
    m.train(True)
    x, y = _batch()
    x = x.contiguous(memory_format=torch.channels_last)
    before = _params(m.model)
    out = m.train_step(x, y)
    assert torch.isfinite(torch.stack(list(out.values()))).all()
    assert _changed(before, m.model)
    assert all(p.dtype == torch.float32 for p in m.model.parameters()), "weights stay fp32 under autocast"


def test_every_method_class_in_the_package_registers_itself() -> None:
    """Methods self-register (@register_method) in modules the package discovers, as attacks do:
    no class with a name is left out of METHODS, and a name cannot be taken twice."""
    import pytest

    from training.methods import register_method
    from training.methods.base import Method

    def subclasses(cls: type) -> list[type]:
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]

    named = {c.name: c for c in subclasses(Method) if c.__module__.startswith("training.methods.")}
    assert named == METHODS
    with pytest.raises(ValueError, match="registered twice"):
        register_method(METHODS["er"])
