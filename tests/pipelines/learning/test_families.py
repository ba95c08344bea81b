"""Model families from conf/models.yaml on specs of other shapes and class counts than the digits:
real training, ONNX export with the parity check, weights and metadata written and loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from family_data import IMAGE, TABULAR, rows

from pipelines.config import ModelFamily, TrainingProfile, load_config, load_models
from pipelines.data.spec import DIGITS
from pipelines.learning import families

PROFILE = TrainingProfile(epochs=3, lr=0.003, batch_size=32, weight_decay=0.0)
CASES = [
    ("digits-cnn", DIGITS), ("digits-cnn", IMAGE), ("resnet-small", IMAGE), ("resnet-small", DIGITS),
    ("tabular-mlp", TABULAR), ("tabular-mlp", IMAGE),
]


def _write_model(model, family: str, spec, target: Path) -> Path:
    from pipelines.learning.artifacts import save_weights

    target.mkdir(parents=True)
    save_weights(model, target)
    (target / "metadata.json").write_text(json.dumps({
        "family": family, "architecture": families.architecture_record(family), "spec": spec.to_dict()}))
    return target


def test_the_configured_families_and_the_default():
    assert {"digits-cnn", "resnet-small", "tabular-mlp"} <= set(load_models().families)
    assert load_config().stages.model_family == families.default_family() == "digits-cnn"
    architectures = {name: f.architecture for name, f in load_models().families.items()}
    assert architectures.items() >= {"digits-cnn": "cnn", "resnet-small": "resnet", "tabular-mlp": "mlp"}.items()


@pytest.mark.parametrize(("family", "spec"), CASES, ids=[f"{f}-{'x'.join(map(str, s.input_shape))}" for f, s in CASES])
def test_family_trains_exports_with_parity_and_loads_back(tmp_path, family, spec):
    from pipelines.learning.artifacts import load_model
    from pipelines.learning.onnx_export import export_onnx, logits_onnx, onnx_session, parity_max_abs
    from pipelines.learning.train import accuracy, logits_torch, train

    x, y = rows(spec, 240, seed=1)
    x_test, y_test = rows(spec, 120, seed=2)
    result = train(x, y, PROFILE, seed=5, family=family, spec=spec)
    assert len(result.history) == PROFILE.epochs
    test_accuracy = accuracy(logits_torch(result.model, x_test), y_test)
    assert test_accuracy >= 0.8 > 1.0 / spec.n_classes, test_accuracy

    model_dir = _write_model(result.model, family, spec, tmp_path / "model")
    onnx_path = export_onnx(result.model, model_dir / "model.onnx")
    (graph_input,) = onnx_session(onnx_path).get_inputs()
    assert graph_input.shape[1] == spec.n_features  # rows of the spec's width, batch dynamic
    assert logits_onnx(onnx_path, x_test[:5]).shape == (5, spec.n_classes)
    assert parity_max_abs(result.model, onnx_path, x_test) < load_config().stages.onnx_parity_max_abs

    loaded = load_model(model_dir)  # rebuilt from metadata.json: family, architecture, spec
    assert type(loaded) is type(result.model)
    np.testing.assert_allclose(logits_torch(loaded, x_test), logits_torch(result.model, x_test), atol=1e-6)


def test_mlp_standardises_raw_units_from_the_training_rows():
    from pipelines.learning.train import train

    x, y = rows(TABULAR, 200, seed=3)
    model = train(x, y, PROFILE, seed=1, family="tabular-mlp", spec=TABULAR).model
    np.testing.assert_allclose(model.input_mean.numpy(), x.mean(axis=0), rtol=1e-4)
    # fine-tuning keeps the base's standardisation, whatever the new rows' scale
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = train(x * 2.0, y, PROFILE, seed=1, family="tabular-mlp", spec=TABULAR, base_state=base,
                  mode="fine_tune").model
    np.testing.assert_array_equal(tuned.input_mean.numpy(), base["input_mean"].numpy())


def test_training_is_reproducible_from_the_seed():
    """The model is built after seeding: the same seed gives the same weights, however it is named."""
    import torch

    from pipelines.learning.train import train

    x, y = rows(IMAGE, 64, seed=1)
    one = TrainingProfile(epochs=1, lr=0.003, batch_size=32, weight_decay=0.0)
    first = train(x, y, one, seed=9, family="resnet-small", spec=IMAGE).model.state_dict()
    torch.rand(1000)  # other use of the global generator in between changes nothing
    again = train(x, y, one, seed=9, architecture=families.architecture_record("resnet-small"),
                  spec=IMAGE).model.state_dict()
    assert list(first) == list(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_the_digits_family_is_the_original_digits_cnn():
    import torch

    torch.manual_seed(0)
    model = families.build_model("digits-cnn", DIGITS)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == [
        ("features.0.weight", (16, 1, 3, 3)), ("features.0.bias", (16,)), ("features.2.weight", (32, 16, 3, 3)),
        ("features.2.bias", (32,)), ("classifier.1.weight", (64, 512)), ("classifier.1.bias", (64,)),
        ("classifier.4.weight", (10, 64)), ("classifier.4.bias", (10,))]


def test_metadata_without_a_family_is_the_digits_cnn(tmp_path):
    """Models written before families were recorded load as they always did."""
    from pipelines.learning.artifacts import load_model, save_weights
    from pipelines.learning.model import ConvNet

    model = families.build_model("digits-cnn", DIGITS)
    (tmp_path / "m").mkdir()
    save_weights(model, tmp_path / "m")
    (tmp_path / "m" / "metadata.json").write_text(json.dumps({"name": "digits-cnn-m4", "stage": "M4"}))
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, ConvNet) and loaded.input_shape == (1, 8, 8) and loaded.n_classes == 10


def test_recorded_architecture_wins_over_todays_conf(tmp_path):
    """A received model is rebuilt as its trainer built it, not from this site's conf/models.yaml."""
    from pipelines.learning.artifacts import load_model, save_weights

    recorded = {"architecture": "resnet", "hyper": {"widths": [8, 16], "blocks": [2, 1], "groups": 2}}
    model = families.build_architecture(recorded, IMAGE)
    (tmp_path / "m").mkdir()
    save_weights(model, tmp_path / "m")
    (tmp_path / "m" / "metadata.json").write_text(json.dumps(
        {"family": "resnet-small", "architecture": recorded, "spec": IMAGE.to_dict()}))
    assert sum(p.numel() for p in load_model(tmp_path / "m").parameters()) == sum(
        p.numel() for p in model.parameters())


@pytest.mark.parametrize(("family", "spec", "message"), [
    ("digits-cnn", TABULAR, "the cnn architecture takes C x H x W images; the data's input shape is [7]"),
    ("resnet-small", TABULAR, "the resnet architecture takes C x H x W images"),
    ("transformer-xl", DIGITS, "unknown model family 'transformer-xl'; conf/models.yaml defines digits-cnn"),
])
def test_a_family_that_cannot_take_the_data_is_refused(family, spec, message):
    with pytest.raises(families.FamilyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        families.build_model(family, spec)


@pytest.mark.parametrize(("entry", "message"), [
    ({"architecture": "resnet", "hyper": {"widths": [6, 8], "blocks": [1, 1], "groups": 4}},
     "GroupNorm groups 4 must divide every width"),
    ({"architecture": "resnet", "hyper": {"widths": [8, 16], "blocks": [1]}}, "differ in length"),
    ({"architecture": "cnn", "hyper": {"chanels": [8]}}, "chanels"),
    ({"architecture": "vit"}, "Input should be 'cnn', 'resnet' or 'mlp'"),
    ({"architecture": "mlp", "hyper": {"hidden": [0]}}, "hidden widths must lie in 1..8192"),
])
def test_bad_family_conf_is_refused_naming_the_problem(entry, message):
    with pytest.raises(ValueError, match=message):
        ModelFamily(**entry)


def test_training_refuses_rows_or_labels_that_do_not_fit_the_spec():
    from pipelines.learning.train import train

    x, y = rows(TABULAR, 40, seed=0)
    with pytest.raises(ValueError, match=r"training rows have shape \(40, 7\); the model takes rows of 64"):
        train(x, y, PROFILE, seed=0, family="tabular-mlp", spec=DIGITS)
    with pytest.raises(ValueError, match=r"labels must be class indices 0..3; found 3..6"):
        train(x, y + 3, PROFILE, seed=0, family="tabular-mlp", spec=TABULAR)


def test_spec_mismatch_names_both_sides():
    assert families.spec_mismatch(DIGITS, DIGITS, expected_is="a", actual_is="b") is None
    message = families.spec_mismatch(IMAGE, TABULAR, expected_is="the model takes", actual_is="the data holds")
    assert message == ("the model takes image 3x12x12 (432 features, 3 classes), the data holds tabular 7 "
                       "(7 features, 4 classes) (they differ in kind, encoding, input_shape, feature_columns, classes)")
