"""How a DAG task runs a step: in-process (FACTORY_RUNTIME=local, the default) or as a
KubernetesPodOperator pod running `factory step NAME --site SITE --params-json ...`.

Step parameters may hold upstream task outputs (XComArgs); in-process Airflow
resolves them, for pods they become Jinja `xcom_pull` expressions in the arguments.
"""

from __future__ import annotations

import json
import os
from typing import Any

from airflow.sdk import task
from airflow.sdk.definitions.xcom_arg import XComArg


def runtime() -> str:
    value = os.environ.get("FACTORY_RUNTIME", "local")
    if value not in ("local", "kubernetes"):
        raise ValueError(f"FACTORY_RUNTIME must be 'local' or 'kubernetes', not {value!r}")
    return value


def step_context(site: str, context: dict[str, Any]):
    from pipelines.steps import StepContext

    dag_run = context.get("dag_run")
    actor = getattr(dag_run, "triggering_user_name", None) if dag_run is not None else None
    return StepContext.for_site(site, run_id=context["run_id"], dag_id=context["dag"].dag_id, actor=actor)


@task
def run_local_step(step_name: str, site: str, step_params: dict[str, Any], **context: Any) -> dict[str, Any]:
    from airflow.sdk.exceptions import AirflowFailException

    from pipelines.steps import StepError, run_step

    try:
        return run_step(step_name, step_context(site, context), **step_params)
    except StepError as error:  # a quality bar or a gate said no: retrying cannot change that
        raise AirflowFailException(f"{step_name} at {site}: {error}") from error


def _templated(value: Any, upstream: list[XComArg]) -> Any:
    if isinstance(value, XComArg):
        upstream.append(value)
        task_id = value.operator.task_id
        key = getattr(value, "key", "return_value")
        return {"__xcom__": task_id, "key": key}
    if isinstance(value, dict):
        return {k: _templated(v, upstream) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_templated(v, upstream) for v in value]
    return value


def pod_params_json(params: dict[str, Any]) -> tuple[str, list[XComArg]]:
    """Params as a JSON template whose XCom references are pulled when the pod is rendered."""
    upstream: list[XComArg] = []
    text = json.dumps(_templated(params, upstream), sort_keys=True)
    for ref in upstream:
        task_id = ref.operator.task_id
        marker = json.dumps({"__xcom__": task_id, "key": getattr(ref, "key", "return_value")}, sort_keys=True)
        text = text.replace(marker, "{{ ti.xcom_pull(task_ids='" + task_id + "') | tojson }}")
    return text, upstream


def step_task(step_name: str, *, site: str, task_id: str | None = None, resources: str = "default",
              outlets: list | None = None, **params: Any):
    """A task that runs step `step_name` at `site` with `params`."""
    task_id = task_id or step_name
    if runtime() == "kubernetes":
        from pipelines.runtime.kubernetes import pod_operator_for_step

        params_json, upstream = pod_params_json(params)
        operator = pod_operator_for_step(task_id=task_id, step=step_name, site=site, params=params_json,
                                         resources=resources, outlets=outlets or [])
        for ref in upstream:
            ref.operator >> operator
        return XComArg(operator)
    return run_local_step.override(task_id=task_id, outlets=outlets or [])(step_name, site, params)
