"""screen_dataset on a real initialised workspace, without Airflow: the supplier holds a short real
M1 and receives the origin's shared data (registered as received, with the origin's flags), once
with a trigger patch planted in 4 % of the rows and once clean. The poisoned version is quarantined,
reported and audited, the step fails, and stage 3's training cannot take it; the clean one passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.data.builder import build_frames
from pipelines.data.catalog import DatasetQuarantined, get, partition_flags, register_dataset
from pipelines.data.spec import DIGITS
from pipelines.learning import registry
from pipelines.protection.poisoning import plant_trigger
from pipelines.steps import StepContext, StepError, run_step
from pipelines.trust import audit
from pipelines.workspace import SitePaths


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from pipelines.init import init_workspace

    home = tmp_path_factory.mktemp("factory")
    init_workspace(home)
    return home


def _ctx(home: Path) -> StepContext:
    return StepContext(site="supplier", paths=SitePaths.of("supplier", home), run_id="test-run", dag_id="test")


@pytest.fixture(scope="module")
def m1(home: Path) -> dict:
    ctx = _ctx(home)
    trained = run_step("train_model", ctx, stage="M1", profile="local", datasets=["train"])
    evaluated = run_step("evaluate_model", ctx, trained=trained, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", ctx, trained=evaluated, parity_set="test")
    return run_step("register_model", ctx, trained=exported)


def _receive(home: Path, name: str, frame) -> str:
    """Register `frame` at the supplier as data received from the origin (as receive_dataset does)."""
    paths = SitePaths.of("supplier", home)
    target = paths.data_dir / "received" / f"{name}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.drop(columns=list(DIGITS.sensitive_columns), errors="ignore").to_parquet(target, index=False)
    version = register_dataset(paths, name, target, parents=["origin/shared@0123456789ab"], kind="received",
                               flags=partition_flags("origin", "shared"), owner="origin")
    return version.id


@pytest.fixture(scope="module")
def contribution():
    frames, _ = build_frames("origin")
    return frames["shared"]


def _entries(home: Path, action: str, dataset_id: str) -> list[dict]:
    return [e for e in audit.entries(SitePaths.of("supplier", home))
            if e["action"] == action and e["object"] == dataset_id]


def test_poisoned_contribution_is_quarantined_and_training_is_not_reached(home, m1, contribution):
    ctx = _ctx(home)
    x, y = DIGITS.features(contribution), DIGITS.labels(contribution)
    poisoned_x, poisoned_y, planted = plant_trigger(x, y, input_shape=DIGITS.input_shape, target=0,
                                                    fraction=0.04, size=3)
    frame = contribution.copy()
    frame[list(DIGITS.feature_columns)] = poisoned_x
    frame[DIGITS.label_column] = poisoned_y
    dataset_id = _receive(home, "origin-shared-poisoned", frame)

    with pytest.raises(StepError, match=rf"{dataset_id} is quarantined: the poisoning screen found \d+ suspicious"):
        run_step("screen_dataset", ctx, dataset={"dataset_id": dataset_id}, model="M1")

    version = get(ctx.paths, dataset_id)
    assert version.status == "quarantined" and version.quarantine_reason.startswith("poisoning screen")
    report_file = ctx.paths.repo / "reports" / "screening" / f"{version.name}-{version.md5[:12]}.json"
    report = json.loads(report_file.read_text())
    planted_ids = set(frame[DIGITS.id_column].iloc[planted])
    named_ids = {record["id"] for record in report["suspicious_records"]}
    assert report["poisoned"] and report["flagged_classes"] == [0] and report["model"].endswith("/" + m1["version"])
    assert len(named_ids & planted_ids) >= 0.9 * len(planted_ids) and len(named_ids - planted_ids) <= 2
    assert all(frame[DIGITS.id_column].iloc[r["row"]] == r["id"] for r in report["suspicious_records"])
    screened = _entries(home, "dataset.screened", dataset_id)
    assert len(screened) == 1 and screened[0]["outcome"] == "poisoned"
    assert screened[0]["details"]["suspicious"] == len(named_ids)
    assert len(_entries(home, "dataset.quarantined", dataset_id)) == 1

    # The run stops here; training on the version is refused even if it were attempted, and no M3 exists.
    with pytest.raises(DatasetQuarantined):
        run_step("train_model", ctx, stage="M3", profile="local", datasets=["train", dataset_id], base_model="M1")
    with pytest.raises(registry.ModelNotFound):
        registry.resolve_model(ctx.paths, "M3")

    # A re-run fails the same way without screening or auditing again.
    with pytest.raises(StepError, match=rf"{dataset_id} is quarantined: the poisoning screen found"):
        run_step("screen_dataset", ctx, dataset=dataset_id, model="M1")
    assert len(_entries(home, "dataset.screened", dataset_id)) == 1


def test_clean_contribution_passes_with_its_statistics_once(home, m1, contribution):
    ctx = _ctx(home)
    dataset_id = _receive(home, "origin-shared", contribution)
    result = run_step("screen_dataset", ctx, dataset={"dataset_id": dataset_id}, model="M1")
    assert result["dataset_id"] == dataset_id and not result["poisoned"] and result["suspicious"] == 0
    assert result["rows"] == len(contribution) and len(result["per_class"]) == 10
    assert get(ctx.paths, dataset_id).status == "ok"
    assert [e["outcome"] for e in _entries(home, "dataset.screened", dataset_id)] == ["clean"]
    assert run_step("screen_dataset", ctx, dataset=dataset_id, model="M1") == result
    assert len(_entries(home, "dataset.screened", dataset_id)) == 1


def test_unknown_model_is_a_clear_error(home, contribution):
    ctx = _ctx(home)
    dataset_id = _receive(home, "origin-shared", contribution)
    with pytest.raises(StepError, match=f"cannot screen {dataset_id}: .*no-such-model"):
        run_step("screen_dataset", ctx, dataset=dataset_id, model="no-such-model/1")
