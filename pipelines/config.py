"""Typed access to `conf/` (sites, users and roles, stage parameters).

Configuration is data: everything here is read from YAML, validated once with
pydantic, and cached per process. `FACTORY_CONF` points at another folder.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SITES = ("supplier", "origin", "destination")
LEVELS = ("public", "restricted", "confidential", "secret")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Partition(_Strict):
    classification: str
    local_only: bool
    export_authorized: bool
    releasable_to: tuple[str, ...] = ()
    purposes: tuple[str, ...] = ()


class Site(_Strict):
    display_name: str
    data_partitions: dict[str, Partition]
    # The policy bundle this site trusts (pipelines.policy.pin): "auto" = the pin in the site's home
    # (written by `factory init`, changed by `factory policy pin`), else the project's policies/ folder;
    # "sha256:<hex>" = that digest too (a home pin must then agree with it).
    policy_bundle_digest: str = Field(default="auto", pattern=r"^(auto|sha256:[0-9a-f]{64})$")


class User(_Strict):
    id: str
    site: str
    roles: tuple[str, ...]
    airflow_role: str


class ServiceIdentity(_Strict):
    id: str
    roles: tuple[str, ...]
    clearance: str


class TrainingProfile(_Strict):
    epochs: int = Field(gt=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    weight_decay: float = Field(ge=0)


class Resources(_Strict):
    requests: dict[str, str]
    limits: dict[str, str]


class KubernetesConf(_Strict):
    namespace: str
    image: str
    service_account: str


class Stage(_Strict):
    """One collaboration stage of `order:` in conf/stages.yaml."""

    stage: int = Field(ge=1)
    site: str
    model: str | None = None
    dags: tuple[str, ...] = Field(min_length=1)


class StagesConf(_Strict):
    order: tuple[Stage, ...]
    seed: int
    model_family: str
    training: dict[str, TrainingProfile]
    onnx_parity_max_abs: float
    schedules: dict[str, str | None]
    resources: dict[str, Resources]
    kubernetes: KubernetesConf

    @field_validator("order")
    @classmethod
    def _one_run_order(cls, order: tuple[Stage, ...]) -> tuple[Stage, ...]:
        numbers = [s.stage for s in order]
        if numbers != sorted(set(numbers)):
            raise ValueError(f"stages must be listed once each, in increasing order; got {numbers}")
        dags = [d for s in order for d in s.dags]
        if len(dags) != len(set(dags)):
            raise ValueError("a DAG is listed in more than one stage")
        return order

    def stage(self, number: int) -> Stage:
        for entry in self.order:
            if entry.stage == number:
                return entry
        raise KeyError(f"no stage {number} in conf/stages.yaml order (stages: {[s.stage for s in self.order]})")


class FactoryConfig(_Strict):
    sites: dict[str, Site]
    users: tuple[User, ...]
    service_identities: dict[str, ServiceIdentity]
    stages: StagesConf
    extra: dict[str, Any] = {}

    def user(self, user_id: str) -> User:
        for user in self.users:
            if user.id == user_id:
                return user
        raise KeyError(f"unknown user {user_id!r}; users are listed in conf/users.yaml")

    def partition(self, site: str, name: str) -> Partition:
        try:
            return self.sites[site].data_partitions[name]
        except KeyError:
            raise KeyError(f"site {site!r} has no data partition {name!r} in conf/sites.yaml") from None


def conf_dir() -> Path:
    return Path(os.environ.get("FACTORY_CONF", PROJECT_ROOT / "conf"))


def read_yaml(name: str) -> dict[str, Any]:
    """Read `conf/<name>` (used by areas that keep their own config file there)."""
    path = conf_dir() / name
    with path.open() as handle:
        return yaml.safe_load(handle) or {}


@functools.lru_cache(maxsize=4)
def _load(directory: str) -> FactoryConfig:
    sites = read_yaml("sites.yaml")
    users = read_yaml("users.yaml")
    return FactoryConfig(
        sites=sites["sites"],
        users=users["users"],
        service_identities=users["service_identities"],
        stages=read_yaml("stages.yaml"),
    )


def load_config() -> FactoryConfig:
    return _load(str(conf_dir()))
