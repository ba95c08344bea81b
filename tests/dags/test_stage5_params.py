"""Export variants are triggered with params checked by a JSON schema: bad params are refused
before anything runs, with the schema's message. The params belong to the supplier's preparation
DAG, which records them with the export request; the origin's review and the supplier's release
take no params (the release reads the recorded request)."""

from __future__ import annotations

from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


def _dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS / f"{dag_id}.py")).dags[dag_id]


@pytest.fixture(scope="module")
def stage5():
    return _dag("stage_5_export_preparation")


@pytest.mark.parametrize("conf,message", [
    ({"variant": "Night Variant!"}, "does not match"),
    ({"destination": "nowhere"}, "is not one of"),
    ({"subset": {"labels": []}}, "should be non-empty"),
    ({"subset": {"labels": [-1]}}, "less than the minimum"),
    ({"subset": {"classes": [1]}}, "Additional properties are not allowed"),
    ({"thresholds": {"supplier_test": 0.5}}, "less than the minimum"),
    ({"thresholds": {"made_up_metric": 0.99}}, "Additional properties are not allowed"),
    ({"end_use": "Targeting!"}, "does not match"),
    ({"restrictions": {"abstain_classes": []}}, "should be non-empty"),
    ({"restrictions": {"abstain_classes": [3, 3]}}, "has non-unique elements"),
    ({"restrictions": {"abstain_classes": [-1]}}, "less than the minimum"),
    ({"restrictions": {"max_confidence": 0}}, "less than or equal to the minimum"),
    ({"restrictions": {"max_confidence": 1.5}}, "greater than the maximum"),
    ({"restrictions": {"hide": [3]}}, "Additional properties are not allowed"),
])
def test_bad_params_are_refused_with_the_schema_message(stage5, conf, message):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    params = ParamsDict(stage5.params)
    with pytest.raises(ParamValidationError) as error:  # what a trigger with this conf gets back
        params.update(conf)
        params.validate()
    assert message.lower() in str(error.value).lower()


def test_stricter_thresholds_and_defaults_are_accepted(stage5):
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(stage5.params)
    params.update({"variant": "night-v2", "thresholds": {"supplier_test": 0.95}, "subset": {"labels": [0, 1, 7]}})
    assert params.validate()["thresholds"] == {"supplier_test": 0.95}
    assert params.validate()["end_use"] == "evaluation"  # the destination licence's default (policy data)
    assert params.validate()["restrictions"] == {}  # no capability restriction unless asked
    params.update({"restrictions": {"abstain_classes": [3, 7], "max_confidence": 0.9}})
    assert params.validate()["restrictions"] == {"abstain_classes": [3, 7], "max_confidence": 0.9}


def test_the_params_go_into_the_export_request_sent_for_review(stage5):
    request = stage5.get_task("request_review")
    _, site, params = request.op_args
    assert site == "supplier" and params["recipient"] == "origin" and params["kind"] == "m5-review"
    assert {params[name] for name in ("destination", "variant", "thresholds", "end_use")} == {
        "{{ params.destination }}", "{{ params.variant }}", "{{ params.thresholds }}", "{{ params.end_use }}"}
    assert "training_flow.register_model" in request.get_flat_relative_ids(upstream=True)


def test_restrictions_go_into_training_and_the_request(stage5):
    """The variant's restrictions are trained into the model's signed metadata; the request checks them."""
    _, _, train = stage5.get_task("training_flow.train_model").op_args
    _, _, request = stage5.get_task("request_review").op_args
    assert train["restrictions"] == request["restrictions"] == "{{ params.restrictions }}"


@pytest.mark.parametrize("dag_id", ["stage_5_export_review", "stage_5_export_release"])
def test_review_and_release_take_no_params(dag_id):
    dag = _dag(dag_id)
    assert not dict(dag.params), f"{dag_id} takes params {sorted(dag.params)}"


def test_release_takes_its_parameters_from_the_request_and_needs_export_control():
    dag = _dag("stage_5_export_release")
    release = dag.get_task("release_export")
    _, site, params = release.op_args
    assert site == "supplier" and params["kind"] == "m5" and params["recipient"] == "destination"
    assert not {"variant", "thresholds", "model"} & set(params)
    upstream = release.get_flat_relative_ids(upstream=True)
    assert {"receive_approval", "export_control_approval"} <= upstream
    assert dag.get_task("export_control_approval").assigned_users == [{"id": "supplier_export_officer",
                                                                       "name": "supplier_export_officer"}]


def test_origin_officer_answers_at_the_origin():
    dag = _dag("stage_5_export_review")
    gate = dag.get_task("review_approval")
    assert gate.owner_site == "origin" and [u["id"] for u in gate.assigned_users] == ["origin_officer"]
    assert "site:origin" in dag.tags and dag.get_task("send_approval").op_args[2]["recipient"] == "supplier"
