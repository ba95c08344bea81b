"""The record schema every party's Parquet files share.

Features are the 8x8 digit images flattened row-major and scaled to [0, 1]
(`f00` .. `f63`), then passed through the party's sensor effect and clipped.
Metadata columns are what a real capture chain attaches; the sensitive ones
must be removed or coarsened before data leaves its owner.
"""

from __future__ import annotations

N_FEATURES = 64
FEATURE_COLUMNS = tuple(f"f{i:02d}" for i in range(N_FEATURES))
LABEL_COLUMN = "label"
LABELS = tuple(range(10))
ID_COLUMN = "record_id"

# column -> pandas dtype as stored in Parquet
METADATA_COLUMNS = {
    "sensor_serial": "string",
    "capture_time": "datetime64[ns, UTC]",
    "latitude": "float64",
    "longitude": "float64",
    "mission_id": "string",
    "operator": "string",
}
# Columns that identify people, missions, equipment or places: never leave a site as-is.
SENSITIVE_COLUMNS = ("sensor_serial", "operator", "mission_id", "latitude", "longitude")
# Column names that look sensitive if they ever appear (validation refuses them on release).
SENSITIVE_NAME_PATTERNS = ("gps", "lat", "lon", "callsign", "operator", "serial", "mission", "name", "ssn")

ALL_COLUMNS = (ID_COLUMN, *FEATURE_COLUMNS, LABEL_COLUMN, *METADATA_COLUMNS)

# The partitions each party's data is split into (design section 3); flags live in conf/sites.yaml.
PARTITIONS = {
    "supplier": ("train", "test"),
    "origin": ("shared", "private", "export_authorized", "test"),
    "destination": ("shared", "private", "contribution", "test"),
}
