"""`factory policy eval` and `factory policy test`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import click


@click.group()
def policy() -> None:
    """Policy gates: evaluate a gate, run the Rego tests."""


@policy.command("eval")
@click.option("--gate", required=True, help="data_access, data_release, model_release, approval, ...")
@click.option("--input", "input_file", required=True, type=click.File("r"), help="gate input JSON file, - for stdin")
@click.option("--site", default=None, help="also append the decision to this site's audit log")
def eval_command(gate: str, input_file, site: str | None) -> None:
    """Print the decision {"allow": ..., "reasons": [...]}; exit 0 allowed, 1 denied, 2 bad input."""
    from pipelines.policy import evaluate, gates

    known = gates()
    if gate not in known:
        raise click.UsageError(f"unknown gate {gate!r}; gates are {', '.join(known)}")
    try:
        document = json.load(input_file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise click.BadParameter(f"{input_file.name} is not JSON: {error}", param_hint="--input") from None
    except OSError as error:
        raise click.BadParameter(f"cannot read {input_file.name}: {error}", param_hint="--input") from None
    decision = evaluate(gate, document, site=site)
    click.echo(json.dumps(decision.to_dict()))
    sys.exit(0 if decision.allow else 1)


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
