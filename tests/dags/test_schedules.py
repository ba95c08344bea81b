"""Stages 3 and 6 run when their partner's package arrives, or also on the platform team's cron from
conf/; every stage that trains on a partner's data receives it inline, at the start of its own DAG."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


@pytest.fixture(scope="module")
def default_dags():
    return _bag().dags


def test_without_cron_stages_3_and_6_wait_for_their_assets(default_dags):
    dags = default_dags
    for dag_id, uri in (("stage_3_collaborative_optimization", "factory://supplier/inbox/origin-shared"),
                        ("stage_6_destination_collaboration", "factory://supplier/inbox/destination-shared")):
        assert type(dags[dag_id].timetable).__name__ == "AssetTriggeredTimetable"
        assert uri in repr(dags[dag_id].timetable.asset_condition)


def test_cron_in_conf_adds_a_time_schedule(tmp_path, monkeypatch):
    from pipelines.config import _load

    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    stages = yaml.safe_load((conf / "stages.yaml").read_text())
    stages["schedules"]["stage_3_collaborative_optimization"] = "0 3 * * 0"
    (conf / "stages.yaml").write_text(yaml.safe_dump(stages))
    monkeypatch.setenv("FACTORY_CONF", str(conf))
    _load.cache_clear()
    try:
        dags = _bag().dags
    finally:
        _load.cache_clear()
    timetable = dags["stage_3_collaborative_optimization"].timetable
    assert type(timetable).__name__ == "AssetOrTimeSchedule"
    assert timetable.timetable._expression == "0 3 * * 0"
    assert "factory://supplier/inbox/origin-shared" in repr(timetable.asset_condition)
    assert type(dags["stage_6_destination_collaboration"].timetable).__name__ == "AssetTriggeredTimetable"


@pytest.mark.parametrize("dag_id, kind", [
    ("stage_3_collaborative_optimization", "origin-shared"),
    ("stage_5_export_preparation", "origin-export"),
    ("stage_6_destination_collaboration", "destination-shared"),
    ("stage_8_reciprocal_contribution", "destination-contribution"),
])
def test_stages_on_partner_data_receive_and_validate_it_before_training(default_dags, dag_id, kind):
    dag = default_dags[dag_id]
    receive, validate = dag.get_task("receive_dataset"), dag.get_task("validate_dataset")
    assert not receive.upstream_list and validate.upstream_list == [receive]
    assert receive.op_args[2] == {"kind": kind, "name": kind}
    assert f"factory://supplier/inbox/{kind}" in repr(dag.timetable.asset_condition)
    assert "validate_dataset" in dag.get_task("training_flow.train_model").get_flat_relative_ids(upstream=True)


def test_a_run_with_an_empty_inbox_fails_naming_the_inbox(tmp_path):
    """What a cron-triggered retraining gets before any partner data arrived (a later run with no
    new package re-uses the dataset received last)."""
    from pipelines.steps import StepContext, StepError, run_step
    from pipelines.workspace import SitePaths

    paths = SitePaths.of("supplier", tmp_path)
    ctx = StepContext(site="supplier", paths=paths, run_id="scheduled__x", dag_id="stage_3_collaborative_optimization")
    with pytest.raises(StepError, match=r"no acceptable origin-shared package in the supplier inbox"):
        run_step("receive_dataset", ctx, kind="origin-shared", name="origin-shared")
