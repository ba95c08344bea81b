"""With FACTORY_RUNTIME=kubernetes every step task of every stage DAG is a pod running
`factory step ...` in the step image, hardened, and valid against the Kubernetes schemas; once
Airflow renders its templates, the pod's `--params-json` is a JSON object whose run-time values
(task outputs, trigger params) keep their type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[3] / "dags"
# Run in the Airflow worker: HITL gates, short-circuits that only read a step's XCom (go on or stop),
# and the drift monitor's asset event (an Airflow outlet, emitted by the worker)
WORKER_TASKS = ("approval", "training_finished", "models_affected", "emit_drift_event")


def _kubernetes_dags() -> dict:
    from airflow.dag_processing.dagbag import DagBag

    mp = pytest.MonkeyPatch()
    mp.setenv("FACTORY_RUNTIME", "kubernetes")
    try:
        bag = DagBag(dag_folder=str(DAGS))
    finally:
        mp.undo()
    assert not bag.import_errors, bag.import_errors
    return bag.dags


@pytest.fixture(scope="module")
def kubernetes_dags():
    return _kubernetes_dags()


class _XComs:
    """The task instance a template sees, as far as XCom pulls go: each pull answers what it asked for."""

    def xcom_pull(self, task_ids, key="return_value", **_):
        return {"pulled": task_ids, "key": key}


def _rendered_params(task, dag, **params) -> dict:
    """Render the task's templates as Airflow does at run time; the pod's step parameters."""
    from airflow.sdk.definitions.param import ParamsDict

    trigger = ParamsDict(dag.params)
    trigger.update(params)
    context = {"params": trigger.validate(), "run_id": "manual__1", "dag": dag, "ti": _XComs()}
    task.render_template_fields(context)
    args = task.arguments
    assert all(isinstance(a, str) for a in args), args
    assert args[6:] == ["--run-id", "manual__1", "--dag-id", dag.dag_id]
    return json.loads(args[5])


def test_every_step_task_of_every_stage_renders_a_valid_pod(kubernetes_dags):
    import kubernetes_validate
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from pipelines.config import load_config
    from pipelines.runtime.kubernetes import render_pod

    image = load_config().stages.kubernetes.image
    rendered = 0
    for dag_id, dag in kubernetes_dags.items():
        for task in dag.tasks:
            if task.task_id.endswith(WORKER_TASKS):
                continue
            assert isinstance(task, KubernetesPodOperator), f"{dag_id}.{task.task_id} is not a pod"
            pod = render_pod(task)
            kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
            container = pod["spec"]["containers"][0]
            assert container["image"] == image
            args = container["args"]
            site = next(t.split(":")[1] for t in dag.tags if t.startswith("site:"))
            assert args[0] == "step" and args[2:4] == ["--site", site]
            security = pod["spec"]["securityContext"]
            assert security["runAsNonRoot"] is True
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["resources"]["limits"]
            rendered += 1
    assert rendered >= 40


def _values(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _values(item)
    elif isinstance(value, list):
        for item in value:
            yield from _values(item)
    else:
        yield value


def test_every_step_pod_renders_its_params_as_a_json_object():
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    rendered = 0
    for dag_id, dag in _kubernetes_dags().items():
        for task in dag.tasks:
            if not isinstance(task, KubernetesPodOperator):  # gates, their checks, the drift event
                continue
            params = _rendered_params(task, dag)
            assert isinstance(params, dict), f"{dag_id}.{task.task_id}"
            for value in _values(params):  # no template left, no Python repr of an object
                assert not (isinstance(value, str) and ("{{" in value or value.startswith(("{'", "['")))), (
                    f"{dag_id}.{task.task_id}: {value!r}")
            rendered += 1
    assert rendered >= 40


def test_export_variant_params_and_task_outputs_reach_the_pod_as_objects():
    dags = _kubernetes_dags()
    dag = dags["stage_5_export_preparation"]
    trigger = {"variant": "night-v2", "subset": {"labels": [0, 7]}, "thresholds": {"supplier_test": 0.95}}
    train = _rendered_params(dag.get_task("training_flow.train_model"), dag, **trigger)
    assert train["subset"] == {"labels": [0, 7]} and train["variant"] == "night-v2"
    request = _rendered_params(dag.get_task("request_review"), dag, **trigger)
    assert request["thresholds"] == {"supplier_test": 0.95} and request["variant"] == "night-v2"
    assert request["destination"] == "destination" and request["recipient"] == "origin"
    assert request["model"] == {"pulled": "training_flow.register_model", "key": "return_value"}
    release_dag = dags["stage_5_export_release"]
    release = _rendered_params(release_dag.get_task("release_export"), release_dag)
    assert release["request"] == {"pulled": "receive_approval", "key": "return_value"}
    assert [a["pulled"] for a in release["approvals"]] == ["export_control_approval"]
    assert release["recipient"] == "destination"


def test_a_task_output_taken_by_key_is_pulled_by_that_key(monkeypatch):
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG
    from factory_plugin.steps import step_task

    monkeypatch.setenv("FACTORY_RUNTIME", "kubernetes")
    with DAG("keyed", schedule=None) as dag:
        split = EmptyOperator(task_id="split")
        step_task("evaluate_model", site="supplier", trained=split.output["holdout"], test_sets={"t": "test"})
    task = dag.get_task("evaluate_model")
    assert split in task.upstream_list
    assert _rendered_params(task, dag)["trained"] == {"pulled": "split", "key": "holdout"}


def test_a_step_parameter_mixing_text_and_jinja_is_refused(monkeypatch):
    from airflow.sdk import DAG
    from factory_plugin.steps import step_task

    monkeypatch.setenv("FACTORY_RUNTIME", "kubernetes")
    with DAG("mixed", schedule=None), pytest.raises(ValueError, match="must be one Jinja expression"):
        step_task("evaluate_model", site="supplier", model="M{{ params.stage }}")
