"""`factory policy eval`, `test`, `digest` and `pin`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click

from pipelines.config import SITES


@click.group()
def policy() -> None:
    """Policy gates: evaluate a gate, run the Rego tests, pin the bundle a site trusts."""


@policy.command("eval")
@click.option("--gate", required=True, help="data_access, data_release, model_release, approval, ...")
@click.option("--input", "input_file", required=True, type=click.File("r"), help="gate input JSON file, - for stdin")
@click.option("--site", default=None, help="also append the decision to this site's audit log")
def eval_command(gate: str, input_file, site: str | None) -> None:
    """Print the decision {"allow": ..., "reasons": [...]}; exit 0 allowed, 1 denied, 2 bad input."""
    from pipelines.policy import evaluate, gates
    from pipelines.policy.bundle import BundleError

    try:
        known = gates()
    except BundleError:
        known = None  # the bundle does not load: evaluate() denies, saying why (and audits it with --site)
    if known is not None and gate not in known:
        raise click.UsageError(f"unknown gate {gate!r}; gates are {', '.join(known)}")
    try:
        document = json.load(input_file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise click.BadParameter(f"{input_file.name} is not JSON: {error}", param_hint="--input") from None
    except OSError as error:
        raise click.BadParameter(f"cannot read {input_file.name}: {error}", param_hint="--input") from None
    decision = evaluate(gate, document, site=site)
    click.echo(json.dumps(decision.to_dict()))
    from pipelines.policy.bundle import policy_root

    used = f"policy bundle {decision.bundle_digest} ({policy_root()}), engine {decision.engine}"
    if decision.bundle_revision is not None:
        used += f", OPA bundle revision {decision.bundle_revision}"
    click.echo(used + (f"; checked against the pin of {site}" if site else "; compared with no site's pin (no --site)"),
               err=True)
    sys.exit(0 if decision.allow else 1)


@policy.command("digest")
@click.option("--policies", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="policy folder (default: the one in effect, FACTORY_POLICIES or policies/)")
def digest_command(policies: Path | None) -> None:
    """Print the bundle digest of a policy folder (a site's pin; an OPA bundle's --revision)."""
    from pipelines.policy.bundle import BundleError, load_bundle

    try:
        click.echo(load_bundle(policies.resolve() if policies else None).digest)
    except BundleError as error:
        raise click.ClickException(str(error)) from None


@policy.command("pin")
@click.option("--site", required=True, type=click.Choice(SITES))
@click.option("--policies", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="policy folder to trust (default: the one in effect, FACTORY_POLICIES or policies/)")
@click.option("--by", "actor", default=None, help="who reviewed the change (audit actor; default the site's service)")
@click.option("--reason", default="", help="why the pin changes (recorded in the audit log)")
def pin_command(site: str, policies: Path | None, actor: str | None, reason: str) -> None:
    """Pin SITE to a policy bundle after a reviewed policy change (audited as policy.pinned)."""
    from pipelines.policy.bundle import BundleError, policy_root
    from pipelines.policy.pin import PinError, write_pin
    from pipelines.workspace import SitePaths

    try:
        record = write_pin(SitePaths.of(site), (policies or policy_root()).resolve(), actor=actor, reason=reason)
    except (BundleError, PinError) as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # no keys, no audit log: the pin is not changed
        raise click.ClickException(f"site {site} not pinned: {type(error).__name__}: {error}") from None
    previous = record["previous"] or "no pin"
    click.echo(f"{site} pinned to {record['digest']} ({record['policies']}); was {previous}")


@policy.command("test")
@click.option("--coverage", is_flag=True, help="print per-file line coverage of the policies")
@click.option("--min-coverage", type=float, default=None, help="fail when a policy file is covered below this %")
def test_command(coverage: bool, min_coverage: float | None) -> None:
    """Run every test_* rule of every *_test.rego (and `opa test policies/` when opa is on PATH)."""
    from pipelines.policy.bundle import load_bundle
    from pipelines.policy.testing import run_all

    bundle = load_bundle()
    results, lines = run_all(bundle.root, coverage=coverage or min_coverage is not None)
    for result in results:
        mark = "PASS" if result.passed else "FAIL"
        detail = "" if result.passed else f"  ({result.detail})"
        click.echo(f"{mark} {result.test.id}{detail}")
    failed = sum(not r.passed for r in results)
    click.echo(f"regorus: {len(results) - failed} passed, {failed} failed")
    low = []
    if lines:
        click.echo("coverage:")
        for path, (covered, total) in sorted(lines.items()):
            percent = 100.0 * covered / total if total else 0.0
            shown = f"{covered}/{total} lines" if total else "not reached by any test"
            click.echo(f"  {path}: {percent:.1f}% ({shown})")
            if min_coverage is not None and percent < min_coverage:
                low.append(path)
        if low:
            click.echo(f"below {min_coverage:g}% coverage: {', '.join(low)}")
    opa_failed = False
    opa = shutil.which("opa")
    if opa:
        click.echo(f"opa test {bundle.root}:")
        opa_failed = subprocess.run([opa, "test", str(bundle.root)], check=False).returncode != 0
    else:
        click.echo("opa: not on PATH, `opa test` skipped")
    sys.exit(1 if failed or low or opa_failed or not results else 0)
