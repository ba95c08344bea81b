"""The real-data builder of design section 3.

scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download)
are split between the three parties. Each party's images pass through its own
sensor model (origin: lower gain plus noise; destination: rotated and blurred)
and get the metadata a capture chain attaches. The origin's shared partition
also gets injected critical outliers, contradictory duplicates and exact
duplicates, recorded in `injected_defects.json` so sanitization can be checked.
Everything is seeded: the same call writes byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from pipelines.data.schema import FEATURE_COLUMNS, ID_COLUMN, LABEL_COLUMN, PARTITIONS
from pipelines.fileio import atomic_path, write_json
from pipelines.workspace import SitePaths

SEED = 20261202
# Records per partition of the default build (1,797 images in all).
PARTITION_SIZES = {
    "supplier": {"train": 450, "test": 150},
    "origin": {"shared": 250, "private": 150, "export_authorized": 100, "test": 150},
    "destination": {"shared": 200, "private": 100, "contribution": 97, "test": 150},
}
SITE_PREFIX = {"supplier": "SUP", "origin": "ORG", "destination": "DST"}
SITE_LOCATION = {"supplier": (48.14, 11.58), "origin": (50.85, 4.35), "destination": (59.33, 18.07)}
ORIGIN_SENSOR = {"gain": 0.5, "offset": 0.1, "noise": 0.13}
DESTINATION_SENSOR = {"angle": 35.0, "blur_sigma": 0.55}
INJECTED = {"outliers": 6, "contradictory_pairs": 4, "exact_duplicates": 3}
CAPTURE_START = pd.Timestamp("2026-03-01T00:00:00Z")


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as float32 images in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def origin_sensor(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = x * ORIGIN_SENSOR["gain"] + ORIGIN_SENSOR["offset"]
    out = out + rng.normal(0.0, ORIGIN_SENSOR["noise"], size=x.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def destination_sensor(x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    images = x.reshape(-1, 8, 8)
    rotated = ndimage.rotate(images, DESTINATION_SENSOR["angle"], axes=(1, 2), reshape=False, order=1)
    blurred = ndimage.gaussian_filter(rotated, sigma=(0, DESTINATION_SENSOR["blur_sigma"], DESTINATION_SENSOR["blur_sigma"]))
    return np.clip(blurred.reshape(-1, 64), 0.0, 1.0).astype(np.float32)


SENSORS = {"supplier": lambda x, rng: x.astype(np.float32), "origin": origin_sensor, "destination": destination_sensor}


def _split_indices(n_total: int) -> dict[str, dict[str, np.ndarray]]:
    order = np.random.default_rng(SEED).permutation(n_total)
    out: dict[str, dict[str, np.ndarray]] = {}
    start = 0
    for site, sizes in PARTITION_SIZES.items():
        out[site] = {}
        for partition, size in sizes.items():
            out[site][partition] = order[start : start + size]
            start += size
    if start != n_total:
        raise AssertionError(f"partition sizes cover {start} of {n_total} images")
    return out


def _augment(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Grow (x, y) to n records: originals first, then shifted, jittered copies."""
    if n <= len(x):
        return x[:n], y[:n]
    picks = rng.integers(0, len(x), size=n - len(x))
    extra = x[picks].reshape(-1, 8, 8)
    shifts = rng.integers(-1, 2, size=(len(picks), 2))
    for axis in (0, 1):
        for s in (-1, 1):
            rows = shifts[:, axis] == s
            extra[rows] = np.roll(extra[rows], s, axis=axis + 1)
    extra = np.clip(extra.reshape(-1, 64) + rng.normal(0, 0.02, size=(len(picks), 64)), 0, 1)
    return np.vstack([x, extra.astype(np.float32)]), np.concatenate([y, y[picks]])


def _frame(site: str, partition: str, x: np.ndarray, y: np.ndarray, first_id: int, rng: np.random.Generator) -> pd.DataFrame:
    n = len(x)
    prefix = SITE_PREFIX[site]
    lat0, lon0 = SITE_LOCATION[site]
    frame = pd.DataFrame(x, columns=list(FEATURE_COLUMNS))
    frame.insert(0, ID_COLUMN, pd.array([f"{prefix}-{first_id + i:07d}" for i in range(n)], dtype="string"))
    frame[LABEL_COLUMN] = y.astype(np.int64)
    frame["sensor_serial"] = pd.array([f"{prefix}-SN-{k:04d}" for k in rng.integers(0, 12, n)], dtype="string")
    seconds = np.sort(rng.integers(0, 90 * 86400, n))
    frame["capture_time"] = CAPTURE_START + pd.to_timedelta(seconds, unit="s")
    frame["latitude"] = np.round(lat0 + rng.normal(0, 0.3, n), 6)
    frame["longitude"] = np.round(lon0 + rng.normal(0, 0.3, n), 6)
    frame["mission_id"] = pd.array([f"{prefix}-M-{k:03d}" for k in rng.integers(0, 40, n)], dtype="string")
    frame["operator"] = pd.array([f"{prefix.lower()}-op-{k:02d}" for k in rng.integers(0, 15, n)], dtype="string")
    return frame


def _inject_defects(frame: pd.DataFrame, rng: np.random.Generator, next_id: int) -> tuple[pd.DataFrame, dict]:
    """Append critical outliers, contradictory duplicates and exact duplicates to origin's shared data."""
    prefix = SITE_PREFIX["origin"]
    features = list(FEATURE_COLUMNS)
    rows = []
    ids: dict[str, list[str]] = {"outliers": [], "contradictory_duplicates": [], "exact_duplicates": []}

    def new_row(template: pd.Series, **changes) -> pd.Series:
        nonlocal next_id
        row = template.copy()
        row[ID_COLUMN] = f"{prefix}-{next_id:07d}"
        next_id += 1
        for key, value in changes.items():
            row[key] = value
        return row

    picks = rng.choice(len(frame), size=sum(INJECTED.values()) + INJECTED["contradictory_pairs"], replace=False)
    cursor = iter(picks)
    for _ in range(INJECTED["outliers"]):  # a saturated, failing sensor: bright garbage over the whole frame
        row = new_row(frame.iloc[next(cursor)])
        row[features] = rng.uniform(0.85, 1.0, size=64).astype(np.float32)
        rows.append(row)
        ids["outliers"].append(row[ID_COLUMN])
    for _ in range(INJECTED["contradictory_pairs"]):  # same image, a second record with another label
        original = frame.iloc[next(cursor)]
        wrong = int((original[LABEL_COLUMN] + 1 + rng.integers(0, 8)) % 10)
        copy = new_row(original, **{LABEL_COLUMN: wrong})
        rows.append(copy)
        ids["contradictory_duplicates"] += [original[ID_COLUMN], copy[ID_COLUMN]]
    for _ in range(INJECTED["exact_duplicates"]):  # the same record captured twice
        copy = new_row(frame.iloc[next(cursor)])
        rows.append(copy)
        ids["exact_duplicates"].append(copy[ID_COLUMN])
    out = pd.concat([frame, pd.DataFrame(rows).astype(frame.dtypes.to_dict())], ignore_index=True)
    out = out.sample(frac=1.0, random_state=SEED).reset_index(drop=True)
    return out, {"partition": "shared", **ids}


def build_frames(site: str, scale: int | None = None) -> tuple[dict[str, pd.DataFrame], dict | None]:
    """The site's partitions as data frames (and origin's defect record)."""
    x_all, y_all = digits()
    indices = _split_indices(len(x_all))[site]
    total_default = sum(sum(sizes.values()) for sizes in PARTITION_SIZES.values())
    rng = np.random.default_rng([SEED, list(PARTITION_SIZES).index(site)])
    frames: dict[str, pd.DataFrame] = {}
    defects = None
    next_id = 0
    for partition in PARTITIONS[site]:
        idx = indices[partition]
        x, y = x_all[idx], y_all[idx]
        if scale and partition != "test":  # test sets stay the real images: accuracy stays comparable
            x, y = _augment(x, y, max(1, round(len(idx) * scale / total_default)), rng)
        x = SENSORS[site](x, rng)
        frame = _frame(site, partition, x, y, next_id, rng)
        next_id += len(frame) + 1000
        if site == "origin" and partition == "shared":
            frame, defects = _inject_defects(frame, rng, next_id)
            next_id += 1000
        frames[partition] = frame
    return frames, defects


def build_site_data(paths: SitePaths, scale: int | None = None) -> dict[str, Path]:
    """Write the site's partitions as Parquet under `paths.data_dir`; return partition -> file."""
    frames, defects = build_frames(paths.site, scale)
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for partition, frame in frames.items():
        target = paths.data_dir / f"{partition}.parquet"
        with atomic_path(target) as tmp:
            frame.to_parquet(tmp, index=False, engine="pyarrow")
        written[partition] = target
    if defects is not None:
        write_json(paths.data_dir / "injected_defects.json", defects)
    return written
