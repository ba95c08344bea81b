"""CycloneDX 1.6 ML-BOM of a model: the model (with its model card), its datasets, the Python environment.

cyclonedx-python-lib builds the components; it has no `modelCard` or `data` fields yet, so those are
added to its JSON output, and the result is validated against the library's bundled 1.6 schema.
"""

from __future__ import annotations

import json
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.contact import OrganizationalEntity
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

from pipelines.fileio import file_digests, sha256_file, write_atomic
from pipelines.trust.signing import TRUST_FILES

BOM_FILE = "bom.cdx.json"
MODEL_FILE = "model.onnx"
_TRUST_FILES = set(TRUST_FILES)
_ALGORITHMS = {"sha256": HashAlgorithm.SHA_256, "sha512": HashAlgorithm.SHA_512, "md5": HashAlgorithm.MD5,
               "blake3": HashAlgorithm.BLAKE3, "sha1": HashAlgorithm.SHA_1}


class BomError(RuntimeError):
    """The BOM does not validate or does not match the model."""


def _hash(digest: str) -> HashType | None:
    algorithm, _, value = digest.partition(":")
    if not value:
        algorithm, value = "sha256", digest
    known = _ALGORITHMS.get(algorithm.lower())
    return HashType(alg=known, content=value) if known else None


def _model_files(model_dir: Path) -> dict[str, str]:
    return file_digests(model_dir, _TRUST_FILES)


def _environment() -> list[Component]:
    seen: dict[str, Component] = {}
    for dist in importlib_metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in seen:
            seen[name.lower()] = Component(
                name=name, version=dist.version, type=ComponentType.LIBRARY,
                purl=PackageURL(type="pypi", name=name.lower(), version=dist.version),
                bom_ref=f"pypi:{name.lower()}@{dist.version}",
            )
    return [seen[key] for key in sorted(seen)]


def write_ml_bom(
    model_dir: Path,
    *,
    model_name: str,
    version: str,
    metrics: dict[str, float],
    datasets: list[dict[str, str]],
    intended_use: str,
) -> Path:
    """Write `model_dir/bom.cdx.json`; `datasets` are `{id, digest, owner}`. Returns the path."""
    model_dir = Path(model_dir)
    model_file = model_dir / MODEL_FILE
    if not model_file.is_file():
        raise BomError(f"{model_dir} has no {MODEL_FILE}")
    model_ref = f"model:{model_name}@{version}"
    model = Component(
        name=model_name, version=str(version), type=ComponentType.MACHINE_LEARNING_MODEL, bom_ref=model_ref,
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=sha256_file(model_file))],
        components=[Component(name=name, type=ComponentType.FILE, bom_ref=f"file:{name}",
                              hashes=[HashType(alg=HashAlgorithm.SHA_256, content=digest)])
                    for name, digest in _model_files(model_dir).items()],
    )
    data = []
    for dataset in datasets:
        digest = _hash(dataset["digest"])
        data.append(Component(
            name=dataset["id"], type=ComponentType.DATA, bom_ref=f"data:{dataset['id']}",
            supplier=OrganizationalEntity(name=dataset["owner"]), hashes=[digest] if digest else [],
            properties=[Property(name="factory:digest", value=dataset["digest"]),
                        Property(name="factory:owner", value=dataset["owner"])],
        ))
    bom = Bom()
    bom.metadata.component = model
    environment = _environment()
    for component in [*data, *environment]:
        bom.components.add(component)
    bom.register_dependency(model, [*data, *environment])
    document = json.loads(JsonV1Dot6(bom).output_as_string())
    document["metadata"]["component"]["modelCard"] = {
        "modelParameters": {
            "task": "classification",
            "datasets": [{"ref": f"data:{d['id']}"} for d in datasets],
        },
        "quantitativeAnalysis": {
            "performanceMetrics": [{"type": name, "value": str(value)} for name, value in sorted(metrics.items())],
        },
        "considerations": {"useCases": [intended_use]},
    }
    for component in document.get("components", []):
        if component["type"] == "data":
            owner = next(d["owner"] for d in datasets if f"data:{d['id']}" == component["bom-ref"])
            component["data"] = [{"type": "dataset", "name": component["name"],
                                  "governance": {"owners": [{"organization": {"name": owner}}]}}]
    text = json.dumps(document, indent=2)
    _validate_text(text, model_dir / BOM_FILE)
    target = model_dir / BOM_FILE
    write_atomic(target, text.encode())
    return target


def _validate_text(text: str, where: Path) -> None:
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        detail = getattr(error.data, "message", str(error).splitlines()[0])
        at = "/".join(str(part) for part in getattr(error.data, "absolute_path", []))
        raise BomError(f"{where} is not a valid CycloneDX 1.6 BOM: {detail} (at /{at})")


def validate_bom(path: Path, model_dir: Path | None = None) -> dict[str, Any]:
    """Validate against the CycloneDX 1.6 schema and check the recorded file hashes against the model
    files (in `model_dir`, default the BOM's folder). Returns the BOM."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BomError(f"no BOM at {path}") from None
    _validate_text(text, path)
    document = json.loads(text)
    model_dir = Path(model_dir or path.parent)
    component = document.get("metadata", {}).get("component", {})
    if component.get("type") != "machine-learning-model" or "modelCard" not in component:
        raise BomError(f"{path} does not describe a machine-learning model with a model card")
    recorded = {c["name"]: {h["alg"]: h["content"] for h in c.get("hashes", [])}.get("SHA-256")
                for c in component.get("components", []) if c.get("type") == "file"}
    actual = _model_files(model_dir)
    for name in sorted(set(recorded) | set(actual)):
        if recorded.get(name) != actual.get(name):
            state = "missing" if name not in actual else ("not in the BOM" if name not in recorded else "changed")
            raise BomError(f"{model_dir}/{name} is {state}: the model files do not match {path}")
    return document
