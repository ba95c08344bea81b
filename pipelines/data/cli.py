"""`factory data ...` and `factory lineage ...`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipelines.config import SITES
from pipelines.workspace import SAFE_NAME, SitePaths, WorkspaceError

SITE_OPTION = click.option("--site", required=True, type=click.Choice(SITES), help="The site whose catalog to read.")


def _paths(site: str) -> SitePaths:
    try:
        return SitePaths.of(site).require()
    except WorkspaceError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def data() -> None:
    """Dataset versions in a site's catalog."""


@data.command("list")
@SITE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def list_command(site: str, as_json: bool) -> None:
    """Show every dataset version with its status and flags."""
    from pipelines.data import catalog

    versions = catalog.list_datasets(_paths(site))
    if as_json:
        click.echo(json.dumps([v.to_dict() for v in versions], indent=2))
        return
    if not versions:
        click.echo(f"site {site} has no dataset versions")
        return
    rows = [("ID", "KIND", "OWNER", "STATUS", "CLASS", "FLAGS", "REGISTERED")]
    for v in versions:
        flags = ",".join(
            f
            for f, on in (("local-only", v.local_only), ("export-authorized", v.export_authorized))
            if on
        )
        flags += ("; to " + ",".join(v.releasable_to)) if v.releasable_to else ""
        status = v.status if v.usable else f"quarantined: {v.quarantine_reason[:60]}"
        rows.append((v.id, v.kind, v.owner, status, v.classification, flags or "-", v.registered_at[:19]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])


@data.command("show")
@SITE_OPTION
@click.argument("ref")
def show_command(site: str, ref: str) -> None:
    """Print one version's catalog record (by id, name@md5 or name for the latest)."""
    from pipelines.data import catalog

    try:
        version = catalog.get(_paths(site), ref)
    except catalog.CatalogError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(version.to_dict(), indent=2))


@data.command("import")
@click.option("--site", required=True, type=click.Choice(SITES), help="The site whose catalog receives the data.")
@click.option("--name", required=True, help="The dataset's name in the catalog.")
@click.option("--from", "source", required=True, type=click.Path(exists=True, path_type=Path),
              help="An image folder (one sub-folder per class) or a CSV / Parquet file.")
@click.option("--label-column", default="label", show_default=True, help="Tabular files: the column of labels.")
@click.option("--partition", default=None,
              help="The conf/sites.yaml partition whose flags the data takes (default: secret, local-only).")
@click.option("--resize", default=None, metavar="HxW", help="Image folders: resize every image (mixed sizes or modes).")
@click.option("--metadata", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Image folders: a CSV of per-image metadata, column 'file' = the image's path in the folder.")
@click.option("--metadata-columns", default="", metavar="A,B",
              help="Tabular files: columns that are metadata, not features (besides those conf/sanitization.yaml names).")
@click.option("--classes", default=None, metavar="A,B,...",
              help="Tabular files: the labels in class order; any other label is refused.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=None,
              help="Rows read and written at a time (default: about 64 MiB of data).")
def import_command(site: str, name: str, source: Path, label_column: str, partition: str | None, resize: str | None,
                   metadata: Path | None, metadata_columns: str, classes: str | None, chunk_rows: int | None) -> None:
    """Import an image folder or a tabular file as a raw dataset version of the site.

    Registers the DVC version, the data spec, the lineage entry naming the source and its digest, and
    a Great Expectations suite derived from the data. Bad input is refused naming the file and line,
    and nothing is registered; the same content imported twice is the same version.
    """
    from pipelines.context import StepError
    from pipelines.data.importer import import_dataset

    paths = _paths(site)
    try:
        result = import_dataset(
            paths, name, source, label_column=label_column, partition=partition, resize=resize, metadata=metadata,
            metadata_columns=[c.strip() for c in metadata_columns.split(",") if c.strip()],
            classes=[c.strip() for c in classes.split(",")] if classes is not None else None,
            chunk_rows=chunk_rows,
        )
    except StepError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(result.message())


@click.group()
def lineage() -> None:
    """Where a model or dataset came from."""


@lineage.command("show")
@SITE_OPTION
@click.argument("ref")
@click.option("--variant", default=None, help="Export variant, for M5.")
@click.option("--json", "as_json", is_flag=True, help="Print the model.lineage list the model_release gate reads.")
def show_lineage(site: str, ref: str, variant: str | None, as_json: bool) -> None:
    """Walk REF (a dataset id or name, or a model: M1..M8, name@alias, name/version) back to raw data."""
    from pipelines.data import catalog
    from pipelines.data.lineage import lineage_entries, render_text

    paths = _paths(site)
    try:
        if _is_dataset(paths, ref):
            version = catalog.get(paths, ref)
            entries = lineage_entries(paths, [version.id])
            title, base = f"dataset {version.id}", None
        else:
            title, entries, base = _model_lineage(paths, ref, variant)
    except click.ClickException:
        raise
    except Exception as exc:  # unknown model, broken catalog: one line, non-zero exit
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
    else:
        click.echo(render_text(title, entries, base))


def _is_dataset(paths: SitePaths, ref: str) -> bool:
    from pipelines.data import catalog

    if catalog._ID.match(ref):
        return True
    if "@" in ref or "/" in ref:
        return False
    return bool(catalog.list_datasets(paths, ref)) if SAFE_NAME.match(ref) else False


def _model_lineage(paths: SitePaths, ref: str, variant: str | None):
    from pipelines.learning.registry import resolve_model

    model = resolve_model(paths, ref, variant=variant) if variant else resolve_model(paths, ref)
    metadata = getattr(model, "metadata", None) or {}
    name = metadata.get("name") or getattr(model, "name", ref)
    version = metadata.get("version") or getattr(model, "version", "?")
    digest = metadata.get("digest") or getattr(model, "digest", None)
    title = f"model {ref} = {name}/{version}" + (f" ({digest})" if digest else "")
    return title, list(metadata.get("lineage") or []), metadata.get("base_model")
