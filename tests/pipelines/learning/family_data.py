"""Small synthetic, separable datasets for any spec (shared by the family tests).

Each class has a prototype row: a permutation of evenly spaced values in [0.1, 0.9], so every row's
mean is about 0.5 and its spread about 0.25 whatever its class (inside the sites' ODD envelope);
rows are prototype plus Gaussian noise. Tabular rows are then put on scales of their own per
feature (a model sees raw units, not [0, 1])."""

from __future__ import annotations

import numpy as np

from pipelines.data.spec import DataSpec

IMAGE = DataSpec(kind="image", input_shape=(3, 12, 12), feature_columns=("pixels",), classes=("a", "b", "c"),
                 encoding="pixels")
TABULAR = DataSpec(kind="tabular", input_shape=(7,), feature_columns=tuple(f"x{i}" for i in range(7)),
                   classes=("low", "mid", "high", "peak"))
TABULAR_SCALE = np.array([1.0, 10.0, 250.0, 0.01, 3.0, 40.0, 0.5])
TABULAR_OFFSET = np.array([0.0, -5.0, 1000.0, 0.2, -3.0, 15.0, 7.0])


def prototypes(spec: DataSpec, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, spec.n_features, spec.n_classes])
    levels = np.linspace(0.1, 0.9, spec.n_features)
    return np.stack([rng.permutation(levels) for _ in range(spec.n_classes)])


def to_units(spec: DataSpec, unit_rows: np.ndarray) -> np.ndarray:
    """Rows in [0, 1] as the data holds them (tabular: scaled and offset per feature)."""
    if spec.kind == "tabular":
        return (unit_rows * TABULAR_SCALE[: spec.n_features] + TABULAR_OFFSET[: spec.n_features]).astype(np.float32)
    return unit_rows.astype(np.float32)


def rows(spec: DataSpec, n: int, *, seed: int, noise: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """`n` rows (float32, n_features wide) and their class indices."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, spec.n_classes, n)
    unit = np.clip(prototypes(spec)[y] + rng.normal(0.0, noise, (n, spec.n_features)), 0.0, 1.0)
    return to_units(spec, unit), y.astype(np.int64)


def frame(spec: DataSpec, n: int, *, seed: int):
    """A dataset frame of `spec` (pixel rows stored as uint8 bytes, columns as float columns)."""
    import pandas as pd

    x, y = rows(spec, n, seed=seed)
    data = {spec.id_column: [f"r{seed}-{i:05d}" for i in range(n)]}
    if spec.encoding == "pixels":
        data[spec.feature_columns[0]] = [bytes(row) for row in np.round(x * 255).astype(np.uint8)]
    else:
        data.update({column: x[:, j].astype(np.float64) for j, column in enumerate(spec.feature_columns)})
    data[spec.label_column] = y
    return pd.DataFrame(data)
