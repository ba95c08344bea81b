"""Capability restrictions of an export variant, enforced by the service on a small real model.

The restricted model is the session's signed M4 with `restrictions` written into its metadata and
signed again (what training an export variant with the `restrictions` param records). Its answers
are compared with the unrestricted service and with the model's own logits (ONNX Runtime)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipelines.learning import restrictions as capability
from pipelines.serving.app import ServedModel, ServingError, create_app

SENSOR, BRUSSELS = "ORG-SN-0003", {"lat": 50.85, "lon": 4.35}


def _restricted_copy(paths, ref, target, restrictions, *, sign=True):
    from pipelines.trust.signing import sign_model_dir

    shutil.copytree(ref.model_dir, target)
    (target / "model.sig").unlink()
    meta = json.loads((target / "metadata.json").read_text())
    (target / "metadata.json").write_text(json.dumps({**meta, "restrictions": restrictions}))
    if sign:
        sign_model_dir(paths, target)
    return ServedModel(name="digits-cnn-m4-restricted", version="1", stage="M4", model_dir=target)


def _logits(ref, rows):
    import onnxruntime as ort

    session = ort.InferenceSession(str(ref.model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": rows})[0]


def _predict(client, rows):
    response = client.post("/predict", json={"inputs": rows.tolist(),
                                             "context": {"sensor_id": SENSOR, "location": BRUSSELS}})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def rows(in_domain_rows):
    return in_domain_rows[:200]


@pytest.fixture(scope="module")
def abstain(origin, rows):
    """The class the model predicts most often on these rows: abstaining on it must show."""
    return [int(np.bincount(_logits(origin[1], rows).argmax(axis=1), minlength=10).argmax())]


@pytest.fixture(scope="module")
def cap(origin, rows):
    """The median confidence of the (briefly trained) model on these rows: the cap must bite on half of them."""
    from scipy.special import softmax

    return float(np.median(softmax(_logits(origin[1], rows).astype(np.float64), axis=1).max(axis=1)))


@pytest.fixture(scope="module")
def restricted(origin, tokens, abstain, cap, tmp_path_factory, conf_with):
    paths, ref = origin
    model = _restricted_copy(paths, ref, tmp_path_factory.mktemp("restricted") / "model",
                             {"abstain_classes": abstain, "max_confidence": cap})
    app = create_app(paths, model, conf=conf_with(audit={"breaches_per_client": 100000}))
    with TestClient(app, headers={"Authorization": f"Bearer {tokens['test-client']}"}) as c:
        yield c


def test_abstained_classes_are_never_returned_and_confidence_never_exceeds_the_cap(restricted, origin, rows,
                                                                                   abstain, cap):
    body = _predict(restricted, rows)
    assert body["restrictions"] == {"abstain_classes": abstain, "max_confidence": cap}
    best = _logits(origin[1], rows).argmax(axis=1)
    assert set(best.tolist()) & set(abstain)  # the unrestricted model does predict them here
    for i, (prediction, output) in enumerate(zip(body["predictions"], body["outputs"], strict=True)):
        assert prediction not in abstain and output["label"] not in abstain
        if best[i] in abstain:
            assert prediction is None and output == {"label": None, "confidence": None, "abstained": True}
        else:
            assert prediction == output["label"] == int(best[i]) and output["abstained"] is False
            assert 0.0 < output["confidence"] <= cap
    assert sum(o["abstained"] for o in body["outputs"]) == int(np.isin(best, abstain).sum())
    assert any(o["confidence"] == cap for o in body["outputs"] if not o["abstained"])  # the cap did bite
    assert any(o["confidence"] < cap for o in body["outputs"] if not o["abstained"])  # and only where it is lower


def test_unrestricted_model_answers_as_before(client, origin, rows, cap):
    from scipy.special import softmax

    body = _predict(client, rows)
    logits = _logits(origin[1], rows)
    assert body["restrictions"] == {}
    assert body["predictions"] == logits.argmax(axis=1).tolist()  # the plain argmax, as before restrictions
    probabilities = softmax(logits.astype(np.float64), axis=1).max(axis=1)
    assert not any(o["abstained"] for o in body["outputs"])
    np.testing.assert_allclose([o["confidence"] for o in body["outputs"]], probabilities, rtol=1e-9)
    assert max(o["confidence"] for o in body["outputs"]) > cap  # so the cap above changed something


def test_withheld_request_returns_no_outputs(restricted, rows):
    response = restricted.post("/predict", json={"inputs": rows[:2].tolist(), "context": {"sensor_id": "DST-SN-0001"}})
    assert response.status_code == 200
    assert response.json()["predictions"] is None and response.json()["outputs"] is None


def test_restrictions_changed_after_signing_refuse_to_serve(origin, tmp_path):
    """The restriction is signed with the model: dropping it from a signed copy breaks the signature."""
    paths, ref = origin
    model = _restricted_copy(paths, ref, tmp_path / "model", {"abstain_classes": [3]})
    meta = json.loads((model.model_dir / "metadata.json").read_text())
    del meta["restrictions"]
    (model.model_dir / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ServingError, match="refusing to serve digits-cnn-m4-restricted/1"):
        create_app(paths, model, auth=False)


@pytest.mark.parametrize(("restrictions", "message"), [
    ({"abstain_classes": [3, 12]}, r"abstain_classes names no class \[12\] of this data \(class indices 0..9\)"),
    ({"abstain_classes": list(range(10))}, "leaves no class of the 10 to answer with"),
    ({"max_confidence": 0}, r"max_confidence must be a number in \(0, 1\], not 0"),
    ({"max_confidence": 1.2}, r"max_confidence must be a number in \(0, 1\], not 1.2"),
    ({"abstain": [3]}, "unknown restriction abstain"),
    ([3], "restrictions must be an object"),
])
def test_malformed_restrictions_refuse_to_serve(origin, tmp_path, restrictions, message):
    paths, ref = origin
    model = _restricted_copy(paths, ref, tmp_path / "model", restrictions)
    with pytest.raises(ServingError, match=message):
        create_app(paths, model, auth=False)


def test_parse_normalises_and_apply_without_restrictions_is_the_argmax():
    assert capability.parse({"abstain_classes": [7, 3], "max_confidence": 1}) == {
        "abstain_classes": [3, 7], "max_confidence": 1.0}
    assert capability.parse(None) == capability.parse({}) == {}
    with pytest.raises(capability.RestrictionError, match=r"names a class twice"):
        capability.parse({"abstain_classes": [3, 3]})
    with pytest.raises(capability.RestrictionError, match="list of class indices"):
        capability.parse({"abstain_classes": [True]})
    logits = np.array([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0]])
    plain = capability.apply(logits, {})
    assert plain.labels == [1, 0] and plain.abstained == [False, False]
    restricted = capability.apply(logits, {"abstain_classes": [1], "max_confidence": 0.5})
    assert restricted.labels == [None, 0] and restricted.confidences[0] is None
    assert restricted.confidences[1] == 0.5 and plain.confidences[1] > 0.5
    assert capability.describe({"abstain_classes": [3, 7], "max_confidence": 0.9}) == (
        "abstains on classes 3, 7; confidence capped at 0.9")
