"""The site chart: rendered offline with Helm's Go SDK, every object validated against Kubernetes schemas,
straight from a checkout (its OPA policies are the repository's, through the files/policies link)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from pipelines.config import PROJECT_ROOT, SITES, load_config
from pipelines.runtime.kubernetes import SiteObjects, pod_operator_for_step, render_pod

CHART = PROJECT_ROOT / "charts" / "sovereign-factory"
K8S_VERSION = kubernetes_validate.latest_version()
REGO = "package factory.probe\n\nimport rego.v1\n\ndefault allow := false\n\nallow if input.ok\n"
REGO_TEST = (
    "package factory.probe_test\n\nimport rego.v1\n\ntest_ok if data.factory.probe.allow with input as {}\n"
)
AIRFLOW_API = "http://site-airflow-api-server:8080"
# Airflow is not rendered offline; the inbox is given the URL of the site's Airflow API it needs.
OFF = {"airflow": {"enabled": False}, "inbox": {"airflow": {"url": AIRFLOW_API}}}


def _checkout(root: Path, paths: tuple[str, ...] = ("charts", "policies")) -> Path:
    """`paths` of the repository as a clone has them: the files git tracks (and the new ones it does
    not ignore) as they are in the working tree, links kept as links, nothing git ignores."""
    listed = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *paths],
        check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = PROJECT_ROOT / name, root / name
        if not source.is_symlink() and not source.exists():  # deleted, not yet committed
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        else:
            shutil.copy2(source, target)
    return root


@pytest.fixture(scope="module")
def chart_dir(tmp_path_factory) -> Path:
    """The chart of a checkout whose policies/ also holds a probe policy and its test."""
    root = _checkout(tmp_path_factory.mktemp("checkout"))
    (root / "policies" / "probe").mkdir()
    (root / "policies" / "probe" / "probe.rego").write_text(REGO)
    (root / "policies" / "probe" / "probe_test.rego").write_text(REGO_TEST)
    (root / "policies" / "probe" / "NOTES.md").write_text("not a policy")
    return root / "charts" / "sovereign-factory"


@pytest.fixture(scope="module")
def chart(chart_dir):
    with helm.Chart.load(chart_dir) as loaded:
        yield loaded


def merged(base: dict, values: dict) -> dict:
    """`values` over `base`, nested mappings merged as Helm merges values files."""
    out = dict(base)
    for key, value in values.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render(chart, values: dict, *, name: str = "site", namespace: str = "factory") -> list[dict]:
    manifests = chart.render(merged(OFF, values), name=name, namespace=namespace)
    objects = []
    for text in manifests.values():
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


VALUE_SETS = {
    "defaults": {},
    "s3-remote": {
        "dvc": {
            "remote": {
                "type": "s3",
                "s3": {"url": "s3://bucket/dvc", "egress": [{"cidr": "10.0.0.0/16", "port": 443}]},
            }
        }
    },
    "minimal": {"opa": {"enabled": False}, "mlflow": {"enabled": False}, "networkPolicy": {"enabled": False}},
    "tuned": {
        "workspace": {"size": "5Gi", "storageClassName": "fast", "accessModes": ["ReadWriteMany"]},
        "opa": {"replicas": 3, "policies": {"gates/probe.rego": REGO}},
        "siteKeys": {"existingSecret": "keys-from-vault"},
        "step": {"extraRoleSubjects": [{"name": "scheduler", "namespace": "airflow"}]},
        "commonLabels": {"team": "platform"},
    },
}


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid_kubernetes(chart, site, value_set):
    objects = render(chart, {"site": site, **VALUE_SETS[value_set]}, name=site)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["labels"]["sovereign-factory/site"] == site
        assert obj["metadata"]["name"].startswith(("factory-", "factory-step-"))


@pytest.mark.parametrize("values_file", sorted((CHART / "ci").glob("*-values.yaml")), ids=lambda p: p.name)
def test_ci_values_files_render_valid_objects(chart, values_file):
    values = helm.values_from_yaml(values_file.read_text())
    objects = render(chart, values, name=values["site"])
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_validator_is_strict_about_unknown_fields():
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [], "bogus": 1},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_values_file_violating_the_schema_is_refused_with_the_schema_message(chart, tmp_path):
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("site: mars\nworkspace:\n  size: lots\n")
    with pytest.raises(helm.HelmValuesError) as refused:
        chart.render(helm.values_from_yaml(bad.read_text()), name="x", namespace="factory")
    message = str(refused.value)
    assert "at '/site': value must be one of 'supplier', 'origin', 'destination'" in message
    assert "/workspace/size" in message


def test_unknown_value_key_is_refused(chart):
    with pytest.raises(helm.HelmValuesError, match="additional properties 'replica' not allowed"):
        chart.render({**OFF, "site": "origin", "opa": {"replica": 2}}, name="x", namespace="factory")


def _schema_nodes(node: dict, path: str):
    for key, prop in node.get("properties", {}).items():
        yield f"{path}.{key}", prop
        if prop.get("type") == "object":
            yield from _schema_nodes(prop, f"{path}.{key}")


def test_schema_documents_every_property_and_forbids_unknown_keys():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    for path, prop in _schema_nodes(schema, ""):
        assert {"description", "type", "default"} <= prop.keys(), path
        if prop["type"] == "object" and path != ".airflow":  # airflow: the subchart's own schema applies
            assert prop.get("additionalProperties") is not True, path
            if "properties" in prop:
                assert prop["additionalProperties"] is False, path


def test_schema_defaults_are_the_values_yaml_defaults():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def check(node: dict, data: dict, path: str) -> None:
        assert set(node["properties"]) == set(data), f"{path}: values.yaml and schema keys differ"
        for key, prop in node["properties"].items():
            assert prop["default"] == data[key], f"{path}.{key}"
            if prop.get("type") == "object" and "properties" in prop and key != "airflow":
                check(prop, data[key], f"{path}.{key}")

    check(schema, values, "")


def test_helm_lint_finds_nothing_but_the_undownloadable_airflow_chart(chart_dir):
    report = helm.lint(chart_dir, {**OFF, "site": "origin"}, strict=True, kube_version=f"v{K8S_VERSION}")
    problems = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    assert problems == ["chart directory is missing these dependencies: airflow"]


def test_airflow_is_an_optional_dependency_on_the_official_chart():
    # a fresh load: rendering with the condition off drops the dependency from a loaded chart
    with helm.Chart.load(CHART) as fresh:
        (dep,) = fresh.metadata["dependencies"]
        assert fresh.values["airflow"]["enabled"] is True
        assert fresh.values["airflow"]["executor"] == "KubernetesExecutor"
    assert dep["name"] == "airflow" and dep["repository"] == "https://airflow.apache.org"
    assert dep["condition"] == "airflow.enabled"


@pytest.mark.parametrize("site", SITES)
def test_chart_provides_what_step_pods_refer_to(chart, site):
    objects = render(chart, {"site": site}, name=site, namespace="factory")
    names = SiteObjects.of(site)
    assert names.service_account in by_kind(objects, "ServiceAccount")
    claims = by_kind(objects, "PersistentVolumeClaim")
    assert {names.workspace_claim, names.dvc_remote_claim} <= claims.keys()
    services = {n: s["spec"]["ports"][0]["port"] for n, s in by_kind(objects, "Service").items()}
    for url in (names.mlflow_url, names.opa_url):
        host, port = url.removeprefix("http://").split(":")
        assert services[host] == int(port)
    # the pod's labels are the ones the NetworkPolicy selects
    pod = render_pod(pod_operator_for_step(task_id="t", step="evaluate", site=site))
    egress = by_kind(objects, "NetworkPolicy")[f"factory-{site}-step-egress"]
    assert egress["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["serviceAccountName"] == names.service_account
    # where a release step's outbox is pushed: the partners' inbox URLs of the chart's values
    env_from = [e["configMapRef"]["name"] for e in pod["spec"]["containers"][0]["envFrom"] if "configMapRef" in e]
    assert names.partners_config in env_from and names.partners_config in by_kind(objects, "ConfigMap")
    assert load_config().stages.kubernetes.service_account == chart.values["step"]["serviceAccountName"]


def test_secrets_are_referenced_never_rendered(chart):
    objects = render(chart, {"site": "origin", "siteKeys": {"existingSecret": "vault-keys"}})
    assert not by_kind(objects, "Secret")
    mlflow = by_kind(objects, "Deployment")["factory-origin-mlflow"]
    (env,) = [
        e
        for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"].startswith("MLFLOW_")
    ]
    assert env == {
        "name": "MLFLOW_BACKEND_STORE_URI",
        "valueFrom": {"secretKeyRef": {"name": "factory-origin-mlflow-db", "key": "uri"}},
    }
    assert "postgresql" not in json.dumps(objects)


def test_pod_launcher_rbac_is_the_minimum(chart):
    objects = render(chart, {"site": "supplier"})
    (role,) = by_kind(objects, "Role").values()
    rules = {(tuple(r["resources"]), tuple(sorted(r["verbs"]))) for r in role["rules"]}
    assert rules == {
        (("pods",), ("create", "delete", "get", "list", "patch", "watch")),
        (("pods/log",), ("get",)),
        (("pods/exec",), ("create", "get")),
        (("events",), ("list",)),
    }
    assert all(r["apiGroups"] == [""] for r in role["rules"])
    (binding,) = by_kind(objects, "RoleBinding").values()
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "factory-step-supplier", "namespace": "factory"}
    ]
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")


def test_step_pods_reach_only_mlflow_opa_and_dns_and_ingress_is_denied(chart):
    objects = render(chart, {"site": "destination"})
    policies = by_kind(objects, "NetworkPolicy")
    deny = policies["factory-destination-default-deny-ingress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    egress = policies["factory-destination-step-egress"]["spec"]
    assert set(egress["policyTypes"]) == {"Ingress", "Egress"} and egress["ingress"] == []
    targets = [rule["to"][0] for rule in egress["egress"]]
    components = [t["podSelector"]["matchLabels"].get("app.kubernetes.io/component") for t in targets]
    assert components == ["mlflow", "opa", None]
    assert all(
        t["podSelector"]["matchLabels"]["sovereign-factory/site"] == "destination" for t in targets[:2]
    )
    assert targets[2]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert not any("ipBlock" in t for t in targets)


def test_s3_remote_opens_egress_to_the_store_only(chart):
    s3 = {"type": "s3", "s3": {"url": "s3://b/dvc", "egress": [{"cidr": "10.9.0.0/24", "port": 9000}]}}
    objects = render(chart, {"site": "origin", "dvc": {"remote": s3}})
    egress = by_kind(objects, "NetworkPolicy")["factory-origin-step-egress"]["spec"]["egress"]
    assert egress[-1] == {
        "to": [{"ipBlock": {"cidr": "10.9.0.0/24"}}],
        "ports": [{"protocol": "TCP", "port": 9000}],
    }
    assert "factory-origin-dvc-remote" not in by_kind(objects, "PersistentVolumeClaim")
    assert (
        by_kind(objects, "ConfigMap")["factory-origin-dvc"]["data"]["FACTORY_DVC_REMOTE_URL"] == "s3://b/dvc"
    )


def test_s3_remote_without_url_fails_to_render(chart):
    with pytest.raises(helm.HelmRenderError, match="dvc.remote.s3.url is required"):
        render(chart, {"site": "origin", "dvc": {"remote": {"type": "s3"}}})


def test_opa_serves_the_repository_policies_without_their_tests(chart):
    objects = render(chart, {"site": "supplier"})
    config = by_kind(objects, "ConfigMap")["factory-supplier-opa-policies"]["data"]
    assert config["probe__probe.rego"] == REGO
    assert not any(key.endswith(("_test.rego", ".md")) for key in config)
    repo_files = {
        p.relative_to(PROJECT_ROOT / "policies").as_posix()
        for p in (PROJECT_ROOT / "policies").rglob("*")
        if p.suffix in (".rego", ".json") and not p.name.endswith("_test.rego")
    }
    deployment = by_kind(objects, "Deployment")["factory-supplier-opa"]["spec"]["template"]["spec"]
    items = {i["key"]: i["path"] for i in deployment["volumes"][0]["configMap"]["items"]}
    assert set(items.values()) == repo_files | {"probe/probe.rego", ".manifest"}
    assert all(key in config for key in items)
    (container,) = deployment["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["args"][-2:] == ["--bundle", "/policies"]


def test_opa_bundle_revision_is_the_digest_a_site_pins(chart, chart_dir, tmp_path):
    """The chart's OPA reports the revision a site built from the same policies/ pins, so gates in
    step pods allow; other policies give another revision, which a site's gate denies."""
    from pipelines.policy.bundle import read_bundle

    objects = render(chart, {"site": "supplier"})
    config = by_kind(objects, "ConfigMap")["factory-supplier-opa-policies"]["data"]
    manifest = json.loads(config[".manifest"])
    assert manifest["revision"] == read_bundle(chart_dir / "files" / "policies").digest
    assert manifest["roots"] == [""]
    (tmp_path / "only.rego").write_text(REGO)
    other = render(chart, {"site": "origin", "opa": {"policies": {"only.rego": REGO}}})
    revision = json.loads(by_kind(other, "ConfigMap")["factory-origin-opa-policies"]["data"][".manifest"])["revision"]
    assert revision == read_bundle(tmp_path).digest != manifest["revision"]


def test_policies_from_values_replace_the_repository_ones(chart):
    objects = render(chart, {"site": "origin", "opa": {"policies": {"only.rego": REGO}}})
    data = by_kind(objects, "ConfigMap")["factory-origin-opa-policies"]["data"]
    assert {key: value for key, value in data.items() if key != ".manifest"} == {"only.rego": REGO}


def test_chart_renders_from_a_clean_checkout(tmp_path):
    """What `git clone` gives (no generated or ignored file): the OPA ConfigMap holds the repository's policies."""
    chart_dir = _checkout(tmp_path) / "charts" / "sovereign-factory"
    assert (chart_dir / "files" / "policies").is_symlink()
    with helm.Chart.load(chart_dir) as fresh:
        objects = render(fresh, {"site": "origin"}, name="origin")
    config = by_kind(objects, "ConfigMap")["factory-origin-opa-policies"]["data"]
    for gate in ("approval", "data_access", "data_release", "model_release"):
        path = PROJECT_ROOT / "policies" / gate / f"{gate}.rego"
        assert config[f"{gate}__{gate}.rego"] == path.read_text()
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_chart_without_policies_fails_naming_the_link(tmp_path):
    chart_dir = _checkout(tmp_path, ("charts",)) / "charts" / "sovereign-factory"
    with pytest.raises(helm.HelmChartLoadError, match="files/policies"):  # the link points nowhere
        helm.Chart.load(chart_dir)
    (tmp_path / "policies").mkdir()  # a folder with no Rego or JSON file in it
    with helm.Chart.load(chart_dir) as bare, pytest.raises(helm.HelmRenderError, match="files/policies"):
        bare.render({**OFF, "site": "origin"}, name="x", namespace="factory")


# ------------------------------------------------------------------------------------------ inbox

# Documentation ranges (RFC 5737), one per site, and where each site's inbox answers.
RANGES = {"supplier": "198.51.100.0/24", "origin": "203.0.113.0/24", "destination": "192.0.2.0/24"}
INBOX_URLS = {site: f"https://inbox.{site}.example:8443" for site in SITES}


def partners_of(site: str) -> list[dict]:
    return [{"site": p, "cidrs": [RANGES[p]], "inboxUrl": INBOX_URLS[p]} for p in SITES if p != site]


def inbox_objects(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "inbox"]


def selects(policy: dict, labels: dict) -> bool:
    return policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()


def ingress_rules_for(objects: list[dict], labels: dict) -> list[dict]:
    """Every ingress rule of every NetworkPolicy that applies to a pod with `labels`."""
    return [
        rule
        for policy in by_kind(objects, "NetworkPolicy").values()
        if selects(policy, labels) and "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", [])
    ]


def inbox_pod(objects: list[dict], site: str) -> dict:
    return by_kind(objects, "Deployment")[f"factory-{site}-inbox"]["spec"]["template"]


EXPOSURES = {
    "cluster-ip": {},
    "load-balancer": {"inbox": {"service": {"type": "LoadBalancer"}}},
    "node-port": {"inbox": {"service": {"type": "NodePort", "nodePort": 30443}}},
    "ingress": {"inbox": {"ingress": {"enabled": True, "host": "inbox.example.org"}}},
    "external-airflow": {
        # null (not {}) drops the default labels, as in any Helm values file
        "inbox": {"airflow": {"podLabels": None, "egress": [{"cidr": "10.40.0.0/24", "port": 443}]}}
    },
}


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("exposure", sorted(EXPOSURES))
def test_inbox_objects_are_valid_kubernetes(chart, site, exposure):
    objects = render(chart, merged({"site": site, "partners": partners_of(site)}, EXPOSURES[exposure]), name=site)
    kinds = {o["kind"] for o in inbox_objects(objects)}
    assert {"Deployment", "Service", "NetworkPolicy"} <= kinds
    assert ("Ingress" in kinds) == (exposure == "ingress")
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("site", SITES)
def test_inbox_admits_its_port_only_from_the_partner_ranges(chart, site):
    objects = render(chart, {"site": site, "partners": partners_of(site)})
    rules = ingress_rules_for(objects, inbox_pod(objects, site)["metadata"]["labels"])
    assert rules, "the inbox admits nobody"
    admitted = set()
    for rule in rules:
        assert rule.get("from"), f"a rule without sources admits every address: {rule}"
        assert rule["ports"] == [{"protocol": "TCP", "port": 8443}]
        for peer in rule["from"]:
            assert peer.keys() == {"ipBlock"} and peer["ipBlock"].keys() == {"cidr"}, peer
            admitted.add(peer["ipBlock"]["cidr"])
    assert admitted == {RANGES[p] for p in SITES if p != site}
    # the default-deny policy isolates the pod; no other policy opens it
    assert by_kind(objects, "NetworkPolicy")[f"factory-{site}-default-deny-ingress"]["spec"]["podSelector"] == {}


def test_inbox_without_partners_admits_nobody(chart):
    objects = render(chart, {"site": "origin"})
    assert ingress_rules_for(objects, inbox_pod(objects, "origin")["metadata"]["labels"]) == []
    assert by_kind(objects, "NetworkPolicy")["factory-origin-inbox"]["spec"]["ingress"] == []


def test_inbox_behind_an_ingress_also_admits_the_controller_and_nothing_else(chart):
    objects = render(chart, merged({"site": "origin", "partners": partners_of("origin")}, EXPOSURES["ingress"]))
    rules = ingress_rules_for(objects, inbox_pod(objects, "origin")["metadata"]["labels"])
    peers = [peer for rule in rules for peer in rule["from"]]
    assert [p for p in peers if "ipBlock" not in p] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}},
        }
    ]
    assert all(rule["ports"] == [{"protocol": "TCP", "port": 8443}] for rule in rules)


def test_inbox_reaches_only_its_own_airflow_api_the_partner_inboxes_and_dns(chart):
    objects = render(chart, {"site": "destination", "partners": partners_of("destination")})
    policies = by_kind(objects, "NetworkPolicy")
    egress = policies["factory-destination-inbox"]["spec"]["egress"]
    assert egress[0] == {
        "to": [{"podSelector": {"matchLabels": {"tier": "airflow", "component": "api-server"}}}],
        "ports": [{"protocol": "TCP", "port": 8080}],
    }
    # its pusher delivers the outbox to each partner's inbox, on that inbox's port only
    assert egress[1:3] == [{"to": [{"ipBlock": {"cidr": RANGES[p]}}], "ports": [{"protocol": "TCP", "port": 8443}]}
                           for p in SITES if p != "destination"]
    assert egress[3]["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert len(egress) == 4
    # and the Airflow API server admits the inbox
    api = policies["factory-destination-inbox-to-airflow"]["spec"]
    assert api["podSelector"]["matchLabels"] == {"tier": "airflow", "component": "api-server"}
    (rule,) = api["ingress"]
    assert selects({"spec": {"podSelector": rule["from"][0]["podSelector"]}}, inbox_pod(objects, "destination")["metadata"]["labels"])
    external = render(chart, merged({"site": "destination"}, EXPOSURES["external-airflow"]))
    egress = by_kind(external, "NetworkPolicy")["factory-destination-inbox"]["spec"]["egress"]
    assert egress[0] == {"to": [{"ipBlock": {"cidr": "10.40.0.0/24"}}], "ports": [{"protocol": "TCP", "port": 443}]}
    assert "factory-destination-inbox-to-airflow" not in by_kind(external, "NetworkPolicy")


@pytest.mark.parametrize("site", SITES)
def test_inbox_serves_with_the_site_keys_read_only_on_the_step_workspace(chart, site):
    """The inbox sees the site's files exactly where step pods do: the same claim at FACTORY_HOME, the
    same keys Secret over the site's keys folder (read-only), so `factory inbox serve` finds its key."""
    objects = render(chart, {"site": site, "partners": partners_of(site)})
    pod = inbox_pod(objects, site)["spec"]
    container, pusher = pod["containers"]
    assert container["command"] + container["args"] == [
        "factory", "inbox", "serve", "--site", site, "--host", "0.0.0.0", "--port", "8443",
    ]  # fmt: skip
    assert pusher["command"] + pusher["args"] == ["factory", "outbox", "push", "--site", site, "--interval", "10"]
    assert pusher["volumeMounts"] == container["volumeMounts"] and pusher["securityContext"] == container["securityContext"]
    pushes_to = {e["name"]: e.get("value") for e in pusher["env"]}
    assert {f"FACTORY_PARTNER_INBOX_{p.upper()}" for p in SITES if p != site} <= pushes_to.keys()
    assert container["image"] == load_config().stages.kubernetes.image

    step = render_pod(pod_operator_for_step(task_id="t", step="evaluate", site=site))["spec"]
    (step_container,) = [c for c in step["containers"] if c["name"] == "base"]
    names = SiteObjects.of(site)

    def mounts(spec, c):
        volumes = {v["name"]: v for v in spec["volumes"]}
        return {m["mountPath"]: (volumes[m["name"]], m.get("readOnly", False)) for m in c["volumeMounts"]}

    step_env = {e["name"]: e.get("value") for e in step_container["env"]}
    home = step_env["FACTORY_HOME"]
    (keys_dir,) = [path for path, (v, _) in mounts(step, step_container).items() if "secret" in v]
    inbox = mounts(pod, container)
    workspace, workspace_read_only = inbox[home]
    assert workspace["persistentVolumeClaim"] == {"claimName": names.workspace_claim}
    assert not workspace_read_only
    keys, keys_read_only = inbox[keys_dir]
    assert keys["secret"] == {"secretName": names.keys_secret, "defaultMode": 0o440}
    assert keys_read_only
    env = {e["name"]: e for e in container["env"]}
    assert env["FACTORY_HOME"]["value"] == home and env["FACTORY_SITE"]["value"] == site

    # hardened like every pod of the chart
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["readinessProbe"]["tcpSocket"] == container["livenessProbe"]["tcpSocket"] == {"port": "https"}
    assert container["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]


def test_inbox_posts_to_its_own_airflow_with_credentials_from_a_secret(chart):
    objects = render(
        chart,
        {"site": "origin", "inbox": {"maxPackageBytes": 5 * 2**30, "airflow": {"existingSecret": "origin-sa"}}},
    )
    assert not by_kind(objects, "Secret")
    env = {e["name"]: e for e in inbox_pod(objects, "origin")["spec"]["containers"][0]["env"]}
    assert env["FACTORY_AIRFLOW_URL"]["value"] == AIRFLOW_API
    assert env["FACTORY_AIRFLOW_USERNAME"]["valueFrom"] == {"secretKeyRef": {"name": "origin-sa", "key": "username"}}
    assert env["FACTORY_AIRFLOW_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "origin-sa", "key": "password"}}
    assert env["FACTORY_INBOX_MAX_PACKAGE_BYTES"]["value"] == str(5 * 2**30)
    default = render(chart, {"site": "origin"})
    env = {e["name"]: e for e in inbox_pod(default, "origin")["spec"]["containers"][0]["env"]}
    assert env["FACTORY_AIRFLOW_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "factory-origin-inbox-airflow"


def test_inbox_without_its_airflow_url_fails_naming_the_value(chart):
    with pytest.raises(helm.HelmRenderError, match="inbox.airflow.url is required"):
        render(chart, {"site": "origin", "inbox": {"airflow": {"url": ""}}})


def test_ingress_only_when_enabled_and_it_passes_tls_through(chart):
    assert not by_kind(render(chart, {"site": "origin"}), "Ingress")
    objects = render(chart, merged({"site": "origin"}, EXPOSURES["ingress"]))
    ingress = by_kind(objects, "Ingress")["factory-origin-inbox"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    assert "tls" not in ingress["spec"]  # the controller holds no certificate: it never terminates
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "inbox.example.org"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "factory-origin-inbox", "port": {"name": "https"}}
    assert ingress["spec"]["ingressClassName"] == "nginx"


@pytest.mark.parametrize(
    ("ingress", "message"),
    [
        ({"enabled": True}, "inbox.ingress.host is required"),
        (
            {"enabled": True, "host": "inbox.example.org",
             "annotations": {"nginx.ingress.kubernetes.io/ssl-passthrough": "false"}},
            "TLS must pass through",
        ),
        ({"enabled": True, "host": "inbox.example.org", "annotations": None}, "TLS must pass through"),
    ],
)  # fmt: skip
def test_ingress_that_would_not_pass_tls_through_fails(chart, ingress, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, {"site": "origin", "inbox": {"ingress": ingress}})


def test_load_balancer_and_node_port_keep_partner_addresses_visible(chart):
    values = merged({"site": "origin", "partners": partners_of("origin")}, EXPOSURES["load-balancer"])
    service = by_kind(render(chart, values), "Service")["factory-origin-inbox"]["spec"]
    assert service["type"] == "LoadBalancer" and service["externalTrafficPolicy"] == "Local"
    assert service["loadBalancerSourceRanges"] == [RANGES["supplier"], RANGES["destination"]]
    node = by_kind(render(chart, merged({"site": "origin"}, EXPOSURES["node-port"])), "Service")["factory-origin-inbox"]
    assert node["spec"]["externalTrafficPolicy"] == "Local" and node["spec"]["ports"][0]["nodePort"] == 30443
    cluster = by_kind(render(chart, {"site": "origin"}), "Service")["factory-origin-inbox"]["spec"]
    assert cluster["type"] == "ClusterIP" and "externalTrafficPolicy" not in cluster
    assert cluster["ports"] == [{"name": "https", "port": 8443, "targetPort": "https", "protocol": "TCP"}]


def test_disabled_inbox_renders_no_inbox_objects(chart):
    objects = render(
        chart, {"site": "origin", "inbox": {"enabled": False, "airflow": {"url": ""}}, "partners": partners_of("origin")}
    )
    assert inbox_objects(objects) == []
    assert not [o for o in objects if "inbox" in o["metadata"]["name"]]
    # the site still pushes to its partners
    assert by_kind(objects, "ConfigMap")["factory-origin-partners"]["data"]


def test_step_pods_get_the_partner_inbox_urls_and_may_reach_only_those(chart):
    partners = partners_of("supplier")
    partners[0]["inboxUrl"] = "https://inbox.origin.example"  # port 443 implied
    partners[1]["inboxCidrs"] = ["192.0.2.128/28"]  # destination's inbox behind its own load balancer
    partners.append({"site": "supplier", "cidrs": ["10.0.0.0/8"]})  # a mistake: refused below
    with pytest.raises(helm.HelmRenderError, match="supplier is this release's own site"):
        render(chart, {"site": "supplier", "partners": partners})
    partners.pop()
    objects = render(chart, {"site": "supplier", "partners": partners})
    config = by_kind(objects, "ConfigMap")["factory-supplier-partners"]
    assert config["data"] == {
        "FACTORY_PARTNER_INBOX_ORIGIN": "https://inbox.origin.example",
        "FACTORY_PARTNER_INBOX_DESTINATION": INBOX_URLS["destination"],
    }
    egress = by_kind(objects, "NetworkPolicy")["factory-supplier-step-egress"]["spec"]["egress"]
    assert [r for r in egress if "ipBlock" in r["to"][0]] == [
        {"to": [{"ipBlock": {"cidr": RANGES["origin"]}}], "ports": [{"protocol": "TCP", "port": 443}]},
        {"to": [{"ipBlock": {"cidr": "192.0.2.128/28"}}], "ports": [{"protocol": "TCP", "port": 8443}]},
    ]
    # a partner that only pushes here: admitted by the inbox, never pushed to
    receive_only = [{"site": "origin", "cidrs": [RANGES["origin"]]}]
    objects = render(chart, {"site": "supplier", "partners": receive_only})
    assert by_kind(objects, "ConfigMap")["factory-supplier-partners"]["data"] == {}
    egress = by_kind(objects, "NetworkPolicy")["factory-supplier-step-egress"]["spec"]["egress"]
    assert not any("ipBlock" in r["to"][0] for r in egress)


@pytest.mark.parametrize(
    ("partners", "message"),
    [
        ([{"site": "origin", "cidrs": ["0.0.0.0/0"]}], "0.0.0.0/0 admits every address"),
        ([{"site": "origin", "cidrs": ["10.0.0.0/8"], "inboxCidrs": ["::/0"]}], "::/0 admits every address"),
        ([{"site": "origin", "cidrs": ["10.1.0.0/16"]}, {"site": "origin", "cidrs": ["10.2.0.0/16"]}],
         "origin is listed twice"),
    ],
)  # fmt: skip
def test_partner_mistakes_fail_to_render(chart, partners, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, {"site": "supplier", "partners": partners})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"partners": [{"site": "origin", "inboxUrl": "https://inbox.origin.example"}]}, "missing property 'cidrs'"),
        ({"partners": [{"site": "origin", "cidrs": []}]}, "/partners/0/cidrs"),
        ({"partners": [{"site": "origin", "cidrs": ["origin.example"]}]}, "/partners/0/cidrs/0"),
        ({"partners": [{"site": "mars", "cidrs": ["10.0.0.0/8"]}]}, "/partners/0/site"),
        ({"partners": [{"site": "origin", "cidrs": ["10.0.0.0/8"], "inboxUrl": "http://inbox.origin.example"}]},
         "/partners/0/inboxUrl"),
        ({"partners": [{"site": "origin", "cidrs": ["10.0.0.0/8"], "port": 8443}]}, "additional properties 'port'"),
        ({"inbox": {"ingress": {"tls": True}}}, "additional properties 'tls'"),
        ({"inbox": {"service": {"type": "ExternalName"}}}, "/inbox/service/type"),
    ],
)  # fmt: skip
def test_schema_refuses_bad_inbox_and_partner_values(chart, values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.render(merged(OFF, {"site": "supplier", **values}), name="x", namespace="factory")


def test_ci_sites_agree_on_each_partner_and_admit_each_other():
    """The per-site examples describe one federation: every site lists the two others, and what two
    sites say about a third (its ranges, its inbox) is the same."""
    described: dict[str, list[dict]] = {}
    ingress_hosts = {}
    for values_file in (CHART / "ci").glob("*-values.yaml"):
        values = yaml.safe_load(values_file.read_text())
        assert {p["site"] for p in values["partners"]} == set(SITES) - {values["site"]}, values_file.name
        for partner in values["partners"]:
            described.setdefault(partner["site"], []).append(partner)
        if values["inbox"].get("ingress", {}).get("enabled"):
            ingress_hosts[values["site"]] = values["inbox"]["ingress"]["host"]
    for site, views in described.items():
        assert len(views) == 2 and views[0] == views[1], site
    for site, host in ingress_hosts.items():
        assert described[site][0]["inboxUrl"] == f"https://{host}"
