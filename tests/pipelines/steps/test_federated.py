"""Federated rounds across the sites, step by step without Airflow, on a small real model (issue 20).

One module-scoped workspace with stage 3 switched to federated (a copy of conf/ with 2 rounds): the
supplier trains a short M1 and releases it to the origin, which registers it. The tests then run
the coordinator's and the participant's steps with the media carrier between them: packages from
the wrong sender or with a wrong digest are refused, a site past the deadline is left out of the
round and its late update refused, and the result goes through evaluate → export → register as M3
with the origin's dataset in its lineage, while no dataset package ever reached the supplier.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from pipelines.carrier.outbox import seal_to_outbox
from pipelines.config import FederatedStage, load_config
from pipelines.fileio import read_json, write_json
from pipelines.learning import registry
from pipelines.steps import StepContext, StepError, run_step
from pipelines.steps import federated as fl
from pipelines.trust.packages import read_signed_header
from pipelines.workspace import SitePaths

PLAN = {"units": {"supplier": 1, "origin": 2}, "data": {"supplier": "train", "origin": "shared"}}


# ---------------------------------------------------------------------------- plan and split (no workspace)


def test_units_split_a_site_partition_deterministically_into_disjoint_shares():
    parts = fl.split_units(101, 3, seed=7)
    assert [len(p) for p in parts] == [34, 34, 33]
    assert sorted(np.concatenate(parts).tolist()) == list(range(101))  # every row once
    assert all((a == b).all() for a, b in zip(parts, fl.split_units(101, 3, seed=7), strict=True))
    assert not all((a == b).all() for a, b in zip(parts, fl.split_units(101, 3, seed=8), strict=True))
    with pytest.raises(StepError, match="2 rows cannot be split into 3 units"):
        fl.split_units(2, 3, seed=7)


@pytest.mark.parametrize(("changes", "message"), [
    ({"secure_aggregation": True, "units": {"supplier": 1, "origin": 1}, "data": {"supplier": "train", "origin": "shared"}},
     "secure aggregation needs at least 3 units"),
    ({"mu": 0.1}, "FedProx's proximal term"),
    ({"rule": "median", "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}}, "needs each update in the clear"),
    ({"data": {"supplier": "train"}}, "units and data must name the same sites"),
    ({"min_rounds": 9, "rounds": 3}, "min_rounds 9 exceeds rounds 3"),
    ({"rule": "fedsgd"}, "rule"),
    ({"rounds": 3, "surprise": 1}, "surprise"),
])
def test_a_federated_plan_that_cannot_run_is_refused(changes, message):
    with pytest.raises(ValidationError, match=message):
        FederatedStage(**{**PLAN, **changes})


def test_update_privacy_spend_grows_with_the_rounds_and_is_none_without_privacy():
    from pipelines.federated import epsilon

    private = FederatedStage(**PLAN, privacy={"clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5})
    spends = [fl.round_epsilon(private, n) for n in (1, 4)]
    assert spends[0]["delta"] == 1e-5 and 0 < spends[0]["epsilon"] < spends[1]["epsilon"]
    assert spends[1]["epsilon"] == pytest.approx(epsilon([1.1] * 4, sample_rate=1.0, delta=1e-5))
    assert fl.round_epsilon(FederatedStage(**PLAN), 4) is None


def test_collaboration_is_centralized_by_default_and_federated_needs_its_plan(tmp_path, monkeypatch):
    stages = load_config().stages
    assert stages.collaboration_of(3) == "centralized" and stages.collaboration_of(6) == "centralized"
    for mode, message in (("8: federated", "collaboration.8 is federated but federated.8 is missing"),
                          ("2: federated", "collaboration.2: no stage 2 with a model")):
        monkeypatch.delenv("FACTORY_CONF", raising=False)
        conf = _conf_copy(tmp_path / mode[0], federated=False)
        text = (conf / "stages.yaml").read_text()
        (conf / "stages.yaml").write_text(text.replace("collaboration: {3: centralized, 6: centralized}",
                                                       f"collaboration: {{3: centralized, {mode}}}"))
        monkeypatch.setenv("FACTORY_CONF", str(conf))
        with pytest.raises(ValidationError, match=message):
            load_config()


def test_the_steps_do_nothing_while_the_stage_is_centralized(tmp_path):
    paths = SitePaths.of("supplier", tmp_path)
    ctx = StepContext(site="supplier", paths=paths, run_id="r", dag_id="t")
    assert fl.federated_coordinate(ctx, stage=3, start=False)["status"] == "centralized"
    with pytest.raises(StepError, match="collaborates centralized"):
        fl.federated_coordinate(ctx, stage=3, start=True)
    origin = StepContext(site="origin", paths=SitePaths.of("origin", tmp_path), run_id="r", dag_id="t")
    assert fl.federated_participate(origin, stage=3)["status"] == "centralized"


# ---------------------------------------------------------------------------- a workspace, federated


def _conf_copy(tmp: Path, *, federated: bool = True) -> Path:
    from pipelines.config import conf_dir

    conf = tmp / "conf"
    shutil.copytree(conf_dir(), conf)
    if federated:
        text = (conf / "stages.yaml").read_text()
        text = text.replace("collaboration: {3: centralized, 6: centralized}", "collaboration: {3: federated, 6: centralized}")
        text = text.replace("    rounds: 10\n    min_rounds: 4", "    rounds: 2\n    min_rounds: 1")
        # origin's shared data is never released while stage 3 is federated: M8 trains without it, M4 on
        # the partition itself (conf/stages.yaml refuses the names otherwise)
        text = text.replace("M8: {datasets: [train, origin-shared, origin-export", "M8: {datasets: [train, origin-export")
        text = text.replace("M4: {datasets: [shared-sanitized, ", "M4: {datasets: [shared, ")
        (conf / "stages.yaml").write_text(text)
    return conf


def _ctx(home: Path, site: str, run_id: str = "test-run") -> StepContext:
    return StepContext(site=site, paths=SitePaths.of(site, home), run_id=run_id, dag_id="test")


def _carry(home: Path, sender: str, recipient: str) -> None:
    from pipelines.carrier.media import hand_over

    hand_over(SitePaths.of(sender, home), SitePaths.of(recipient, home))


def _rejected(home: Path, site: str) -> list[str]:
    folder = SitePaths.of(site, home).inbox / "rejected"
    return sorted(read_json(p)["reason"] for p in folder.glob("*.reason.json")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from pipelines.init import init_workspace

    tmp = tmp_path_factory.mktemp("federated")
    before = os.environ.get("FACTORY_CONF")
    os.environ["FACTORY_CONF"] = str(_conf_copy(tmp))
    try:
        home = tmp / "home"
        init_workspace(home)
        supplier = _ctx(home, "supplier")
        trained = run_step("train_model", supplier, stage="M1", profile="local", datasets=["train"])
        evaluated = run_step("evaluate_model", supplier, trained=trained, test_sets={"supplier_test": "test"})
        exported = run_step("export_model", supplier, trained=evaluated, parity_set="test")
        m1 = run_step("register_model", supplier, trained=exported)
        run_step("release_model", supplier, model=m1, recipient="origin", purpose="collaboration", kind="m1")
        _carry(home, "supplier", "origin")
        run_step("receive_model", _ctx(home, "origin"), kind="m1", test_sets={"origin_test": "test"})
        yield home
    finally:
        if before is None:
            os.environ.pop("FACTORY_CONF", None)
        else:
            os.environ["FACTORY_CONF"] = before


def _fake_global(home: Path, sender: str, **changes) -> None:
    """A global-model package of `sender` for the origin, from the supplier's running round, changed."""
    supplier = SitePaths.of("supplier", home)
    record = read_json(supplier.state_dir / "federated" / "stage-3.json")
    vector = (supplier.state_dir / "federated" / record["training"] / "global.bin").read_bytes()
    src = SitePaths.of(sender, home).state_dir / "global.bin"
    src.write_bytes(vector)
    meta = {"kind": "m3-fl-global", "training": record["training"], "round": record["round"], "stage": "M3",
            "digest": fl.vector_digest(vector), "base_model": record["base_model"], "units": 2, "deadline": 60}
    seal_to_outbox(SitePaths.of(sender, home), "origin", src, purpose="collaboration", content_type=fl.GLOBAL,
                   metadata={**meta, **changes})
    _carry(home, sender, "origin")


def test_the_coordinator_starts_a_round_and_refuses_a_second_training(home):
    started = run_step("federated_coordinate", _ctx(home, "supplier"), stage=3, start="True")
    assert started["status"] == "started" and started["round"] == 1
    with pytest.raises(StepError, match="still running"):
        run_step("federated_coordinate", _ctx(home, "supplier"), stage=3, start=True)
    # nothing from the origin yet, deadline not passed: the round waits
    assert run_step("federated_coordinate", _ctx(home, "supplier"), stage=3)["waiting"] == ["origin"]


def test_a_global_model_from_another_site_or_with_a_wrong_digest_or_base_is_refused(home):
    _carry(home, "supplier", "origin")  # round 1's real global model
    sent = run_step("federated_participate", _ctx(home, "origin"), stage=3)
    assert sent["status"] == "sent" and sent["round"] == 1
    # each alone (a package channel's sequence only goes forward): none is answered
    for sender, changes in (("destination", {}), ("supplier", {"round": 5, "digest": "sha256:" + "0" * 64}),
                            ("supplier", {"round": 5, "base_model": {"run_key": "not-the-m1-the-origin-holds"}}),
                            ("supplier", {"round": 5, "training": "../../etc"}),
                            ("supplier", {"round": 1})):  # a second round-1 model
        _fake_global(home, sender, **changes)
        assert run_step("federated_participate", _ctx(home, "origin"), stage=3)["status"] == "idle"
    reasons = " | ".join(_rejected(home, "origin"))
    assert "the coordinator of this stage is supplier" in reasons
    assert "does not match its digest" in reasons
    assert "not the M1 origin verified" in reasons
    assert "training id '../../etc' is malformed" in reasons
    assert "round 1 of" in reasons and "was answered already" in reasons


def test_a_site_past_the_deadline_is_left_out_and_its_late_update_refused(home):
    # the deadline passes before the update arrives
    supplier = SitePaths.of("supplier", home)
    state = supplier.state_dir / "federated" / "stage-3.json"
    record = read_json(state)
    record["current"]["started"] -= record["deadline"] + 1
    write_json(state, record)
    moved_on = run_step("federated_coordinate", _ctx(home, "supplier"), stage=3)
    assert moved_on["status"] == "next_round" and moved_on["round"] == 2
    first = read_json(state)["history"][0]
    assert first["stragglers"] == ["origin"] and first["included"] == ["supplier/unit-0"]
    _carry(home, "origin", "supplier")  # the late round-1 update
    waiting = run_step("federated_coordinate", _ctx(home, "supplier"), stage=3)
    assert waiting["status"] == "waiting"
    assert any("round 1 is not the running round 2" in r for r in _rejected(home, "supplier"))
    # updates for round 2 with names the coordinator did not ask for, or from a site that takes no part
    record = read_json(state)
    for sender, units in (("origin", ["origin/unit-0", "../../unit-1"]), ("destination", ["destination/unit-0"])):
        folder = SitePaths.of(sender, home).state_dir / "forged" / "update"
        folder.mkdir(parents=True, exist_ok=True)
        seal_to_outbox(SitePaths.of(sender, home), "supplier", folder, purpose="collaboration", content_type=fl.UPDATE,
                       metadata={"kind": "m3-fl-update", "training": record["training"], "round": 2,
                                 "digest": record["current"]["digest"],
                                 "units": [{"unit": u, "n_samples": 10, "digest": "sha256:" + "0" * 64} for u in units]})
        _carry(home, sender, "supplier")
        assert run_step("federated_coordinate", _ctx(home, "supplier"), stage=3)["status"] == "waiting"
    reasons = " | ".join(_rejected(home, "supplier"))
    assert "units must be ['origin/unit-0', 'origin/unit-1']" in reasons
    assert "update from destination: not a participant" in reasons


def test_the_last_round_registers_m3_with_every_dataset_and_only_updates_crossed(home):
    _carry(home, "supplier", "origin")
    sent = run_step("federated_participate", _ctx(home, "origin"), stage=3)
    assert sent["round"] == 2 and sent["metrics"]["global_origin_test"] > 0.5
    _carry(home, "origin", "supplier")
    supplier = _ctx(home, "supplier", run_id="finish")
    finished = run_step("federated_coordinate", supplier, stage=3)
    assert finished["finished"] and finished["stopped"] == "rounds"
    evaluated = run_step("evaluate_model", supplier, trained=finished, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", supplier, trained=evaluated, parity_set="test")
    m3 = run_step("register_model", supplier, trained=exported)
    ref = registry.resolve_model(SitePaths.of("supplier", home), f"{m3['name']}/{m3['version']}")
    meta = ref.metadata
    assert meta["stage"] == "M3" and meta["federated"]["rounds"] == 2
    assert {d["owner"] for d in meta["datasets"]} == {"supplier", "origin"}
    assert any(s["owner"] == "origin" and s["dataset_id"].startswith("origin/shared") for s in meta["lineage"])
    second = meta["federated"]["history"][1]
    assert second["included"] == ["supplier/unit-0", "origin/unit-0", "origin/unit-1"] and not second["stragglers"]
    vector = (SitePaths.of("supplier", home).state_dir / "federated" / finished["training"] / "global.bin").stat().st_size
    assert vector < second["bytes_down"]["origin"] < vector + 8192  # the weights and a signed header
    assert 2 * vector < second["bytes_up"]["origin"] < 2 * vector + 16384  # two units' updates
    assert second["content_types"] == [fl.GLOBAL, fl.UPDATE]
    # only model updates crossed into the supplier: no dataset package, whatever its state
    supplier_paths = SitePaths.of("supplier", home)
    headers = [read_signed_header(supplier_paths, p) for p in supplier_paths.inbox.rglob("*.sfp")]
    assert headers and {h["content_type"] for h in headers} == {fl.UPDATE}
    # the participant's own record of what left it
    mine = read_json(SitePaths.of("origin", home).state_dir / "federated" / "participant-stage-3.json")
    assert [r["bytes_out"] for r in mine[finished["training"]]["rounds"].values()] == [sent["bytes_out"]] * 2


def test_with_update_privacy_the_lineage_carries_each_source_s_spend(home, tmp_path, monkeypatch):
    conf = Path(os.environ["FACTORY_CONF"])
    private = tmp_path / "conf"
    shutil.copytree(conf, private)
    text = (private / "stages.yaml").read_text()
    (private / "stages.yaml").write_text(text.replace(
        "    privacy: null\n    base_model: M1",
        "    privacy: {clip_norm: 0.5, noise_multiplier: 1.0, delta: 1.0e-5}\n    base_model: M1"))
    monkeypatch.setenv("FACTORY_CONF", str(private))
    supplier = _ctx(home, "supplier", run_id="private")
    assert run_step("federated_coordinate", supplier, stage=3, start=True)["status"] == "started"
    for _ in range(2):
        _carry(home, "supplier", "origin")
        sent = run_step("federated_participate", _ctx(home, "origin"), stage=3)
        assert sent["status"] == "sent"
        _carry(home, "origin", "supplier")
        result = run_step("federated_coordinate", supplier, stage=3)
    assert result["finished"]
    expected = fl.round_epsilon(load_config().stages.federated_stage(3), 2)
    meta = read_json(Path(result["staging"]) / "metadata.json")
    assert meta["privacy"]["mechanism"] == "dp-fedavg" and meta["privacy"]["epsilon"] == expected["epsilon"]
    origin_sources = [s for s in meta["lineage"] if s["owner"] == "origin"]
    assert origin_sources and all(s["dp"] == expected for s in origin_sources)
    assert meta["federated"]["history"][-1]["dp"] == expected


# ---------------------------------------------------------------------------- secure aggregation across the sites


@pytest.fixture
def secure(home, tmp_path, monkeypatch) -> Path:
    """The module's workspace with stage 3's secure_aggregation on (2 rounds, the 3 units of the plan)."""
    conf = tmp_path / "conf"
    shutil.copytree(Path(os.environ["FACTORY_CONF"]), conf)
    text = (conf / "stages.yaml").read_text()
    (conf / "stages.yaml").write_text(text.replace("    secure_aggregation: false\n    privacy: null\n    base_model: M1",
                                                   "    secure_aggregation: true\n    privacy: null\n    base_model: M1"))
    monkeypatch.setenv("FACTORY_CONF", str(conf))
    assert load_config().stages.federated_stage(3).secure_aggregation
    return home


def _exchange(home: Path, **participate) -> dict:
    """One message each way: the origin answers the supplier's latest, the supplier collects."""
    _carry(home, "supplier", "origin")
    assert run_step("federated_participate", _ctx(home, "origin"), stage=3, **participate)["status"] == "sent"
    _carry(home, "origin", "supplier")
    return run_step("federated_coordinate", _ctx(home, "supplier"), stage=3)


def _training_dir(home: Path) -> tuple[dict, Path]:
    folder = SitePaths.of("supplier", home).state_dir / "federated"
    record = read_json(folder / "stage-3.json")
    return record, folder / record["training"]


def _plain_mean(home: Path, global_vector: np.ndarray, number: int, units: set[str]) -> np.ndarray:
    """FedAvg in the clear of `units`' updates from `global_vector` (the units train deterministically)."""
    from pipelines.federated import StateLayout

    plan = load_config().stages.federated_stage(3)
    total, weight = 0.0, 0.0
    for site in ("supplier", "origin"):
        ctx = _ctx(home, site)
        template, architecture, spec = fl._model_parts(fl._base(ctx, plan))
        state = StateLayout.of(template).to_state(global_vector, template)
        records, vectors, _ = fl._train_units(ctx, plan, state, architecture, spec, training="t", number=number)
        for unit, vector in zip(records, vectors, strict=True):
            if unit["unit"] in units:
                total = total + unit["n_samples"] * vector.astype(np.float64)
                weight += unit["n_samples"]
    return total / weight


def _vector(path: Path, size: int | None = None) -> np.ndarray:
    from pipelines.federated import update_from_bytes
    from pipelines.federated.updates import UPDATE_MAGIC

    data = path.read_bytes()
    return update_from_bytes(data, size or (len(data) - len(UPDATE_MAGIC) - 1) // 4)


def test_secure_rounds_the_coordinator_holds_masked_vectors_whose_sum_is_fedavg_and_a_dropout_is_recovered(secure):
    home = secure
    assert run_step("federated_coordinate", _ctx(home, "supplier"), stage=3, start=True)["status"] == "started"
    record, folder = _training_dir(home)
    assert record["current"]["phase"] == "keys"
    assert _exchange(home)["phase"] == "shares"  # every unit's public keys make the roster
    assert _exchange(home)["phase"] == "masked"  # sealed shares relayed; round 1's model goes out with them
    # the units' secrets: one 0600 file each, at their own site, none in the coordinator's record
    for site, count in (("supplier", 1), ("origin", 2)):
        files = sorted((SitePaths.of(site, home).state_dir / "federated" / "secagg").glob(f"{record['training']}-*"))
        assert len(files) == count and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    record, folder = _training_dir(home)
    assert "mask_key\": \"" not in (folder.parent / "stage-3.json").read_text()
    relayed = record["secure"]["roster"]
    assert sorted(relayed) == ["origin/unit-0", "origin/unit-1", "supplier/unit-0"]
    global_1 = _vector(folder / "global.bin")
    size = len(global_1)
    moved_on = _exchange(home)
    assert moved_on["status"] == "next_round" and moved_on["round"] == 2
    # the coordinator's stored data of round 1: masked uint64 vectors only, never a unit's update in the clear
    stored = [p for p in folder.glob("*.bin") if p.name != "global.bin"]
    assert len(stored) == 3 and all(_vector(p, size).dtype == np.uint64 for p in stored)
    global_2 = _vector(folder / "global.bin")
    expected = _plain_mean(home, global_1, 1, {"supplier/unit-0", "origin/unit-0", "origin/unit-1"})
    assert np.abs((global_2.astype(np.float64) - global_1) - expected).max() < 1e-5  # quantisation and float32
    first = read_json(folder.parent / "stage-3.json")["history"][0]
    assert first["secure_aggregation"] and first["recovered"] == [] and len(first["included"]) == 3
    # round 2: origin/unit-1 drops out; the survivors' shares of its mask key complete the sum
    unmasking = _exchange(home, withdraw=["origin/unit-1"])
    assert unmasking["status"] == "unmasking" and unmasking["dropped"] == ["origin/unit-1"]
    finished = _exchange(home)
    assert finished["finished"]
    record, folder = _training_dir(home)
    second = record["history"][1]
    assert second["recovered"] == ["origin/unit-1"] and second["skipped"] is None
    assert second["included"] == ["supplier/unit-0", "origin/unit-0"]
    expected = _plain_mean(home, global_2, 2, {"supplier/unit-0", "origin/unit-0"})
    final = read_json(Path(finished["staging"]) / "metadata.json")
    assert final["federated"]["secure_aggregation"] and final["federated"]["recovered"] == ["origin/unit-1"]
    from pipelines.federated import StateLayout
    from pipelines.learning.artifacts import load_weights

    staged = load_weights(Path(finished["staging"]))
    got = StateLayout.of(staged).to_vector(staged)
    assert np.abs((got.astype(np.float64) - global_2) - expected).max() < 1e-5
    from mlflow.tracking import MlflowClient  # per round in the coordinator's MLflow run

    client = MlflowClient(SitePaths.of("supplier", home).mlflow_uri)
    for name, values in (("secure_aggregation", [1.0, 1.0]), ("units_recovered", [0.0, 1.0])):
        history = sorted(client.get_metric_history(record["mlflow_run_id"], name), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == list(zip([1, 2], values, strict=True))
    # the recovered unit takes no further part: its keys are known to the coordinator
    origin_unit = SitePaths.of("origin", home).state_dir / "federated" / "secagg" / f"{record['training']}-unit-0.json"
    assert read_json(origin_unit)["revealed"] == ["origin/unit-1"]


def test_secure_round_with_too_few_shares_is_left_out_and_forged_answers_are_refused(secure):
    home = secure
    run_step("federated_coordinate", _ctx(home, "supplier"), stage=3, start=True)
    _exchange(home)
    assert _exchange(home)["phase"] == "masked"
    record, folder = _training_dir(home)
    before = (folder / "global.bin").read_bytes()
    # forged answers while round 1 is masked: a share answer, another training, a plain float update
    for meta, unit_file in (({"secure": {"phase": "shares"}}, None),
                            ({"training": "0" * 16, "secure": {"phase": "masked"}}, None),
                            ({"secure": {"phase": "masked"}}, np.zeros(len(_vector(folder / "global.bin")), np.float32))):
        src = SitePaths.of("origin", home).state_dir / "forged-secure" / "update"
        shutil.rmtree(src.parent, ignore_errors=True)
        src.mkdir(parents=True)
        units = []
        if unit_file is not None:
            from pipelines.federated import update_bytes

            (src / "unit-0.bin").write_bytes(update_bytes(unit_file))
            units = [{"unit": "origin/unit-0", "index": 0, "n_samples": 10,
                      "digest": fl.vector_digest((src / "unit-0.bin").read_bytes())}]
        write_json(src / fl.SECAGG, {"shares": {}})
        seal_to_outbox(SitePaths.of("origin", home), "supplier", src, purpose="collaboration", content_type=fl.UPDATE,
                       metadata={"kind": "m3-fl-update", "training": record["training"], "round": 1,
                                 "digest": record["current"]["digest"], "units": units, **meta})
        _carry(home, "origin", "supplier")
        assert run_step("federated_coordinate", _ctx(home, "supplier"), stage=3)["status"] == "waiting"
    reasons = " | ".join(_rejected(home, "supplier"))
    assert "phase 'shares'; round 1 is in secure-aggregation phase masked" in reasons
    assert "training '0000000000000000' is not the running one" in reasons
    assert "origin/unit-0's update is not masked" in reasons
    # the origin sends nothing by the deadline: one masked vector, fewer than the threshold of 2
    state = folder.parent / "stage-3.json"
    record = read_json(state)
    record["current"]["started"] -= record["deadline"] + 1
    write_json(state, record)
    moved_on = run_step("federated_coordinate", _ctx(home, "supplier"), stage=3)
    assert moved_on["status"] == "next_round"
    first = read_json(state)["history"][0]
    assert first["stragglers"] == ["origin"] and "fewer" not in str(first["recovered"])
    assert "only 1 participants sent masked vectors" in first["skipped"] and "left out" in first["skipped"]
    assert (folder / "global.bin").read_bytes() == before  # no wrong sum applied


def test_the_origin_refuses_to_release_data_a_federated_stage_keeps_home(home):
    outbox = SitePaths.of("origin", home).outbox
    before = sorted(p.name for p in outbox.rglob("*"))
    with pytest.raises(StepError, match="stage 3 is federated: origin's data stays home and is not released to "
                                        "supplier"):
        run_step("release_dataset", _ctx(home, "origin", run_id="release"), dataset="shared", recipient="supplier",
                 purpose="collaboration", kind="origin-shared")
    assert sorted(p.name for p in outbox.rglob("*")) == before  # nothing sealed
