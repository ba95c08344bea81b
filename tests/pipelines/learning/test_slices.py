"""Sliced training (SISA): the plan, checkpoints at the trainer, and a withdrawal that resumes from
the checkpoint before the withdrawn dataset's slice and gives the never-included model exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from family_data import TABULAR, rows

from pipelines.config import TrainingProfile
from pipelines.learning.slices import (
    Slice,
    SliceError,
    checkpoint_keys,
    load_checkpoint,
    plan_slices,
    train_sliced,
    without,
)

PROFILE = TrainingProfile(epochs=8, lr=0.01, batch_size=32, weight_decay=0.0)
ARCH = {"architecture": "mlp", "hyper": {"hidden": [16], "dropout": 0.1}}
MATERIAL = {"base": None, "architecture": ARCH, "seed": 7}


@pytest.fixture(scope="module")
def parts() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: rows(TABULAR, 120, seed=seed) for name, seed in (("own", 1), ("a", 2), ("b", 3))}


def _train(parts, slices, folder: Path | None, **kwargs):
    return train_sliced(parts, slices, PROFILE, seed=7, material=MATERIAL, checkpoints=folder, architecture=ARCH,
                        spec=TABULAR, **kwargs)


def _same(left, right) -> bool:
    a, b = left.state_dict(), right.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_gives_the_own_slice_most_epochs_and_each_contribution_a_cumulative_slice():
    assert plan_slices(["own", "a"], own=1, epochs=8, own_share=0.625) == [
        Slice(("own",), 5), Slice(("own", "a"), 3, (("a", 3),))]  # a: 3 passes, entered 3 times: 9 as unsliced's 8
    five = plan_slices(["o1", "o2", "a", "b", "c"], own=2, epochs=8, own_share=0.625)
    assert [s.epochs for s in five] == [5, 3, 3, 3] and five[-1].repeat == (("c", 3),)
    assert plan_slices(["own"], own=1, epochs=8, own_share=0.625) == [Slice(("own",), 8)]
    assert [s.epochs for s in plan_slices(["o", "a", "b"], own=1, epochs=20, own_share=0.625)] == [13, 7, 7]
    assert all(s.epochs >= 1 for s in plan_slices(["o", "a", "b", "c"], own=1, epochs=2, own_share=0.5))


def test_withdrawal_leaves_earlier_slices_unchanged():
    plan = plan_slices(["own", "a", "b"], own=1, epochs=8, own_share=0.625)
    assert without(plan, "a") == [Slice(("own",), 5), Slice(("own",), 3), Slice(("own", "b"), 3, (("b", 3),))]
    assert without([Slice(("a",), 5), Slice(("a", "b"), 3)], "a") == [Slice(("b",), 8)]
    with pytest.raises(SliceError, match="no slice trains on"):
        without(plan, "elsewhere")


def test_resumed_withdrawal_equals_the_schedule_that_never_saw_the_dataset(parts, tmp_path):
    plan = plan_slices(["own", "a", "b"], own=1, epochs=8, own_share=0.625)
    full = _train(parts, plan, tmp_path / "trainer")
    assert full.resumed_from_slice is None and full.trained_slices == 3
    assert all(record["checkpoint"].startswith("sha256:") for record in full.slices)

    resumed = _train(parts, without(plan, "a"), tmp_path / "trainer")
    assert resumed.resumed_from_slice == 1 and resumed.trained_slices == 2  # slice 0 from its checkpoint
    never = _train({k: v for k, v in parts.items() if k != "a"}, without(plan, "a"), tmp_path / "fresh")
    assert never.resumed_from_slice is None
    assert _same(resumed.model, never.model)
    assert not _same(resumed.model, full.model)
    assert [r["checkpoint"] for r in resumed.slices] == [r["checkpoint"] for r in never.slices]


def test_withdrawing_the_last_contribution_resumes_after_the_one_before(parts, tmp_path):
    plan = plan_slices(["own", "a", "b"], own=1, epochs=8, own_share=0.625)
    _train(parts, plan, tmp_path)
    resumed = _train(parts, without(plan, "b"), tmp_path)
    assert resumed.resumed_from_slice == 2 and resumed.trained_slices == 1


def test_a_changed_or_partial_checkpoint_is_not_resumed_from(parts, tmp_path):
    plan = plan_slices(["own", "a"], own=1, epochs=4, own_share=0.5)
    _train(parts, plan, tmp_path)
    key = checkpoint_keys(plan, MATERIAL, {})[0]
    assert load_checkpoint(tmp_path, key) is not None
    weights = tmp_path / key / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert load_checkpoint(tmp_path, key) is None
    again = _train(parts, without(plan, "a"), tmp_path)
    assert again.resumed_from_slice is None  # trained from the start, not from altered weights
    assert not list(tmp_path.rglob("*.tmp"))


def test_one_slice_is_unsliced_training(parts):
    from pipelines.learning.train import train

    x, y = parts["own"]
    sliced = _train(parts, [Slice(("own",), 3)], None)
    plain = train(x, y, PROFILE.model_copy(update={"epochs": 3}), seed=7, architecture=ARCH, spec=TABULAR)
    assert _same(sliced.model, plain.model)
