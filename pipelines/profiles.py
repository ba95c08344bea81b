"""Profiles: what `factory init --profile FILE` builds at each site, and what each site recorded of it.

A profile (YAML) names the model family the stages train and, per site, where the site's data
comes from: the bundled digits builder (`builder: digits`: the demo's partitions, design section 3)
or a `source` to import as `factory data import` does (an image folder or a CSV / Parquet file; a
relative path is taken against the profile file's folder) with a `split:` of it into the site's
partitions of conf/sites.yaml (fractions summing to 1; seeded, stratified by class). Optional keys:
`seed` (of the split; default conf/stages.yaml `seed`) and `training` (overrides of conf/stages.yaml
training profiles, e.g. `{initial: {epochs: 10}}` for small data). The default profile,
`conf/profiles/digits.yaml`, is the digits demo.

Each site records its own part (the profile's name and digest, the family, the training overrides,
its data) in its own home, `state/profile.json`: each site is its own deployment and reads only its
own record. That family is the default of the site's training steps
(`pipelines.learning.families.default_family(paths)`); without a record conf/stages.yaml
`model_family` is.

A bad profile is refused with a `ProfileError` naming the file and the key, before anything is
written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.config import SITES, TrainingProfile, conf_dir, load_config, load_models, parse_yaml
from pipelines.fileio import read_json, write_json
from pipelines.workspace import SitePaths, UnsafeName, safe_name

BUILDERS = ("digits",)
RECORD = "profile.json"
IMAGE_ARCHITECTURES = ("cnn", "resnet")  # architectures that take C x H x W images only
TABULAR_SUFFIXES = (".csv", ".parquet", ".pq")
SPLIT_TOLERANCE = 1e-6
_RESIZE = re.compile(r"^\s*[1-9]\d*\s*[xX]\s*[1-9]\d*\s*$")


class ProfileError(ValueError):
    """A profile cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _SiteData(_Strict):
    builder: str | None = None
    source: str | None = None
    name: str | None = None  # the import's catalog name (default `<site>-source`)
    label_column: str | None = None
    classes: list[str | int] | None = None
    metadata_columns: list[str] | None = None
    metadata: str | None = None
    resize: str | None = None
    split: dict[str, float] | None = None


class _ProfileFile(_Strict):
    name: str
    family: str
    seed: int | None = None
    training: dict[str, dict[str, Any]] = {}
    sites: dict[str, _SiteData]


def default_profile_path() -> Path:
    """`conf/profiles/digits.yaml` (of FACTORY_CONF when set): the digits demo."""
    return conf_dir() / "profiles" / "digits.yaml"


@dataclass(frozen=True)
class Profile:
    """A checked profile: source paths absolute, every default filled in."""

    path: Path
    name: str
    family: str
    seed: int
    training: dict[str, dict[str, Any]]
    sites: dict[str, dict[str, Any]]  # site -> {"builder": ...} or {"source": ..., "split": {...}, ...}
    digest: str

    def imports(self, site: str) -> bool:
        return "source" in self.sites[site]

    def site_record(self, site: str) -> dict[str, Any]:
        """What `site` records in its home: its own part only, and the whole profile's digest."""
        return {"profile": self.name, "digest": self.digest, "family": self.family, "seed": self.seed,
                "training": self.training, "data": self.sites[site]}


def _fail(path: Path, key: str, problem: str) -> ProfileError:
    return ProfileError(f"profile {path}: {key}: {problem}")


def load_profile(path: Path | str | None = None) -> Profile:
    """Read and check a profile (default: the digits demo); a bad one raises ProfileError naming the key."""
    path = Path(path).expanduser().resolve() if path is not None else default_profile_path().resolve()
    try:
        raw = parse_yaml(path.read_text())
    except OSError as exc:
        raise ProfileError(f"profile {path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {path}: not YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"profile {path}: must be a mapping with name, family and sites")
    try:
        parsed = _ProfileFile(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise _fail(path, key, first["msg"]) from None
    try:
        safe_name(parsed.name, "profile name")
    except UnsafeName as exc:
        raise _fail(path, "name", str(exc)) from None
    families = load_models().families
    if parsed.family not in families:
        raise _fail(path, "family", f"unknown model family {parsed.family!r}; conf/models.yaml defines "
                                    f"{', '.join(sorted(families))}")
    training = _training(path, parsed.training)
    unknown = [site for site in parsed.sites if site not in SITES]
    if unknown:
        raise _fail(path, f"sites.{unknown[0]}", f"unknown site; sites are {', '.join(SITES)}")
    missing = [site for site in SITES if site not in parsed.sites]
    if missing:
        raise _fail(path, f"sites.{missing[0]}", "missing: every site needs a builder or a source")
    sites = {site: _site(path, site, parsed.sites[site]) for site in SITES}
    architecture = families[parsed.family].architecture
    if architecture in IMAGE_ARCHITECTURES:
        for site, data in sites.items():
            if data.get("kind") == "tabular":
                raise _fail(path, "family", f"{parsed.family} ({architecture}) takes C x H x W images, but "
                                            f"sites.{site}.source is a tabular file; use an mlp family")
    seed = parsed.seed if parsed.seed is not None else load_config().stages.seed
    body = {"name": parsed.name, "family": parsed.family, "seed": seed, "training": training, "sites": sites}
    digest = "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return Profile(path=path, digest=digest, **body)


def _training(path: Path, overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Overrides of conf/stages.yaml training profiles, each checked as a whole profile."""
    conf = load_config().stages.training
    out = {}
    for name, override in overrides.items():
        if name not in conf:
            raise _fail(path, f"training.{name}", f"unknown training profile; conf/stages.yaml has "
                                                  f"{', '.join(conf)}")
        try:
            TrainingProfile(**{**conf[name].model_dump(), **override})
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            raise _fail(path, f"training.{name}.{key}", first["msg"]) from None
        out[name] = dict(override)
    return out


def _site(path: Path, site: str, data: _SiteData) -> dict[str, Any]:
    """One site's data, normalised: {"builder": ...}, or the import's options with absolute paths."""
    key = f"sites.{site}"
    given = data.model_dump(exclude_none=True)
    if data.builder is not None:
        if data.builder not in BUILDERS:
            raise _fail(path, f"{key}.builder", f"unknown builder {data.builder!r}; builders: {', '.join(BUILDERS)}")
        extra = sorted(set(given) - {"builder"})
        if extra:
            raise _fail(path, f"{key}.{extra[0]}", "the digits builder makes its own partitions; "
                                                   "this key is for an imported source")
        return {"builder": data.builder}
    if data.source is None:
        raise _fail(path, key, "needs a builder (builder: digits) or a source to import")
    source = _resolve(path, data.source)
    if not source.exists():
        raise _fail(path, f"{key}.source", f"no such file or folder: {source}")
    kind = "image" if source.is_dir() else "tabular"
    if kind == "tabular" and source.suffix.lower() not in TABULAR_SUFFIXES:
        raise _fail(path, f"{key}.source", f"{source} is neither an image folder nor a CSV or Parquet file")
    own = {"image": ("metadata", "resize"), "tabular": ("label_column", "classes", "metadata_columns")}
    other = "tabular" if kind == "image" else "image"
    stray = [k for k in own[other] if k in given]
    if stray:
        raise _fail(path, f"{key}.{stray[0]}", f"is for {other} sources; {source} is "
                                               f"{'an image folder' if kind == 'image' else 'a tabular file'}")
    out: dict[str, Any] = {"source": str(source), "kind": kind, "name": data.name or f"{site}-source"}
    try:
        safe_name(out["name"], "dataset name")
    except UnsafeName as exc:
        raise _fail(path, f"{key}.name", str(exc)) from None
    partitions = list(load_config().sites[site].data_partitions)
    if out["name"] in partitions:
        raise _fail(path, f"{key}.name", f"{out['name']!r} is a partition of {site}; the import needs another name")
    if kind == "image":
        if data.metadata is not None:
            metadata = _resolve(path, data.metadata)
            if not metadata.is_file():
                raise _fail(path, f"{key}.metadata", f"no such file: {metadata}")
            out["metadata"] = str(metadata)
        if data.resize is not None:
            if not _RESIZE.match(data.resize):
                raise _fail(path, f"{key}.resize", f"{data.resize!r} is not HxW (e.g. 64x64)")
            out["resize"] = data.resize.strip().lower().replace(" ", "")
    else:
        out["label_column"] = data.label_column or "label"
        if data.classes is not None:
            out["classes"] = [str(c) for c in data.classes]
        out["metadata_columns"] = [str(c) for c in data.metadata_columns or ()]
    out["split"] = _split(path, key, site, data.split, partitions)
    return out


def _resolve(profile: Path, value: str) -> Path:
    candidate = Path(value).expanduser()
    return (candidate if candidate.is_absolute() else profile.parent / candidate).resolve()


def _split(path: Path, key: str, site: str, split: dict[str, float] | None, partitions: list[str]) -> dict[str, float]:
    if not split:
        raise _fail(path, f"{key}.split", f"missing: the fractions of {site}'s partitions ({', '.join(partitions)})")
    for name, fraction in split.items():
        if name not in partitions:
            raise _fail(path, f"{key}.split.{name}", f"{site} has no partition {name!r} in conf/sites.yaml "
                                                     f"(partitions: {', '.join(partitions)})")
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise _fail(path, f"{key}.split.{name}", f"fraction {fraction!r} must lie in (0, 1]")
    missing = [p for p in partitions if p not in split]
    if missing:
        raise _fail(path, f"{key}.split", f"missing partition(s) {', '.join(missing)} of {site} (the stages "
                                          "read every partition conf/sites.yaml gives the site)")
    total = math.fsum(split.values())
    if abs(total - 1.0) > SPLIT_TOLERANCE:
        raise _fail(path, f"{key}.split", f"fractions sum to {total:g}, not 1")
    return {p: float(split[p]) for p in partitions}  # in conf/sites.yaml order


def split_rows(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Row indices per partition: each class's rows shuffled (seeded) and cut by the fractions
    (largest remainder), so every partition holds about its fraction of every class. Indices
    come back sorted: the partitions keep the source's row order."""
    names = list(fractions)
    weights = np.array([fractions[n] for n in names], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picked: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        share = len(rows) * weights
        counts = np.floor(share).astype(np.int64)
        left = len(rows) - int(counts.sum())
        counts[np.argsort(-(share - counts), kind="stable")[:left]] += 1
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for i, name in enumerate(names):
            picked[name].append(rows[bounds[i]:bounds[i + 1]])
    return {n: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64) for n, parts in picked.items()}


# ---------------------------------------------------------------------------- a site's record


def record_path(paths: SitePaths) -> Path:
    return paths.state_dir / RECORD


def recorded(paths: SitePaths) -> dict[str, Any] | None:
    """The profile record of the site (None before `factory init` wrote one)."""
    path = record_path(paths)
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict):
        raise ProfileError(f"{path} is not a profile record")
    return record


def record(paths: SitePaths, profile: Profile) -> bool:
    """Write the site's record of `profile` (atomically); False when it already says the same."""
    wanted = profile.site_record(paths.site)
    if recorded(paths) == wanted:
        return False
    write_json(record_path(paths), wanted)
    return True


def site_family(paths: SitePaths) -> str | None:
    """The model family the site's profile names, or None (no profile recorded)."""
    family = (recorded(paths) or {}).get("family")
    if family is not None and not isinstance(family, str):
        raise ProfileError(f"{record_path(paths)} names family {family!r}, not a family name")
    return family


def training_profile(paths: SitePaths, name: str) -> TrainingProfile:
    """conf/stages.yaml training profile `name` with the site's profile's overrides applied."""
    conf = load_config().stages.training
    if name not in conf:
        raise KeyError(f"unknown training profile {name!r}; conf/stages.yaml has {', '.join(conf)}")
    override = ((recorded(paths) or {}).get("training") or {}).get(name) or {}
    return TrainingProfile(**{**conf[name].model_dump(), **override}) if override else conf[name]
