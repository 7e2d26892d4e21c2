"""Offline side of the ER-Classifier project: models, data, attacks, training methods, evaluation.

The package depends on torch, numpy, safetensors, tqdm, pyyaml (and matplotlib for plots) only;
nothing here imports :mod:`service`.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
