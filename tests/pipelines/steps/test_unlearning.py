"""Withdrawal of a contribution at the trainer, through the real steps (MLflow, DVC, signing, ONNX):
the supplier trains M1 on its own data and M3 from it on its data and the origin's shared data
(received, owner origin), in slices; `retrain_without` then makes a new M3 from the checkpoint
before the origin's slice, and a model fine-tuned from M3 is trained again from the new M3."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.learning import registry
from pipelines.steps import StepContext, run_step
from pipelines.steps.unlearning import UNLEARNED_TAG, models_reaching, reaches, retrain_without
from pipelines.workspace import SitePaths


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from pipelines.init import init_workspace

    home = tmp_path_factory.mktemp("factory")
    init_workspace(home)
    return home


def _ctx(home: Path) -> StepContext:
    return StepContext(site="supplier", paths=SitePaths.of("supplier", home), run_id="test-run", dag_id="test")


def receive(home: Path, partition: str, name: str) -> str:
    """The origin's `partition` registered at the supplier as receive_dataset registers a package's
    content (owner origin, the origin's lineage upstream); the package transport is not under test."""
    from pipelines.data.catalog import latest, register_dataset
    from pipelines.data.lineage import lineage_entries

    origin, supplier = SitePaths.of("origin", home), SitePaths.of("supplier", home)
    source = latest(origin, partition)
    target = supplier.data_dir / "received" / f"{name}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.path, target)
    version = register_dataset(supplier, name, target, parents=[source.id], kind="received",
                               flags={**source.flags, "releasable_to": ["supplier"], "purposes": ["training"]},
                               owner="origin", upstream=lineage_entries(origin, [source.id]))
    return version.id


def _train(ctx: StepContext, **kwargs) -> dict:
    trained = run_step("train_model", ctx, **kwargs)
    evaluated = run_step("evaluate_model", ctx, trained=trained, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", ctx, trained=evaluated, parity_set="test")
    registered = run_step("register_model", ctx, trained=exported)
    return {**registered, "uri": f"{registered['name']}/{registered['version']}"}


@pytest.fixture(scope="module")
def trained(home) -> dict:
    ctx = _ctx(home)
    received = receive(home, "shared", "origin-shared")
    m1 = _train(ctx, stage="M1", profile="local", datasets=["train"])
    m3 = _train(ctx, stage="M3", profile="local", datasets=["train", "origin-shared"], base_model=m1["uri"])
    return {"m1": m1, "m3": m3, "received": received}


@pytest.fixture(scope="module")
def withdrawn(home, trained) -> dict:
    return retrain_without(_ctx(home), model=trained["m3"]["uri"], dataset_id=_origin_source(home))


def _origin_source(home: Path) -> str:
    from pipelines.data.catalog import latest

    return latest(SitePaths.of("origin", home), "shared").id  # the owner's id, as a revocation names it


def test_sliced_run_records_its_plan_and_keeps_checkpoints_at_the_trainer_only(home, trained):
    ctx = _ctx(home)
    ref = registry.resolve_model(ctx.paths, trained["m3"]["uri"])
    slices = ref.metadata["slices"]
    own = [d["id"] for d in ref.metadata["datasets"] if d["owner"] == "supplier"]
    assert [s["datasets"] for s in slices] == [own, own + [trained["received"]]]
    assert [s["epochs"] for s in slices] == [5, 3]  # own_share 0.625 of the local profile's 8 epochs
    checkpoints = ctx.paths.state_dir / "checkpoints"
    for record in slices:
        assert record["checkpoint"].startswith("sha256:")
        assert (checkpoints / record["key"] / "weights.safetensors").is_file()
    assert ctx.paths.repo not in checkpoints.parents
    assert not [p for p in ref.model_dir.rglob("*") if "checkpoint" in p.name or p.is_dir()]
    assert not list(checkpoints.rglob("*.tmp"))
    m1 = registry.resolve_model(ctx.paths, trained["m1"]["uri"])
    assert "slices" not in m1.metadata  # own data only: trained as before


def test_withdrawal_resumes_before_the_slice_and_the_lineage_no_longer_reaches_the_dataset(home, trained, withdrawn):
    ctx = _ctx(home)
    assert withdrawn["replaced"] == trained["m3"]["uri"] and withdrawn["model"] != trained["m3"]["uri"]
    assert withdrawn["resumed_from_slice"] == 1 and withdrawn["full_retrain"] is False
    old = registry.resolve_model(ctx.paths, trained["m3"]["uri"])
    new = registry.resolve_model(ctx.paths, withdrawn["model"])
    assert reaches(old.metadata, _origin_source(home)) and not reaches(new.metadata, _origin_source(home))
    assert all(entry["owner"] == "supplier" for entry in new.metadata["lineage"])
    assert [d["id"] for d in new.metadata["datasets"]] == [d["id"] for d in old.metadata["datasets"][:1]]
    assert new.metadata["slices"][0]["checkpoint"] == old.metadata["slices"][0]["checkpoint"]  # reused, not retrained
    assert new.metadata["slices"][1]["datasets"] == new.metadata["slices"][0]["datasets"]
    assert new.metadata["unlearned"]["replaced"] == old.uri
    assert new.tags[UNLEARNED_TAG] and _origin_source(home) in new.tags[UNLEARNED_TAG]
    assert new.metadata["metrics"]["supplier_test"] >= 0.85
    assert registry.resolve_model(ctx.paths, "M3").uri == new.uri  # the current M3


def test_withdrawal_runs_once(home, trained, withdrawn):
    ctx = _ctx(home)
    before = len(registry.list_models(ctx.paths))
    again = retrain_without(ctx, model=trained["m3"]["uri"], dataset_id=_origin_source(home))
    assert again["model"] == withdrawn["model"] and again["already_done"]
    assert again["resumed_from_slice"] == 1 and not again["full_retrain"]  # as the first run made it
    assert len(registry.list_models(ctx.paths)) == before
    found = {row["model"]: row for row in models_reaching(ctx, _origin_source(home))}
    assert found[trained["m3"]["uri"]] == {"model": trained["m3"]["uri"], "trained_here": True,
                                           "replaced_by": withdrawn["model"]}
    assert withdrawn["model"] not in found and trained["m1"]["uri"] not in found


def test_a_model_whose_lineage_lacks_the_dataset_is_left_alone(home, trained, withdrawn):
    ctx = _ctx(home)
    before = len(registry.list_models(ctx.paths))
    for model in (trained["m1"]["uri"], withdrawn["model"]):
        result = retrain_without(ctx, model=model, dataset_id=_origin_source(home))
        assert result["noop"] and result["replaced"] is None and "does not reach" in result["reason"]
    assert len(registry.list_models(ctx.paths)) == before


def test_a_model_fine_tuned_from_one_that_saw_the_dataset_is_trained_from_the_clean_base(home, trained, withdrawn):
    ctx = _ctx(home)
    m6 = _train(ctx, stage="M6", profile="local", datasets=["train"], base_model=trained["m3"]["uri"])
    result = retrain_without(ctx, model=m6["uri"], dataset_id=_origin_source(home))
    assert [step["replaced"] for step in result["chain"]] == [trained["m3"]["uri"], m6["uri"]]
    assert result["chain"][0]["model"] == withdrawn["model"]  # the base's replacement, made once
    assert result["full_retrain"] and result["resumed_from_slice"] is None  # a new base: nothing to resume
    new = registry.resolve_model(ctx.paths, result["model"])
    assert new.metadata["base_model"]["version"] == withdrawn["model"].split("/")[1]
    assert not reaches(new.metadata, _origin_source(home))
