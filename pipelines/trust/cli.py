"""`factory package`, `factory keys` and `factory audit`. Errors: exit 1 and one line on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from pathlib import Path
from typing import Any

import click

from pipelines.config import SITES
from pipelines.workspace import SitePaths, WorkspaceError

SITE = click.Choice(SITES)
AS_SITE = click.option("--as", "site", type=SITE, required=True, help="the site that receives")
IN_FILE = click.option("--in", "src", type=click.Path(path_type=Path), required=True)


def _fail(prefix: str, message: str) -> None:
    click.echo(f"{prefix}: {message}".replace("\n", " "), err=True)
    sys.exit(1)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the trust layer's errors into one stderr line and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipelines.trust.audit import AuditError
        from pipelines.trust.keys import TrustError
        from pipelines.trust.packages import PackageRejected, SealError
        from pipelines.trust.signing import SignatureError

        try:
            return fn(*args, **kwargs)
        except PackageRejected as error:
            _fail("rejected", error.reason)
        except AuditError as error:
            _fail("audit log broken", str(error))
        except (TrustError, SealError, SignatureError, WorkspaceError, FileExistsError, OSError) as error:
            _fail("error", str(error))

    return wrapper


# ---------------------------------------------------------------- package


@click.group()
def package() -> None:
    """Seal, open and verify packages exchanged between sites."""


@package.command("seal")
@click.option("--from", "sender", type=SITE, required=True, help="sending site (signs the package)")
@click.option("--to", "recipient", type=SITE, required=True, help="recipient site (the only one that can open it)")
@click.option("--in", "src", type=click.Path(path_type=Path), required=True, help="file or directory to seal")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="package file to write")
@click.option("--purpose", default="collaboration", show_default=True)
@click.option("--content-type", default=None, help="dataset or model (default: model if the folder has model.sig)")
@click.option("--kem", type=click.Choice(["mlkem768-x25519", "x25519"]), default="mlkem768-x25519", show_default=True)
@click.option("--expires-days", type=float, default=7.0, show_default=True)
@_guarded
def seal_command(sender: str, recipient: str, src: Path, out: Path, purpose: str, content_type: str | None,
                 kem: str, expires_days: float) -> None:
    """Seal PATH for one recipient site."""
    from pipelines.trust import packages

    if content_type is None:
        content_type = "model" if (src / "model.sig").is_file() else "dataset"
    header = packages.seal(SitePaths.of(sender), recipient, src, out, purpose=purpose, content_type=content_type,
                           expires_in=timedelta(days=expires_days), kem=kem)
    click.echo(json.dumps({k: header[k] for k in ("package_id", "sequence", "content_digest", "content_size")}
                          | {"out": str(out)}))


@package.command("open")
@click.option("--as", "site", type=SITE, required=True, help="the recipient site opening the package")
@IN_FILE
@click.option("--out", type=click.Path(path_type=Path), required=True, help="folder to put the content in")
@_guarded
def open_command(site: str, src: Path, out: Path) -> None:
    """Verify and open a package (consumes it: it cannot be opened again)."""
    from pipelines.trust import packages

    header = packages.open_package(SitePaths.of(site), src, out)
    click.echo(json.dumps({k: header[k] for k in ("package_id", "sender", "sequence", "content_type", "path")}))


@package.command("verify")
@AS_SITE
@IN_FILE
@_guarded
def verify_command(site: str, src: Path) -> None:
    """Verify a package completely without writing plaintext or consuming it."""
    from pipelines.trust import packages

    header = packages.verify_package(SitePaths.of(site), src)
    header.pop("wrapped_key", None)
    click.echo(json.dumps(header, indent=2))


# ---------------------------------------------------------------- keys


@click.group()
def keys() -> None:
    """List, rotate, accept and revoke site keys; change the passphrase of the private keys."""


@keys.command("list")
@click.option("--site", type=SITE, required=True)
@click.option("--json", "as_json", is_flag=True)
@_guarded
def keys_list(site: str, as_json: bool) -> None:
    from pipelines.trust import keys as k

    rows = k.list_keys(SitePaths.of(site))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        owner = "own" if row["own"] else "trusted"
        click.echo(f"{row['site']:<12} {owner:<8} gen {row['generation']:<3} {row['status']:<10} "
                   f"signing {row['signing_key_id']}  kem {row['kem_key_id']}  {row['created']}")


@keys.command("rotate")
@click.option("--site", type=SITE, required=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default=None,
              help="where to write the key-update documents (default: the site's state/outbox)")
@_guarded
def keys_rotate(site: str, out_dir: Path | None) -> None:
    """New keys for SITE, plus one key-update document per trusted site (deliver each to it)."""
    from pipelines.trust import rotation

    for path in rotation.rotate_keys(SitePaths.of(site), out_dir):
        click.echo(str(path))


@keys.command("accept")
@AS_SITE
@IN_FILE
@_guarded
def keys_accept(site: str, src: Path) -> None:
    """Take another site's key-update document into SITE's trust store."""
    from pipelines.trust import rotation

    record = rotation.accept_key_update(SitePaths.of(site), src)
    click.echo(f"accepted {record['site']} generation {record['generation']} (signing {record['signing_key_id']})")


@keys.command("passphrase")
@click.option("--site", type=SITE, required=True)
@click.option("--from-env", "from_env", is_flag=True,
              help="the new passphrase is the one the environment gives: FACTORY_KEY_PASSPHRASE_<SITE>, "
                   "else the file FACTORY_KEY_PASSPHRASE_FILE names, else FACTORY_KEY_PASSPHRASE")
@click.option("--file", "file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="the new passphrase is the first line of this file (outside FACTORY_HOME)")
@_guarded
def keys_passphrase(site: str, from_env: bool, file: Path | None) -> None:
    """Re-encrypt SITE's private keys with a new passphrase and remove the generated secret file.

    Afterwards every process of SITE needs the passphrase from its environment (with --file:
    FACTORY_KEY_PASSPHRASE_FILE=FILE)."""
    from pipelines.trust import keys as k
    from pipelines.trust import rotation

    if from_env == (file is not None):
        _fail("error", "give exactly one of --from-env and --file")
    paths = SitePaths.of(site)
    if file is not None:
        new, source = k.read_passphrase_file(paths, file), f"file {file}"
    else:
        configured = k.configured_passphrases(paths)
        if not configured:
            _fail("error", f"no passphrase in the environment: set {k.site_passphrase_env(paths)}, "
                           f"{k.PASSPHRASE_FILE_ENV} or {k.PASSPHRASE_ENV}")
        source, new = configured[0]
    count = rotation.change_passphrase(paths, new, source)
    click.echo(f"{count} key files of {site} re-encrypted with the passphrase from {source}")
    if file is not None:
        click.echo(f"set {k.PASSPHRASE_FILE_ENV}={file} for every process of {site}")


@keys.command("revoke")
@click.option("--site", type=SITE, required=True, help="the site whose trust store records the revocation")
@click.option("--key-id", required=True)
@click.option("--reason", default="")
@_guarded
def keys_revoke(site: str, key_id: str, reason: str) -> None:
    from pipelines.trust import rotation

    entry = rotation.revoke_key(SitePaths.of(site), key_id, reason)
    click.echo(f"revoked {entry['key_id']} of {entry['site']} at {site}")


# ---------------------------------------------------------------- audit


@click.group()
def audit() -> None:
    """Verify, show and export the site's audit log."""


@audit.command("verify")
@click.option("--site", type=SITE, required=True)
@click.option("--witnessed", "witnessed_files", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              multiple=True, help="heads of SITE a partner witnessed (`factory audit witnessed` on its machine); "
                                  "repeatable")
@_guarded
def audit_verify(site: str, witnessed_files: tuple[Path, ...]) -> None:
    """Check SITE's log: chain, signatures, its signed head and every head its partners witnessed.

    Partners under the same FACTORY_HOME are read directly; partners elsewhere export theirs with
    `factory audit witnessed` and pass them with --witnessed."""
    from pipelines.trust import audit as a

    paths = SitePaths.of(site)
    heads = [head for partner in SITES if partner != site for head in a.witnessed_heads(SitePaths.of(partner), site)]
    for file in witnessed_files:
        heads += a.load_witnessed(file, site)
    a.verify(paths, heads)
    click.echo(f"audit log of {site} intact: {sum(1 for _ in a.entries(paths))} entries, "
               f"{len(heads)} heads witnessed by partners found in it")


@audit.command("witnessed")
@click.option("--site", type=SITE, required=True, help="the witnessing site (whose records are exported)")
@click.option("--of", "of", type=SITE, required=True, help="the partner whose heads SITE witnessed")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True)
@_guarded
def audit_witnessed(site: str, of: str, out: Path) -> None:
    """Export the heads of OF's audit log that SITE witnessed, for `factory audit verify --witnessed`."""
    from pipelines.trust import audit as a

    count = a.export_witnessed(SitePaths.of(site), of, out)
    click.echo(f"{count} heads of {of} witnessed by {site} written to {out}")


@audit.command("show")
@click.option("--site", type=SITE, required=True)
@click.option("--json", "as_json", is_flag=True)
@_guarded
def audit_show(site: str, as_json: bool) -> None:
    from pipelines.trust import audit as a

    rows = list(a.entries(SitePaths.of(site)))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for e in rows:
        click.echo(f"{e['seq']:>6} {e['time']} {e['actor']:<24} {e['action']:<20} {e['outcome']:<9} {e['object']}")


@audit.command("export")
@click.option("--site", type=SITE, required=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="file to write (default: stdout)")
@_guarded
def audit_export(site: str, out: Path | None) -> None:
    """SIEM export: one JSON event per line (time, site, actor, action, object, outcome, ...)."""
    from pipelines.fileio import write_atomic
    from pipelines.trust import audit as a

    paths = SitePaths.of(site)
    a.verify(paths)
    lines = "".join(json.dumps(a.siem_record(e), sort_keys=False) + "\n" for e in a.entries(paths))
    if out is None:
        click.echo(lines, nl=False)
    else:
        write_atomic(out, lines.encode())


@audit.command("report")
@click.option("--site", type=SITE, required=True)
@click.option("--since", default=None, help="only entries from this date (YYYY-MM-DD, UTC) or ISO time on")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="the HTML file to write")
@_guarded
def audit_report(site: str, since: str | None, out: Path) -> None:
    """Compliance report of SITE: every gate decision, approval, release, receipt, quarantine and key
    event with who, when, why and on which evidence, the audit chain's verification at the top.

    A broken chain does not stop the report: it says so at the top, naming the first bad entry, and
    the command exits with status 2."""
    from pipelines.trust import compliance

    try:
        result = compliance.write_report(SitePaths.of(site), out, compliance.parse_since(since))
    except compliance.ReportError as error:
        _fail("error", str(error))
    click.echo(f"{result['listed']} entries of {site} listed in {out}; audit chain "
               + ("verified" if result["verified"] else f"BROKEN: {result['message']}"))
    if not result["verified"]:
        sys.exit(2)
