"""Issue 15, finding 7: policies swapped through the environment are refused, not obeyed.

A site trusts one policy bundle (its pin); FACTORY_POLICIES pointing at another folder, or
FACTORY_OPA_URL pointing at a server that serves another bundle, gives an audited denial
that names the expected and the found digest. A bundle that does not load is an audited
denial too, never an exception out of `evaluate()`.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from pipelines.config import PROJECT_ROOT
from pipelines.policy import evaluate
from pipelines.policy.bundle import load_bundle, read_bundle
from pipelines.policy.cli import policy
from pipelines.policy.pin import PinError, ensure_pin, pin_file, read_pin, write_pin
from pipelines.policy.testing import serve_data_api
from pipelines.trust import audit, keys
from pipelines.workspace import SitePaths

ALLOW_ALL = """package factory.model_release

import rego.v1

decision := {"allow": true, "reasons": []}

allow := true

deny := set()
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """The supplier's home with keys (an audit log can be written) and no pin yet."""
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FACTORY_POLICIES", raising=False)
    monkeypatch.delenv("FACTORY_OPA_TOKEN", raising=False)
    monkeypatch.delenv("FACTORY_OPA_TOKEN_FILE", raising=False)
    paths = SitePaths.of("supplier", tmp_path / "home")
    keys.ensure_site_keys(paths)
    return paths


@pytest.fixture
def allow_all(tmp_path):
    """A copy of the project's policies whose model_release gate allows everything."""
    root = tmp_path / "evil-policies"
    shutil.copytree(load_bundle().root, root)
    for module in (root / "model_release").glob("*.rego"):  # the gate's package spans several files
        module.unlink()
    (root / "model_release" / "model_release.rego").write_text(ALLOW_ALL)
    return root


def decide(paths, document, **kwargs):
    return evaluate("model_release", document, site=paths.site, home=paths.home, **kwargs)


def decisions(paths):
    return [entry for entry in audit.entries(paths) if entry["action"] == "policy.decision"]


def refused_export(allowed_export):
    return dict(allowed_export, approvals=[])  # no approval at all: the shipped policy denies it


# --- the embedded engine and FACTORY_POLICIES --------------------------------------------------------


def test_project_policies_decide_without_a_pin(site, allowed_export):
    decision = decide(site, allowed_export)
    assert decision.allow and not decision.failed
    assert decision.bundle_digest == load_bundle(PROJECT_ROOT / "policies").digest
    assert read_pin(site) is None


def test_init_pins_the_policies_in_effect_and_audits_it(site, allowed_export):
    record = ensure_pin(site)
    assert record["digest"] == load_bundle().digest and record["previous"] is None
    assert json.loads(pin_file(site).read_text())["digest"] == record["digest"]
    before = pin_file(site).read_bytes()
    assert ensure_pin(site) is None and pin_file(site).read_bytes() == before  # a second init changes nothing
    pinned = [e for e in audit.entries(site) if e["action"] == "policy.pinned"]
    assert len(pinned) == 1 and pinned[0]["object"] == record["digest"] and pinned[0]["actor"] == "svc-supplier"
    assert decide(site, allowed_export).allow


@pytest.mark.parametrize("pinned", [False, True], ids=["auto-pin", "init-pin"])
def test_swapped_policy_folder_is_refused_and_audited(site, allow_all, monkeypatch, allowed_export, pinned):
    if pinned:
        ensure_pin(site)
    monkeypatch.setenv("FACTORY_POLICIES", str(allow_all))
    attack = refused_export(allowed_export)
    assert evaluate("model_release", attack).allow  # the attack: with no site to check, the swapped bundle rules

    decision = decide(site, attack)
    evil, good = read_bundle(allow_all).digest, load_bundle(PROJECT_ROOT / "policies").digest
    assert not decision.allow and decision.failed and decision.bundle_digest == evil
    assert decision.reasons == (decision.reasons[0],)
    assert f"expected {good}" in decision.reasons[0] and f"found {evil}" in decision.reasons[0]
    assert "policy bundle refused for site supplier" in decision.reasons[0]
    [entry] = decisions(site)
    assert entry["outcome"] == "deny" and entry["object"] == "model_release"
    assert entry["details"]["bundle_digest"] == evil and entry["details"]["reasons"] == list(decision.reasons)
    audit.verify(site)


def test_a_reviewed_change_is_pinned_with_the_cli_then_decides(site, allow_all, monkeypatch, allowed_export):
    monkeypatch.setenv("FACTORY_POLICIES", str(allow_all))
    assert not decide(site, refused_export(allowed_export)).allow
    result = CliRunner().invoke(policy, ["pin", "--site", "supplier", "--by", "supplier_officer",
                                         "--reason", "reviewed change"])
    assert result.exit_code == 0, result.output
    evil = read_bundle(allow_all).digest
    assert f"supplier pinned to {evil}" in result.output and "was no pin" in result.output
    assert decide(site, refused_export(allowed_export)).allow  # what the site now trusts decides
    [pinned] = [e for e in audit.entries(site) if e["action"] == "policy.pinned"]
    assert pinned["actor"] == "supplier_officer" and pinned["object"] == evil
    assert pinned["details"]["reason"] == "reviewed change" and pinned["details"]["previous"] is None
    monkeypatch.delenv("FACTORY_POLICIES")  # the project's folder is now the other bundle: refused
    decision = decide(site, allowed_export)
    assert not decision.allow and f"expected {evil} (pin {pin_file(site)})" in decision.reasons[0]
    audit.verify(site)


def test_pin_without_keys_leaves_nothing(tmp_path):
    paths = SitePaths.of("origin", tmp_path)
    with pytest.raises(keys.KeysMissing):
        write_pin(paths, PROJECT_ROOT / "policies")
    assert not pin_file(paths).exists()


def test_pin_cli_without_keys_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    result = CliRunner().invoke(policy, ["pin", "--site", "origin"])
    assert result.exit_code == 1 and "site origin not pinned: KeysMissing" in result.output
    assert not pin_file(SitePaths.of("origin", tmp_path)).exists()


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"site": "supplier", "digest": "md5:abc"}',
                                     b'{"site": "origin", "digest": "sha256:' + b"0" * 64 + b'"}', b"[" * 100000])
def test_unreadable_pin_denies(site, allowed_export, content):
    pin_file(site).write_bytes(content)
    decision = decide(site, allowed_export)
    assert not decision.allow and decision.failed
    assert f"the policy pin {pin_file(site)} is" in decision.reasons[0]
    assert decisions(site)[-1]["outcome"] == "deny"


@pytest.fixture
def conf_with_digest(tmp_path, monkeypatch):
    """Use a copy of conf/ whose supplier pins `digest` in sites.yaml (conf is read once per folder)."""
    def use(digest: str):
        conf = tmp_path / f"conf-{digest[-8:]}"
        shutil.copytree(PROJECT_ROOT / "conf", conf, dirs_exist_ok=True)
        sites = yaml.safe_load((conf / "sites.yaml").read_text())
        sites["sites"]["supplier"]["policy_bundle_digest"] = digest
        (conf / "sites.yaml").write_text(yaml.safe_dump(sites))
        monkeypatch.setenv("FACTORY_CONF", str(conf))
    return use


def test_digest_in_conf_is_enforced(site, conf_with_digest, allowed_export):
    conf_with_digest(load_bundle().digest)
    assert decide(site, allowed_export).allow
    conf_with_digest("sha256:" + "0" * 64)
    decision = decide(site, allowed_export)
    assert not decision.allow and f"expected sha256:{'0' * 64} (conf/sites.yaml" in decision.reasons[0]


def test_a_home_pin_must_agree_with_the_digest_in_conf(site, conf_with_digest, allow_all, allowed_export):
    write_pin(site, allow_all)
    conf_with_digest(load_bundle().digest)  # a conf swapped in cannot overrule the home's pin, nor the reverse
    decision = decide(site, allowed_export)
    assert not decision.allow and "disagrees with conf/sites.yaml policy_bundle_digest" in decision.reasons[0]
    with pytest.raises(PinError, match="trusts sha256:.* .conf/sites.yaml policy_bundle_digest.; the folder"):
        write_pin(site, allow_all)


def test_eval_cli_says_which_bundle_decided(allowed_approval):
    result = CliRunner().invoke(policy, ["eval", "--gate", "approval", "--input", "-"],
                                input=json.dumps(allowed_approval))
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"allow": True, "reasons": []}
    assert f"policy bundle {load_bundle().digest} ({load_bundle().root}), engine regorus" in result.stderr
    assert "compared with no site's pin (no --site)" in result.stderr


def test_digest_cli_prints_the_pinnable_digest(allow_all):
    result = CliRunner().invoke(policy, ["digest", "--policies", str(allow_all)])
    assert result.exit_code == 0 and result.stdout.strip() == read_bundle(allow_all).digest


def test_test_files_are_not_part_of_the_digest(tmp_path):
    root = tmp_path / "policies"
    shutil.copytree(load_bundle().root, root)
    for test in root.rglob("*_test.rego"):
        test.unlink()
    assert read_bundle(root).digest == load_bundle().digest  # what an OPA bundle ships is what the site pins


# --- an OPA server -------------------------------------------------------------------------------------


@pytest.fixture
def opa(monkeypatch):
    with serve_data_api() as server:
        monkeypatch.setenv("FACTORY_OPA_URL", server.url)
        monkeypatch.setenv("FACTORY_OPA_TIMEOUT", "2")
        yield server


def test_opa_revision_is_recorded_and_checked(site, opa, allowed_export):
    decision = decide(site, allowed_export)
    assert decision.allow and decision.engine == "opa" and decision.bundle_revision == load_bundle().digest
    assert decision.record()["bundle_revision"] == load_bundle().digest
    [entry] = decisions(site)
    assert entry["details"]["bundle_revision"] == load_bundle().digest


def test_opa_serving_an_allow_all_bundle_is_refused(site, opa, allow_all, allowed_export):
    opa.bundle = read_bundle(allow_all)
    opa.revision = opa.bundle.digest
    attack = refused_export(allowed_export)
    assert evaluate("model_release", attack).allow  # the attack: the server's answer is an allow
    decision = decide(site, attack)
    assert not decision.allow and decision.failed and decision.bundle_revision == opa.revision
    assert decision.reasons == (f"OPA bundle refused for site supplier: expected revision {load_bundle().digest} "
                                f"(the project's policy folder {PROJECT_ROOT / 'policies'} (no pin yet)), "
                                f"found {opa.revision} (OPA server {opa.url})",)
    [entry] = decisions(site)
    assert entry["outcome"] == "deny" and entry["details"]["bundle_revision"] == opa.revision
    audit.verify(site)


@pytest.mark.parametrize("revision", [None, "", "v1.2.3"])
def test_opa_without_the_pinned_revision_is_refused(site, opa, allowed_export, revision):
    opa.revision = revision
    decision = decide(site, allowed_export)
    assert not decision.allow and decision.failed
    if revision is None:
        assert "reports no bundle revision" in decision.reasons[0] and "--revision" in decision.reasons[0]
    else:
        assert f"found {revision} (OPA server" in decision.reasons[0]
    assert decisions(site)[-1]["outcome"] == "deny"


def test_opa_requires_its_token(site, opa, tmp_path, monkeypatch, allowed_export):
    opa.token = "s3cret-token"
    decision = decide(site, allowed_export)  # no token: the server refuses, the gate fails closed
    assert not decision.allow and decision.failed
    assert "answered HTTP 401 (fail closed)" in decision.reasons[0] and "no token was sent" in decision.reasons[0]
    assert opa.authorizations[-1] is None

    monkeypatch.setenv("FACTORY_OPA_TOKEN", "wrong")
    decision = decide(site, allowed_export)
    assert not decision.allow and "refused the token" in decision.reasons[0]

    monkeypatch.setenv("FACTORY_OPA_TOKEN", "s3cret-token")
    assert decide(site, allowed_export).allow and opa.authorizations[-1] == "Bearer s3cret-token"

    monkeypatch.delenv("FACTORY_OPA_TOKEN")
    token_file = tmp_path / "opa-token"
    token_file.write_text("s3cret-token\n")
    monkeypatch.setenv("FACTORY_OPA_TOKEN_FILE", str(token_file))
    assert decide(site, allowed_export).allow and opa.authorizations[-1] == "Bearer s3cret-token"
    token_file.write_text("rotated-token-value\n")  # a new token is read at the next call
    assert not decide(site, allowed_export).allow and opa.authorizations[-1] == "Bearer rotated-token-value"
    assert [e["outcome"] for e in decisions(site)] == ["deny", "deny", "allow", "allow", "deny"]


@pytest.mark.parametrize("problem", ["missing", "empty", "both"])
def test_a_bad_token_setting_fails_closed(site, opa, tmp_path, monkeypatch, allowed_export, problem):
    token_file = tmp_path / "opa-token"
    if problem == "empty":
        token_file.write_text("\n")
    if problem == "both":
        token_file.write_text("t")
        monkeypatch.setenv("FACTORY_OPA_TOKEN", "t")
    monkeypatch.setenv("FACTORY_OPA_TOKEN_FILE", str(token_file))
    decision = decide(site, allowed_export)
    assert not decision.allow and decision.failed and opa.requests == 0
    expected = {"missing": "cannot be read (fail closed)", "empty": "holds no usable token",
                "both": "both FACTORY_OPA_TOKEN and FACTORY_OPA_TOKEN_FILE are set"}[problem]
    assert expected in decision.reasons[0]
    assert decisions(site)[-1]["outcome"] == "deny"


# --- bundles that do not load ------------------------------------------------------------------------


def broken(root, problem):
    if problem == "bad_rego":
        (root / "approval" / "approval.rego").write_text("package factory.approval\n\ndecision := {\n")
    elif problem == "bad_json":
        (root / "factory" / "data.json").write_text('{"release_thresholds": ')
    elif problem == "not_utf8":
        (root / "factory" / "data.json").write_bytes(b'{"x": "\xff"}')
    elif problem == "missing":
        shutil.rmtree(root)
    elif problem == "no_rego":
        for module in root.rglob("*.rego"):
            module.unlink()


REASONS = {
    "bad_rego": "does not load in the engine",
    "bad_json": "policy data factory/data.json is not valid JSON",
    "not_utf8": "policy file factory/data.json is not UTF-8",
    "missing": "does not exist",
    "no_rego": "holds no Rego policy",
}


@pytest.mark.parametrize("problem", sorted(REASONS))
def test_a_broken_bundle_is_an_audited_denial(site, tmp_path, monkeypatch, allowed_approval, problem):
    root = tmp_path / "broken-policies"
    shutil.copytree(load_bundle().root, root)
    broken(root, problem)
    if problem == "bad_rego":
        write_pin(site, root)  # a reviewed, pinned change that turns out not to compile
    monkeypatch.setenv("FACTORY_POLICIES", str(root))

    plain = evaluate("approval", allowed_approval)  # no site: still no exception
    assert not plain.allow and plain.failed and REASONS[problem] in plain.reasons[0]

    decision = evaluate("approval", allowed_approval, site="supplier", home=site.home)
    assert not decision.allow and decision.failed and REASONS[problem] in decision.reasons[0]
    entry = decisions(site)[-1]
    assert entry["outcome"] == "deny" and entry["details"]["reasons"] == list(decision.reasons)
    audit.verify(site)


def test_eval_cli_with_a_broken_bundle_denies(tmp_path, monkeypatch, allowed_approval):
    root = tmp_path / "policies"
    shutil.copytree(load_bundle().root, root)
    broken(root, "bad_json")
    monkeypatch.setenv("FACTORY_POLICIES", str(root))
    result = CliRunner().invoke(policy, ["eval", "--gate", "approval", "--input", "-"],
                                input=json.dumps(allowed_approval))
    assert result.exit_code == 1, result.output
    assert "is not valid JSON" in json.loads(result.stdout)["reasons"][0]


def test_an_unexpected_error_is_a_denial_not_an_exception(site, monkeypatch, allowed_export):
    import pipelines.policy as policy_module

    def explode(bundle):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(policy_module, "engine_for", explode)
    decision = decide(site, allowed_export)
    assert not decision.allow and decision.failed
    assert decision.reasons[0] == "policy evaluation failed (fail closed): OSError: [Errno 5] Input/output error"
    assert decisions(site)[-1]["outcome"] == "deny"
