"""The gate pages show the evidence: each approval task's body, rendered as Airflow renders it
(Jinja, undefined names an error) from the XComs its upstream steps return, holds the evidence
Markdown those steps built, not a path to it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest

from pipelines import evidence

DAGS = Path(__file__).resolve().parents[2] / "dags"


def _task(dag_id: str, task_id: str):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS / f"{dag_id}.py")).dags[dag_id].get_task(task_id)


class _Xcoms:
    """The `ti` of a template context: the return values of the run's tasks by task id."""

    def __init__(self, values: dict[str, dict]):
        self.values = values

    def xcom_pull(self, task_ids: str):
        return self.values[task_ids]


def _render(task, xcoms: dict[str, dict]) -> str:
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return environment.from_string(task.body).render(ti=_Xcoms(xcoms),
                                                     dag_run=SimpleNamespace(triggering_user_name="engineer"))


SANITIZATION = evidence.sanitization_md(
    {"site": "origin", "purpose": "export", "rows_in": 100, "rows_out": 97, "passed": True, "problems": [],
     "columns_removed": ["operator"], "columns_coarsened": {}, "remaining_columns": ["f00"],
     "remaining_sensitive_columns": [], "rules": [{"rule": "exact_duplicates", "reason": "copies", "count": 3}]},
    dataset={"dataset_id": "origin/export_authorized-sanitized@1", "classification": "restricted"}, lineage=[])
VALIDATION = evidence.validation_md({"success": True, "suite": "release", "checks": [
    {"expectation": "expect_column_min_to_be_between", "column": "f00", "success": True}]})


def test_data_release_gate_shows_what_sanitization_and_validation_did():
    gate = _task("stage_5_export_data_release", "release_approval")
    page = _render(gate, {
        "sanitize_dataset": {"dataset_id": "origin/export_authorized-sanitized@1", "source_id": "origin/x@0",
                             "report": "/site/repo/reports/sanitization/x.json", "passed": True,
                             "remaining_sensitive_columns": [], "evidence_md": SANITIZATION},
        "validate_release": {"dataset_id": "origin/export_authorized-sanitized@1", "success": True,
                             "evidence_md": VALIDATION}})
    assert SANITIZATION in page and VALIDATION in page
    assert "/site/repo/reports" not in page  # the content, not the path


@pytest.mark.parametrize("dag_id,task_id,upstream", [
    ("stage_5_export_review", "review_approval", "receive_review"),
    ("stage_5_export_release", "export_control_approval", "receive_approval"),
])
def test_export_gates_show_the_model_evidence_and_the_end_use(dag_id, task_id, upstream):
    model = evidence.model_md({"label": "M5", "model": "digits-cnn-m5-default/2", "metrics": {"origin_test": 0.9}},
                              [], {})
    record = {"from": "supplier", "variant": "default", "destination": "destination", "request_id": "prepare-1",
              "model": "digits-cnn-m5-default/2", "digest": "sha256:" + "0" * 64, "here": "digits-cnn-m5-default/1",
              "thresholds": {}, "end_use": "border_surveillance", "officer": "origin_officer", "comment": "",
              "requested_by": "supplier_engineer", "evidence": model, "evidence_md": model}
    page = _render(_task(dag_id, task_id), {upstream: record})
    assert model in page and "`border_surveillance`" in page
