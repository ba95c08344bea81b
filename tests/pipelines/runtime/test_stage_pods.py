"""With FACTORY_RUNTIME=kubernetes every step task of every stage DAG is a pod running
`factory step ...` in the step image, hardened, and valid against the Kubernetes schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[3] / "dags"
WORKER_TASKS = ("approval", "check_approval")  # HITL gates and their checks run in the Airflow worker


@pytest.fixture(scope="module")
def kubernetes_dags():
    from airflow.dag_processing.dagbag import DagBag

    mp = pytest.MonkeyPatch()
    mp.setenv("FACTORY_RUNTIME", "kubernetes")
    try:
        bag = DagBag(dag_folder=str(DAGS))
    finally:
        mp.undo()
    assert not bag.import_errors, bag.import_errors
    return bag.dags


def test_every_step_task_of_every_stage_renders_a_valid_pod(kubernetes_dags):
    import kubernetes_validate
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from pipelines.config import load_config
    from pipelines.runtime.kubernetes import render_pod

    image = load_config().stages.kubernetes.image
    rendered = 0
    for dag_id, dag in kubernetes_dags.items():
        if not dag_id.startswith("stage_"):
            continue
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
            assert isinstance(
                json.loads(re.sub(r"\{\{.*?\}\}", "null", args[5])), dict
            )  # JSON once XComs render
            security = pod["spec"]["securityContext"]
            assert security["runAsNonRoot"] is True
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["resources"]["limits"]
            rendered += 1
    assert rendered >= 40
