"""Helpers shared by the subcommands: output, argument types, the common model/data flags."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def out(text: str) -> None:
    """One line of a command's result on stdout (logs and progress go to stderr)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def floats(text: str) -> list[float]:
    """``0,0.1,0.3`` -> ``[0.0, 0.1, 0.3]``."""
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def scalar(text: str) -> Any:
    """``40`` -> 40, ``1e-2`` -> 0.01 (YAML 1.1 would keep that a string), else YAML (``true``...)."""
    import yaml

    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def add_model_args(p: argparse.ArgumentParser, *, runs: bool = True) -> None:
    """The model reference and where to look for it."""
    what = "model name in the store, a model directory" + (", or a run directory" if runs else "")
    p.add_argument("model", help=what)
    p.add_argument("--store", default="model_store", help="model store folder")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")


def canonical_dataset(name: str | None) -> str | None:
    """A ``--dataset`` value as runs and cards record it (an image folder with its absolute path)."""
    from training.data import is_folder
    from training.data.folder import canonical_name

    return canonical_name(name) if name and is_folder(name) else name


__all__ = ["add_model_args", "canonical_dataset", "floats", "out", "scalar"]


def attack_arg(text: str) -> tuple[str, dict[str, Any]]:
    """``pgd:steps=40,restarts=2`` -> ``("pgd", {"steps": 40, "restarts": 2})``."""
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"attack parameters look like key=value, got {item!r}")
        params[key.strip()] = scalar(value.strip())
    return name.strip(), params


# Shorthand flags of erc eval / erc audit -> the attack parameter each sets (on every named attack).
SHORTHANDS = {"steps": "steps", "restarts": "restarts", "alpha": "alpha", "loss": "loss"}


def add_attack_args(p: argparse.ArgumentParser, *, default: str | None, several: str) -> None:
    """``--attack NAME[:key=value,...]`` (repeatable), ``--norm`` and the parameter shorthands."""
    p.add_argument(
        "--attack",
        type=attack_arg,
        action="append",
        metavar="NAME[:KEY=VALUE,...]",
        help=f"repeatable; {several}. `erc list` shows every attack and preset, e.g. "
        "pgd:steps=100,restarts=5, apgd:loss=dlr, fab-t, or autoattack (AutoAttack's standard suite, alone)"
        + (f" [default: {default}]" if default else ""),
    )
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--steps", type=int, help="shorthand for steps=N on every attack that takes it")
    p.add_argument("--restarts", type=int, help="shorthand for restarts=N")
    p.add_argument("--alpha", type=float, help="shorthand for alpha=X (PGD's step; default 2.5*eps/steps)")
    p.add_argument(
        "--loss", help="shorthand for loss=NAME (PGD: ce, margin; APGD: ce, dlr; Square: margin, ce)"
    )
    p.add_argument(
        "--last-iterate",
        action="store_true",
        help="PGD: judge only each restart's last iterate (the original PGD); default: any iterate counts",
    )


def suite_from_args(args: argparse.Namespace, default: list[tuple[str, dict[str, Any]]] | None = None) -> Any:
    """The :class:`~training.attacks.Suite` that ``--attack`` and the shorthands ask for (``default``
    when no ``--attack`` is given, ``pgd`` when that is None too)."""
    from training.attacks import PRESETS, AttackError, build_attacks, get_attack_def

    requests = args.attack or default or [("pgd", {})]
    extra = {key: getattr(args, flag) for flag, key in SHORTHANDS.items() if getattr(args, flag) is not None}
    if args.last_iterate:
        extra["keep_best"] = False
    merged = []
    for name, params in requests:
        if name in PRESETS:
            if extra:
                raise AttackError(f"preset {name!r} takes no parameters (got {', '.join(sorted(extra))})")
            merged.append((name, params))
            continue
        takes = get_attack_def(name).parameters()
        merged.append((name, {**params, **{k: v for k, v in extra.items() if k in takes}}))
    unused = [
        k
        for k in extra
        if not any(k in get_attack_def(n).parameters() for n, _ in requests if n not in PRESETS)
    ]
    if unused:
        raise AttackError(f"no attack given takes {', '.join(unused)} ({', '.join(n for n, _ in requests)})")
    return build_attacks(merged, args.norm)


def add_settings_flags(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """One flag per :class:`service.settings.Settings` field (``{flag: field}``), its help and
    default taken from the field itself, so flags and ``ERC_*`` variables never disagree."""
    from service.settings import Settings

    for flag, name in flags.items():
        info = Settings.model_fields[name]
        default = "" if info.default is None else f", default {info.default}"
        p.add_argument(
            "--" + flag.replace("_", "-"),
            dest=name,
            metavar=name.split("_")[-1].upper(),
            help=f"{info.description} [ERC_{name.upper()}{default}]",
        )


def settings_from_flags(args: argparse.Namespace, flags: dict[str, str]) -> Any:
    """Settings from ``ERC_*`` variables with the given flags on top; invalid ones exit with one
    line naming each problem."""
    from pydantic import ValidationError

    from service.settings import Settings

    overrides = {name: getattr(args, name) for name in flags.values() if getattr(args, name) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise SystemExit(f"erc: invalid settings: {problems}") from None
