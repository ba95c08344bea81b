"""How a DAG task runs a step: in-process (FACTORY_RUNTIME=local, the default) or as a
KubernetesPodOperator pod running `factory step NAME --site SITE --params-json ...`.

Step parameters may hold upstream task outputs (XComArgs) and Jinja expressions; in-process
Airflow resolves both, for pods `pod_params_json` turns them into Jinja in the arguments that
renders as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from airflow.sdk import task
from airflow.sdk.definitions.xcom_arg import PlainXComArg, XComArg

log = logging.getLogger(__name__)
# The line every in-process step task logs when its step returns (benchmarks read the seconds from it).
STEP_FINISHED = "step %s at %s finished in %.3f s"


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


# One XCom, `return_value`: downstream steps take a step's whole result. (The `dict` return annotation alone
# would make Airflow also push each key as an XCom of its own: one API call per key per task, read by nothing.)
@task(multiple_outputs=False)
def run_local_step(step_name: str, site: str, step_params: dict[str, Any], **context: Any) -> dict[str, Any]:
    from airflow.sdk.exceptions import AirflowFailException

    from pipelines.steps import StepError, run_step

    started = time.perf_counter()
    try:
        result = run_step(step_name, step_context(site, context), **step_params)
    except StepError as error:  # a quality bar or a gate said no: retrying cannot change that
        raise AirflowFailException(f"{step_name} at {site}: {error}") from error
    log.info(STEP_FINISHED, step_name, site, time.perf_counter() - started)
    return result


# A parameter that is one Jinja expression, e.g. "{{ params.subset }}".
_EXPRESSION = re.compile(r"\{\{((?:(?!\{\{|\}\}).)*)\}\}", re.DOTALL)
_JINJA_MARKS = ("{{", "{%", "{#")


def _json_template(value: Any, upstream: list[XComArg]) -> str:
    if isinstance(value, PlainXComArg):
        upstream.append(value)
        return f"{{{{ ti.xcom_pull(task_ids={value.operator.task_id!r}, key={value.key!r}) | tojson }}}}"
    if isinstance(value, XComArg):
        raise TypeError(f"a step pod takes plain task outputs as parameters, not {type(value).__name__}")
    if isinstance(value, str) and any(mark in value for mark in _JINJA_MARKS):
        whole = _EXPRESSION.fullmatch(value.strip())
        if not whole:
            raise ValueError(f"a templated step parameter must be one Jinja expression such as "
                             f"'{{{{ params.name }}}}', not {value!r}")
        return f"{{{{ ({whole.group(1).strip()}) | tojson }}}}"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}: {_json_template(v, upstream)}" for k, v in sorted(value.items()))
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_json_template(v, upstream) for v in value) + "]"
    return json.dumps(value)


def pod_params_json(params: dict[str, Any]) -> tuple[str, list[XComArg]]:
    """Params as the text of a JSON object, with Jinja where values are known only at run time.

    Task outputs (XComArgs, with their key) become XCom pulls and a parameter that is one Jinja
    expression (`"{{ params.subset }}"`) becomes that expression's value: both rendered as JSON
    (`tojson`), so an object stays an object in the pod. Returns the text and the upstream outputs.
    """
    upstream: list[XComArg] = []
    return _json_template(params, upstream), upstream


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
