"""Stages 3 and 6 run on their asset trigger, or also on the platform team's cron from conf/."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_without_cron_stages_3_and_6_wait_for_their_assets():
    dags = _bag().dags
    for dag_id, uri in (("stage_3_collaborative_optimization", "factory://supplier/datasets/origin-shared"),
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
    assert "factory://supplier/datasets/origin-shared" in repr(timetable.asset_condition)
    assert type(dags["stage_6_destination_collaboration"].timetable).__name__ == "AssetTriggeredTimetable"
