"""Training on a small image folder with the defaults a user gets (issue 25): a batch size that
fits the set, a network that trains on it, BatchNorm statistics that match the weights evaluated
and saved, and a run that learned nothing says so."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from training.config import auto_batch_size, load_config
from training.data.folder import FolderOptions, load_folder
from training.methods.base import recalibrate_batchnorm
from training.models import SMALL_SET, folder_arch
from training.train import run_training


def test_auto_batch_size_gives_small_sets_enough_steps() -> None:
    assert auto_batch_size(60_000) == 128 and auto_batch_size(1280) == 128
    assert auto_batch_size(180) == 16  # 11 steps an epoch instead of one of 128
    assert auto_batch_size(1040) == 64 and auto_batch_size(1279) == 64
    assert auto_batch_size(10) == 10 and auto_batch_size(16) == 16
    assert auto_batch_size(180, world_size=3) == 15 and auto_batch_size(2, world_size=4) == 4
    for n in range(16, 1280):
        size = auto_batch_size(n)
        assert size >= 16 and (n // size >= 10 or size == 16), n


def test_folder_arch_gives_small_sets_a_compact_encoder() -> None:
    arch, why = folder_arch("er", (3, 32, 32), 180)
    assert arch == "er_mnist" and "er_cifar10" in why and "180 training images" in why
    assert folder_arch("er", (3, 64, 64), 5000)[0] == "er_mnist"
    assert folder_arch("er", (3, 128, 128), 5000)[0] == "er_stl10"
    assert folder_arch("er", (1, 28, 28), 100)[0] == "er_mnist"
    # Large sets keep the paper's network of the closest geometry; the baselines keep theirs.
    assert folder_arch("er", (3, 32, 32), SMALL_SET)[0] == "er_cifar10"
    assert folder_arch("baseline", (3, 32, 32), 180)[0] == "vgg19_cifar10"


def test_recalibrate_batchnorm_is_update_bn_and_leaves_the_model_alone_meanwhile() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(16))
    net = nn.Sequential(*net, nn.BatchNorm1d(16)).eval()
    net(torch.randn(2, 3, 8, 8))  # materialize the lazy layer
    batches = [torch.randn(20, 3, 8, 8) * 3 + 1 for _ in range(5)]
    reference = copy.deepcopy(net)
    torch.optim.swa_utils.update_bn(batches, reference)
    before = net[1].running_mean.clone()

    def crafted():  # like adversarial examples: made against the model as it is
        for x in batches:
            assert torch.equal(net[1].running_mean, before) and not net.training
            yield x

    assert recalibrate_batchnorm(net, crafted()) == 100
    assert not net.training
    for ours, ref in zip(net.modules(), reference.modules(), strict=True):
        if isinstance(ours, nn.modules.batchnorm._BatchNorm):
            assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-5)
            assert torch.allclose(ours.running_var, ref.running_var, rtol=1e-4)
            assert ours.momentum == 0.1


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory, small_shapes_fn) -> Path:
    return small_shapes_fn(tmp_path_factory.mktemp("shapes"))


def _train(shapes: Path, out: Path, **overrides: object) -> dict:
    base = {
        "data.dataset": f"folder:{shapes}",
        "adv.eps": 0.03,
        "method.name": "none",
        "model.width": 0.25,
        "run.epochs": 4,
        "run.progress": False,
        "run.out_dir": str(out),
        "run.threads": 2,
    }
    return run_training(load_config(overrides={**base, **overrides}))


def _eval_and_train_mode_accuracy(run: Path, shapes: Path) -> tuple[float, float]:
    from training.card import model_from_checkpoint
    from training.checkpoint import load_checkpoint

    model = model_from_checkpoint(load_checkpoint(run / "checkpoint.pt"))
    test = load_folder(f"folder:{shapes}", FolderOptions(progress=False)).test
    x, y = test.as_float(), test.labels
    with torch.no_grad():
        evaluated = float((model.eval()(x).argmax(1) == y).float().mean())
        batch_stats = float((model.train()(x).argmax(1) == y).float().mean())
    return evaluated, batch_stats


def test_batchnorm_statistics_match_the_weights_on_a_small_set(shapes: Path, tmp_path: Path) -> None:
    """Batch 128 on 180 images: one step an epoch. The running averages lag the weights and the
    evaluated model is at chance while batch statistics classify the test set; recomputed after
    each epoch, the evaluated model agrees with them."""
    lagging = _train(shapes, tmp_path / "lag", **{"data.batch_size": 128, "run.bn_recalibration_n": 0})
    fixed = _train(shapes, tmp_path / "fix", **{"data.batch_size": 128})
    evaluated, batch_stats = _eval_and_train_mode_accuracy(tmp_path / "fix", shapes)
    assert abs(evaluated - batch_stats) <= 0.05, (evaluated, batch_stats)
    assert fixed["last"]["test_acc"] == pytest.approx(evaluated) and evaluated >= 0.9
    assert fixed["warnings"] == []
    # Without the recalibration: the failure this fixes, and the run says so.
    assert lagging["last"]["test_acc"] < 0.5
    assert any("chance level" in w for w in lagging["warnings"]), lagging["warnings"]


def test_defaults_train_the_small_set_and_state_their_choices(shapes: Path, tmp_path: Path) -> None:
    summary = _train(shapes, tmp_path / "run", **{"run.epochs": 3})
    assert summary["arch"] == "vgg19_cifar10" and summary["last"]["test_acc"] >= 0.95
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "batch_size: 16" in saved  # the number used, recorded
    er = _train(shapes, tmp_path / "er", **{"method.name": "er", "adv.steps": 2, "run.epochs": 2})
    assert er["arch"] == "er_mnist" and er["last"]["test_acc"] >= 0.9, er["last"]
    assert "arch: er_mnist" in (tmp_path / "er" / "config.yaml").read_text()
    lines = [json.loads(ln) for ln in (tmp_path / "er" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
