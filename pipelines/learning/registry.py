"""Each site's MLflow tracking store and model registry.

Registered model names follow the model family and the stage: `<family>-m1` ...
`<family>-m8` (`digits-cnn-m1` for the digits demo), export variants
`<family>-m5-<variant>`. A site registers the models it trains and the models it
receives, so `resolve_model(paths, "M3")` answers "the latest M3 this site
legitimately holds" (of the configured family, or of the one family that holds an
M3 here). A model version's artifact `model/` is a
directory: model.onnx, weights.safetensors, model_card.json, metadata.json and,
once signed, model.sig, provenance.dsse.json, bom.cdx.json.

A version revoked by a withdrawn contribution (`mark_revoked`; `pipelines.learning.revocations`)
still resolves by NAME/VERSION or alias, for inspection, but never as a stage model: `resolve_model`
of "M3" gives the newest unrevoked M3.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipelines.config import load_config
from pipelines.learning import revocations
from pipelines.workspace import SitePaths

STAGE_MODELS = ("M1", "M2", "M3", "M4", "M5", "M6", "M7", "M8")
DEFAULT_VARIANT = "default"
REVOKED_TAG = "factory.revoked"  # model-version tag: JSON {revocation_id, dataset, owner, replaced_by, at}
_FAMILY = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_REF = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


class ModelNotFound(LookupError):
    pass


def registered_name(stage: str, variant: str | None = None, *, family: str | None = None) -> str:
    """The registered name of `stage`'s model of `family` (default: conf/stages.yaml model_family)."""
    stage = stage.upper()
    if stage not in STAGE_MODELS:
        raise ModelNotFound(f"unknown stage model {stage!r}; use M1..M8, NAME@ALIAS or NAME/VERSION")
    family = family or load_config().stages.model_family
    if not _FAMILY.fullmatch(family):
        raise ModelNotFound(f"model family {family!r} is not a family name (lowercase letters, digits, '-')")
    if stage == "M5":
        return f"{family}-m5-{variant or DEFAULT_VARIANT}"
    return f"{family}-{stage.lower()}"


def client(paths: SitePaths):
    from mlflow import MlflowClient

    paths.mlflow_dir.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=paths.mlflow_uri, registry_uri=paths.mlflow_uri)


def experiment_id(paths: SitePaths, name: str | None = None) -> str:
    """The site's experiment (created on first use, artifacts under the site's mlflow folder)."""
    name = name or f"factory-{paths.site}"
    mlflow_client = client(paths)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    paths.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    return mlflow_client.create_experiment(name, artifact_location=paths.mlflow_artifacts.as_uri())


@dataclass(frozen=True)
class ModelRef:
    site: str
    name: str
    version: str
    stage: str | None
    model_dir: Path
    tags: dict[str, str]
    run_id: str | None

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads((self.model_dir / "metadata.json").read_text())

    @property
    def uri(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def revoked(self) -> dict[str, Any] | None:
        """The revocation recorded on this version's registry tag (None when it is not revoked)."""
        return _revocation_tag(self.tags.get(REVOKED_TAG))


def _revocation_tag(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        record = json.loads(value)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"revocation_id": None, "reason": f"unreadable tag {value[:80]!r}"}


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ModelNotFound(f"model source {uri} is not on this site's file store")
    return Path(unquote(parsed.path))


def _to_ref(paths: SitePaths, version) -> ModelRef:
    return ModelRef(
        site=paths.site,
        name=version.name,
        version=str(version.version),
        stage=version.tags.get("factory.stage"),
        model_dir=_local_path(version.source),
        tags=dict(version.tags),
        run_id=version.run_id,
    )


def _stage_versions(mlflow_client, paths: SitePaths, stage: str, variant: str | None, family: str | None):
    """The versions of the stage model: of `family` when given; else of the site's family (its profile's,
    else conf/stages.yaml's), or, where this site holds none of that, of the one other family of
    conf/models.yaml that it holds."""
    from pipelines.config import load_models
    from pipelines.learning.families import default_family

    if family:
        name = registered_name(stage, variant, family=family)
        return name, mlflow_client.search_model_versions(f"name='{name}'")
    name = registered_name(stage, variant, family=default_family(paths))
    versions = mlflow_client.search_model_versions(f"name='{name}'")
    if versions:
        return name, versions
    held = {}
    for other in load_models().families:
        other_name = registered_name(stage, variant, family=other)
        if other_name != name:
            found = mlflow_client.search_model_versions(f"name='{other_name}'")
            if found:
                held[other_name] = found
    if len(held) > 1:
        raise ModelNotFound(f"site {paths.site} holds {stage.upper()} of several model families "
                            f"({', '.join(sorted(held))}) and none of the configured one ({name}): name the family")
    return next(iter(held.items()), (name, []))


def resolve_model(paths: SitePaths, ref: str, *, variant: str | None = None, family: str | None = None) -> ModelRef:
    """M1..M8 (latest version this site holds; of `family` when given), NAME@ALIAS or NAME/VERSION."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(paths)
    try:
        if ref.upper() in STAGE_MODELS:
            name, versions = _stage_versions(mlflow_client, paths, ref, variant, family)
            if not versions:
                raise ModelNotFound(f"site {paths.site} holds no {ref.upper()} ({name}) yet")
            listed = revocations.revoked_models(paths)
            usable = [v for v in versions if not v.tags.get(REVOKED_TAG) and f"{v.name}/{v.version}" not in listed]
            if not usable:
                raise ModelNotFound(f"every {ref.upper()} site {paths.site} holds ({name}) is revoked "
                                    f"(`factory lineage` / the registry name each revocation)")
            return _to_ref(paths, max(usable, key=lambda v: int(v.version)))
        match = _REF.match(ref)
        if not match:
            raise ModelNotFound(f"cannot read model reference {ref!r}; use M1..M8, NAME@ALIAS or NAME/VERSION")
        if match["alias"]:
            version = mlflow_client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            version = mlflow_client.get_model_version(match["name"], match["version"])
        return _to_ref(paths, version)
    except MlflowException as error:
        raise ModelNotFound(f"site {paths.site} has no model {ref!r}: {error.message}") from None


def find_version_by_tag(paths: SitePaths, name: str, key: str, value: str) -> ModelRef | None:
    """The version of `name` carrying tag key=value (how steps stay idempotent on their inputs)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client(paths).search_model_versions(f"name='{name}' and tag.`{key}` = '{value}'")
    except MlflowException:
        return None
    return _to_ref(paths, versions[0]) if versions else None


def register(paths: SitePaths, name: str, model_dir: Path, *, run_id: str | None, tags: dict[str, str],
             aliases: tuple[str, ...] = ("current",)) -> ModelRef:
    """Register `model_dir` (already in its final place) as a new version of `name`."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(paths)
    try:
        mlflow_client.create_registered_model(name, tags={"factory.site": paths.site})
    except MlflowException as error:
        if "already exists" not in str(error).lower() and "RESOURCE_ALREADY_EXISTS" not in str(error):
            raise
    version = mlflow_client.create_model_version(name, source=model_dir.as_uri(), run_id=run_id, tags=tags)
    for alias in aliases:
        mlflow_client.set_registered_model_alias(name, alias, version.version)
    return _to_ref(paths, mlflow_client.get_model_version(name, version.version))


def list_models(paths: SitePaths) -> list[ModelRef]:
    return [_to_ref(paths, v) for v in client(paths).search_model_versions("")]


def revocation_of(paths: SitePaths, ref: ModelRef) -> dict[str, Any] | None:
    """The revocation of `ref` at this site: its registry tag, else its entry in the site's list."""
    return ref.revoked or revocations.revoked_models(paths).get(ref.uri)


def mark_revoked(paths: SitePaths, ref: ModelRef, revocation: dict[str, Any]) -> dict[str, Any]:
    """Mark `ref` revoked: first in the site's revocation list (what serving reads), then on the
    registry tag. Idempotent; a later call of the same revocation adds what it knows now
    (`replaced_by`). `revocation`: {revocation_id, dataset, owner, replaced_by, at}."""
    entry = revocations.record_revoked(paths, name=ref.name, version=ref.version,
                                       run_key=ref.tags.get("factory.run_key"), revocation=revocation)
    tag = {k: entry.get(k) for k in revocations.RECORD_KEYS}
    client(paths).set_model_version_tag(ref.name, ref.version, REVOKED_TAG, json.dumps(tag, sort_keys=True))
    return entry
