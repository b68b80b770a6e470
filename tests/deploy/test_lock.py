"""The pinned environment: constraints.txt pins every dependency pyproject.toml declares, each
pin inside the declared range, and the running environment is the pinned one (so a fresh
clone's `make test` runs what CI ran)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {line!r} is not NAME==VERSION"
        pins[canonicalize_name(name)] = version
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts += [t for t in extra if not t.startswith("llm-sidecar")]
    return [Requirement(t) for t in texts]


def test_every_declared_dependency_is_pinned_inside_its_range() -> None:
    pins = _pins()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} is outside pyproject.toml's range {req.specifier}")
        assert re.search(r"[<~]|==", str(req.specifier)), (
            f"{req.name}: the range has no upper bound; state the tested range")


def test_the_running_environment_is_the_pinned_one() -> None:
    pins = _pins()
    for req in _declared():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        installed = importlib.metadata.version(req.name)
        assert installed == pins[name], (
            f"{req.name} {installed} is installed but constraints.txt pins {pins[name]}: "
            "reinstall with `make dev` (or regenerate the lock with `make lock`)")
