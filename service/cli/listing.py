"""``erc list``: what can be named: architectures, methods, priors, datasets, attacks and presets."""

from __future__ import annotations

import argparse
from typing import Any

from service.cli._common import out


def register(sub: Any) -> None:
    ls = sub.add_parser("list", help="architectures, methods, priors, datasets, attacks")
    ls.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from training.attacks import ATTACKS, PRESETS, list_attacks, list_presets
    from training.data import list_datasets
    from training.methods import METHODS
    from training.models import list_models
    from training.priors import PRIORS

    out("architectures: " + ", ".join(list_models()))
    out("methods:")
    for name, m in METHODS.items():
        out(f"  {name:9} {m.description}")
    out("priors: " + ", ".join(f"{p.name} ({p.description})" for p in PRIORS.values()))
    out("datasets: " + ", ".join(list_datasets()) + ", folder:PATH (your own images, one folder per class)")
    out("attacks (erc eval/audit --attack NAME[:key=value,...]):")
    for name in list_attacks():
        d = ATTACKS[name]
        out(f"  {name:9} [{'/'.join(d.norms)}] {d.description}")
    out("presets (run alone, as a cascade):")
    for name in list_presets():
        out(f"  {name:9} [{'/'.join(PRESETS[name].norms)}] {PRESETS[name].description}")
    return 0
