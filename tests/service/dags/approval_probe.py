"""Test DAG for the service tests: a step, an origin data-release approval gate, a release step.

The release step writes `origin/state/released/<run_id>.json` only when the gate's
answer holds (verified_approval).
"""

from __future__ import annotations

from airflow.sdk import dag, task
from factory_plugin.approvals import approval_gate

GATE = {"gate_name": "data_release", "owner_site": "origin", "required_role": "compliance_officer"}


@dag(dag_id="approval_probe", schedule=None, catchup=False, doc_md=__doc__, tags=["test"],
     default_args={"retries": 0})
def approval_probe():
    @task
    def prepare() -> dict:
        return {"dataset": "origin-shared@probe", "rows": 3}

    gate = approval_gate(
        task_id="approve_release",
        subject="Release dataset {{ ti.xcom_pull(task_ids='prepare')['dataset'] }} to supplier",
        body="**Dataset** `{{ ti.xcom_pull(task_ids='prepare')['dataset'] }}`\n\n"
             "**Lineage** origin shared partition\n\n**Policy** data_release: sanitization passed",
        requested_by="{{ dag_run.triggering_user_name }}",
        **GATE,
    )

    @task
    def release(**context) -> dict:
        import json
        import os

        from factory_plugin.approvals import verified_approval

        from pipelines.workspace import SitePaths

        paths = SitePaths.of("origin")
        record = verified_approval(
            ti_xcom_value=context["ti"].xcom_pull(task_ids="approve_release"),
            requested_by=context["dag_run"].triggering_user_name,
            site_paths=paths,
            **GATE,
        )
        out = paths.state_dir / "released" / f"{context['run_id']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, out)
        return record

    prepare() >> gate >> release()


approval_probe()
