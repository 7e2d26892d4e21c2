"""What an attack is, written once: the registry every front end derives from.

Each attack module declares its :class:`AttackDef` (the function, the norms it implements, its
default parameters, how to label and cost a configuration, whether it uses gradients and iterates)
and calls :func:`register`; :mod:`training.attacks` imports every module of the package, so a new
attack is one file plus its tests. Presets (:class:`Preset`, e.g. AutoAttack's standard suite) are
ordered lists of configured attacks run as a cascade.

Everything that builds an attack goes through :func:`build_attack`, which refuses an unknown name,
a norm the attack does not implement, a parameter its function does not take and a value of the
wrong type, with an :class:`AttackError` naming the problem. ``erc eval``, ``erc audit``,
``erc export``, the admin API (its attack names), the audit engine (labels, cost, flags), its
sanity checks and :func:`training.evaluate.robust_flags` all use it, so they cannot drift apart.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from training.errors import ErcError

# What every attack attacks: images [N, C, H, W] in [0, 1] -> logits [N, classes] (the one
# definition; attacks, the audit engine and the attack check import it from here).
Model = Callable[[torch.Tensor], torch.Tensor]
NORMS = ("linf", "l2")
# Keyword arguments every attack function receives from the caller rather than from its parameters.
CALL_ARGS = frozenset({"model", "x", "y", "eps", "generator", "norm"})
# Integer parameters that count something and must be >= 1.
COUNTS = ("steps", "restarts", "queries", "binary_steps", "n_target_classes")


class AttackError(ErcError, ValueError):
    """An attack that does not exist, or does not fit the norm, parameters or inputs given."""


@dataclass(frozen=True)
class AttackDef:
    """One attack, as its module declares it.

    Attributes:
        name: registry key, as users type it (``erc audit --attack NAME``, the API's ``name``).
        fn: the attack function, keeping the contract of :mod:`training.attacks.pgd`.
        norms: threat models it implements; ``fn`` takes ``norm=`` when there are several.
        defaults: the parameters used when a request gives none (the audit's configuration).
        label: parameters (defaults applied) -> a short label, e.g. ``"PGD-100x5"``.
        cost: parameters -> forward-backward passes per image (a forward-only query counts a
            third), the unit of progress, ETAs and the audit size limit.
        gradient: uses the model's input gradients (white-box); ``False``: queries only.
        iterative: several steps (the convergence check doubles ``steps`` and ``restarts``).
        minimum_norm: searches the smallest perturbation (CW, FAB) rather than the worst point of
            the ball; with an ``eps`` it only reports what lies within it.
        description: one line for ``erc list`` and the API documentation.
        needs: extra keyword inputs beyond JSON parameters (e.g. ``("typicality",)``); such an
            attack is built only by code that supplies them, never from a request.
        choices: the allowed values of enumerated parameters (e.g. ``{"loss": ("ce", "dlr")}``).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    norms: tuple[str, ...]
    defaults: Mapping[str, Any]
    label: Callable[[dict[str, Any]], str]
    cost: Callable[[dict[str, Any]], float]
    gradient: bool = True
    iterative: bool = True
    minimum_norm: bool = False
    description: str = ""
    needs: tuple[str, ...] = ()
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def public(self) -> bool:
        """Whether requests (CLI, API) may name it."""
        return not self.needs

    @property
    def takes_norm(self) -> bool:
        return "norm" in inspect.signature(self.fn).parameters

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The function's tunable parameters (what ``params`` may set)."""
        sig = inspect.signature(self.fn).parameters
        return {k: p for k, p in sig.items() if k not in CALL_ARGS and k not in self.needs}


@dataclass(frozen=True)
class Attack:
    """An attack configured for one norm: build it with :func:`build_attack`, call it like its function
    (``attack(model, x, y, eps=..., generator=...)``)."""

    spec: AttackDef
    params: dict[str, Any]  # as requested, defaults not applied
    norm: str = "linf"
    inputs: dict[str, Any] = field(default_factory=dict, repr=False)  # the spec's ``needs``

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kwargs(self) -> dict[str, Any]:
        """Every parameter the function is called with, defaults applied (norm included)."""
        kw = {**self.spec.defaults, **self.params}
        if self.spec.takes_norm:
            kw["norm"] = self.norm
        return kw

    @property
    def label(self) -> str:
        return self.spec.label(self.kwargs)

    @property
    def cost(self) -> float:
        return float(self.spec.cost(self.kwargs))

    @property
    def description(self) -> str:
        return f"{self.label} {self.norm}: {self.spec.description}"

    def __call__(
        self,
        model: Model,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        kw = {**self.kwargs, **self.inputs}
        if "generator" in inspect.signature(self.spec.fn).parameters:
            kw["generator"] = generator
        return self.spec.fn(model, x, y, eps=eps, **kw)

    def with_params(self, **params: Any) -> Attack:
        """The same attack with some parameters changed (validated again)."""
        return build_attack(self.name, {**self.params, **params}, self.norm, **self.inputs)

    def record(self) -> dict[str, Any]:
        """How the adversarial examples were made, for results and cards: name, norm, label,
        description and every parameter (flat, so ``record["steps"]`` reads as it always did)."""
        return {
            "name": self.name,
            "norm": self.norm,
            "label": self.label,
            "description": self.description,
            **{k: v for k, v in self.kwargs.items() if k != "norm"},
        }


@dataclass(frozen=True)
class Preset:
    """A named, ordered set of configured attacks run as a cascade: each attack only on the samples
    (and eps levels) that every earlier attack failed on; the per-sample worst case is the figure."""

    name: str
    label: str  # as results and tables show it
    attacks: tuple[tuple[str, dict[str, Any]], ...]
    norms: tuple[str, ...]
    description: str

    def build(self, norm: str = "linf") -> list[Attack]:
        if norm not in self.norms:
            raise AttackError(f"preset {self.name!r} is defined for {'/'.join(self.norms)}, not {norm}")
        return [build_attack(name, params, norm) for name, params in self.attacks]


ATTACKS: dict[str, AttackDef] = {}
PRESETS: dict[str, Preset] = {}


def register(defn: AttackDef) -> AttackDef:
    """Add an attack to the registry (called once, by the module that defines it)."""
    if defn.name in ATTACKS or defn.name in PRESETS:
        raise ValueError(f"attack {defn.name!r} registered twice")
    unknown = [n for n in defn.norms if n not in NORMS]
    if unknown or not defn.norms:
        raise ValueError(f"attack {defn.name!r}: norms must be among {NORMS}, got {defn.norms}")
    ATTACKS[defn.name] = defn
    return defn


def register_preset(preset: Preset) -> Preset:
    if preset.name in ATTACKS or preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} registered twice")
    PRESETS[preset.name] = preset
    return preset


def list_attacks(*, public: bool = True) -> list[str]:
    """Registered attack names, sorted (only those requests may name, by default)."""
    return sorted(n for n, d in ATTACKS.items() if d.public or not public)


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_attack_def(name: str) -> AttackDef:
    try:
        return ATTACKS[name]
    except KeyError:
        known = ", ".join([*list_attacks(), *list_presets()])
        raise AttackError(f"unknown attack {name!r}; known: {known}") from None


def _check_type(attack: str, key: str, value: Any, default: Any) -> None:
    """A parameter's value has the type of its default (ints count as floats; floats finite), so a
    bad value is refused with the request rather than failing later."""
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float) or default is None:
        # None defaults are optional radii or step sizes: numbers when given.
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise AttackError(f"attack {attack!r}: {key} must be {want}, got {value!r}")


def build_attack(
    name: str, params: Mapping[str, Any] | None = None, norm: str = "linf", **inputs: Any
) -> Attack:
    """Validate and configure an attack: a known name, a norm it implements, parameters its function
    takes with values of the right type (counts >= 1), and the extra inputs it needs."""
    defn = get_attack_def(name)
    if norm not in defn.norms:
        raise AttackError(f"attack {name!r} works in {'/'.join(defn.norms)}, not {norm}")
    missing = [k for k in defn.needs if k not in inputs]
    if missing:
        raise AttackError(f"attack {name!r} needs {', '.join(missing)}; it cannot be requested by name alone")
    params = dict(params or {})
    accepted = defn.parameters()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise AttackError(
            f"attack {name!r} takes no parameter(s) {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(accepted))}"
        )
    for key, value in params.items():
        if key in COUNTS and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise AttackError(f"attack {name!r}: {key} must be a positive integer, got {value!r}")
        _check_type(name, key, value, accepted[key].default)
        if key in defn.choices and value not in defn.choices[key]:
            allowed = ", ".join(map(str, defn.choices[key]))
            raise AttackError(f"attack {name!r}: {key} must be one of {allowed}, got {value!r}")
    return Attack(defn, params, norm, dict(inputs))


@dataclass(frozen=True)
class Suite:
    """Several configured attacks whose per-sample worst case is the figure; a preset's suite runs
    as a cascade (each attack only on what the earlier ones failed on, so later figures are
    cumulative), a list of named attacks each on every sample (so each has its own figure)."""

    attacks: tuple[Attack, ...]
    cascade: bool = False
    preset: str | None = None

    @property
    def norm(self) -> str:
        return self.attacks[0].norm

    @property
    def label(self) -> str:
        if self.preset is not None:
            return PRESETS[self.preset].label
        return " + ".join(a.label for a in self.attacks)

    @property
    def cost(self) -> float:
        """Forward-backward passes per image if every attack ran on every sample (an upper bound for
        a cascade, where later attacks only see the survivors)."""
        return sum(a.cost for a in self.attacks)

    @property
    def description(self) -> str:
        if self.preset is not None:
            return f"{self.label} {self.norm}: {PRESETS[self.preset].description}"
        return "; ".join(a.description for a in self.attacks)

    def requests(self) -> list[dict[str, Any]]:
        """``[{"name", "params"}]`` that :func:`build_attacks` turns back into this suite (JSON)."""
        if self.preset is not None:
            return [{"name": self.preset, "params": {}}]
        return [{"name": a.name, "params": dict(a.params)} for a in self.attacks]

    def record(self) -> dict[str, Any]:
        """A single attack's record, or for several: name (the preset's, or "union"), norm, label,
        description, cascade and every attack's record."""
        if len(self.attacks) == 1 and self.preset is None:
            return self.attacks[0].record()
        return {
            "name": self.preset or "union",
            "norm": self.norm,
            "label": self.label,
            "description": self.description,
            "cascade": self.cascade,
            "attacks": [a.record() for a in self.attacks],
        }


def build_attacks(requests: Sequence[tuple[str, Mapping[str, Any] | None]], norm: str = "linf") -> Suite:
    """The suite for a list of ``(name, params)`` requests. A preset stands alone and expands to its
    attacks, run as a cascade; named attacks must differ in label."""
    if not requests:
        raise AttackError("no attack given")
    names = [n for n, _ in requests]
    presets = [n for n in names if n in PRESETS]
    if presets:
        if len(requests) > 1:
            raise AttackError(f"preset {presets[0]!r} runs alone (it is a suite); got {', '.join(names)}")
        name, params = requests[0]
        if params:
            raise AttackError(
                f"preset {name!r} takes no parameters; name its attacks one by one to change them"
            )
        return Suite(tuple(PRESETS[name].build(norm)), cascade=True, preset=name)
    attacks = [build_attack(n, p, norm) for n, p in requests]
    labels = [a.label for a in attacks]
    twice = sorted({lb for lb in labels if labels.count(lb) > 1})
    if twice:
        raise AttackError(
            f"two attacks with the same label {', '.join(twice)}: give them different steps or restarts"
        )
    return Suite(tuple(attacks))


def default_attacks(norm: str = "linf", *, gradients: bool = True) -> Suite:
    """The audit default when a request names no attack: those of FGSM, PGD-40 and APGD-CE-100
    that implement ``norm``; for a model without input gradients (black-box), Square alone."""
    if not gradients:
        return build_attacks([("square", {})], norm)
    wanted = [("fgsm", {}), ("pgd", {"steps": 40}), ("apgd", {"steps": 100})]
    return build_attacks([(n, p) for n, p in wanted if norm in ATTACKS[n].norms], norm)


def require_queries_only(suite: Suite, *, gradients: bool, why: str = "") -> None:
    """Refuse gradient attacks in ``suite`` when the model gives no input gradients (black-box):
    one :class:`AttackError` naming them and the attacks that can run."""
    if gradients:
        return
    white = [a.label for a in suite.attacks if a.spec.gradient]
    if white:
        queries = ", ".join(n for n, d in ATTACKS.items() if not d.gradient and d.public)
        raise AttackError(
            f"{', '.join(white)} need input gradients (white-box) and this model has none"
            f"{f' ({why})' if why else ''}; only query attacks run on it: {queries}"
        )


def catalog() -> dict[str, Any]:
    """What a request may name, as JSON (``GET /v1/attacks``, the console's attack list): every
    public attack with its norms, tunable parameters and their defaults, allowed values and flags;
    every preset with its attacks; the default suite per norm."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    attacks = []
    for name in list_attacks():
        d = ATTACKS[name]
        tunable = {
            k: plain(d.defaults.get(k, p.default))
            for k, p in d.parameters().items()
            if k != "norm" and p.default is not inspect.Parameter.empty
        }
        # A default of None is derived from the others (e.g. PGD's alpha from eps and steps): such a
        # parameter may be set, but has no value to show.
        params = {k: v for k, v in tunable.items() if v is not None}
        derived = sorted(k for k, v in tunable.items() if v is None)
        attacks.append(
            {
                "name": name,
                "label": d.label(params),
                "description": d.description,
                "norms": list(d.norms),
                "params": params,
                "derived": derived,
                "choices": {k: list(v) for k, v in d.choices.items()},
                "gradient": d.gradient,
                "iterative": d.iterative,
                "minimum_norm": d.minimum_norm,
            }
        )
    presets = [
        {
            "name": p.name,
            "label": p.label,
            "description": p.description,
            "norms": list(p.norms),
            "attacks": [{"name": n, "params": dict(kw)} for n, kw in p.attacks],
        }
        for p in (PRESETS[n] for n in list_presets())
    ]
    default = {}
    for norm in NORMS:
        suite = default_attacks(norm)
        default[norm] = {"label": suite.label, "attacks": suite.requests()}
    return {"norms": list(NORMS), "attacks": attacks, "presets": presets, "default": default}


__all__ = [
    "ATTACKS",
    "PRESETS",
    "Attack",
    "AttackDef",
    "AttackError",
    "Preset",
    "Suite",
    "build_attack",
    "build_attacks",
    "catalog",
    "default_attacks",
    "get_attack_def",
    "list_attacks",
    "list_presets",
    "register",
    "register_preset",
]
