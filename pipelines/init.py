"""`factory init`: build FACTORY_HOME for the three sites (design section 4).

Every part is idempotent: a second run changes nothing and never replaces keys or
data; a run interrupted half-way is completed by the next one.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from pipelines.config import SITES, load_config
from pipelines.data.schema import PARTITIONS
from pipelines.workspace import SitePaths, factory_home

console = Console(stderr=True)


def _build_marker(paths: SitePaths) -> Path:
    return paths.data_dir / "build.json"


def _init_data(paths: SitePaths, scale: int | None) -> bool:
    """Build and track the site's partitions once. True when something was written."""
    from pipelines.data.builder import build_site_data
    from pipelines.data.catalog import register_dataset
    from pipelines.data.repo import commit_files, site_lock

    marker = _build_marker(paths)
    wanted = {"scale": scale, "partitions": list(PARTITIONS[paths.site])}
    with site_lock(paths):
        if marker.exists() and json.loads(marker.read_text()) == wanted:
            return False
        files = build_site_data(paths, scale)
        for partition, file in files.items():
            register_dataset(paths, partition, file, kind="raw",
                             flags=load_config().partition(paths.site, partition).model_dump())
        extra = [paths.data_dir / "injected_defects.json"] if paths.site == "origin" else []
        marker.write_text(json.dumps(wanted) + "\n")
        commit_files(paths, [marker, *extra], f"Build {paths.site} data (scale {scale or 'default'})")
        return True


def _init_mlflow(paths: SitePaths) -> None:
    from pipelines.learning.registry import experiment_id

    experiment_id(paths)


def init_workspace(home: Path | None = None, *, scale: int | None = None) -> dict[str, dict[str, bool]]:
    """Create or complete every site's repo, remote, data, MLflow store, keys and policy pin, then exchange trust."""
    from pipelines.data.repo import init_site_repo
    from pipelines.policy.pin import ensure_pin
    from pipelines.trust import audit
    from pipelines.trust.keys import ensure_site_keys, exchange_trust, signing_key_id

    home = (home or factory_home()).resolve()
    summary: dict[str, dict[str, bool]] = {}
    for site in SITES:
        paths = SitePaths.of(site, home)
        for folder in (paths.inbox, paths.state_dir, paths.trust_dir):
            folder.mkdir(parents=True, exist_ok=True)
        console.print(f"[bold]{site}[/]: repository, keys, policy pin, data, MLflow store")
        repo_created = init_site_repo(paths)
        ensure_site_keys(paths)
        if not paths.audit_log.exists():  # a site with keys always has a log: it starts here
            audit.append(paths, action="site.initialised", actor=f"svc-{site}", object=site, outcome="success",
                         details={"signing_key_id": signing_key_id(paths)})
        ensure_pin(paths)  # the policy bundle in effect now is the one this site trusts from here on
        data_built = _init_data(paths, scale)
        _init_mlflow(paths)
        summary[site] = {"repo_created": repo_created, "data_built": data_built}
    exchange_trust(home)
    return summary


@click.command("init")
@click.option("--scale", type=click.IntRange(min=1), default=None,
              help="Augment the training data to about N records in all (load and performance runs); "
                   "test sets stay the real images.")
def init_command(scale: int | None) -> None:
    """Create FACTORY_HOME with the three sites (idempotent)."""
    home = factory_home()
    summary = init_workspace(home, scale=scale)
    changed = any(any(v.values()) for v in summary.values())
    console.print(f"workspace {'ready' if changed else 'already complete, nothing changed'}: {home}")
