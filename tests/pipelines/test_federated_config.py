"""conf/stages.yaml with a federated stage: the partner's data is never released nor trained on elsewhere."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from pipelines.config import StagesConf, conf_dir


def _stages(collaboration: dict[int, str], **datasets: list[str]) -> dict:
    data = yaml.safe_load((conf_dir() / "stages.yaml").read_text())
    data["collaboration"] = collaboration
    for model, names in datasets.items():
        data["inputs"]["models"][model]["datasets"] = names
    return data


def test_a_model_may_not_train_on_data_a_federated_stage_keeps_home():
    with pytest.raises(ValidationError, match="M4 trains on shared-sanitized, which origin never holds while stage 3 "
                                              "is federated .*name the partition itself"):
        StagesConf(**_stages({3: "federated"}))
    with pytest.raises(ValidationError, match="M8 trains on origin-shared, which supplier never holds while stage 3 "
                                              "is federated .*remove it"):
        StagesConf(**_stages({3: "federated"}, M4=["shared", "private", "export_authorized"]))
    with pytest.raises(ValidationError, match="M7 trains on shared-sanitized, which destination never holds while "
                                              "stage 6 is federated"):
        StagesConf(**_stages({6: "federated"}))


def test_the_data_release_of_a_federated_stage_is_skipped_and_others_run():
    federated = StagesConf(**_stages({3: "federated"}, M4=["shared", "private", "export_authorized"],
                                     M8=["train", "origin-export", "destination-contribution-train"]))
    assert federated.kept_home() == {("supplier", "origin-shared"): 3, ("origin", "shared-sanitized"): 3}
    assert "stage 3 is federated" in federated.skipped_release(2)
    assert federated.skipped_release(5) is None and federated.skipped_release(8) is None
    # a federated stage with its own data release runs its rounds instead: it is not skipped
    stage_6 = StagesConf(**_stages({6: "federated"}, M7=["shared", "private"]))
    assert stage_6.skipped_release(6) is None and stage_6.skipped_release(2) is None
    # ... but its data release DAG stays paused and its release step refuses (the data is kept home)
    assert "stage 6 is federated" in stage_6.release_kept_home(6) and stage_6.release_kept_home(2) is None
    centralized = StagesConf(**_stages({3: "centralized"}))
    assert centralized.kept_home() == {} and centralized.skipped_release(2) is None
