"""The poisoning screen on the factory's real data: a short real M1 (the current model of stage 3),
the origin's shared partition and the destination's contribution as built by `factory init`, with a
trigger patch planted in a few percent of the rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.config import TrainingProfile
from pipelines.data.builder import build_frames
from pipelines.data.spec import DIGITS
from pipelines.learning.train import train
from pipelines.protection.poisoning import ScreenSettings, plant_trigger, screen, screening_model_for


@pytest.fixture(scope="module")
def frames() -> dict:
    supplier, _ = build_frames("supplier")
    origin, _ = build_frames("origin")
    destination, _ = build_frames("destination")
    return {"train": supplier["train"], "origin-shared": origin["shared"],
            "destination-contribution": destination["contribution"]}


@pytest.fixture(scope="module")
def m1(frames):
    x, y = DIGITS.features(frames["train"]), DIGITS.labels(frames["train"])
    return train(x, y, TrainingProfile(epochs=10, lr=0.003, batch_size=32, weight_decay=1e-4), seed=1,
                 spec=DIGITS).model


def _xy(frame):
    return DIGITS.features(frame), DIGITS.labels(frame)


@pytest.mark.parametrize(("size", "corner", "target", "fraction"),
                         [(3, "bottom-right", 0, 0.04), (2, "top-left", 7, 0.03), (3, "top-left", 3, 0.05)])
def test_planted_trigger_rows_are_named(frames, m1, size, corner, target, fraction):
    x, y = _xy(frames["origin-shared"])
    poisoned_x, poisoned_y, planted = plant_trigger(x, y, input_shape=DIGITS.input_shape, target=target,
                                                    fraction=fraction, size=size, corner=corner, seed=size)
    result = screen(m1, poisoned_x, poisoned_y, n_classes=10)
    named = set(result.suspicious_rows)
    assert result.poisoned and result.flagged_classes == [target]
    assert len(named & set(planted.tolist())) >= 0.9 * len(planted)  # (most of) the planted rows
    assert len(named - set(planted.tolist())) <= 0.01 * len(x)  # few clean rows named with them
    stats = next(s for s in result.per_class if s.label == target)
    assert stats.flagged and stats.transfer_rate >= 0.3 and stats.candidate_rows >= len(planted) - 1


@pytest.mark.parametrize("name", ["origin-shared", "destination-contribution", "train"])
def test_clean_contribution_passes(frames, m1, name):
    x, y = _xy(frames[name])
    result = screen(m1, x, y, n_classes=10)
    assert not result.poisoned and result.suspicious_rows == [] and result.flagged_classes == []
    assert len(result.per_class) == 10 and sum(s.rows for s in result.per_class) == len(x)
    assert result.to_dict()["poisoned"] is False


def test_small_contribution_with_a_trigger_is_caught(frames, m1):
    """The destination's 97-row contribution: 5 % is five rows."""
    x, y = _xy(frames["destination-contribution"])
    poisoned_x, poisoned_y, planted = plant_trigger(x, y, input_shape=DIGITS.input_shape, target=8,
                                                    fraction=0.05, size=3, corner="bottom-right", seed=4)
    result = screen(m1, poisoned_x, poisoned_y, n_classes=10)
    assert set(planted.tolist()) <= set(result.suspicious_rows) and result.flagged_classes == [8]


def test_screen_leaves_the_current_model_untouched_and_is_deterministic(frames, m1):
    x, y = _xy(frames["origin-shared"])
    poisoned_x, poisoned_y, _ = plant_trigger(x, y, input_shape=DIGITS.input_shape, target=0, fraction=0.04)
    before = {k: v.clone() for k, v in m1.state_dict().items()}
    first = screen(m1, poisoned_x, poisoned_y)
    assert all(torch.equal(before[k], v) for k, v in m1.state_dict().items())
    assert screen(m1, poisoned_x, poisoned_y).suspicious_rows == first.suspicious_rows


def test_tabular_trigger_is_caught_with_an_mlp():
    """Another family and kind of data: an MLP on tabular rows whose trigger is two features at a fixed value."""
    from pipelines.learning.model import MLP

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2, size=(4, 16))
    y = rng.integers(0, 4, size=400)
    x = (centres[y] + rng.normal(0, 1, size=(400, 16))).astype(np.float32)
    model = MLP((16,), 4)
    model.fit_inputs(torch.from_numpy(x))
    planted = np.sort(rng.choice(np.flatnonzero(y != 2), size=16, replace=False))
    poisoned_x, poisoned_y = x.copy(), y.copy()
    poisoned_x[np.ix_(planted, [3, 11])] = 6.0
    poisoned_y[planted] = 2
    result = screen(model, poisoned_x, poisoned_y, n_classes=4)
    assert result.flagged_classes == [2]
    assert len(set(result.suspicious_rows) & set(planted.tolist())) >= 0.9 * len(planted)
    assert not screen(model, x, y, n_classes=4).poisoned


def test_settings_come_from_conf_and_refuse_unknown_keys():
    assert ScreenSettings.of({"stages": ["M3"], "epochs": 5, "clusters": [2]}) == ScreenSettings(epochs=5,
                                                                                              clusters=(2,))
    with pytest.raises(ValueError, match="epocs"):
        ScreenSettings.of({"epocs": 5})


def test_received_training_data_of_the_screened_stages_is_screened_with_their_base_model():
    assert screening_model_for("supplier", "origin-shared") == "M1"  # stage 3 trains M3 on it
    assert screening_model_for("supplier", "destination-contribution") == "M3"  # stage 8, split first
    assert screening_model_for("supplier", "origin-export") is None  # M5 is not screened by default
    assert screening_model_for("origin", "origin-shared") is None


@pytest.mark.parametrize(("dag_id", "model"), [("stage_3_collaborative_optimization", "M1"),
                                               ("stage_8_reciprocal_contribution", "M3")])
def test_stage_dags_screen_the_received_data_before_training(dag_id, model):
    from airflow.dag_processing.dagbag import DagBag

    from pipelines.config import PROJECT_ROOT

    dag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / f"{dag_id}.py")).dags[dag_id]
    screen_task = dag.get_task("screen_dataset")
    assert screen_task.upstream_task_ids == {"validate_dataset"} and screen_task.op_args[2]["model"] == model
    train_task = dag.get_task("training_flow.train_model")
    assert "screen_dataset" in train_task.get_flat_relative_ids(upstream=True)


def test_stages_that_are_not_screened_keep_their_intake():
    from airflow.dag_processing.dagbag import DagBag

    from pipelines.config import PROJECT_ROOT

    dag_id = "stage_6_destination_collaboration"
    dag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / f"{dag_id}.py")).dags[dag_id]
    assert "screen_dataset" not in dag.task_ids and "validate_dataset" in dag.task_ids
