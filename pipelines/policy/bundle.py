"""The policy bundle: the Rego modules and JSON data of `policies/`, read once per process.

Data files are placed the way `opa run --server policies/` places them: a JSON file
lands at the path of its folder relative to `policies/`, so the policy data,
`policies/factory/data.json`, is `data.factory` (beside the gate packages
`factory.<gate>`; its keys must not be gate names). Files in one folder are merged,
and a key defined twice is an error. Test modules (`*_test.rego`) are kept apart:
gates never load them, and they are not part of the bundle's digest.

The digest is what a site pins (`pipelines.policy.pin`) and what the site's OPA server
reports as its bundle revision: `sha256:` + sha256 of the lines `<path>\0<sha256 hex of the
file>\n` of every module and data file, sorted by path. The Helm chart computes the same
value from the files it serves (`sovereign-factory.bundleRevision`), so a chart and a site
built from one policies/ folder agree without anyone copying a digest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import PROJECT_ROOT

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class BundleError(RuntimeError):
    """The policy folder cannot be loaded; the message names the file."""


@dataclass(frozen=True, eq=False)
class Bundle:
    root: Path
    modules: tuple[tuple[str, str], ...]  # (path relative to root, Rego text), tests excluded
    tests: tuple[tuple[str, str], ...]
    data: dict[str, Any]
    digest: str

    @functools.cached_property
    def gates(self) -> tuple[str, ...]:
        """Packages `factory.<gate>` that define a decision (helpers excluded)."""
        names = []
        for _, text in self.modules:
            match = _PACKAGE.search(text)
            if match and match.group(1).startswith("factory.") and re.search(r"^decision\s*:=", text, re.M):
                names.append(match.group(1).removeprefix("factory."))
        return tuple(sorted(set(names)))


def policy_root() -> Path:
    return Path(os.environ.get("FACTORY_POLICIES", PROJECT_ROOT / "policies")).resolve()


def _merge(target: dict[str, Any], source: dict[str, Any], where: str, origin: str) -> None:
    for key, value in source.items():
        if key in target:
            if isinstance(target[key], dict) and isinstance(value, dict):
                _merge(target[key], value, f"{where}.{key}", origin)
                continue
            raise BundleError(f"policy data {where}.{key} is defined twice (again in {origin})")
        target[key] = value


def read_bundle(root: Path) -> Bundle:
    if not root.is_dir():
        raise BundleError(f"policy folder {root} does not exist")
    modules, tests, data = [], [], {}
    lines: list[str] = []
    try:
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".rego", ".json"))
    except OSError as error:
        raise BundleError(f"policy folder {root} cannot be listed: {error}") from None
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise BundleError(f"policy file {rel} cannot be read: {error}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BundleError(f"policy file {rel} is not UTF-8: {error}") from None
        if path.suffix == ".rego":
            if path.name.endswith("_test.rego"):
                tests.append((rel, text))
                continue  # tests never decide, so they are not part of the digest
            modules.append((rel, text))
        else:
            try:
                document = json.loads(text)
            except json.JSONDecodeError as error:
                raise BundleError(f"policy data {rel} is not valid JSON: {error}") from None
            except RecursionError:
                raise BundleError(f"policy data {rel} is nested too deeply") from None
            if not isinstance(document, dict):
                raise BundleError(f"policy data {rel} must hold a JSON object")
            node = data
            parts = path.parent.relative_to(root).parts
            for part in parts:
                node = node.setdefault(part, {})
            _merge(node, document, "data" + "".join(f".{p}" for p in parts), rel)
        lines.append(f"{rel}\0{hashlib.sha256(raw).hexdigest()}\n")
    if not modules:
        raise BundleError(f"policy folder {root} holds no Rego policy")
    digest = hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
    return Bundle(root, tuple(modules), tuple(tests), data, "sha256:" + digest)


@functools.lru_cache(maxsize=8)
def _cached(root: str | None) -> Bundle:
    return read_bundle(Path(root).resolve() if root else policy_root())


def load_bundle(root: Path | None = None) -> Bundle:
    """The bundle of `root` (default `policies/`, or FACTORY_POLICIES), read once per process."""
    return _cached(str(root) if root else os.environ.get("FACTORY_POLICIES"))
