"""Bad input at the step level: a dataset missing a column or a corrupted Parquet file fails
validation naming the expectation and the column, is quarantined, and nothing stored changes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from pipelines.steps import StepContext, StepError, run_step
from pipelines.workspace import SitePaths


def _digests(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.parquet"))}


@pytest.fixture
def supplier_ctx(session_home: Path) -> StepContext:
    return StepContext(site="supplier", paths=SitePaths.of("supplier", session_home), run_id="test")


def _register(ctx: StepContext, name: str, writer) -> str:
    from pipelines.data.catalog import register_dataset

    target = ctx.paths.data_dir / "incoming" / f"{name}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    writer(target)
    flags = {"classification": "restricted", "local_only": True, "export_authorized": False,
             "releasable_to": [], "purposes": ["training"]}
    return register_dataset(ctx.paths, name, target, kind="raw", flags=flags).id


def test_missing_column_fails_naming_expectation_and_column(supplier_ctx: StepContext):
    frame = pd.read_parquet(supplier_ctx.paths.data_dir / "train.parquet").drop(columns=["f17"])
    dataset_id = _register(supplier_ctx, "no-f17", lambda p: frame.to_parquet(p, index=False))
    before = _digests(supplier_ctx.paths.data_dir)
    with pytest.raises(StepError) as error:
        run_step("validate_dataset", supplier_ctx, dataset=dataset_id, suite="training")
    assert "f17" in str(error.value) and "expect" in str(error.value)
    assert _digests(supplier_ctx.paths.data_dir) == before
    with pytest.raises(StepError, match="quarantine"):
        run_step("train_model", supplier_ctx, stage="M1", profile="initial", datasets=[dataset_id])


def test_corrupted_parquet_fails_validation_not_the_process(supplier_ctx: StepContext):
    good = (supplier_ctx.paths.data_dir / "train.parquet").read_bytes()
    dataset_id = _register(supplier_ctx, "corrupt", lambda p: p.write_bytes(good[: len(good) // 3]))
    before = _digests(supplier_ctx.paths.data_dir)
    with pytest.raises(StepError) as error:
        run_step("validate_dataset", supplier_ctx, dataset=dataset_id, suite="training")
    assert "readable_parquet" in str(error.value)
    assert _digests(supplier_ctx.paths.data_dir) == before


def test_train_refuses_unknown_profile(supplier_ctx: StepContext):
    with pytest.raises(StepError, match="unknown training profile 'fast'"):
        run_step("train_model", supplier_ctx, stage="M1", profile="fast", datasets=["train"])


def test_train_refuses_a_subset_of_classes_the_data_does_not_have(supplier_ctx: StepContext):
    with pytest.raises(StepError, match=r"no class \[10, 12\] in this data \(class indices 0..9"):
        run_step("train_model", supplier_ctx, stage="M5", profile="export", datasets=["train"],
                 subset={"labels": [3, 10, 12]})
