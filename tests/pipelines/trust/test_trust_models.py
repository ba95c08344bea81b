"""Model signature, provenance and ML-BOM: they verify on an intact model and fail after any file change."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipelines.config import SITES
from pipelines.trust import bom, keys, packages, provenance, signing
from pipelines.workspace import SitePaths

MODEL_FILES = ("model.onnx", "model_card.json", "metadata.json")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A supplier model directory with model.sig, provenance.dsse.json and bom.cdx.json."""
    home = tmp_path_factory.mktemp("factory")
    for site in SITES:
        keys.ensure_site_keys(SitePaths.of(site, home))
    keys.exchange_trust(home)
    supplier = SitePaths.of("supplier", home)
    model = home / "M1"
    model.mkdir()
    (model / "model.onnx").write_bytes(os.urandom(2048))
    (model / "model_card.json").write_text(json.dumps({"name": "digits-cnn", "accuracy": 0.95}))
    (model / "metadata.json").write_text(json.dumps({"stage": "M1"}))
    provenance.write_provenance(
        supplier, model, stage="M1", external_parameters={"epochs": 3, "seed": 7},
        dependencies=[{"name": "supplier/train", "digest": "md5:" + "a" * 32},
                      {"name": "code", "digest": {"gitCommit": "0" * 40}}],
        run_details={"dag_run_id": "manual__1", "started_on": "2026-01-01T00:00:00Z",
                     "finished_on": "2026-01-01T00:05:00Z"},
        approvals=[{"user": "supplier_officer", "decision": "approve"}],
    )
    bom.write_ml_bom(model, model_name="digits-cnn", version="1", metrics={"accuracy": 0.95},
                     datasets=[{"id": "supplier/train", "digest": "md5:" + "a" * 32, "owner": "supplier"}],
                     intended_use="handwritten digit recognition")
    signing.sign_model_dir(supplier, model)  # last: covers the provenance and the BOM too
    return home, model


def _copy(released, tmp_path: Path) -> tuple[Path, SitePaths]:
    home, model = released
    target = tmp_path / "M1"
    shutil.copytree(model, target)
    return target, SitePaths.of("origin", home)


def _verify_all(model: Path, origin: SitePaths) -> None:
    signing.verify_model_dir(model, paths=origin, signer_site="supplier")
    provenance.verify_provenance(model / provenance.PROVENANCE_FILE, keys.public_signing_key(origin, "supplier"))
    bom.validate_bom(model / bom.BOM_FILE)


def test_intact_model_verifies(released, tmp_path):
    model, origin = _copy(released, tmp_path)
    _verify_all(model, origin)
    assert sorted(p.name for p in model.iterdir()) == sorted([*MODEL_FILES, "model.sig", "provenance.dsse.json",
                                                              "bom.cdx.json"])


def test_provenance_content(released, tmp_path):
    model, origin = _copy(released, tmp_path)
    statement = provenance.verify_provenance(model / "provenance.dsse.json", keys.public_signing_key(origin, "supplier"))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    build = statement["predicate"]["buildDefinition"]
    assert build["externalParameters"] == {"epochs": 3, "seed": 7}
    assert build["resolvedDependencies"][1] == {"name": "code", "digest": {"gitCommit": "0" * 40}}
    assert build["internalParameters"]["approvals"] == [{"user": "supplier_officer", "decision": "approve"}]
    assert statement["predicate"]["runDetails"]["metadata"]["invocationId"] == "manual__1"
    assert {s["name"] for s in statement["subject"]} == set(MODEL_FILES)  # the signature covers it instead


def test_bom_content(released, tmp_path):
    model, _ = _copy(released, tmp_path)
    document = bom.validate_bom(model / "bom.cdx.json")
    assert document["specVersion"] == "1.6"
    component = document["metadata"]["component"]
    assert component["type"] == "machine-learning-model"
    assert component["modelCard"]["quantitativeAnalysis"]["performanceMetrics"] == [{"type": "accuracy", "value": "0.95"}]
    data = [c for c in document["components"] if c["type"] == "data"]
    assert data[0]["data"][0]["governance"]["owners"] == [{"organization": {"name": "supplier"}}]
    assert any(c.get("purl", "").startswith("pkg:pypi/cryptography@") for c in document["components"])


@pytest.mark.parametrize("name", MODEL_FILES)
@pytest.mark.parametrize("change", ["modify", "delete"])
def test_every_check_fails_after_a_model_file_change(released, tmp_path, name, change):
    model, origin = _copy(released, tmp_path)
    if change == "modify":
        with (model / name).open("ab") as handle:
            handle.write(b" ")
    else:
        (model / name).unlink()
    with pytest.raises(signing.SignatureError, match=name):
        signing.verify_model_dir(model, paths=origin, signer_site="supplier")
    with pytest.raises(provenance.ProvenanceError, match=name):
        provenance.verify_provenance(model / "provenance.dsse.json", keys.public_signing_key(origin, "supplier"))
    with pytest.raises(bom.BomError, match=name):
        bom.validate_bom(model / "bom.cdx.json")


def test_every_check_fails_after_a_file_is_added(released, tmp_path):
    model, origin = _copy(released, tmp_path)
    (model / "backdoor.py").write_text("print('hi')")
    with pytest.raises(signing.SignatureError, match="backdoor.py"):
        signing.verify_model_dir(model, paths=origin, signer_site="supplier")
    with pytest.raises(provenance.ProvenanceError, match="backdoor.py"):
        provenance.verify_provenance(model / "provenance.dsse.json", keys.public_signing_key(origin, "supplier"))
    with pytest.raises(bom.BomError, match="backdoor.py"):
        bom.validate_bom(model / "bom.cdx.json")


def test_wrong_signer_key_fails(released, tmp_path):
    model, origin = _copy(released, tmp_path)
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify_model_dir(model, paths=origin, signer_site="destination")
    with pytest.raises(provenance.ProvenanceError, match="signature .* does not verify"):
        provenance.verify_provenance(model / "provenance.dsse.json", keys.public_signing_key(origin, "destination"))


def test_edited_attestation_fails(released, tmp_path):
    model, origin = _copy(released, tmp_path)
    envelope = json.loads((model / "provenance.dsse.json").read_text())
    envelope["payload"] = envelope["payload"][:-8] + "AAAAAAA="
    (model / "provenance.dsse.json").write_text(json.dumps(envelope))
    with pytest.raises(provenance.ProvenanceError, match="does not verify"):
        provenance.verify_provenance(model / "provenance.dsse.json", keys.public_signing_key(origin, "supplier"))


def test_invalid_bom_is_refused(released, tmp_path):
    model, _ = _copy(released, tmp_path)
    document = json.loads((model / "bom.cdx.json").read_text())
    document["metadata"]["component"]["modelCard"]["unexpected"] = True
    (model / "bom.cdx.json").write_text(json.dumps(document))
    with pytest.raises(bom.BomError, match="not a valid CycloneDX 1.6 BOM"):
        bom.validate_bom(model / "bom.cdx.json")


def test_model_package_round_trip_verifies_signature(released, tmp_path):
    home, model = released
    supplier, origin = SitePaths.of("supplier", home), SitePaths.of("origin", home)
    packages.seal(supplier, "origin", model, tmp_path / "m.pkg", purpose="collaboration", content_type="model")
    opened = Path(packages.open_package(origin, tmp_path / "m.pkg", tmp_path / "inbox")["path"])
    _verify_all(opened, origin)
