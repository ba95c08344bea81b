"""Step pods: rendered offline from KubernetesPodOperator and validated against the Kubernetes schemas."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from pipelines.config import load_config
from pipelines.runtime.kubernetes import (
    POD_FACTORY_HOME,
    STEP_UID,
    SiteObjects,
    pod_operator_for_step,
    render_pod,
)
from pipelines.workspace import WorkspaceError

K8S_VERSION = kubernetes_validate.latest_version()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))


def _main(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "base")


CASES = [
    ("train_initial", "supplier", {"epochs": 2}, "train"),
    ("sanitize_shared", "origin", {"dataset": "shared"}, "default"),
    ("evaluate", "destination", None, "default"),
    (
        "seal_model",
        "supplier",
        {"recipient": "origin", "run": "{{ ti.xcom_pull(task_ids='train') }}"},
        "default",
    ),
]


@pytest.mark.parametrize(("step", "site", "params", "profile"), CASES)
def test_step_pod_is_valid_and_hardened(step, site, params, profile):
    op = pod_operator_for_step(task_id=f"t_{step}", step=step, site=site, params=params, resources=profile)
    pod = render_pod(op)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)

    stages = load_config().stages
    main = _main(pod)
    assert main["image"] == stages.kubernetes.image
    assert main["args"][:4] == ["step", step, "--site", site]
    assert main["args"][4] == "--params-json"
    assert json.loads(main["args"][5]) == (params or {})
    assert main["args"][6:] == ["--run-id", "{{ run_id }}", "--dag-id", "{{ dag.dag_id }}"]
    assert not main.get("command")  # the image's entrypoint is `factory`

    wanted = stages.resources[profile]
    assert main["resources"] == {"requests": dict(wanted.requests), "limits": dict(wanted.limits)}

    spec = pod["spec"]
    assert pod["metadata"]["namespace"] == stages.kubernetes.namespace
    assert spec["serviceAccountName"] == f"{stages.kubernetes.service_account}-{site}"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == STEP_UID
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in spec["containers"]:  # the step and the xcom sidecar
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}

    env = {e["name"]: e["value"] for e in main["env"]}
    names = SiteObjects.of(site)
    assert env["FACTORY_SITE"] == site and env["FACTORY_HOME"] == POD_FACTORY_HOME
    assert env["FACTORY_OPA_URL"] == names.opa_url
    assert env[f"FACTORY_MLFLOW_URI_{site.upper()}"] == names.mlflow_url

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == names.workspace_claim
    assert mounts[POD_FACTORY_HOME] == "workspace"
    assert volumes["site-keys"]["secret"]["secretName"] == names.keys_secret
    assert mounts[f"{POD_FACTORY_HOME}/{site}/keys"] == "site-keys"
    assert "emptyDir" in volumes["tmp"] and mounts["/tmp"] == "tmp"
    assert volumes["dvc-remote"]["persistentVolumeClaim"]["claimName"] == names.dvc_remote_claim
    # do_xcom_push: the sidecar and its shared volume
    assert {c["name"] for c in spec["containers"]} == {"base", "airflow-xcom-sidecar"}
    assert mounts["/airflow/xcom"] == "xcom"
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "step" and labels["sovereign-factory/site"] == site


def test_s3_remote_pods_read_store_settings_instead_of_a_claim():
    op = pod_operator_for_step(task_id="t", step="register_dataset", site="origin", dvc_remote="s3")
    pod = render_pod(op)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert "dvc-remote" not in {v["name"] for v in pod["spec"]["volumes"]}
    sources = _main(pod)["envFrom"]
    assert {"configMapRef": {"name": "factory-origin-dvc"}} in sources
    assert {"secretRef": {"name": "factory-origin-dvc"}} in sources


def test_prebuilt_params_json_is_passed_verbatim():
    text = '{"model": {{ ti.xcom_pull(task_ids="train") | tojson }}}'
    op = pod_operator_for_step(task_id="t", step="evaluate", site="origin", params=text)
    assert _main(render_pod(op))["args"][5] == text


def test_operator_kwargs_override_defaults():
    op = pod_operator_for_step(
        task_id="t", step="evaluate", site="origin", namespace="site-origin", retries=3
    )
    assert op.retries == 3
    assert render_pod(op)["metadata"]["namespace"] == "site-origin"


def test_unknown_resource_profile_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown resources profile 'huge'.*default.*train"):
        pod_operator_for_step(task_id="t", step="evaluate", site="origin", resources="huge")


def test_unknown_site_is_refused():
    with pytest.raises(WorkspaceError, match="unknown site 'mars'"):
        pod_operator_for_step(task_id="t", step="evaluate", site="mars")


def test_unknown_dvc_remote_kind_is_refused():
    with pytest.raises(ValueError, match="dvc_remote must be one of pvc, s3"):
        pod_operator_for_step(task_id="t", step="evaluate", site="origin", dvc_remote="nfs")
