"""`factory privacy audit`: an officer runs this site's membership-inference audit of a model it holds.

The same audit the intake and the export review run (pipelines.protection.membership.owner_audit):
members are the rows this site released that the model's lineage reaches, non-members this site's
test set; `--members` / `--non-members` name other dataset versions of this site's catalog. Only the
figures are printed and recorded (`model.membership_audit` in the audit log; the version's registry tags
for the standard audit only).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import click

from pipelines.config import SITES


@click.group("privacy")
def privacy() -> None:
    """Privacy of the data in the models this site holds (membership-inference audits)."""


@privacy.command("audit")
@click.option("--site", required=True, type=click.Choice(list(SITES)), help="the auditing site (the data owner)")
@click.option("--model", "model", required=True, help="a model this site holds: M1..M8, NAME/VERSION or NAME@ALIAS")
@click.option("--members", multiple=True, help="member dataset versions of this site (default: from the lineage)")
@click.option("--non-members", "non_members", multiple=True,
              help="non-member dataset versions of this site (default: the test set it evaluates received models on)")
@click.option("--samples", default=None, type=click.IntRange(2, None), help="records of each side at most")
@click.option("--seed", default=None, type=int, help="seed of the member/non-member draw")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def audit_command(site: str, model: str, members: tuple[str, ...], non_members: tuple[str, ...], samples: int | None,
                  seed: int | None, as_json: bool) -> None:
    """Audit MODEL at SITE: loss-threshold attack AUC, TPR at 1 % FPR and advantage; exits 1 when
    no audit could be made (the reason is printed)."""
    from pipelines.config import load_config
    from pipelines.learning import registry
    from pipelines.protection import membership
    from pipelines.workspace import SitePaths, WorkspaceError

    try:
        paths = SitePaths.of(site)
        ref = registry.resolve_model(paths, model)
    except (WorkspaceError, registry.ModelNotFound) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        test_sets = load_config().stages.inputs.received_test_sets(site)
    except KeyError:
        test_sets = {}
    custom = bool(members or non_members or samples is not None or seed is not None)
    if custom:
        meta = ref.metadata
        chosen_members = list(members) or membership.released_members(paths, meta)
        chosen_non = list(non_members) or list(test_sets.values())[:1]
        options = {k: v for k, v in (("samples", samples), ("seed", seed)) if v is not None}
        try:
            result = membership.audit_model(paths, ref.model_dir, chosen_members, chosen_non, **options)
        except Exception as exc:  # noqa: BLE001 - bad input: nothing is recorded (an earlier audit's tags stay)
            raise click.ClickException(f"no audit of {ref.uri} with members {', '.join(chosen_members) or 'none'} "
                                       f"and non-members {', '.join(chosen_non) or 'none'}: {str(exc)[:300]}") from None
    else:
        result = membership.owner_audit(paths, ref.model_dir, test_sets)
    actor = os.environ.get("FACTORY_ACTOR") or f"svc-{site}"
    if not result.get("no_members"):
        membership.record_audit(SimpleNamespace(paths=paths, site=site), ref, result, actor=actor, tags=not custom)
    result = {"model": ref.uri, "site": site, **result}
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        click.echo(f"{ref.uri} at {site} ({result.get('model_digest')}): {membership.summary(result)}")
    if not result.get("audited"):
        raise SystemExit(1)
