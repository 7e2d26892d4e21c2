"""Attack suites run as a cascade (see :class:`training.attacks.catalog.Preset`)."""

from __future__ import annotations

from training.attacks.catalog import Preset, register_preset

# AutoAttack's standard version (Croce & Hein, ICML 2020; fra31/auto-attack, version="standard",
# l_inf): APGD-CE, APGD-T over 9 target classes, FAB-T over 9 target classes (100 iterations each,
# one restart), Square with 5,000 queries and p_init 0.8. The figure every MNIST/CIFAR robustness
# paper and leaderboard reports.
AUTOATTACK = register_preset(
    Preset(
        name="autoattack",
        label="AutoAttack",
        attacks=(
            ("apgd", {"loss": "ce", "steps": 100, "restarts": 1}),
            ("apgd-t", {"steps": 100, "n_target_classes": 9, "restarts": 1}),
            ("fab-t", {"steps": 100, "n_target_classes": 9, "restarts": 1}),
            ("square", {"queries": 5000, "p_init": 0.8, "restarts": 1}),
        ),
        norms=("linf",),
        description="AutoAttack's standard suite (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T, Square-5000, "
        "each attack only on what the earlier ones failed on",
    )
)

__all__ = ["AUTOATTACK"]
