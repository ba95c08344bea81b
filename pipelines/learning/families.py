"""Model families: a name in conf/models.yaml, built for a dataset's spec.

`build_model(family, spec)` gives an untrained model of the family for `spec` (input shape,
classes). A trained model's metadata.json records the family, its architecture with the
hyper-parameters it was built with (`architecture_record`) and the spec (`DataSpec.to_dict()`);
`model_from_metadata` rebuilds exactly that model wherever the model goes, whatever the local
conf/models.yaml says today. Models written before families were recorded are the digits CNN on
the digits spec.

The family a stage trains is the one the site's profile recorded (`factory init --profile`,
`pipelines.profiles`), else `conf/stages.yaml model_family`, unless the training step is given
another (`train_model(..., family=...)`); fine-tuning continues the base model's family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipelines.config import ModelFamily, load_config, load_models
from pipelines.data.spec import DIGITS, DataSpec, SpecError
from pipelines.workspace import SitePaths

if TYPE_CHECKING:  # torch is imported where a model is built, not by readers of metadata (serving)
    from torch import nn

LEGACY_FAMILY = "digits-cnn"  # the family of models whose metadata names none (all of them were DigitsCNN)
LEGACY_ARCHITECTURE = {"architecture": "cnn", "hyper": {"channels": [16, 32], "hidden": 64, "dropout": 0.2}}


class FamilyError(ValueError):
    """A family is unknown, or cannot take a dataset's spec; the message says which and why."""


def default_family(paths: SitePaths | None = None) -> str:
    """The family the stages train unless told otherwise: at a site (`paths`), the one its profile
    recorded (`factory init --profile`); else conf/stages.yaml `model_family`."""
    if paths is not None:
        from pipelines.profiles import site_family

        family = site_family(paths)
        if family:
            return family
    return load_config().stages.model_family


def family_names() -> tuple[str, ...]:
    return tuple(load_models().families)


def family_conf(family: str) -> ModelFamily:
    try:
        return load_models().family(family)
    except KeyError as exc:
        raise FamilyError(exc.args[0]) from None


def architecture_record(family: str) -> dict[str, Any]:
    """What metadata.json records of a family: `{"architecture", "hyper"}` with every default filled in."""
    return family_conf(family).model_dump(mode="json")


def build_architecture(architecture: ModelFamily | Mapping[str, Any], spec: DataSpec) -> nn.Module:
    """An untrained model of `architecture` ({architecture, hyper}) for inputs and classes of `spec`."""
    from pipelines.learning.model import MLP, ConvNet, ResNet

    if not isinstance(architecture, ModelFamily):
        try:
            architecture = ModelFamily(**architecture)
        except (TypeError, ValueError) as exc:
            raise FamilyError(f"not a model architecture: {exc}") from None
    hyper = architecture.typed_hyper()
    if architecture.architecture == "mlp":
        return MLP(spec.input_shape, spec.n_classes, hidden=hyper.hidden, dropout=hyper.dropout)
    if len(spec.input_shape) != 3:
        raise FamilyError(f"the {architecture.architecture} architecture takes C x H x W images; the data's "
                          f"input shape is {list(spec.input_shape)} ({spec.kind}): use an mlp family")
    try:
        if architecture.architecture == "cnn":
            return ConvNet(spec.input_shape, spec.n_classes, channels=hyper.channels, hidden=hyper.hidden,
                           dropout=hyper.dropout)
        return ResNet(spec.input_shape, spec.n_classes, widths=hyper.widths, blocks=hyper.blocks,
                      groups=hyper.groups)
    except ValueError as exc:
        raise FamilyError(f"the {architecture.architecture} architecture cannot take {spec.kind} inputs of shape "
                          f"{list(spec.input_shape)}: {exc}") from None


def build_model(family: str, spec: DataSpec) -> nn.Module:
    """An untrained model of the conf/models.yaml `family` for inputs and classes of `spec`."""
    architecture = family_conf(family)
    try:
        return build_architecture(architecture, spec)
    except FamilyError as exc:
        raise FamilyError(f"family {family!r}: {exc}") from None


def metadata_family(metadata: Mapping[str, Any]) -> str:
    """The family a model's metadata names (models from before families were recorded: digits-cnn)."""
    family = metadata.get("family") or LEGACY_FAMILY
    if not isinstance(family, str):
        raise FamilyError(f"model metadata names family {family!r}, not a family name")
    return family


def metadata_spec(metadata: Mapping[str, Any]) -> DataSpec:
    """The spec a model was trained on (models from before specs were recorded: the digits demo)."""
    data = metadata.get("spec")
    try:
        return DataSpec.from_dict(data) if data else DIGITS
    except (SpecError, TypeError, AttributeError) as exc:
        raise FamilyError(f"model metadata carries an unusable spec: {exc}") from None


def metadata_architecture(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture a model was built with: as recorded, else its family's in conf/models.yaml."""
    recorded = metadata.get("architecture")
    if recorded:
        return dict(recorded)
    if not metadata.get("family"):
        return dict(LEGACY_ARCHITECTURE)
    return architecture_record(metadata_family(metadata))


def model_from_metadata(metadata: Mapping[str, Any]) -> nn.Module:
    """An untrained model shaped as the one `metadata` describes (its weights load into it)."""
    return build_architecture(metadata_architecture(metadata), metadata_spec(metadata))


def input_contract(spec: DataSpec) -> dict[str, Any]:
    """What a model depends on in a spec: how rows become inputs, the input shape and the classes
    (metadata columns and which of them are sensitive may differ between versions of one data)."""
    return {"kind": spec.kind, "encoding": spec.encoding, "input_shape": list(spec.input_shape),
            "feature_columns": list(spec.feature_columns), "classes": list(spec.classes)}


def describe(spec: DataSpec) -> str:
    shape = "x".join(str(d) for d in spec.input_shape)
    return f"{spec.kind} {shape} ({spec.n_features} features, {spec.n_classes} classes)"


def spec_differences(expected: DataSpec, actual: DataSpec) -> list[str]:
    """The parts of the input contract in which `actual` differs from `expected` (empty: rows of
    `actual` can go to a model trained on `expected`)."""
    want, have = input_contract(expected), input_contract(actual)
    return [key for key in want if want[key] != have[key]]


def spec_mismatch(expected: DataSpec, actual: DataSpec, *, expected_is: str, actual_is: str) -> str | None:
    """None when the specs agree; else a sentence naming both sides and where they differ."""
    differs = spec_differences(expected, actual)
    if not differs:
        return None
    return (f"{expected_is} {describe(expected)}, {actual_is} {describe(actual)} "
            f"(they differ in {', '.join(differs)})")
