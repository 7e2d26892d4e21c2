"""The CPU fine-tune path of issue 31 on tiny models: ``er-trades`` (TRADES's classification step
inside Algorithm 1), its inner attack, the weights' moving average, the cosine schedule, and an
interrupted fine-tune resumed to the same result as an uninterrupted one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from training.checkpoint import load_checkpoint, network_weights
from training.config import ConfigError, load_config
from training.data import dataset_info
from training.ema import WeightEMA
from training.methods import create_method
from training.methods.er import ERTradesMethod, trades_adversarial, trades_kl
from training.train import run_training


def _trades(steps_per_epoch: int = 1, **overrides):
    cfg = load_config(
        overrides={"method.name": "er-trades", "model.width": 0.125, "adv.steps": 2, **overrides}
    )
    torch.manual_seed(0)
    m = create_method(cfg, dataset_info("mnist"), torch.device("cpu"), steps_per_epoch=steps_per_epoch)
    m.train(True)
    return m


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_kl_term_is_zero_when_predictions_match_and_positive_otherwise() -> None:
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    assert trades_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    assert trades_kl(logits, logits + 5.0).item() == pytest.approx(0.0, abs=1e-6)  # same softmax
    assert trades_kl(logits, torch.flip(logits, dims=[1])).item() > 0.1


def test_trades_loss_is_the_cross_entropy_when_the_adversarial_batch_is_the_clean_one() -> None:
    m = _trades()
    x, y = _batch()
    out = m.trades_step(x, x.clone(), y)
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss"].item() == pytest.approx(out["ce"].item(), abs=1e-5)


def test_classification_loss_reaches_encoder_and_classifier_never_the_critic() -> None:
    m = _trades()
    x, y = _batch()
    x_adv = m.adversarial(x, y)
    assert not torch.equal(x_adv, x)
    critic = dict(m.discriminator.named_parameters())
    before = {k: v.detach().clone() for k, v in critic.items()}
    out = m.trades_step(x, x_adv, y)
    assert out["kl"].item() > 0
    for name, module in (("encoder", m.model.encoder), ("classifier", m.model.classifier)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), f"{name}: a parameter took no gradient"
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, name
    assert all(p.grad is None for p in critic.values()), "the classification loss reached the critic"
    assert all(torch.equal(before[k], v) for k, v in critic.items())


def test_a_full_step_runs_every_phase_and_logs_the_trades_terms() -> None:
    m = _trades()
    x, y = _batch()
    out = m.train_step(x, y)
    assert {"critic_gap", "loss", "ce", "kl", "acc", "adv_acc", "enc_score"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())


def test_frozen_batchnorm_keeps_the_loaded_statistics_through_training_steps() -> None:
    """method.freeze_bn: the BatchNorm layers stay in eval mode whatever train() is called on
    (the method, the model, the crafting's mode restore), so training normalizes with the loaded
    statistics and never changes them; the weights still learn."""
    m = _trades(**{"method.freeze_bn": True, "run.bn_recalibration_n": 0})
    bns = [mod for mod in m.model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    assert bns
    stats = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]  # type: ignore[union-attr]
    weights = [p.detach().clone() for p in m.model.parameters()]
    x, y = _batch()
    for _ in range(2):
        m.train(True)
        m.model.train()
        m.train_step(x, y)
    assert all(not b.training for b in bns)
    for b, (mean, var) in zip(bns, stats, strict=True):
        assert torch.equal(b.running_mean, mean) and torch.equal(b.running_var, var)
    assert any(not torch.equal(p, w) for p, w in zip(m.model.parameters(), weights, strict=True))
    # Unfrozen, the same steps move the statistics.
    m = _trades()
    bn = next(mod for mod in m.model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm))
    mean = bn.running_mean.clone()  # type: ignore[union-attr]
    m.train_step(x, y)
    assert not torch.equal(bn.running_mean, mean)


def test_frozen_batchnorm_with_recalibration_is_refused(tmp_path: Path) -> None:
    cfg = load_config(
        overrides={"method.name": "er-trades", "method.freeze_bn": True, "run.out_dir": str(tmp_path)}
    )
    with pytest.raises(ConfigError, match=r"run\.bn_recalibration_n: 0"):
        run_training(cfg)


def test_inner_attack_stays_in_the_ball_in_float32_under_bf16_and_raises_the_kl() -> None:
    m = _trades(**{"run.amp": "bf16"})
    m.model.eval()
    x, _ = _batch()
    eps = 0.3
    x_adv = trades_adversarial(m.model, x, eps=eps, alpha=0.1, steps=5, autocast=m.autocast)
    assert x_adv.dtype == torch.float32 and x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    start = trades_adversarial(m.model, x, eps=eps, alpha=0.1, steps=0)
    with torch.no_grad():
        clean = m.model(x)
        kl_start, kl_end = trades_kl(clean, m.model(start)), trades_kl(clean, m.model(x_adv))
    assert kl_end > 10 * kl_start
    assert m.model.training is False, "the attack leaves the mode alone"


def test_inner_attack_that_cannot_reach_eps_is_refused() -> None:
    with pytest.raises(ConfigError, match="steps x alpha >= eps"):
        _trades(**{"adv.eps": 0.3, "adv.steps": 10, "adv.alpha": 0.01})


def test_ema_update_math_and_buffers() -> None:
    live = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        live[0].weight.fill_(1.0)
    ema = WeightEMA(live, decay=0.9)
    with torch.no_grad():
        live[0].weight.fill_(3.0)
        live[1].running_mean.fill_(0.5)
    ema.update(live)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 0.9 * 1.0 + 0.1 * 3.0))
    ema.update(live)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 0.9 * 1.2 + 0.1 * 3.0))
    assert torch.equal(ema.module[1].running_mean, live[1].running_mean), "buffers are copied"
    assert ema.updates == 2 and not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    again = WeightEMA(live, decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 2 and torch.equal(again.module[0].weight, ema.module[0].weight)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(live, decay=0.99).load_state_dict(ema.state_dict())


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_cosine_schedule_decays_per_step_to_the_floor() -> None:
    """Two epochs of one step: the rate halves its way to the floor after the first step."""
    m = _trades(steps_per_epoch=1, **{"optim.schedule": "cosine", "optim.min_lr_mult": 0.1, "run.epochs": 2})
    lr0 = m.learning_rates()["encoder"]
    m.step_schedulers()  # an epoch's end does not move a per-step schedule
    assert m.learning_rates()["encoder"] == lr0
    m.after_step()
    assert m.learning_rates()["encoder"] == pytest.approx(
        lr0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    )
    m.after_step()
    assert m.learning_rates()["encoder"] == pytest.approx(0.1 * lr0)


TINY = {
    "method.name": "er-trades",
    "model.width": 0.125,
    "data.train_subset": 256,
    "data.eval_subset": 100,
    "data.batch_size": 64,
    "adv.eps": 0.3,
    "adv.steps": 2,
    "run.epochs": 2,
    "run.amp": "bf16",
    "run.ema_decay": 0.9,
    "run.bn_recalibration_n": 128,
    "run.eval_adv_n": 20,
    "run.progress": False,
    "run.threads": 1,
    "optim.lr": 1e-3,
    "optim.schedule": "cosine",
}


class Interrupted(Exception):
    pass


def test_interrupted_fine_tune_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = run_training(load_config(overrides={**TINY, "run.out_dir": str(tmp_path / "straight")}))
    assert straight["epochs_done"] == 2

    calls = {"n": 0}
    original = ERTradesMethod.train_step

    def dies_in_epoch_two(self, x, y):  # 4 steps an epoch: die at the second step of epoch 2
        calls["n"] += 1
        if calls["n"] == 6:
            raise Interrupted
        return original(self, x, y)

    cfg = load_config(overrides={**TINY, "run.out_dir": str(tmp_path / "killed")})
    with monkeypatch.context() as mp:
        mp.setattr(ERTradesMethod, "train_step", dies_in_epoch_two)
        with pytest.raises(Interrupted):
            run_training(cfg)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    resumed = run_training(cfg, resume=True)
    assert resumed["epochs_done"] == 2

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 8
    for key in ("model", "discriminator"):
        for k, v in a["state"]["modules"][key].items():
            assert torch.allclose(v.float(), b["state"]["modules"][key][k].float(), atol=1e-5), (key, k)
    for k, v in a["ema"]["model"].items():
        assert torch.allclose(v.float(), b["ema"]["model"][k].float(), atol=1e-5), ("ema", k)
    assert a["state"]["schedulers"] == b["state"]["schedulers"]
    assert straight["last"]["test_acc"] == pytest.approx(resumed["last"]["test_acc"])
    # What export and init_from read is the moving average, with its own BatchNorm statistics.
    weights = network_weights(b)
    assert all(torch.equal(weights[k], v) for k, v in b["ema"]["model"].items())
    live = b["state"]["modules"]["model"]
    bn_means = [k for k in weights if k.endswith("running_mean")]
    assert bn_means and any(not torch.equal(weights[k], live[k]) for k in bn_means)
