"""What a request row of the served model is: its width from the model's metadata spec, the input
envelope from conf/odd.yaml per family or from the training data's range, and the refusals to start."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from pipelines.data.spec import DataSpec
from pipelines.serving.odd import input_envelope

SERVICE = {"input_envelopes": {"digits-cnn": {"min": 0.0, "max": 1.0}}, "derived_envelope_margin": 0.1}
TABLE = DataSpec(kind="tabular", input_shape=(3,), feature_columns=("a", "b", "c"), classes=("x", "y"))


def test_a_configured_family_has_the_conf_envelope_on_every_feature():
    envelope = input_envelope("digits-cnn", {}, 64, SERVICE)
    assert envelope.low.tolist() == [0.0] * 64 and envelope.high.tolist() == [1.0] * 64
    assert envelope.source == "conf/odd.yaml service.input_envelopes.digits-cnn"
    x = np.array([[0.2] * 64], dtype=np.float32)
    np.testing.assert_array_equal(envelope.scaled(x), x)  # the digits' ODD statistics are unchanged


def test_another_family_gets_the_training_range_widened_by_the_margin():
    metadata = {"input_envelope": {"min": [0.0, -10.0, 5.0], "max": [2.0, 30.0, 5.0]}}
    envelope = input_envelope("tabular-mlp", metadata, 3, SERVICE)
    np.testing.assert_allclose(envelope.low, [-0.2, -14.0, 4.5])  # constant feature: 0.1 * max(|5|, 1)
    np.testing.assert_allclose(envelope.high, [2.2, 34.0, 5.5])
    assert envelope.outside(np.array([[2.3, 0.0, 5.0]])).tolist() == [[True, False, False]]


@pytest.mark.parametrize(("family", "metadata", "service", "message"), [
    ("tabular-mlp", {}, SERVICE, "no input envelope for family 'tabular-mlp'"),
    ("tabular-mlp", {"input_envelope": {"min": [0.0], "max": [1.0]}}, SERVICE, "holds 1 and 1 bounds for 3 features"),
    ("tabular-mlp", {"input_envelope": {"min": [0, 0, 2], "max": [1, 1, 1]}}, SERVICE, "a min above its max"),
    ("digits-cnn", {}, {"input_envelopes": {"digits-cnn": {"min": 1.0, "max": 1.0}}}, "min 1.0 must be below max"),
    ("digits-cnn", {}, {"input_envelopes": {"digits-cnn": [0, 1]}}, "must be {min: number, max: number}"),
    ("tabular-mlp", {"input_envelope": {"min": [0, 0, 0], "max": [1, 1, 1]}}, {"derived_envelope_margin": 0},
     "derived_envelope_margin must be above 0"),
])
def test_an_unusable_envelope_is_refused_naming_the_problem(family, metadata, service, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        input_envelope(family, metadata, 3, service)


def _resigned(origin, copy, **changes):
    from pipelines.trust.signing import sign_model_dir

    meta = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**meta, **changes}))
    (copy / "model.sig").unlink()
    sign_model_dir(origin[0], copy)
    return replace(origin[1], model_dir=copy)


def test_service_refuses_a_model_whose_graph_and_spec_disagree(origin, tampered_copy, tokens):
    from pipelines.serving.app import ServingError, create_app

    ref = _resigned(origin, tampered_copy, family="tabular-mlp", spec=TABLE.to_dict(),
                    input_envelope={"min": [0, 0, 0], "max": [1, 1, 1]})
    with pytest.raises(ServingError, match="takes rows of 64 features; its metadata spec says 3"):
        create_app(origin[0], ref)


def test_service_refuses_a_model_without_an_input_envelope(origin, tampered_copy, tokens):
    from pipelines.serving.app import ServingError, create_app

    ref = _resigned(origin, tampered_copy, family="tabular-mlp")
    with pytest.raises(ServingError, match="no input envelope for family 'tabular-mlp'"):
        create_app(origin[0], ref)


def test_service_refuses_a_body_limit_below_one_row(origin, tokens, conf_with):
    from pipelines.serving.app import ServingError, create_app

    with pytest.raises(ServingError, match="max_body_bytes 1000 cannot hold one request row .* \\(64 values"):
        create_app(*origin, conf=conf_with(max_body_bytes=1000))
