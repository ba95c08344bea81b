"""conf/stages.yaml with a federated stage: the partner's data is never released nor trained on elsewhere."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from pipelines.config import StagesConf, conf_dir


def _stages(collaboration: dict[int, str], *, m8_drops: str | None = None) -> dict:
    data = yaml.safe_load((conf_dir() / "stages.yaml").read_text())
    data["collaboration"] = collaboration
    if m8_drops:
        data["inputs"]["models"]["M8"]["datasets"].remove(m8_drops)
    return data


def test_a_model_may_not_train_on_data_a_federated_stage_keeps_home():
    with pytest.raises(ValidationError, match="M8 trains on origin-shared, which never reaches the supplier while "
                                              "stage 3 is federated"):
        StagesConf(**_stages({3: "federated"}))


def test_the_data_release_of_a_federated_stage_is_skipped_and_others_run():
    federated = StagesConf(**_stages({3: "federated"}, m8_drops="origin-shared"))
    assert federated.kept_home() == {"origin-shared": 3}
    assert "stage 3 is federated" in federated.skipped_release(2)
    assert federated.skipped_release(5) is None and federated.skipped_release(8) is None
    centralized = StagesConf(**_stages({3: "centralized"}))
    assert centralized.kept_home() == {} and centralized.skipped_release(2) is None
