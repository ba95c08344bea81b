"""Typed access to `conf/` (sites, users and roles, stage parameters, model families).

Configuration is data: everything here is read from YAML, validated once with
pydantic, and cached per process. `FACTORY_CONF` points at another folder.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

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


class Carrier(_Strict):
    """How sealed packages reach this site and leave it (pipelines.carrier); every key optional."""

    # https: partners push to this site's inbox service; media: they export to removable media.
    transport: Literal["https", "media"] = "https"
    # Where partners reach the inbox service (env FACTORY_PARTNER_INBOX_<SITE> overrides it).
    inbox_url: str | None = Field(default=None, pattern=r"^https://[^/?#\s]+/?$")
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8460, ge=0, le=65535)
    # Client addresses the inbox service admits (empty: any; in Kubernetes the NetworkPolicy does this).
    partner_cidrs: tuple[str, ...] = ()
    max_package_bytes: int = Field(default=4 << 30, gt=0)
    max_connections: int = Field(default=16, ge=1)
    timeout_seconds: float = Field(default=60, gt=0)
    retry_base_seconds: float = Field(default=5, gt=0)
    retry_max_seconds: float = Field(default=3600, gt=0)
    # This site's own Airflow API, for the inbox asset events (env FACTORY_AIRFLOW_URL[_<SITE>]);
    # None: packages are stored and nothing is posted. The user defaults to the site's service identity.
    airflow_url: str | None = Field(default=None, pattern=r"^https?://[^?#\s]+$")
    airflow_user: str | None = None

    @field_validator("partner_cidrs")
    @classmethod
    def _networks(cls, cidrs: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in cidrs:
            ipaddress.ip_network(cidr)  # ValueError names the bad range
        return cidrs


class Deployment(_Strict):
    """Where the site's own deployment listens on one machine (`factory up --site S`); a busy port is
    replaced by a free one, and the one in use is written in the site's service record."""

    airflow_port: int = Field(default=8080, ge=0, le=65535)
    mlflow_port: int = Field(default=5000, ge=0, le=65535)


class Site(_Strict):
    display_name: str
    data_partitions: dict[str, Partition]
    carrier: Carrier = Carrier()
    deployment: Deployment = Deployment()
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
    # Its user in the site's own Airflow: the inbox service posts "package arrived" asset events as
    # this user, which needs the OP role.
    airflow_role: str = "OP"


class AdversarialTraining(_Strict):
    """Adversarial training: this share of every batch is replaced by FGSM or PGD examples within an
    L-inf budget `eps` (a fraction of the training data's value range, as the robustness budgets of
    conf/protection.yaml); PGD takes `steps` steps."""

    method: Literal["fgsm", "pgd"] = "fgsm"
    eps: float = Field(gt=0, le=1)
    ratio: float = Field(default=0.5, gt=0, le=1)
    steps: int = Field(default=5, ge=1, le=100)


class DifferentialPrivacy(_Strict):
    """DP-SGD (Opacus; `pipelines.learning.privacy`): every sample's gradient clipped to
    `max_grad_norm`, Gaussian noise of `noise_multiplier` times that norm added to each batch's sum,
    batches drawn by Poisson sampling (rate batch_size / rows). Give `noise_multiplier`, or
    `target_epsilon` and Opacus picks the noise that spends it over the profile's epochs. The
    accountant (`rdp`, or `prv`) reports the (epsilon, `delta`) spent."""

    noise_multiplier: float | None = Field(default=None, gt=0)
    target_epsilon: float | None = Field(default=None, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _one_noise_source(self) -> DifferentialPrivacy:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy takes exactly one of noise_multiplier and target_epsilon")
        return self


class TrainingProfile(_Strict):
    epochs: int = Field(gt=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    weight_decay: float = Field(ge=0)
    adversarial: AdversarialTraining | None = None  # off unless a profile asks for it
    privacy: DifferentialPrivacy | None = None  # DP-SGD, off unless a profile asks for it

    @model_validator(mode="after")
    def _not_adversarial_and_private(self) -> TrainingProfile:
        if self.adversarial is not None and self.privacy is not None:
            raise ValueError("a training profile takes adversarial training or differential privacy, not both "
                             "(the adversarial examples would enter the per-sample gradients unaccounted)")
        return self

    @model_serializer(mode="wrap")
    def _plain_stays_plain(self, handler) -> dict[str, Any]:
        """A profile without adversarial training or privacy dumps as before (run keys of plain runs are unchanged)."""
        data = handler(self)
        for key in ("adversarial", "privacy"):
            if isinstance(data, dict) and data.get(key) is None:
                data.pop(key, None)
        return data


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


class CnnHyper(_Strict):
    """Convolutions (3x3, ReLU) of these widths, one 2x2 max-pool, a hidden dense layer."""

    channels: tuple[int, ...] = Field(default=(16, 32), min_length=1, max_length=8)
    hidden: int = Field(default=64, ge=1, le=4096)
    dropout: float = Field(default=0.2, ge=0, lt=1)

    @field_validator("channels")
    @classmethod
    def _widths(cls, channels: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= c <= 1024 for c in channels):
            raise ValueError(f"channel widths must lie in 1..1024, got {list(channels)}")
        return channels


class ResnetHyper(_Strict):
    """Residual stages (basic blocks of two 3x3 convolutions with GroupNorm): one width and block
    count per stage, every stage after the first halving the resolution; global average pool."""

    widths: tuple[int, ...] = Field(default=(16, 32, 64), min_length=1, max_length=6)
    blocks: tuple[int, ...] = Field(default=(1, 1, 1), min_length=1, max_length=6)
    groups: int = Field(default=4, ge=1, le=64)  # GroupNorm groups: no batch statistics (DP-friendly)

    @model_validator(mode="after")
    def _shape(self) -> ResnetHyper:
        if len(self.widths) != len(self.blocks):
            raise ValueError(f"resnet widths {list(self.widths)} and blocks {list(self.blocks)} differ in length")
        if any(not 1 <= w <= 1024 for w in self.widths) or any(not 1 <= b <= 16 for b in self.blocks):
            raise ValueError("resnet widths must lie in 1..1024 and blocks per stage in 1..16")
        if any(w % self.groups for w in self.widths):
            raise ValueError(f"GroupNorm groups {self.groups} must divide every width {list(self.widths)}")
        return self


class MlpHyper(_Strict):
    """Dense layers of these widths (ReLU, dropout) over standardised input rows."""

    hidden: tuple[int, ...] = Field(default=(64, 64), max_length=8)
    dropout: float = Field(default=0.1, ge=0, lt=1)

    @field_validator("hidden")
    @classmethod
    def _widths(cls, hidden: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= h <= 8192 for h in hidden):
            raise ValueError(f"hidden widths must lie in 1..8192, got {list(hidden)}")
        return hidden


ARCHITECTURES: dict[str, type[_Strict]] = {"cnn": CnnHyper, "resnet": ResnetHyper, "mlp": MlpHyper}


class ModelFamily(_Strict):
    """One entry of conf/models.yaml `families:`, also recorded in each model's metadata.json."""

    architecture: Literal["cnn", "resnet", "mlp"]
    hyper: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _hyper(cls, data: Any) -> Any:
        """Check the hyper-parameters against the architecture's own schema and fill in its defaults."""
        if isinstance(data, dict) and data.get("architecture") in ARCHITECTURES:
            hyper = data.get("hyper") or {}
            if not isinstance(hyper, dict):
                raise ValueError(f"hyper must be a mapping, not {type(hyper).__name__}")
            data = {**data, "hyper": ARCHITECTURES[data["architecture"]](**hyper).model_dump(mode="json")}
        return data

    def typed_hyper(self):
        return ARCHITECTURES[self.architecture](**self.hyper)


class ModelsConf(_Strict):
    families: dict[str, ModelFamily] = Field(min_length=1)

    @field_validator("families")
    @classmethod
    def _names(cls, families: dict[str, ModelFamily]) -> dict[str, ModelFamily]:
        for name in families:  # family names become registered model names: <family>-m1 ...
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
                raise ValueError(f"model family name {name!r}: lowercase letters, digits and '-' only")
        return families

    def family(self, name: str) -> ModelFamily:
        try:
            return self.families[name]
        except KeyError:
            raise KeyError(f"unknown model family {name!r}; conf/models.yaml defines "
                           f"{', '.join(sorted(self.families))}") from None


_DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # pipelines.workspace.SAFE_NAME
_METRIC_NAME = r"^[a-z][a-z0-9_]{0,62}$"  # a test set's metric key (factory.metric.<key> tags, the report)
DatasetName = Annotated[str, Field(pattern=_DATASET_NAME)]
TestSets = dict[Annotated[str, Field(pattern=_METRIC_NAME)], DatasetName]


class ModelInputs(_Strict):
    """What one stage model (M1..M8) is trained and checked on, at the site that trains it."""

    datasets: tuple[DatasetName, ...] = Field(min_length=1)  # training data (local and received names)
    test_sets: TestSets = Field(min_length=1)  # metric key -> this site's test dataset
    parity_set: DatasetName  # rows the ONNX export is checked on
    subset_datasets: tuple[DatasetName, ...] | None = None  # which datasets a run's `subset` selects from
    base_test_sets: TestSets = {}  # the base model is evaluated on these before the stage trains (stage 8)

    @model_validator(mode="after")
    def _subset_of_datasets(self) -> ModelInputs:
        stray = [d for d in self.subset_datasets or () if d not in self.datasets]
        if stray:
            raise ValueError(f"subset_datasets {stray} are not among the datasets {list(self.datasets)}")
        return self


class DataRelease(_Strict):
    """The dataset (a partition of `site` in conf/sites.yaml) a stage's data release sends, sanitized."""

    site: str
    dataset: DatasetName


class StageInputs(_Strict):
    """`inputs:` of conf/stages.yaml: which dataset of which site feeds each stage (DAG files read it)."""

    models: dict[str, ModelInputs] = Field(min_length=1)
    # The test sets a site evaluates the models it receives on (its own data; it never leaves the site).
    received: dict[str, TestSets] = {}
    releases: dict[int, DataRelease] = {}

    def model(self, model: str) -> ModelInputs:
        try:
            return self.models[model]
        except KeyError:
            raise KeyError(f"conf/stages.yaml inputs.models has no {model!r} "
                           f"(models: {', '.join(self.models)})") from None

    def received_test_sets(self, site: str) -> dict[str, str]:
        try:
            return dict(self.received[site])
        except KeyError:
            raise KeyError(f"conf/stages.yaml inputs.received has no test sets for {site!r}") from None

    def release(self, stage: int, site: str) -> str:
        """The dataset stage `stage`'s data release sends from `site` (refuses another site)."""
        try:
            release = self.releases[stage]
        except KeyError:
            raise KeyError(f"conf/stages.yaml inputs.releases has no stage {stage} "
                           f"(stages: {', '.join(map(str, self.releases))})") from None
        if release.site != site:
            raise KeyError(f"conf/stages.yaml inputs.releases.{stage} is a release of {release.site}, not {site}")
        return release.dataset

    def metric_keys(self) -> tuple[str, ...]:
        """Every test set's metric key, in the order the models and sites first name them."""
        keys: dict[str, None] = {}
        for inputs in self.models.values():
            keys.update(dict.fromkeys(inputs.test_sets))
            keys.update(dict.fromkeys(inputs.base_test_sets))
        for test_sets in self.received.values():
            keys.update(dict.fromkeys(test_sets))
        return tuple(keys)


class Unlearning(_Strict):
    """`unlearning:` of conf/stages.yaml: sliced training (pipelines.learning.slices), so that a
    withdrawn contribution is unlearned by training again only the slices that followed it."""

    # auto: slice a run that trains on data of more than one owner; always; never.
    slicing: Literal["auto", "always", "never"] = "auto"
    # The share of a run's epochs the trainer's own data (slice 0) carries; the contributions share the rest.
    own_share: float = Field(default=0.625, gt=0, le=1)


class FederatedLocal(_Strict):
    """A participant unit's local training each round (pipelines.federated.LocalConfig)."""

    epochs: int = Field(default=1, ge=1, le=100)
    lr: float = Field(default=0.001, gt=0)
    batch_size: int = Field(default=32, ge=1)
    optimizer: Literal["sgd", "adam"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)


class FederatedPrivacy(_Strict):
    """DP-FedAvg on the updates (pipelines.federated.UpdatePrivacy): each unit's update clipped to
    `clip_norm`, Gaussian noise of `noise_multiplier` * clip_norm on the sum (central: the coordinator
    adds it), epsilon from the RDP accountant over the rounds at `delta`."""

    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)


class FederatedStage(_Strict):
    """`federated.<stage>` of conf/stages.yaml: how a stage trains when its collaboration is federated.

    `units`: per participant site, how many units of its own take part; each unit trains on its
    own share of the site's `data` partition (the partition's rows split deterministically by the
    stage seed: unit i of k takes every row whose seeded permutation position is i mod k)."""

    rounds: int = Field(default=8, ge=1, le=1000)
    min_rounds: int = Field(default=1, ge=1)
    tol: float | None = Field(default=None, gt=0)  # stop once the coordinator's test accuracy moves less
    rule: Literal["fedavg", "fedprox", "median", "trimmed_mean", "krum", "multi_krum"] = "fedavg"
    mu: float = Field(default=0.0, ge=0)  # FedProx's proximal term (rule fedprox only)
    f: int = Field(default=1, ge=0)  # Krum / median: the Byzantine units tolerated
    beta: float = Field(default=0.1, ge=0, lt=0.5)  # trimmed mean: the share cut at each end
    m: int | None = Field(default=None, ge=1)  # multi-Krum: the updates averaged
    local: FederatedLocal = FederatedLocal()
    deadline_seconds: float = Field(default=3600, gt=0)  # a site whose update is later is left out
    poll: str | None = "*/5 * * * *"  # the coordinator's cron, so a passed deadline is noticed
    secure_aggregation: bool = False
    privacy: FederatedPrivacy | None = None
    base_model: str = "M1"
    units: dict[str, int] = Field(min_length=1)  # participant site -> its units (the coordinator's own too)
    data: dict[str, DatasetName] = Field(min_length=1)  # participant site -> the partition its units share

    @model_validator(mode="after")
    def _consistent(self) -> FederatedStage:
        if self.min_rounds > self.rounds:
            raise ValueError(f"min_rounds {self.min_rounds} exceeds rounds {self.rounds}")
        if self.mu > 0 and self.rule != "fedprox":
            raise ValueError(f"mu {self.mu} is FedProx's proximal term; the rule is {self.rule!r}")
        if sorted(self.units) != sorted(self.data):
            raise ValueError(f"units and data must name the same sites; units {sorted(self.units)}, "
                             f"data {sorted(self.data)}")
        if any(n < 1 or n > 16 for n in self.units.values()):
            raise ValueError(f"each site takes part with 1 to 16 units; got {self.units}")
        total = sum(self.units.values())
        if (self.secure_aggregation or self.privacy is not None) and self.rule not in ("fedavg", "fedprox"):
            raise ValueError(f"rule {self.rule!r} needs each update in the clear; secure aggregation and "
                             "update privacy work on the sum: use fedavg or fedprox")
        if self.secure_aggregation and total < 3:
            raise ValueError(f"secure aggregation needs at least 3 units; units give {total}")
        return self

    @property
    def unit_count(self) -> int:
        return sum(self.units.values())


class StagesConf(_Strict):
    order: tuple[Stage, ...]
    seed: int
    model_family: str
    training: dict[str, TrainingProfile]
    onnx_parity_max_abs: float
    schedules: dict[str, str | None]
    resources: dict[str, Resources]
    kubernetes: KubernetesConf
    inputs: StageInputs
    unlearning: Unlearning = Unlearning()
    # Per collaboration stage: centralized (the partner's data crosses, sanitized) or federated
    # (the model travels, the data stays: `federated.<stage>`). A stage not named is centralized.
    collaboration: dict[int, Literal["centralized", "federated"]] = {}
    federated: dict[int, FederatedStage] = {}

    def collaboration_of(self, stage: int) -> str:
        return self.collaboration.get(stage, "centralized")

    def kept_home(self) -> dict[tuple[str, str], int]:
        """What a federated stage's partner data would have been called had it been released, and
        which federated stage keeps it home: (site, dataset name) -> stage. The coordinator would have
        received `<owner>-<partition>`, the owner would have trained at home on its sanitized copy
        `<partition>-sanitized`; neither exists while the stage is federated."""
        coordinators = {s.stage: s.site for s in self.order}
        kept: dict[tuple[str, str], int] = {}
        for number, mode in self.collaboration.items():
            if mode != "federated" or number not in self.federated:
                continue
            for site, partition in self.federated[number].data.items():
                if site != coordinators.get(number):
                    kept[(coordinators[number], f"{site}-{partition}")] = number
                    kept[(site, f"{partition}-sanitized")] = number
        return kept

    def release_kept_home(self, stage: int) -> str | None:
        """Why stage `stage`'s data release must not send its data (a federated stage trains on it where
        it lives), else None."""
        release = self.inputs.releases.get(stage)
        if release is None:
            return None
        released_as = f"{release.site}-{release.dataset}"  # its name at the recipient
        federated_stage = next((n for (_, name), n in self.kept_home().items() if name == released_as), None)
        if federated_stage is None:
            return None
        return (f"stage {federated_stage} is federated: {release.site}'s {release.dataset} data trains where it "
                "lives and is not released")

    def skipped_release(self, stage: int) -> str | None:
        """Why data-release stage `stage` does not run at all (`release_kept_home`), else None. A federated
        stage itself runs its rounds instead of its DAGs."""
        return None if self.collaboration_of(stage) == "federated" else self.release_kept_home(stage)

    def federated_stage(self, stage: int) -> FederatedStage:
        try:
            return self.federated[stage]
        except KeyError:
            raise KeyError(f"conf/stages.yaml has no federated.{stage} section") from None

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

    @model_validator(mode="after")
    def _inputs_follow_order(self) -> StagesConf:
        """Every stage model has its inputs, and inputs name only models and stages of `order`."""
        models = [s.model for s in self.order if s.model]
        missing = [m for m in models if m not in self.inputs.models]
        stray = [m for m in self.inputs.models if m not in models]
        if missing or stray:
            raise ValueError(f"inputs.models must name exactly the models of order ({', '.join(models)}); "
                             + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                       stray and f"not in order: {', '.join(stray)}"])))
        unknown = [n for n in self.inputs.releases if n not in {s.stage for s in self.order}]
        if unknown:
            raise ValueError(f"inputs.releases names stage(s) {unknown} that order does not list")
        stages = {s.stage: s for s in self.order}
        for number, mode in self.collaboration.items():
            if number not in stages or not stages[number].model:
                raise ValueError(f"collaboration.{number}: no stage {number} with a model in order")
            if mode == "federated" and number not in self.federated:
                raise ValueError(f"collaboration.{number} is federated but federated.{number} is missing")
        for number, plan in self.federated.items():
            if number not in stages or not stages[number].model:
                raise ValueError(f"federated.{number}: no stage {number} with a model in order")
            if stages[number].site not in plan.units:
                raise ValueError(f"federated.{number}: the coordinator {stages[number].site} must take part "
                                 f"with units of its own (units: {sorted(plan.units)})")
        kept = self.kept_home()
        federated_models = {stages[n].model for n in set(kept.values())}  # their inputs are not read
        for entry in self.order:
            inputs = self.inputs.models.get(entry.model) if entry.model else None
            if inputs is None or entry.model in federated_models:
                continue
            for name in inputs.datasets:
                if (entry.site, name) in kept:
                    hint = ("name the partition itself, trained on at home" if name.endswith("-sanitized")
                            else "remove it from the datasets")
                    raise ValueError(f"inputs.models.{entry.model} trains on {name}, which {entry.site} never holds "
                                     f"while stage {kept[(entry.site, name)]} is federated (the data stays with its "
                                     f"owner, unreleased): {hint}")
        return self


class FactoryConfig(_Strict):
    sites: dict[str, Site]
    users: tuple[User, ...]
    service_identities: dict[str, ServiceIdentity]
    stages: StagesConf
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _inputs_name_sites_and_partitions(self) -> FactoryConfig:
        inputs = self.stages.inputs
        for site in inputs.received:
            if site not in self.sites:
                raise ValueError(f"stages inputs.received names unknown site {site!r}; sites: {', '.join(self.sites)}")
        for stage, release in inputs.releases.items():
            if release.site not in self.sites:
                raise ValueError(f"stages inputs.releases.{stage}: unknown site {release.site!r}")
            partitions = self.sites[release.site].data_partitions
            if release.dataset not in partitions:
                raise ValueError(f"stages inputs.releases.{stage}: {release.site} has no data partition "
                                 f"{release.dataset!r} in conf/sites.yaml (partitions: {', '.join(partitions)})")
        for stage, plan in self.stages.federated.items():
            for site, partition in plan.data.items():
                if site not in self.sites:
                    raise ValueError(f"stages federated.{stage}: unknown site {site!r}")
                if partition not in self.sites[site].data_partitions:
                    raise ValueError(f"stages federated.{stage}: {site} has no data partition {partition!r}")
        return self

    def user(self, user_id: str) -> User:
        for user in self.users:
            if user.id == user_id:
                return user
        raise KeyError(f"unknown user {user_id!r}; users are listed in conf/users.yaml")

    def site_users(self, site: str) -> tuple[User, ...]:
        """The people of one site: the only users its own Airflow knows."""
        return tuple(user for user in self.users if user.site == site)

    def partition(self, site: str, name: str) -> Partition:
        try:
            return self.sites[site].data_partitions[name]
        except KeyError:
            raise KeyError(f"site {site!r} has no data partition {name!r} in conf/sites.yaml") from None


def conf_dir() -> Path:
    return Path(os.environ.get("FACTORY_CONF", PROJECT_ROOT / "conf"))


# libyaml's safe loader where PyYAML has it: a tenth of the pure-Python loader's time, and every task process
# reads conf/ again (~25 ms a task with the pure-Python one).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str) -> Any:
    """YAML text as plain data (the safe loader: no Python objects); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_SAFE_LOADER)


def read_yaml(name: str) -> dict[str, Any]:
    """Read `conf/<name>` (used by areas that keep their own config file there)."""
    return parse_yaml((conf_dir() / name).read_text()) or {}


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


@functools.lru_cache(maxsize=4)
def _load_models(directory: str) -> ModelsConf:
    return ModelsConf(**read_yaml("models.yaml"))


def load_models() -> ModelsConf:
    """`conf/models.yaml`: the model families (architecture and hyper-parameters) stages can train."""
    return _load_models(str(conf_dir()))
