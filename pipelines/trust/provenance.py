"""Provenance of a model: an in-toto Statement v1 with a SLSA Provenance v1 predicate, signed as DSSE.

Subjects are the model files (SHA-256); build type names the factory stage; external parameters are
the DAG run parameters; resolved dependencies are the input datasets, base model and code commit;
run details carry the builder (site), DAG run id and times. Approvals and any other run facts go
into `internalParameters` (`approvals`, `run`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import google.protobuf.json_format as pb_json
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
from in_toto_attestation.v1.statement import Statement
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from pipelines import __version__
from pipelines.fileio import file_digests, read_json, write_json
from pipelines.trust import keys
from pipelines.trust.signing import TRUST_FILES
from pipelines.workspace import SitePaths

PROVENANCE_FILE = "provenance.dsse.json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://sovereign-ai-factory.dev/stage/{stage}/v1"
_NOT_SUBJECTS = set(TRUST_FILES)


class ProvenanceError(RuntimeError):
    """An attestation is missing, badly signed or does not match the model files."""


def _subjects(model_dir: Path) -> dict[str, str]:
    return file_digests(model_dir, _NOT_SUBJECTS)


def _digest(value: str | dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        return value
    algorithm, _, hexdigest = value.partition(":")
    return {algorithm: hexdigest} if hexdigest else {"sha256": value}


def write_provenance(
    paths: SitePaths,
    model_dir: Path,
    *,
    stage: str,
    external_parameters: dict[str, Any],
    dependencies: list[dict[str, Any]],
    run_details: dict[str, Any],
    approvals: Iterable[dict[str, Any]] = (),
) -> Path:
    """Write `model_dir/provenance.dsse.json`, signed with the site's key. `dependencies` are
    `{name, digest}` (digest "alg:hex" or `{alg: hex}`); `run_details` may hold `dag_run_id`,
    `started_on`, `finished_on` (RFC 3339) and any other byproduct fields."""
    model_dir = Path(model_dir)
    subjects = [ResourceDescriptor(name=name, digest={"sha256": d}).pb for name, d in _subjects(model_dir).items()]
    if not subjects:
        raise ProvenanceError(f"{model_dir} holds no model files to attest")
    details = dict(run_details)
    metadata = {k: details.pop(k) for k in ("dag_run_id", "started_on", "finished_on") if k in details}
    predicate = {
        "buildDefinition": {
            "buildType": BUILD_TYPE.format(stage=stage),
            "externalParameters": external_parameters,
            "internalParameters": {"site": paths.site, "approvals": list(approvals), "run": details},
            "resolvedDependencies": [{"name": d["name"], "digest": _digest(d["digest"]),
                                      **({"uri": d["uri"]} if d.get("uri") else {})} for d in dependencies],
        },
        "runDetails": {
            "builder": {"id": f"https://sovereign-ai-factory.dev/sites/{paths.site}", "version": {"factory": __version__}},
            "metadata": {"invocationId": str(metadata.get("dag_run_id", "")),
                         **({"startedOn": metadata["started_on"]} if "started_on" in metadata else {}),
                         **({"finishedOn": metadata["finished_on"]} if "finished_on" in metadata else {})},
        },
    }
    pb_json.ParseDict(predicate, provenance_pb2.Provenance())  # schema check: SLSA v1 field names and types
    statement = Statement(subjects, SLSA_PROVENANCE_V1, predicate)
    statement.validate()
    # Serialise from the dict, not the protobuf Struct, which would turn every integer into a float.
    document = pb_json.MessageToDict(statement.pb) | {"predicate": predicate}
    payload = json.dumps(document, sort_keys=True).encode()
    private = keys.signing_key(paths)
    signer = CryptoSigner(private, SSlibKey.from_crypto(private.public_key(), keyid=keys.signing_key_id(paths)))
    envelope = Envelope(payload, PAYLOAD_TYPE, {})
    envelope.sign(signer)
    target = model_dir / PROVENANCE_FILE
    write_json(target, envelope.to_dict())
    return target


def _load_key(public_key: ec.EllipticCurvePublicKey | Path | str) -> ec.EllipticCurvePublicKey:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key
    return ser.load_pem_public_key(Path(public_key).read_bytes())


def verify_provenance(path: Path, public_key: ec.EllipticCurvePublicKey | Path | str,
                      model_dir: Path | None = None) -> dict[str, Any]:
    """Check the DSSE signature and that every subject matches the files of `model_dir` (default:
    the attestation's folder). Returns the in-toto statement."""
    path = Path(path)
    model_dir = Path(model_dir) if model_dir else path.parent
    key = _load_key(public_key)
    try:
        envelope = Envelope.from_dict(read_json(path))
    except FileNotFoundError:
        raise ProvenanceError(f"no provenance at {path}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ProvenanceError(f"{path} is not a DSSE envelope: {error}") from None
    try:
        envelope.verify([SSlibKey.from_crypto(key, keyid=keys.signing_key_id_of(key))], 1)
    except VerificationError:
        raise ProvenanceError(f"provenance signature of {path} does not verify with key {keys.signing_key_id_of(key)}") from None
    statement = json.loads(envelope.payload)
    if envelope.payload_type != PAYLOAD_TYPE or statement.get("predicateType") != SLSA_PROVENANCE_V1:
        raise ProvenanceError(f"{path} is not an in-toto SLSA provenance statement")
    attested = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    actual = _subjects(model_dir)
    for name in sorted(set(attested) | set(actual)):
        if name not in actual:
            raise ProvenanceError(f"provenance subject {name} is missing from {model_dir}")
        if name not in attested:
            raise ProvenanceError(f"{model_dir}/{name} is not covered by the provenance")
        if attested[name] != actual[name]:
            raise ProvenanceError(f"{model_dir}/{name} changed since its provenance was signed")
    return statement
