from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import SITES
from pipelines.data.repo import dvc_status_clean, git_head
from pipelines.data.schema import PARTITIONS
from pipelines.init import init_workspace
from pipelines.workspace import SitePaths


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file's digest, less caches that change without a change of content (git's index, locks)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and "mlflow" not in p.parts and p.name not in (".repo.lock", "index")}


@pytest.fixture(scope="module")
def fresh_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("init") / "factory"
    init_workspace(home)
    return home


@pytest.mark.parametrize("site", SITES)
def test_init_creates_repo_remote_data_and_keys(fresh_home: Path, site: str):
    paths = SitePaths.of(site, fresh_home)
    assert (paths.repo / ".git").is_dir() and (paths.repo / ".dvc").is_dir()
    for partition in PARTITIONS[site]:
        assert (paths.data_dir / f"{partition}.parquet.dvc").exists()
    assert dvc_status_clean(paths), "dvc status is not clean (workspace or remote)"
    remote_objects = [p for p in paths.dvc_remote.rglob("*") if p.is_file()]
    assert len(remote_objects) >= len(PARTITIONS[site])
    assert (paths.mlflow_dir / "mlflow.db").exists()
    key_files = [p for p in paths.keys_dir.rglob("*") if p.is_file() and p.suffix == ".pem"]
    assert key_files, "no private key files"
    for key_file in key_files:
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert b"ENCRYPTED PRIVATE KEY" in key_file.read_bytes()
    assert oct(paths.secret_file.stat().st_mode & 0o777) == "0o600"
    others = [s for s in SITES if s != site]
    trusted = " ".join(p.name for p in paths.trust_dir.iterdir())
    assert all(other in trusted for other in others)


def test_second_init_changes_nothing(fresh_home: Path):
    heads = {site: git_head(SitePaths.of(site, fresh_home)) for site in SITES}
    before = {site: _tree_digest(fresh_home / site) for site in SITES}
    summary = init_workspace(fresh_home)
    assert not any(any(v.values()) for v in summary.values())
    assert {site: git_head(SitePaths.of(site, fresh_home)) for site in SITES} == heads
    assert {site: _tree_digest(fresh_home / site) for site in SITES} == before


def test_interrupted_init_is_completed_not_duplicated(tmp_path: Path):
    home = tmp_path / "factory"
    init_workspace(home)
    paths = SitePaths.of("destination", home)
    (paths.data_dir / "build.json").unlink()  # as if the run died before marking the data built
    head = git_head(paths)
    init_workspace(home)
    assert (paths.data_dir / "build.json").exists()
    log = subprocess.run(["git", "log", "--oneline"], cwd=paths.repo, capture_output=True, text=True).stdout
    assert log.count("Build destination data") == 1 and git_head(paths) == head  # same data: no new version
    assert dvc_status_clean(paths)


def test_run_without_init_says_to_run_init(tmp_path: Path):
    env = {**os.environ, "FACTORY_HOME": str(tmp_path / "empty")}
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--stages", "1"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "factory init" in result.stderr
