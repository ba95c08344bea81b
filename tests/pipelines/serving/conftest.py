"""One origin site for the serving tests: real digits data, real keys, a small trained CNN exported to
ONNX and signed with the site's key, registered as M4 in the site's MLflow registry."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import PROJECT_ROOT, TrainingProfile
from pipelines.workspace import SitePaths

PLUGINS = str(PROJECT_ROOT / "plugins")
if PLUGINS not in sys.path:
    sys.path.insert(0, PLUGINS)


def make_model_dir(paths: SitePaths, target: Path) -> Path:
    """Train briefly on the origin's private partition, export ONNX, write metadata, sign."""
    import pandas as pd

    from pipelines.data.schema import FEATURE_COLUMNS, LABEL_COLUMN
    from pipelines.learning.onnx_export import export_onnx
    from pipelines.learning.train import train
    from pipelines.trust.signing import sign_model_dir

    frame = pd.read_parquet(paths.data_dir / "private.parquet")
    x, y = frame[list(FEATURE_COLUMNS)].to_numpy(np.float32), frame[LABEL_COLUMN].to_numpy(np.int64)
    result = train(x, y, TrainingProfile(epochs=3, lr=0.003, batch_size=64, weight_decay=0.0), seed=7)
    target.mkdir(parents=True)
    export_onnx(result.model, target / "model.onnx")
    (target / "model_card.json").write_text(json.dumps({"name": "digits-cnn-m4", "stage": "M4"}))
    (target / "metadata.json").write_text(json.dumps({
        "name": "digits-cnn-m4", "stage": "M4", "site": "origin",
        "reference_data": ["data/private.parquet"], "lineage": [],
    }))
    sign_model_dir(paths, target)
    return target


@pytest.fixture(scope="session")
def origin(tmp_path_factory):
    """(paths, model_ref) of an initialised origin site with a signed, registered M4."""
    from pipelines.data.builder import build_site_data
    from pipelines.learning import registry
    from pipelines.trust import keys

    home = tmp_path_factory.mktemp("factory-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTORY_HOME", str(home))
        paths = SitePaths.of("origin", home)
        build_site_data(paths)
        keys.ensure_site_keys(paths)
        model_dir = make_model_dir(paths, paths.models_dir / "m4" / "model")
        ref = registry.register(paths, "digits-cnn-m4", model_dir, run_id=None, tags={"factory.stage": "M4"},
                                aliases=("serving",))
        yield paths, ref


@pytest.fixture
def store(origin):
    from pipelines.serving.odd import serving_conf
    from pipelines.serving.store import InputStore

    s = InputStore.for_site(origin[0], serving_conf().get("store"))
    s.clear()
    return s


def serving_conf_with(**service) -> dict:
    """conf/odd.yaml with some `service` settings replaced (nested `audit` merged)."""
    from pipelines.serving.odd import serving_conf

    conf = copy.deepcopy(serving_conf())
    audit = {**conf["service"].get("audit", {}), **service.pop("audit", {})}
    conf["service"].update(service, audit=audit)
    return conf


@pytest.fixture(scope="session")
def tokens(origin):
    """One registered client of the origin's service: {name: token}."""
    from pipelines.serving.clients import add_client

    return {"test-client": add_client(origin[0], "test-client")}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def conf_with():
    """`serving_conf_with(**service)`: the serving conf with some service settings replaced."""
    return serving_conf_with


@pytest.fixture(scope="session")
def headers(tokens):
    """Request headers that authenticate as the test client."""
    return bearer(tokens["test-client"])


@pytest.fixture(scope="session")
def app(origin, tokens):
    """The origin's service; every breach audited (the rate limit has tests of its own)."""
    from pipelines.serving.app import create_app

    return create_app(*origin, conf=serving_conf_with(audit={"breaches_per_client": 100000}))


@pytest.fixture(scope="session")
def client(app, headers):
    """An authenticated client of `app` (sends the test client's token on every request)."""
    from fastapi.testclient import TestClient

    with TestClient(app, headers=headers) as c:
        yield c


@pytest.fixture
def anonymous(app):
    """A caller of `app` without any credential."""
    from fastapi.testclient import TestClient

    return TestClient(app)


@pytest.fixture(scope="session")
def in_domain_rows(origin):
    import pandas as pd

    from pipelines.data.schema import FEATURE_COLUMNS

    return pd.read_parquet(origin[0].data_dir / "test.parquet")[list(FEATURE_COLUMNS)].to_numpy(np.float32)


@pytest.fixture
def tampered_copy(origin, tmp_path):
    paths, ref = origin
    copy = tmp_path / "model"
    shutil.copytree(ref.model_dir, copy)
    return copy
