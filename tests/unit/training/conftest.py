"""Models and data shared by the attack tests: a tiny CNN, a random batch, a linearly separable
toy problem, and a small CNN trained on MNIST (once per session)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
import torch
from torch import nn

from training.data import load_split


def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


def _separable(n: int = 60) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Three classes told apart by a bright row, and a linear model that fits them exactly."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.rand(n, 1, 6, 6, generator=gen) * 0.3
    for i, label in enumerate(y):
        x[i, 0, 2 * label, :] += 0.6
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return x, y, model.eval()


def _robust(model: Callable[[torch.Tensor], torch.Tensor], x_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` on ``x_adv``."""
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


@pytest.fixture
def tiny_cnn() -> Callable[..., nn.Module]:
    """``tiny_cnn(seed)``: an untrained 3-class CNN on 1x8x8 images (BatchNorm and Dropout, to
    check that attacks leave the mode alone)."""
    return _tiny_cnn


@pytest.fixture
def separable() -> Callable[..., tuple[torch.Tensor, torch.Tensor, nn.Module]]:
    return _separable


@pytest.fixture
def robust() -> Callable[..., float]:
    return _robust


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Asserts that the block leaves every module's mode, the parameters' gradients and the weights
    (BatchNorm running statistics aside) as they were."""
    modes = [m.training for m in model.modules()]
    before = {
        k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    yield
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.fixture
def untouched() -> Callable[[nn.Module], AbstractContextManager[None]]:
    """``with untouched(model): attack(model, ...)``"""
    return _untouched


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)


@pytest.fixture(scope="session")
def mnist_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small CNN trained for a few seconds on 3000 MNIST digits (~95 % clean accuracy), and 200
    test digits."""
    train = load_split("mnist", "train", n=3000, seed=0)
    test = load_split("mnist", "test", n=200, seed=1)
    x, y = train.as_float(), train.labels
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for b in torch.randperm(len(x)).split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    assert (model(test.as_float()).argmax(1) == test.labels).float().mean() >= 0.9
    return model, test.as_float(), test.labels
