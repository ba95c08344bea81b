"""`factory init`: build FACTORY_HOME for the three sites (design section 4).

The sites' data follows a profile (`pipelines.profiles`; default `conf/profiles/digits.yaml`,
the digits demo): per site the bundled digits builder, or a source imported with
`factory data import` (`<site>-source`, secret and local-only) and split into the site's
partitions, each registered as a raw dataset named as the partition (the names the stages read)
with that partition's flags. Each site records the profile in its own home
(`state/profile.json`); its family is the default of the site's training steps.

Every part is idempotent: a second run changes nothing and never replaces keys or
data; a run interrupted half-way is completed by the next one. A bad profile is refused
before anything is written, and so is a profile other than the one the workspace was built with.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from pipelines import profiles
from pipelines.config import SITES, load_config
from pipelines.data.schema import PARTITIONS
from pipelines.fileio import atomic_path, read_json, write_json
from pipelines.profiles import Profile, ProfileError
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


def _import_data(paths: SitePaths, profile: Profile) -> bool:
    """Import the site's source once and split it into its partitions. True when something was written.

    The import (`<site>-source`) stays secret and local-only: it holds every partition. Each
    partition is a raw dataset of its own, named as the partition, with the partition's flags from
    conf/sites.yaml; its record names the import it was cut from (`extra["source"]`, `extra["split"]`)
    and shares the import's data spec and the expectations derived from its data."""
    import pyarrow.parquet as pq

    from pipelines.data.catalog import content_path, register_dataset
    from pipelines.data.importer import import_dataset
    from pipelines.data.repo import commit_files, site_lock
    from pipelines.data.spec import spec_of

    data = profile.sites[paths.site]
    marker = _build_marker(paths)
    wanted = {"profile": profile.name, "digest": profile.digest, "partitions": list(data["split"])}
    with site_lock(paths):
        if marker.exists() and read_json(marker) == wanted:
            return False
        options = {key: data[key] for key in ("label_column", "classes", "metadata_columns", "metadata", "resize")
                   if key in data}
        imported = import_dataset(paths, data["name"], data["source"], progress=False, **options)
        source = imported.version
        console.print(f"  {imported.message()}")
        table = pq.read_table(content_path(paths, source))
        spec = spec_of(source.extra)
        rows = profiles.split_rows(table.column(spec.label_column).to_numpy(), data["split"], profile.seed)
        for partition, picked in rows.items():
            if len(picked) == 0:
                raise ProfileError(f"profile {profile.path}: sites.{paths.site}.split.{partition}: no rows of the "
                                   f"{table.num_rows} in {source.id}; give it a larger fraction or more data")
            target = paths.data_dir / f"{partition}.parquet"
            with atomic_path(target) as tmp:
                pq.write_table(table.take(picked), tmp)
            register_dataset(paths, partition, target, kind="raw", extra={
                "spec": spec.to_dict(),
                "expectations": source.extra["expectations"],
                "source": {**source.extra["source"], "dataset": source.id},
                "split": {"of": source.id, "partition": partition, "fraction": data["split"][partition],
                          "seed": profile.seed, "rows": len(picked)},
            })
        write_json(marker, wanted)
        commit_files(paths, [marker], f"Build {paths.site} data (profile {profile.name})")
        return True


def _check_workspace(home: Path, profile: Profile) -> None:
    """Refuse a profile other than the one the workspace's sites were built with (nothing written)."""
    for site in SITES:
        paths = SitePaths.of(site, home)
        record = profiles.recorded(paths)
        if record is not None:
            if record.get("digest") != profile.digest:
                raise ProfileError(
                    f"{home} was built with profile {record.get('profile')!r} ({record.get('digest')}), not "
                    f"{profile.name!r} of {profile.path} ({profile.digest}); a workspace keeps the profile it was "
                    "built with: use another FACTORY_HOME for another profile")
            continue
        marker = _build_marker(paths)
        if not marker.exists():
            continue
        built = read_json(marker)
        digits = isinstance(built, dict) and "scale" in built
        if (digits and profile.imports(site)) or (not digits and built.get("digest") != profile.digest):
            what = "the digits builder" if digits else f"profile {built.get('profile')!r}"
            raise ProfileError(f"{site}'s data in {home} was built by {what}; profile {profile.name!r} of "
                               f"{profile.path} builds it otherwise: use another FACTORY_HOME for another profile")


def _init_mlflow(paths: SitePaths) -> None:
    from pipelines.learning.registry import experiment_id

    experiment_id(paths)


def init_workspace(home: Path | None = None, *, scale: int | None = None,
                   profile: Path | str | None = None) -> dict[str, dict[str, bool]]:
    """Create or complete every site's repo, remote, data, MLflow store, keys and policy pin, then exchange trust.

    `profile`: the profile file (default `conf/profiles/digits.yaml`); ProfileError before anything is
    written when it is bad or is not the one the workspace was built with."""
    from pipelines.data.repo import init_site_repo
    from pipelines.policy.pin import ensure_pin
    from pipelines.trust import audit
    from pipelines.trust.keys import ensure_site_keys, exchange_trust, signing_key_id

    home = (home or factory_home()).resolve()
    chosen = profiles.load_profile(profile)
    importing = [site for site in SITES if chosen.imports(site)]
    if scale and importing:
        raise ProfileError(f"--scale grows the bundled digits data; profile {chosen.name!r} imports the data of "
                           f"{', '.join(importing)}")
    _check_workspace(home, chosen)
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
        data_built = _import_data(paths, chosen) if chosen.imports(site) else _init_data(paths, scale)
        _init_mlflow(paths)
        summary[site] = {"repo_created": repo_created, "data_built": data_built,
                         "profile_recorded": profiles.record(paths, chosen)}
    exchange_trust(home)
    return summary


@click.command("init")
@click.option("--scale", type=click.IntRange(min=1), default=None,
              help="Augment the training data to about N records in all (load and performance runs); "
                   "test sets stay the real images. Digits data only.")
@click.option("--profile", "profile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A profile (YAML): the model family and each site's data, the digits builder or a source to "
                   "import and split into the site's partitions. Default: conf/profiles/digits.yaml.")
def init_command(scale: int | None, profile: Path | None) -> None:
    """Create FACTORY_HOME with the three sites (idempotent)."""
    from pipelines.context import StepError

    home = factory_home()
    try:
        summary = init_workspace(home, scale=scale, profile=profile)
    except (ProfileError, StepError) as exc:
        raise click.ClickException(str(exc)) from None
    changed = any(any(v.values()) for v in summary.values())
    console.print(f"workspace {'ready' if changed else 'already complete, nothing changed'}: {home}")
