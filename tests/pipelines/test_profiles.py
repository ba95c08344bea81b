"""Profiles (`factory init --profile`): bad profiles refused naming the key before anything is
written, the seeded stratified split, a workspace built from a tabular profile (partitions with
their flags, each site's record of the profile, its family the site's default), re-running init
with the same profile changes nothing and another profile is refused."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from pipelines import profiles
from pipelines.config import SITES, load_config
from pipelines.data import catalog
from pipelines.data.repo import git_head
from pipelines.init import init_workspace
from pipelines.learning.families import default_family
from pipelines.profiles import ProfileError, load_profile, split_rows
from pipelines.workspace import SitePaths

FEATURES = ("a", "b", "c", "d", "e", "f", "g")
CLASSES = ("n", "e", "s", "w")
SPLITS = {
    "supplier": {"train": 0.75, "test": 0.25},
    "origin": {"shared": 0.4, "private": 0.2, "export_authorized": 0.2, "test": 0.2},
    "destination": {"shared": 0.4, "private": 0.2, "contribution": 0.2, "test": 0.2},
}


def _csv(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    frame = pd.DataFrame(rng.normal(labels[:, None], 0.3, (n, len(FEATURES))).round(4), columns=list(FEATURES))
    frame["kind"] = [CLASSES[i] for i in labels]
    frame["operator"] = [f"op-{i % 3}" for i in range(n)]
    frame.to_csv(path, index=False)
    return path


def _profile(folder: Path, **changes) -> Path:
    body = {"name": "sensors", "family": "tabular-mlp", "training": {"initial": {"epochs": 2}},
            "sites": {site: {"source": f"{site}.csv", "label_column": "kind", "split": SPLITS[site]}
                      for site in SITES}}
    body.update(changes)
    path = folder / f"profile-{hashlib.sha256(repr(changes).encode()).hexdigest()[:8]}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sources")
    for k, site in enumerate(SITES):
        _csv(folder / f"{site}.csv", 80, k)
    return folder


def _site(folder: Path, site: str, **changes) -> dict:
    return {"sites": {s: ({**{"source": f"{s}.csv", "label_column": "kind", "split": SPLITS[s]}, **changes}
                          if s == site else {"source": f"{s}.csv", "label_column": "kind", "split": SPLITS[s]})
                      for s in SITES}}


BAD = {
    "unknown site": (lambda f: {"sites": {**_site(f, "origin")["sites"], "mars": {"builder": "digits"}}},
                     "sites.mars: unknown site"),
    "missing site": (lambda f: {"sites": {s: v for s, v in _site(f, "origin")["sites"].items() if s != "origin"}},
                     "sites.origin: missing"),
    "unknown partition": (lambda f: _site(f, "origin", split={"shared": 0.4, "privat": 0.2, "export_authorized": 0.2,
                                                             "test": 0.2}),
                          "sites.origin.split.privat: origin has no partition 'privat'"),
    "missing partition": (lambda f: _site(f, "origin", split={"shared": 0.6, "export_authorized": 0.2, "test": 0.2}),
                          "sites.origin.split: missing partition(s) private"),
    "split not summing to 1": (lambda f: _site(f, "supplier", split={"train": 0.7, "test": 0.2}),
                               "sites.supplier.split: fractions sum to 0.9, not 1"),
    "negative fraction": (lambda f: _site(f, "supplier", split={"train": 1.2, "test": -0.2}),
                          "sites.supplier.split.test: fraction -0.2 must lie in (0, 1]"),
    "missing source": (lambda f: _site(f, "destination", source="nowhere.csv"),
                       "sites.destination.source: no such file or folder"),
    "unknown family": (lambda f: {"family": "transformer-xl"}, "family: unknown model family 'transformer-xl'"),
    "image family on tables": (lambda f: {"family": "resnet-small"}, "family: resnet-small (resnet) takes C x H x W"),
    "unknown training profile": (lambda f: {"training": {"warmup": {"epochs": 1}}}, "training.warmup: unknown"),
    "bad training value": (lambda f: {"training": {"initial": {"epochs": 0}}}, "training.initial.epochs:"),
    "unknown key": (lambda f: _site(f, "origin", colour="red"), "sites.origin.colour: Extra inputs"),
    "image option on a table": (lambda f: _site(f, "origin", resize="8x8"), "sites.origin.resize: is for image"),
    "split for the digits builder": (lambda f: {"sites": {**_site(f, "origin")["sites"],
                                                          "supplier": {"builder": "digits", "split": {"train": 1}}}},
                                     "sites.supplier.split: the digits builder makes its own partitions"),
    "import named as a partition": (lambda f: _site(f, "supplier", name="train"), "sites.supplier.name:"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_profile_is_refused_naming_the_key_before_anything_is_written(sources: Path, tmp_path: Path, case: str):
    changes, message = BAD[case]
    path = _profile(sources, **changes(sources))
    with pytest.raises(ProfileError, match=r"^profile .*: " + re.escape(message)):
        load_profile(path)
    home = tmp_path / "factory"
    result = CliRunner().invoke(_cli(), ["init", "--profile", str(path)], env={"FACTORY_HOME": str(home)})
    assert result.exit_code != 0 and message.split(":")[0] in result.output
    assert not home.exists()


def _cli():
    from pipelines.cli import main

    return main


def test_default_profile_is_the_digits_demo():
    profile = load_profile()
    assert profile.path == profiles.default_profile_path().resolve()
    assert profile.family == load_config().stages.model_family == "digits-cnn"
    assert all(profile.sites[site] == {"builder": "digits"} for site in SITES)
    assert load_profile(profile.path).digest == profile.digest


def test_split_is_seeded_stratified_disjoint_and_complete():
    labels = np.repeat(np.arange(4), [50, 30, 20, 13])
    fractions = {"shared": 0.4, "private": 0.2, "export_authorized": 0.2, "test": 0.2}
    parts = split_rows(labels, fractions, seed=3)
    assert all(np.array_equal(parts[k], split_rows(labels, fractions, seed=3)[k]) for k in fractions)
    assert not all(np.array_equal(parts[k], split_rows(labels, fractions, seed=4)[k]) for k in fractions)
    rows = np.concatenate(list(parts.values()))
    assert sorted(rows) == list(range(len(labels)))  # every row once
    for name, fraction in fractions.items():
        assert list(parts[name]) == sorted(parts[name])  # the source's row order
        for label, count in zip(*np.unique(labels, return_counts=True), strict=True):
            assert abs((labels[parts[name]] == label).sum() - fraction * count) < 1  # per class, rounded


@pytest.fixture(scope="module")
def built(sources: Path, tmp_path_factory) -> tuple[Path, Path]:
    home = tmp_path_factory.mktemp("profiled") / "factory"
    profile = _profile(sources)
    summary = init_workspace(home, profile=profile)
    assert all(s["data_built"] and s["profile_recorded"] for s in summary.values())
    return home, profile


def test_profile_builds_each_sites_partitions_from_its_import(built):
    home, profile = built
    for site in SITES:
        paths = SitePaths.of(site, home)
        source = catalog.get(paths, f"{site}-source")
        assert source.local_only and source.classification == "secret" and source.extra["spec"]["classes"] == sorted(CLASSES)
        rows = 0
        for partition in SPLITS[site]:
            version = catalog.get(paths, partition)
            flags = load_config().partition(site, partition)
            assert version.kind == "raw" and not version.parents
            assert (version.local_only, version.export_authorized) == (flags.local_only, flags.export_authorized)
            assert version.extra["spec"] == source.extra["spec"]
            assert version.extra["split"]["of"] == source.id and version.extra["source"]["dataset"] == source.id
            rows += version.extra["split"]["rows"]
        assert rows == 80


def test_each_site_records_its_own_part_and_trains_its_family(built):
    home, _ = built
    for site in SITES:
        paths = SitePaths.of(site, home)
        record = json.loads((paths.state_dir / "profile.json").read_text())
        assert record["profile"] == "sensors" and record["family"] == "tabular-mlp" == default_family(paths)
        assert record["data"]["split"] == SPLITS[site] and "sites" not in record
        assert profiles.training_profile(paths, "initial").epochs == 2
        assert profiles.training_profile(paths, "local") == load_config().stages.training["local"]
    assert default_family() == load_config().stages.model_family  # no site: conf/stages.yaml


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "mlflow" not in p.parts and p.name not in (".repo.lock", "index")}


def test_same_profile_again_changes_nothing(built):
    home, profile = built
    heads = {site: git_head(SitePaths.of(site, home)) for site in SITES}
    before = _tree(home)
    summary = init_workspace(home, profile=profile)
    assert not any(any(v.values()) for v in summary.values())
    assert {site: git_head(SitePaths.of(site, home)) for site in SITES} == heads
    assert _tree(home) == before


def test_another_profile_on_the_workspace_is_refused(built, sources: Path):
    home, _ = built
    before = _tree(home)
    other = _profile(sources, training={"initial": {"epochs": 3}})
    with pytest.raises(ProfileError, match="was built with profile 'sensors'.*use another FACTORY_HOME"):
        init_workspace(home, profile=other)
    with pytest.raises(ProfileError, match="was built with profile 'sensors'"):
        init_workspace(home)  # the digits default
    assert _tree(home) == before


def test_a_digits_workspace_refuses_a_profile_that_imports(sources: Path, tmp_path: Path):
    """A workspace from before profiles (digits data, no record) keeps its data."""
    home = tmp_path / "factory"
    marker = SitePaths.of("supplier", home).data_dir / "build.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"scale": None, "partitions": ["train", "test"]}) + "\n")
    with pytest.raises(ProfileError, match="supplier's data in .* was built by the digits builder"):
        init_workspace(home, profile=_profile(sources))
    assert sorted(p.name for p in home.rglob("*") if p.is_file()) == ["build.json"]


def test_scale_is_for_the_digits_builder(sources: Path, tmp_path: Path):
    with pytest.raises(ProfileError, match="--scale grows the bundled digits data"):
        init_workspace(tmp_path / "factory", scale=5000, profile=_profile(sources))
    assert not (tmp_path / "factory").exists()
