"""pyproject.toml's dependency ranges admit the tested set: every dependency that constraints.txt
pins (the versions ``make test`` installs and runs) satisfies its range, so ``pip install`` of the
project as a dependency of another project can resolve to the versions we test. (That
each floor is a version that works is pyproject.toml's comment: floors are versions that ran.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"dependencies": project["dependencies"], **project.get("optional-dependencies", {})}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def test_every_runtime_dependency_is_pinned_and_its_pin_satisfies_the_range() -> None:
    pins = _pins()
    for req in _requirements()["dependencies"]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name}: a runtime dependency that constraints.txt does not pin"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}: the tested version {pins[name]} (constraints.txt) is outside {req.specifier}"
        )
        # Every range has a floor: the oldest version we claim works (see pyproject.toml's comment).
        assert any(s.operator in (">=", "~=", "==") for s in req.specifier), f"{req}: no lower bound"


def test_optional_dependencies_admit_their_pins() -> None:
    pins = _pins()
    for group, reqs in _requirements().items():
        for req in reqs:
            name = canonicalize_name(req.name)
            if name in pins:
                assert req.specifier.contains(pins[name], prereleases=True), (
                    f"[{group}] {req.name}: pinned {pins[name]} is outside {req.specifier}"
                )


def test_constraints_pin_each_package_once() -> None:
    seen: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            key = canonicalize_name(name)
            assert seen.get(key, version) == version, f"{name} pinned twice, differently"
            seen[key] = version
