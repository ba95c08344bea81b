"""Withdrawal of a contribution, step by step without Airflow, on a small real model.

One module-scoped workspace: the origin releases its shared data to the supplier (a signed officer
answer, the real data_release gate, a sealed package carried by the media carrier), the supplier
trains a short M3 on it and its own data and releases it to the origin, which registers it. The
tests then revoke: registry marks, serving refusal, the gate, the request's verification and the
whole flow (request → approval → revoke and retrain with the real unlearning engine → notices →
the origin's serve stops answering), interrupted once and resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.approvals import sign_answer
from pipelines.learning import registry, revocations
from pipelines.serving.app import ServingError, create_app
from pipelines.steps import StepContext, StepError, run_step
from pipelines.steps import revocation as flow
from pipelines.trust import audit
from pipelines.workspace import SitePaths

ANSWERED_AT = "2026-12-05T10:00:00+00:00"
ROW = [0.5] * 64


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from pipelines.init import init_workspace

    home = tmp_path_factory.mktemp("factory")
    init_workspace(home)
    return home


def _ctx(home: Path, site: str, run_id: str = "test-run", dag_id: str = "test") -> StepContext:
    return StepContext(site=site, paths=SitePaths.of(site, home), run_id=run_id, dag_id=dag_id)


def _carry(home: Path, sender: str, recipient: str) -> dict:
    from pipelines.carrier.media import hand_over

    return hand_over(SitePaths.of(sender, home), SitePaths.of(recipient, home))


def _actions(paths: SitePaths, action: str) -> list[dict]:
    return [entry for entry in audit.entries(paths) if entry["action"] == action]


def _answer(ctx: StepContext, *, user: str, gate: str, option: str = "Approve", comment: str = "read") -> dict:
    """What the gate task of `ctx`'s run records and signs when `user` answers."""
    return sign_answer(ctx.paths, {
        "gate": gate, "owner_site": ctx.site, "required_role": "compliance_officer", "dag_id": ctx.dag_id,
        "run_id": ctx.run_id, "task_id": "approval", "chosen_options": [option], "comment": comment,
        "responded_by": user, "responded_at": ANSWERED_AT})


@pytest.fixture(scope="module")
def world(home: Path) -> dict:
    return build_world(home)


def build_world(home: Path) -> dict:
    """The origin's shared data at the supplier, the supplier's M3 trained on it, M3 held by the origin."""
    origin = _ctx(home, "origin", run_id="release-shared", dag_id="stage_2_sovereign_data_release")
    sanitized = run_step("sanitize_dataset", origin, dataset="shared", purpose="collaboration")
    validated = run_step("validate_dataset", origin, dataset=sanitized, suite="release")
    run_step("release_dataset", origin, dataset=sanitized, recipient="supplier", purpose="collaboration",
             kind="origin-shared", approvals=[_answer(origin, user="origin_officer", gate="data_release")],
             validation=validated)
    _carry(home, "origin", "supplier")
    supplier = _ctx(home, "supplier", run_id="collaborate", dag_id="stage_3_collaborative_optimization")
    received = run_step("receive_dataset", supplier, kind="origin-shared", name="origin-shared")
    trained = run_step("train_model", supplier, stage="M3", profile="local", datasets=["train", "origin-shared"])
    evaluated = run_step("evaluate_model", supplier, trained=trained, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", supplier, trained=evaluated, parity_set="test")
    m3 = run_step("register_model", supplier, trained=exported)
    run_step("release_model", supplier, model=m3, recipient="origin", purpose="collaboration", kind="m3")
    _carry(home, "supplier", "origin")
    held = run_step("receive_model", _ctx(home, "origin"), kind="m3", test_sets={"origin_test": "test"})
    return {"m3": f"{m3['name']}/{m3['version']}", "origin_m3": f"{held['name']}/{held['version']}",
            "received": received["dataset_id"], "shared": sanitized["source_id"], "sanitized": sanitized["dataset_id"]}


# ---------------------------------------------------------------------------- registry marks and serving


def _copy_at_destination(home: Path, world: dict) -> tuple[SitePaths, list[registry.ModelRef]]:
    """Two versions of a stage model at the destination (the supplier's signed M3, registered twice)."""
    paths = SitePaths.of("destination", home)
    source = registry.resolve_model(SitePaths.of("supplier", home), world["m3"])
    refs = [registry.register(paths, "digits-cnn-m6", source.model_dir, run_id=None,
                              tags={"factory.stage": "M6", "factory.run_key": f"{i:016x}"}) for i in (1, 2)]
    return paths, refs


def test_registry_marks_revoked_versions_and_stage_resolution_skips_them(home, world):
    paths, (v1, v2) = _copy_at_destination(home, world)
    assert registry.resolve_model(paths, "M6").uri == v2.uri
    mark = {"revocation_id": "rev-" + "a" * 24, "dataset": world["shared"], "owner": "origin", "replaced_by": None,
            "at": ANSWERED_AT}
    entry = registry.mark_revoked(paths, v2, mark)
    assert entry["run_key"] == f"{2:016x}" and revocations.revoked_models(paths)[v2.uri]["revocation_id"] == mark["revocation_id"]
    assert registry.resolve_model(paths, "M6").uri == v1.uri  # the newest unrevoked one
    explicit = registry.resolve_model(paths, v2.uri)  # still there, for inspection
    assert explicit.revoked["dataset"] == world["shared"] and registry.revocation_of(paths, explicit) == explicit.revoked
    # The same revocation again fills in its replacement; another revocation does not overwrite the first.
    registry.mark_revoked(paths, v2, {**mark, "replaced_by": "digits-cnn-m6/9"})
    registry.mark_revoked(paths, v2, {**mark, "revocation_id": "rev-" + "b" * 24, "replaced_by": "x/1"})
    tag = json.loads(registry.resolve_model(paths, v2.uri).tags[registry.REVOKED_TAG])
    assert tag["replaced_by"] == "digits-cnn-m6/9" and tag["revocation_id"] == mark["revocation_id"]
    assert revocations.revoked_run(paths, "digits-cnn-m6", f"{2:016x}")["replaced_by"] == "digits-cnn-m6/9"
    registry.mark_revoked(paths, v1, mark)
    with pytest.raises(registry.ModelNotFound, match="every M6 .* is revoked"):
        registry.resolve_model(paths, "M6")


def test_serve_refuses_a_revoked_model_and_answers_410_once_it_is_revoked_while_served(home, world):
    paths = SitePaths.of("destination", home)
    source = registry.resolve_model(SitePaths.of("supplier", home), world["m3"])
    ref = registry.register(paths, "digits-cnn-m7", source.model_dir, run_id=None,
                            tags={"factory.stage": "M7", "factory.run_key": "c" * 16})
    client = TestClient(create_app(paths, ref, auth=False))
    assert client.post("/predict", json={"inputs": [ROW]}).status_code == 200
    registry.mark_revoked(paths, ref, {"revocation_id": "rev-" + "c" * 24, "dataset": world["shared"],
                                       "owner": "origin", "replaced_by": "digits-cnn-m7/2", "at": ANSWERED_AT})
    answer = client.post("/predict", json={"inputs": [ROW]})
    assert answer.status_code == 410, answer.text
    assert answer.json()["revocation"]["revocation_id"] == "rev-" + "c" * 24
    assert "rev-" + "c" * 24 in answer.json()["detail"] and "digits-cnn-m7/2" in answer.json()["detail"]
    assert client.get("/healthz").json()["status"] == "revoked"
    with pytest.raises(ServingError, match="revoked by revocation rev-c"):
        create_app(paths, registry.resolve_model(paths, ref.uri), auth=False)
    # the list alone (as a partner's notice writes it first) is enough: a model the registry does not mark
    bare = registry.register(paths, "digits-cnn-m7", source.model_dir, run_id=None, tags={"factory.stage": "M7"})
    served = TestClient(create_app(paths, bare, auth=False))
    revocations.record_revoked(paths, name=bare.name, version=bare.version, run_key=None,
                               revocation={"revocation_id": "rev-" + "d" * 24, "dataset": "x/y@1", "owner": "origin"})
    assert served.post("/predict", json={"inputs": [ROW]}).status_code == 410


def test_an_unreadable_revocation_list_fails_closed(tmp_path):
    paths = SitePaths.of("origin", tmp_path)
    watch = revocations.RevocationWatch(paths, "m", "1")
    assert watch.check() is None
    revocations.list_path(paths).parent.mkdir(parents=True)
    revocations.list_path(paths).write_text("{not json")
    assert "unreadable" in watch.check()["reason"]


# ---------------------------------------------------------------------------- requests: owner and trainer checks


def test_only_the_owner_may_ask_and_unreleased_data_is_a_noop(home, world):
    supplier = _ctx(home, "supplier", run_id="ask-for-origin")
    with pytest.raises(StepError, match=r"owned by origin, not supplier: only its owner"):
        run_step("request_revocation", supplier, dataset="origin-shared")
    assert _actions(supplier.paths, "revocation.refused")[-1]["outcome"] == "not_owner"
    origin = _ctx(home, "origin", run_id="withdraw-private")
    with pytest.raises(StepError, match="name the dataset"):
        run_step("request_revocation", origin, dataset=" ")
    with pytest.raises(StepError, match="origin cannot withdraw 'no-such-data'"):
        run_step("request_revocation", origin, dataset="no-such-data")
    assert _actions(origin.paths, "revocation.refused")[-1]["outcome"] == "unknown_dataset"
    result = run_step("request_revocation", origin, dataset="private")
    assert result["noop"] and result["sent"] == [] and "never released" in result["message"]


def _send_request(home: Path, signer: str, **fields) -> dict:
    """A request signed by `signer`, sealed for the supplier and carried (as an owner's step would)."""
    ctx = _ctx(home, signer, run_id=f"hand-made-{len(fields)}")
    revocation_id = fields.pop("revocation_id")
    document = flow._sign(ctx, flow.REQUEST_TYPE, {"revocation_id": revocation_id, "recipient": "supplier",
                                                    "requested_by": f"{signer}_officer", **fields})
    return document, ctx


def _deliver(home: Path, ctx: StepContext, document: dict) -> None:
    flow._send(ctx, "supplier", document, kind=flow.REQUEST_KIND, content_type="revocation-request",
               revocation_id=document["revocation_id"])
    _carry(home, ctx.site, "supplier")


def test_a_request_for_another_sites_data_is_denied_and_audited(home, world):
    document, destination = _send_request(home, "destination", revocation_id="rev-" + "1" * 24, owner="destination",
                                          dataset=world["shared"], datasets=[world["shared"]])
    _deliver(home, destination, document)
    supplier = _ctx(home, "supplier", run_id="deny")
    with pytest.raises(StepError, match=rf"{world['shared']} is owned by origin, not destination"):
        run_step("receive_revocation", supplier)
    denied = _actions(supplier.paths, "revocation.denied")[-1]
    assert denied["outcome"] == "not_owner" and denied["object"] == "rev-" + "1" * 24
    assert not revocations.revoked_models(supplier.paths)
    with pytest.raises(StepError, match="was denied"):  # a re-run of the task says so again
        run_step("receive_revocation", supplier)


def test_a_forged_request_is_refused_and_audited(home, world):
    document, origin = _send_request(home, "origin", revocation_id="rev-" + "2" * 24, owner="origin",
                                     dataset=world["shared"], datasets=[world["shared"]])
    document["datasets"] = [world["shared"], world["received"]]  # altered after signing
    _deliver(home, origin, document)
    supplier = _ctx(home, "supplier", run_id="forged")
    before = len(_actions(supplier.paths, "package.quarantined"))
    with pytest.raises(StepError):
        run_step("receive_revocation", supplier)  # the forged one is moved aside; the denied one is the last record
    forged = _actions(supplier.paths, "revocation.denied")[-1]
    assert forged["outcome"] == "forged" and "does not verify" in forged["details"]["reason"]
    assert len(_actions(supplier.paths, "package.quarantined")) == before + 1
    assert list((supplier.paths.inbox / "rejected").glob("contribution-revocation-*.sfp"))
    assert not revocations.revoked_models(supplier.paths)


def test_a_request_for_data_no_model_used_is_a_noop(home, world):
    from pipelines.data.catalog import latest

    unused = latest(SitePaths.of("origin", home), "test").id  # never released, never trained on
    document, origin = _send_request(home, "origin", revocation_id="rev-" + "3" * 24, owner="origin",
                                     dataset=unused, datasets=[unused])
    _deliver(home, origin, document)
    supplier = _ctx(home, "supplier", run_id="noop")
    result = run_step("receive_revocation", supplier)
    assert result["noop"] and result["affected"] == [] and "nothing to retrain or revoke" in result["message"]
    assert run_step("apply_revocation", supplier, revocation=result, approval=None)["noop"]
    assert run_step("send_revocation_notices", supplier, revocation=result)["notices"] == []
    assert not revocations.revoked_models(supplier.paths)
    assert registry.resolve_model(supplier.paths, "M3").uri == world["m3"]


# ---------------------------------------------------------------------------- the whole flow, interrupted once


class Interrupted(Exception):
    pass


def test_owner_revokes_trainer_approves_retrains_and_partner_stops_serving(home, world, monkeypatch):
    from pipelines.steps.unlearning import reaches

    origin_paths, supplier_paths = SitePaths.of("origin", home), SitePaths.of("supplier", home)
    origin_serving = TestClient(create_app(origin_paths, registry.resolve_model(origin_paths, world["origin_m3"]),
                                           auth=False))
    assert origin_serving.post("/predict", json={"inputs": [ROW]}).status_code == 200

    asked = run_step("request_revocation", _ctx(home, "origin", run_id="withdraw-shared"), dataset="shared")
    assert [s["recipient"] for s in asked["sent"]] == ["supplier"]
    assert set(asked["datasets"]) == {world["shared"], world["sanitized"]}  # the released copy is derived from it
    _carry(home, "origin", "supplier")
    supplier = _ctx(home, "supplier", run_id="revoke", dag_id="contribution_revocation")
    received = run_step("receive_revocation", supplier)
    assert [m["model"] for m in received["affected"]] == [world["m3"]] and not received["noop"]
    assert world["shared"] in received["evidence_md"]

    # An answer of another gate is refused; nothing is revoked.
    with pytest.raises(StepError, match="not this run|belongs to gate"):
        run_step("apply_revocation", supplier, revocation=received,
                 approval=_answer(supplier, user="supplier_officer", gate="model_release"))
    assert not revocations.revoked_models(supplier_paths)

    # Interrupted during the retraining: the old version is already out of service, no replacement yet.
    real = flow.retrainer()

    def interrupted(ctx, **kwargs):
        raise Interrupted("the worker was killed")

    monkeypatch.setattr(flow, "retrainer", lambda: interrupted)
    approval = _answer(supplier, user="supplier_officer", gate=flow.GATE)
    with pytest.raises(Interrupted):
        run_step("apply_revocation", supplier, revocation=received, approval=approval)
    assert revocations.revoked_models(supplier_paths)[world["m3"]]["replaced_by"] is None
    with pytest.raises(registry.ModelNotFound, match="revoked"):
        registry.resolve_model(supplier_paths, "M3")
    with pytest.raises(ServingError, match="revoked"):
        create_app(supplier_paths, registry.resolve_model(supplier_paths, world["m3"]), auth=False)

    calls = []

    def counted(ctx, **kwargs):
        calls.append(kwargs)
        return real(ctx, **kwargs)

    monkeypatch.setattr(flow, "retrainer", lambda: counted)
    applied = run_step("apply_revocation", supplier, revocation=received, approval=approval)
    new = applied["replaced"][world["m3"]]["model"]
    assert calls == [{"model": world["m3"], "dataset_id": world["shared"]}]
    assert registry.resolve_model(supplier_paths, "M3").uri == new != world["m3"]
    assert not reaches(registry.resolve_model(supplier_paths, new).metadata, world["shared"])
    assert registry.resolve_model(supplier_paths, world["m3"]).revoked["replaced_by"] == new
    run_step("apply_revocation", supplier, revocation=received, approval=approval)  # resumed again: nothing to do
    assert len(calls) == 1

    # Every gate refuses the old version (the real policy engine).
    with pytest.raises(StepError, match=r"model_release gate denied: .*is revoked \(revocation rev-"):
        run_step("release_model", supplier, model=world["m3"], recipient="origin", purpose="collaboration",
                 kind="m3-again")

    notices = run_step("send_revocation_notices", supplier, revocation=received)
    assert [(n["recipient"], n["models"]) for n in notices["notices"]] == [("origin", [world["m3"]])]
    _carry(home, "supplier", "origin")
    noticed = run_step("receive_revocation_notice", _ctx(home, "origin", run_id="notice"))
    assert noticed["revoked"] == [world["origin_m3"]]
    answer = origin_serving.post("/predict", json={"inputs": [ROW]})
    assert answer.status_code == 410 and answer.json()["revocation"]["replaced_by"] == new
    with pytest.raises(registry.ModelNotFound):
        registry.resolve_model(origin_paths, "M3")  # until the replacement arrives
    with pytest.raises(ServingError, match="revoked"):
        create_app(origin_paths, registry.resolve_model(origin_paths, world["origin_m3"]), auth=False)
    assert _actions(origin_paths, "model.revoked")[-1]["details"]["notified_by"] == "supplier"
    # The replacement went with the notice, as the revoked version had (kind m3): the origin's intake takes it.
    assert [(d["model"], d["recipient"]) for d in notices["deliveries"]] == [(new, "origin")]
    replacement = run_step("receive_model", _ctx(home, "origin", run_id="replacement"), kind="m3",
                           test_sets={"origin_test": "test"})
    assert registry.resolve_model(origin_paths, "M3").uri == f"{replacement['name']}/{replacement['version']}"
    assert not reaches(registry.resolve_model(origin_paths, "M3").metadata, world["shared"])
    again = run_step("send_revocation_notices", supplier, revocation=received)  # a re-run sends nothing twice
    assert [d["package_id"] for d in again["deliveries"]] == [d["package_id"] for d in notices["deliveries"]]

    # A package still carrying the old version (sealed past the gate, as a stale or hostile sender would) is
    # refused at intake: the origin holds that run as revoked.
    from pipelines.steps.exchange import _seal_to_outbox

    old = registry.resolve_model(supplier_paths, world["m3"])
    _seal_to_outbox(supplier, "origin", old.model_dir, purpose="collaboration", content_type="model",
                    metadata={"kind": "m3-late", "model": old.uri, "stage": "M3", "variant": None, "approvals": []})
    _carry(home, "supplier", "origin")
    with pytest.raises(StepError, match="no acceptable m3-late package"):
        run_step("receive_model", _ctx(home, "origin", run_id="late"), kind="m3-late", test_sets={"origin_test": "test"})
    reasons = [json.loads(p.read_text())["reason"] for p in (origin_paths.inbox / "rejected").glob("m3-late-*.json")]
    assert reasons and "holds it as revoked by revocation" in reasons[0]

    actions = {e["action"] for e in audit.entries(supplier_paths) if e["object"] == received["revocation_id"]}
    assert {"revocation.received", "revocation.approved", "model.revoked", "revocation.retrained",
            "revocation.notice_sent"} <= actions


# ---------------------------------------------------------------------------- through Airflow


@pytest.mark.slow
def test_factory_contribution_revoke_through_airflow(tmp_path):
    """`factory contribution revoke --embedded --approve` in its own process and workspace: the origin's
    request DAG, the supplier's DAG (its officer's gate answered through Airflow's API), the origin's
    notice DAG; the supplier holds a new M3, the old one is revoked there and at the origin."""
    import os
    import subprocess
    import sys

    from pipelines.init import init_workspace

    home = tmp_path / "home"
    init_workspace(home)
    world = build_world(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")} | {"FACTORY_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "contribution", "revoke", "--owner", "origin",
                           "--dataset", "shared", "--embedded", "--approve"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ("ran contribution_revocation_request_origin, contribution_revocation, "
            "contribution_revocation_notice_origin") in done.stdout
    supplier, origin = SitePaths.of("supplier", home), SitePaths.of("origin", home)
    new = registry.resolve_model(supplier, "M3")
    assert new.uri != world["m3"] and registry.resolve_model(supplier, world["m3"]).revoked["replaced_by"] == new.uri
    held = registry.resolve_model(origin, world["origin_m3"])
    assert held.revoked["owner"] == "origin" and held.revoked["replaced_by"] == new.uri
    with pytest.raises(ServingError, match="revoked"):
        create_app(origin, held, auth=False)
    approved = [e for e in audit.entries(supplier) if e["action"] == "revocation.approved"]
    assert [e["actor"] for e in approved] == ["supplier_officer"]
