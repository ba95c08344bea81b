"""What a dataset's records look like: the contract between data, models, serving and drift.

A `DataSpec` says how to turn a dataset's rows into model inputs: which columns hold the features
and how they are encoded, the input shape a model family sees (C x H x W for images, (n,) for
tabular rows), the classes (labels are stored as the class index 0..K-1), and which metadata
columns ride along and which of them are sensitive.

Two feature encodings:
- `columns`: one float column per feature (the digits demo's `f00`..`f63`, a tabular file's numeric
  columns), used as is;
- `pixels`: one binary column of C*H*W uint8 bytes per row (imported image folders), scaled to [0, 1].

Every dataset version records its spec (catalog record `extra["spec"]`); a version without one is
the digits demo (`DIGITS`). Models record the spec they were trained on, so export, serving, ODD
and drift know the input without reading names in code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from pipelines.data import schema

KINDS = ("image", "tabular")
ENCODINGS = ("columns", "pixels")
PIXELS_COLUMN = "pixels"


class SpecError(ValueError):
    """A spec, or a frame checked against it, is not usable; the message says why."""


@dataclass(frozen=True)
class DataSpec:
    kind: str
    input_shape: tuple[int, ...]
    feature_columns: tuple[str, ...]
    classes: tuple[str, ...]
    encoding: str = "columns"
    label_column: str = schema.LABEL_COLUMN
    id_column: str = schema.ID_COLUMN
    metadata_columns: Mapping[str, str] = field(default_factory=dict)
    sensitive_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpecError(f"unknown data kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        if self.encoding not in ENCODINGS:
            raise SpecError(f"unknown feature encoding {self.encoding!r}; encodings: {', '.join(ENCODINGS)}")
        if not self.input_shape or any(int(d) < 1 for d in self.input_shape):
            raise SpecError(f"input shape {self.input_shape!r} must be positive dimensions")
        if self.kind == "image" and len(self.input_shape) != 3:
            raise SpecError(f"an image spec needs a C x H x W input shape, not {self.input_shape!r}")
        if self.encoding == "columns" and len(self.feature_columns) != self.n_features:
            raise SpecError(f"{len(self.feature_columns)} feature columns for input shape {self.input_shape!r} "
                            f"({self.n_features} features)")
        if self.encoding == "pixels" and self.feature_columns != (PIXELS_COLUMN,):
            raise SpecError(f"pixel-encoded data keeps its features in one column {PIXELS_COLUMN!r}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise SpecError(f"classes must be two or more distinct names, not {list(self.classes)!r}")

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a record of this spec has, in order."""
        return (self.id_column, *self.feature_columns, self.label_column, *self.metadata_columns)

    def features(self, frame) -> np.ndarray:
        """The model inputs of `frame` as float32 rows of `n_features` (reshape to `input_shape`)."""
        if self.encoding == "columns":
            return np.ascontiguousarray(frame[list(self.feature_columns)].to_numpy(np.float32))
        values = frame[PIXELS_COLUMN].to_numpy()
        if len(values) == 0:
            return np.zeros((0, self.n_features), np.float32)
        raw = np.frombuffer(b"".join(values), dtype=np.uint8)
        if raw.size != len(values) * self.n_features:
            raise SpecError(f"pixel rows do not all hold {self.n_features} bytes ({self.input_shape!r})")
        return raw.reshape(len(values), self.n_features).astype(np.float32) / 255.0

    def labels(self, frame) -> np.ndarray:
        return frame[self.label_column].to_numpy(np.int64)

    def keep_columns(self, columns) -> DataSpec:
        """This spec for a frame that kept only `columns` of its metadata (sanitization drops some).

        Features, label and id are not optional: a frame without them is not of this spec."""
        present = {str(c) for c in columns}
        return replace(
            self,
            metadata_columns={c: t for c, t in self.metadata_columns.items() if c in present},
            sensitive_columns=tuple(c for c in self.sensitive_columns if c in present),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["feature_columns"] = list(self.feature_columns)
        data["classes"] = list(self.classes)
        data["metadata_columns"] = dict(self.metadata_columns)
        data["sensitive_columns"] = list(self.sensitive_columns)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown spec field(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**{
                **data,
                "input_shape": tuple(int(d) for d in data["input_shape"]),
                "feature_columns": tuple(str(c) for c in data["feature_columns"]),
                "classes": tuple(str(c) for c in data["classes"]),
                "metadata_columns": dict(data.get("metadata_columns") or {}),
                "sensitive_columns": tuple(data.get("sensitive_columns") or ()),
            })
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"not a data spec: {exc}") from exc


# The embedded default: the 8x8 digits demo `factory init` builds (pipelines.data.builder).
DIGITS = DataSpec(
    kind="image",
    input_shape=(1, 8, 8),
    feature_columns=schema.FEATURE_COLUMNS,
    classes=tuple(str(label) for label in schema.LABELS),
    metadata_columns=dict(schema.METADATA_COLUMNS),
    sensitive_columns=schema.SENSITIVE_COLUMNS,
)


def spec_of(record_extra: Mapping[str, Any] | None) -> DataSpec:
    """The spec a catalog record carries in `extra["spec"]`; records without one are the digits demo."""
    data = (record_extra or {}).get("spec")
    return DataSpec.from_dict(data) if data else DIGITS
