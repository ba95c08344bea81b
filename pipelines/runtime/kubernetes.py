"""Steps as Kubernetes pods: one KubernetesPodOperator per step task.

The pod runs `factory step STEP --site SITE --params-json JSON` in the step image named in
`conf/stages.yaml` (`kubernetes:`), with requests/limits from a `resources:` profile, under the
site's ServiceAccount, hardened (non-root, read-only root filesystem, no privilege escalation,
all capabilities dropped, seccomp RuntimeDefault). The object names below are the contract with
`charts/sovereign-factory` (one release per site): `tests/charts` checks that both agree.

    op = pod_operator_for_step(task_id="train", step="train_initial", site="supplier", resources="train")
    pod = render_pod(op)   # the V1Pod as a plain dict, no cluster needed
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from pipelines.config import load_config
from pipelines.workspace import SitePaths, check_site

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

# Where the site workspace PVC is mounted in a step pod; FACTORY_HOME points here.
POD_FACTORY_HOME = "/var/lib/factory"
# The unprivileged user of docker/step/Dockerfile.
STEP_UID = 10001
DVC_REMOTE_KINDS = ("pvc", "s3")


@dataclass(frozen=True)
class SiteObjects:
    """Names of the Kubernetes objects a site release provides (see charts/sovereign-factory)."""

    site: str
    service_account: str
    workspace_claim: str
    dvc_remote_claim: str
    dvc_config: str
    keys_secret: str
    partners_config: str
    mlflow_url: str
    opa_url: str

    @classmethod
    def of(cls, site: str) -> SiteObjects:
        check_site(site)
        prefix = f"factory-{site}"
        return cls(
            site=site,
            service_account=f"{load_config().stages.kubernetes.service_account}-{site}",
            workspace_claim=f"{prefix}-workspace",
            dvc_remote_claim=f"{prefix}-dvc-remote",
            dvc_config=f"{prefix}-dvc",
            keys_secret=f"{prefix}-keys",
            partners_config=f"{prefix}-partners",
            mlflow_url=f"http://{prefix}-mlflow:5000",
            opa_url=f"http://{prefix}-opa:8181",
        )


def step_arguments(step: str, site: str, params: dict[str, Any] | str | None = None) -> list[str]:
    """The container arguments (the image's entrypoint is `factory`).

    `params` is a dict, or JSON text already built (it may hold Jinja such as XCom pulls, which
    Airflow renders at run time because `arguments` is a templated field).
    """
    params_json = params if isinstance(params, str) else json.dumps(params or {}, sort_keys=True)
    return [
        "step", step, "--site", site, "--params-json", params_json,
        "--run-id", "{{ run_id }}", "--dag-id", "{{ dag.dag_id }}",
    ]  # fmt: skip


def _container_security_context() -> Any:
    from kubernetes.client import models as k8s

    return k8s.V1SecurityContext(
        run_as_non_root=True,
        run_as_user=STEP_UID,
        run_as_group=STEP_UID,
        read_only_root_filesystem=True,
        allow_privilege_escalation=False,
        privileged=False,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def pod_operator_for_step(
    *,
    task_id: str,
    step: str,
    site: str,
    params: dict[str, Any] | str | None = None,
    resources: str = "default",
    dvc_remote: str = "pvc",
    **operator_kwargs: Any,
) -> KubernetesPodOperator:
    """A KubernetesPodOperator that runs one step at one site.

    `params` (a dict, or JSON text that may hold Jinja) travel as `--params-json`; Airflow renders
    Jinja in the arguments at run time (`--run-id`/`--dag-id` too), `render_pod` shows it unrendered.
    `resources` names a profile of `conf/stages.yaml`.
    `dvc_remote` is `pvc` (the site's DVC remote claim is mounted) or `s3` (remote settings
    and credentials come from the site's `factory-<site>-dvc` ConfigMap and Secret).
    `operator_kwargs` go to the operator (e.g. `dag`, `retries`, `in_cluster`, `namespace`).
    """
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    check_site(site)
    conf = load_config().stages
    try:
        profile = conf.resources[resources]
    except KeyError:
        raise ValueError(
            f"unknown resources profile {resources!r}; conf/stages.yaml defines {', '.join(sorted(conf.resources))}"
        ) from None
    if dvc_remote not in DVC_REMOTE_KINDS:
        raise ValueError(f"dvc_remote must be one of {', '.join(DVC_REMOTE_KINDS)}, not {dvc_remote!r}")

    names = SiteObjects.of(site)
    paths = SitePaths(site, PurePosixPath(POD_FACTORY_HOME))  # type: ignore[arg-type]  # paths in the pod
    volumes = [
        k8s.V1Volume(
            name="workspace",
            persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=names.workspace_claim),
        ),
        # 0o440: readable by the step user through fsGroup, by nobody else.
        k8s.V1Volume(
            name="site-keys",
            secret=k8s.V1SecretVolumeSource(secret_name=names.keys_secret, default_mode=0o440),
        ),
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="1Gi")),
    ]
    mounts = [
        k8s.V1VolumeMount(name="workspace", mount_path=POD_FACTORY_HOME),
        k8s.V1VolumeMount(name="site-keys", mount_path=str(paths.keys_dir), read_only=True),
        k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
    ]
    # the partners' inbox URLs (FACTORY_PARTNER_INBOX_<SITE>): where this site's outbox is pushed
    env_from: list[Any] = [k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=names.partners_config))]
    if dvc_remote == "pvc":
        volumes.append(
            k8s.V1Volume(
                name="dvc-remote",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=names.dvc_remote_claim
                ),
            )
        )
        mounts.append(k8s.V1VolumeMount(name="dvc-remote", mount_path=str(paths.dvc_remote)))
    else:
        env_from += [
            k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=names.dvc_config)),
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=names.dvc_config)),
        ]
    env = {
        "FACTORY_SITE": site,
        "FACTORY_HOME": POD_FACTORY_HOME,
        "FACTORY_OPA_URL": names.opa_url,
        f"FACTORY_MLFLOW_URI_{site.upper()}": names.mlflow_url,
        # the root filesystem is read-only: caches and config of libraries go to the /tmp emptyDir
        "HOME": "/tmp",
    }
    sidecar_context = _container_security_context()
    sidecar_context.run_as_user = sidecar_context.run_as_group = 65534
    kwargs: dict[str, Any] = {
        "namespace": conf.kubernetes.namespace,
        "name": f"{site}-{step}".replace("_", "-").lower(),
        "labels": {
            "app.kubernetes.io/part-of": "sovereign-factory",
            "app.kubernetes.io/component": "step",
            "sovereign-factory/site": site,
            "sovereign-factory/step": step.replace("_", "-"),
        },
        "image_pull_policy": "IfNotPresent",
        "do_xcom_push": True,
        "get_logs": True,
        "on_finish_action": "delete_pod",
        # container arguments are text: a DAG that renders its templates as native objects must not
        # turn the `--params-json` argument into a dict
        "render_template_as_native_obj": False,
    }
    kwargs.update(operator_kwargs)
    return KubernetesPodOperator(
        task_id=task_id,
        image=conf.kubernetes.image,
        arguments=step_arguments(step, site, params),
        service_account_name=names.service_account,
        automount_service_account_token=False,
        container_resources=k8s.V1ResourceRequirements(
            requests=dict(profile.requests), limits=dict(profile.limits)
        ),
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=STEP_UID,
            run_as_group=STEP_UID,
            fs_group=STEP_UID,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        container_security_context=_container_security_context(),
        xcom_sidecar_container_security_context=sidecar_context,
        volumes=volumes,
        volume_mounts=mounts,
        env_vars=env,
        env_from=env_from,
        **kwargs,
    )


def render_pod(op: KubernetesPodOperator) -> dict[str, Any]:
    """The pod `op` would create, as a Kubernetes API dict; needs no cluster or kubeconfig."""
    from kubernetes.client import ApiClient

    pod = op.build_pod_request_obj(dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)
