"""Export variants are triggered with params checked by a JSON schema: bad params are refused
before anything runs, with the schema's message."""

from __future__ import annotations

from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def stage5():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS / "stage_5_export_preparation.py")).dags["stage_5_export_preparation"]


@pytest.mark.parametrize("conf,message", [
    ({"variant": "Night Variant!"}, "does not match"),
    ({"destination": "nowhere"}, "is not one of"),
    ({"subset": {"labels": []}}, "should be non-empty"),
    ({"subset": {"labels": [11]}}, "greater than the maximum"),
    ({"thresholds": {"supplier_test": 0.5}}, "less than the minimum"),
    ({"thresholds": {"made_up_metric": 0.99}}, "Additional properties are not allowed"),
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
