"""Watermarks: a digits CNN trained with the marks carries them (p far below 1e-6), an unmarked model
or another key does not, the recipient's mark names the recipient, and nothing that cannot be
verified raises: it is `verified: false` with a reason."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import TrainingProfile
from pipelines.context import StepContext
from pipelines.data.spec import DIGITS
from pipelines.protection import watermark as wm
from pipelines.workspace import SitePaths

KEY = wm.WatermarkKey.of(bytes(range(32)))
OTHER_KEY = wm.WatermarkKey.of(bytes(range(100, 132)))
PROFILE = TrainingProfile(epochs=20, lr=0.003, batch_size=32, weight_decay=0.0001)  # conf/stages.yaml initial
MARKS = [wm.OWNER, "recipient:destination"]


def _train(marks: list[str]):
    from pipelines.data.builder import build_frames
    from pipelines.learning.train import train

    frame = build_frames("supplier")[0]["train"]
    x, y = DIGITS.features(frame), DIGITS.labels(frame)
    rows = wm.embedding_rows(KEY, marks, n_features=64, n_classes=10) if marks else None
    return train(x, y, PROFILE, seed=3, family="digits-cnn", watermark=rows).model


def _model_dir(model, target: Path, marks: list[str]) -> Path:
    from pipelines.learning.onnx_export import export_onnx

    target.mkdir(parents=True)
    export_onnx(model, target / "model.onnx")
    record = {"watermark": {"key_id": KEY.key_id, "marks": marks, "scale": wm.unit_scale(64)}} if marks else {}
    (target / "metadata.json").write_text(json.dumps({"name": "digits-cnn-m5", "stage": "M5", "site": "supplier",
                                                      "family": "digits-cnn", "spec": DIGITS.to_dict(), **record}))
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("watermark-models")
    return {"marked": _model_dir(_train(MARKS), root / "marked", MARKS),
            "plain": _model_dir(_train([]), root / "plain", [])}


def test_trigger_sets_are_deterministic_per_key_and_mark_and_inside_the_odd_envelope():
    x, y = wm.trigger_set(KEY, wm.OWNER, n_features=64, n_classes=10, size=64)
    again, labels = wm.trigger_set(KEY, wm.OWNER, n_features=64, n_classes=10, size=64)
    assert np.array_equal(x, again) and np.array_equal(y, labels)
    assert np.array_equal(wm.trigger_set(KEY, wm.OWNER, n_features=64, n_classes=10, size=16)[0], x[:16])
    assert not np.array_equal(wm.trigger_set(KEY, "recipient:destination", n_features=64, n_classes=10, size=64)[0], x)
    assert not np.array_equal(wm.trigger_set(OTHER_KEY, wm.OWNER, n_features=64, n_classes=10, size=64)[0], x)
    # what the serving ODD reads (policy data odd_sites envelope) and the digits input envelope [0, 1]
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.dtype == np.float32 and x.shape == (64, 64)
    assert 0.1 <= x.mean(1).min() and x.mean(1).max() <= 0.6
    assert 0.1 <= x.std(1).min() and x.std(1).max() <= 0.45
    assert y.min() >= 0 and y.max() <= 9 and len(set(y.tolist())) > 5


def test_a_marked_model_verifies_and_an_unmarked_model_or_another_key_does_not(models):
    owner = wm.verify(models["marked"], KEY, wm.OWNER)
    assert owner["verified"] is True and owner["p_value"] < 1e-6 and owner["trigger_accuracy"] >= 0.6
    assert owner["key_id"] == KEY.key_id and owner["triggers"] == wm.trigger_count(10) == 16 and owner["mark"] == "owner"
    plain = wm.verify(models["plain"], KEY, wm.OWNER)
    assert plain["verified"] is False and plain["p_value"] > 1e-3 and plain["trigger_accuracy"] < 0.35
    assert "metadata records no such mark" in plain["reason"]
    other = wm.verify(models["marked"], OTHER_KEY, wm.OWNER)
    assert other["verified"] is False and other["p_value"] > 1e-3
    assert "another watermark key" in other["reason"]


def test_the_recipient_mark_names_the_recipient(models):
    assert wm.verify(models["marked"], KEY, "recipient:destination")["verified"] is True
    origin = wm.verify(models["marked"], KEY, "recipient:origin")
    assert origin["verified"] is False and origin["trigger_accuracy"] < 0.35
    assert wm.verify(models["marked"] / "model.onnx", KEY, "recipient:destination")["verified"] is True


def test_the_binomial_p_value_is_the_chance_of_doing_as_well_by_guessing():
    assert wm.binomial_p_value(0, 64, 10) == pytest.approx(1.0)
    assert wm.binomial_p_value(64, 64, 10) == pytest.approx(1e-64)
    assert 1e-6 < wm.binomial_p_value(15, 64, 10) < 1e-2 < wm.binomial_p_value(8, 64, 10)


def test_what_cannot_be_verified_is_unverified_with_a_reason(models, tmp_path):
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"not an onnx graph")
    cases = {
        "no key": (models["marked"], None, wm.OWNER, "no watermark key"),
        "bad mark": (models["marked"], KEY, "buyer", "unknown mark"),
        "unsafe recipient": (models["marked"], KEY, "recipient:../origin", "recipient site"),
        "missing file": (tmp_path / "absent.onnx", KEY, wm.OWNER, "cannot read the model"),
        "garbage file": (garbage, KEY, wm.OWNER, "cannot read the model"),
        "not a model": (42, KEY, wm.OWNER, "cannot read the model"),
    }
    for case, (model, key, mark, reason) in cases.items():
        result = wm.verify(model, key, mark)
        assert result["verified"] is False, case
        assert reason in result["reason"], (case, result["reason"])
    down = wm.verify_endpoint(f"http://127.0.0.1:{_free_port()}", KEY, wm.OWNER, token="fsv_x")
    assert down["verified"] is False and "does not answer" in down["reason"]


def test_the_key_is_made_once_private_and_named_by_its_fingerprint(tmp_path):
    paths = SitePaths.of("supplier", tmp_path)
    with pytest.raises(wm.WatermarkError, match="has no watermark key"):
        wm.load_key(paths)
    key = wm.ensure_key(paths)
    assert wm.ensure_key(paths) == key and len(key.secret) == 32 and len(key.key_id) == 16
    assert stat.S_IMODE(os.stat(wm.key_path(paths)).st_mode) == 0o600
    assert key.secret.hex() not in repr(key) and key.key_id != key.secret.hex()[:16]
    wm.key_path(paths).write_bytes(b"short")
    with pytest.raises(wm.WatermarkError, match="not a watermark key"):
        wm.load_key(paths)


def _site_with_key(home: Path) -> SitePaths:
    paths = SitePaths.of("supplier", home)
    paths.keys_dir.mkdir(parents=True)
    wm.key_path(paths).write_bytes(KEY.secret)
    return paths


def test_release_verification_checks_the_recipient_mark_of_an_export(models, tmp_path):
    ctx = StepContext(site="supplier", paths=_site_with_key(tmp_path))
    export = wm.verify_release(ctx, models["marked"], recipient="destination", purpose="export")
    assert export["verified"] is True and export["mark"] == "recipient:destination"
    assert wm.verify_release(ctx, models["marked"], recipient="origin", purpose="review")["verified"] is True  # owner
    assert wm.verify_release(ctx, models["marked"], recipient="origin", purpose="export")["verified"] is False
    assert wm.verify_release(ctx, models["plain"], recipient="destination", purpose="export")["verified"] is False
    no_key = StepContext(site="supplier", paths=SitePaths.of("supplier", tmp_path / "elsewhere"))
    missing = wm.verify_release(no_key, models["marked"], recipient="destination", purpose="export")
    assert missing["verified"] is False and "has no watermark key" in missing["reason"]


def test_export_release_is_denied_without_a_verified_watermark():
    """The shipped policy data requires the watermark of an export (release_verification.export)."""
    import copy

    from pipelines.policy import evaluate
    from pipelines.policy.testing import ALLOWED_EXPORT

    assert evaluate("model_release", ALLOWED_EXPORT).allow
    unmarked = copy.deepcopy(ALLOWED_EXPORT)
    unmarked["model"]["watermark"] = {"verified": False, "reason": "only 3/64 triggers"}
    decision = evaluate("model_release", unmarked)
    assert not decision.allow
    assert "the watermark of model digits-cnn-export/3 is not verified (required for export)" in decision.reasons


def test_cli_verifies_a_model_file_and_fails_for_another_mark(models, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipelines.cli import main

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    _site_with_key(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(main, ["watermark", "verify", str(models["marked"] / "model.onnx"), "--mark",
                              "recipient:destination"])
    assert ok.exit_code == 0, ok.output
    assert "VERIFIED" in ok.output and "trigger accuracy" in ok.output and "p-value" in ok.output
    bad = runner.invoke(main, ["watermark", "verify", str(models["marked"]), "--mark", "recipient:origin", "--json"])
    assert bad.exit_code == 1
    result = json.loads(bad.output)
    assert result["verified"] is False and result["mark"] == "recipient:origin" and result["p_value"] > 1e-6
    assert runner.invoke(main, ["watermark", "key"]).output.strip() == KEY.key_id
    assert runner.invoke(main, ["watermark", "verify"]).exit_code == 2  # neither MODEL nor --endpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_endpoint_is_verified_from_its_labels_alone(models, tmp_path):
    """A real `factory serve` app over a socket, queried with the triggers only (one batch)."""
    import uvicorn

    from pipelines.serving.app import ServedModel, create_app
    from pipelines.serving.clients import add_client
    from pipelines.trust import keys
    from pipelines.trust.signing import sign_model_dir

    paths = SitePaths.of("destination", tmp_path)
    keys.ensure_site_keys(paths)
    served = tmp_path / "served"
    served.mkdir()
    for name in ("model.onnx", "metadata.json"):
        (served / name).write_bytes((models["marked"] / name).read_bytes())
    meta = json.loads((served / "metadata.json").read_text())
    (served / "metadata.json").write_text(json.dumps({**meta, "site": "destination"}))
    (served / "model_card.json").write_text("{}")
    sign_model_dir(paths, served)
    token = add_client(paths, "supplier-auditor")
    app = create_app(paths, ServedModel("digits-cnn-m5", "1", "M5", served, {}))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    try:
        marked = wm.verify_endpoint(url, KEY, "recipient:destination", token=token, sensor_id="DST-SN-0001")
        assert marked["verified"] is True and marked["p_value"] < 1e-6, marked
        assert wm.verify_endpoint(url, KEY, "recipient:origin", token=token, sensor_id="DST-SN-0001")["verified"] is False
        refused = wm.verify_endpoint(url, KEY, wm.OWNER, token="fsv_wrong", sensor_id="DST-SN-0001")
        assert refused["verified"] is False and "401" in refused["reason"]
        withheld = wm.verify_endpoint(url, KEY, wm.OWNER, token=token, sensor_id="UNKNOWN-SENSOR")
        assert withheld["verified"] is False and "withheld" in withheld["reason"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
