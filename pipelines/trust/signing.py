"""Model signatures with OpenSSF model-signing (key-based, the site's ECDSA P-256 key).

The signature (`model.sig`, a Sigstore bundle) covers every file of the model directory but itself,
the provenance attestation and the ML-BOM included (they are written first); any changed, added or
removed file makes verification fail.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from model_signing import hashing, signing, verifying

from pipelines.fileio import write_atomic
from pipelines.trust import keys
from pipelines.workspace import SitePaths

SIGNATURE_FILE = "model.sig"
TRUST_FILES = (SIGNATURE_FILE, "provenance.dsse.json", "bom.cdx.json")


class SignatureError(RuntimeError):
    """A model signature is missing or does not verify."""


def _hashing(model_dir: Path) -> hashing.Config:
    return hashing.Config().set_ignored_paths(paths=[model_dir / SIGNATURE_FILE])


def sign_model_dir(paths: SitePaths, model_dir: Path) -> Path:
    """Sign `model_dir` with the site's current signing key; returns the `model.sig` path."""
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise SignatureError(f"{model_dir} is not a model directory")
    key_file = keys.signing_key_file(paths)
    target = model_dir / SIGNATURE_FILE
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".signing-") as scratch:
        tmp = Path(scratch) / SIGNATURE_FILE
        (
            signing.Config()
            .use_elliptic_key_signer(private_key=key_file, password=keys.site_secret(paths))
            .set_hashing_config(_hashing(model_dir))
            .sign(model_dir, tmp)
        )
        write_atomic(target, tmp.read_bytes())
    return target


def verify_model_dir(
    model_dir: Path,
    public_key_pem: Path | None = None,
    *,
    paths: SitePaths | None = None,
    signer_site: str | None = None,
) -> None:
    """Verify `model_dir/model.sig` against a PEM public key file, or against the keys `paths` holds
    for `signer_site` (this site or a configured partner: a name from a model's metadata or a package
    is looked up, never made into a path). Raises SignatureError saying what failed."""
    model_dir = Path(model_dir).resolve()
    signature = model_dir / SIGNATURE_FILE
    if not signature.is_file():
        raise SignatureError(f"{model_dir} has no {SIGNATURE_FILE}")
    with tempfile.TemporaryDirectory(prefix="factory-verify-") as scratch:
        if public_key_pem is not None:
            candidates = [Path(public_key_pem)]
        else:
            if paths is None or signer_site is None:
                raise ValueError("pass public_key_pem, or paths and signer_site")
            gone = keys.revoked(paths)
            try:
                known = keys.records(paths, signer_site)
            except keys.TrustError as error:
                raise SignatureError(f"signer refused: {error}") from None
            usable = [r for r in known if r["signing_key_id"] not in gone]
            if not usable:
                raise SignatureError(f"{paths.site!r} trusts no (unrevoked) signing key of {signer_site!r}")
            candidates = []
            for record in sorted(usable, key=lambda r: -r["generation"]):  # newest first; rotated keys still count
                candidates.append(Path(scratch) / f"{record['signing_key_id']}.pem")
                candidates[-1].write_text(record["signing_public"])
        failure: Exception | None = None
        for candidate in candidates:
            try:
                (
                    verifying.Config()
                    .use_elliptic_key_verifier(public_key=candidate)
                    .set_hashing_config(_hashing(model_dir))
                    .verify(model_dir, signature)
                )
                return
            except Exception as error:  # model-signing raises ValueError and others for any mismatch
                failure = error
        raise SignatureError(f"signature of {model_dir.name} does not verify: {failure}")
