"""Signs that a trained model learned nothing usable, said where a user sees them: at the end of
``erc train`` (summary and log) and by ``erc export`` (log, the card's ``warnings``), which also
refuses a degenerate model (every embedding the same) unless told otherwise.

A new user's first run is short training on a small image folder, where every one of these showed
(docs/own-data.md): test accuracy at chance with train accuracy at 100 %, one class predicted for
every image, all embeddings equal.
"""

from __future__ import annotations

import math

import torch

from training.errors import ErcError


class DegenerateModel(ErcError, ValueError):
    """A model that maps every input to the same embedding: nothing downstream can use it."""


def learning_warnings(
    test_acc: float, test_n: int, num_classes: int, train_acc: float | None = None
) -> list[str]:
    """Warnings for clean test accuracy at chance level (within two binomial standard errors,
    at least 5 points, where so few test images still tell chance from 90 %) or more than 30
    points below the training accuracy."""
    chance = 1.0 / max(num_classes, 1)
    margin = max(0.05, 2.0 * math.sqrt(chance * (1.0 - chance) / max(test_n, 1)))
    if test_acc <= chance + margin and chance + margin < 0.9:  # else too few test images to tell
        train = f" (train accuracy {train_acc:.1%})" if train_acc is not None else ""
        return [
            f"test accuracy {test_acc:.1%} on {test_n} images is at chance level ({chance:.1%} for "
            f"{num_classes} classes){train}: the model learned nothing usable. Likely causes: too few "
            "optimizer steps (epochs x steps per epoch; see the batch size in the run's log), a "
            "network too deep for the data (--arch, --width 0.25), BatchNorm statistics that do not "
            "match the weights (run.bn_recalibration_n), or a training eps no class survives"
        ]
    if train_acc is not None and train_acc - test_acc > 0.3:
        return [
            f"test accuracy {test_acc:.1%} is far below train accuracy {train_acc:.1%}: the network "
            "memorizes the training images (too few of them for its size: more data, a slimmer "
            "network with --width, augmentation with --augment crop-flip) or the test split differs "
            "from the training images"
        ]
    return []


def embedding_problems(z: torch.Tensor, pred: torch.Tensor, num_classes: int) -> tuple[list[str], bool]:
    """(warnings, degenerate) for the embeddings ``z`` ``[N, k]`` and predicted labels ``pred`` of
    held-out images: degenerate when every embedding is the same point (relative spread under
    1e-6), a warning when one class is predicted for every image."""
    z = z.double()
    warnings: list[str] = []
    spread = float((z.max(0).values - z.min(0).values).max()) if len(z) else 0.0
    scale = float(z.abs().max()) if len(z) else 0.0
    degenerate = len(z) > 1 and spread <= 1e-6 * (1.0 + scale)
    if degenerate:
        warnings.append(
            f"every one of {len(z)} held-out images has the same embedding (spread {spread:.3g}): "
            "the network maps all inputs to one point, so its predictions, embeddings and "
            "typicality carry no information"
        )
    classes = sorted(set(pred.tolist()))
    if len(pred) >= 2 * num_classes and num_classes > 1 and len(classes) == 1:
        warnings.append(f"one class ({classes[0]}) is predicted for every one of {len(pred)} held-out images")
    return warnings, degenerate
