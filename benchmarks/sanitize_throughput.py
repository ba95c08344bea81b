"""Sanitization + validation throughput on a `--scale N` build (N records over the three sites).

Every partition of every site goes through `sanitize_file` (rules + Parquet out) and GX
validation of the result (release suite; training suite for the supplier, whose only purpose
keeps coarsened geo). Prints records per second and peak RSS beside a plain pandas read +
write of the same files as the baseline. The build runs in a child process so the peak RSS
shown is that of reading, sanitizing and validating.

Run: `.venv/bin/python benchmarks/sanitize_throughput.py --scale 1000000`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

PURPOSE = {"supplier": ("training", "training"), "origin": ("collaboration", "release"),
           "destination": ("collaboration", "release")}
BUILD = (
    "import sys; from pathlib import Path; from pipelines.data.builder import build_site_data; "
    "from pipelines.workspace import SitePaths; "
    "[build_site_data(SitePaths.of(s, Path(sys.argv[1])), scale=int(sys.argv[2])) for s in sys.argv[3:]]"
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=int, default=1_000_000)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent

    from pipelines.data.sanitize import sanitize_file
    from pipelines.data.validate import validate, validate_file
    from pipelines.workspace import SitePaths

    with tempfile.TemporaryDirectory(prefix="sanitize-bench-") as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", BUILD, tmp, str(args.scale), *PURPOSE], check=True, cwd=root)
        build_s = time.perf_counter() - t0
        files = [(site, f) for site in PURPOSE for f in sorted(SitePaths.of(site, Path(tmp)).data_dir.glob("*.parquet"))]
        rows = sum(pd.read_parquet(f, columns=["record_id"]).shape[0] for _, f in files)
        size_mb = sum(f.stat().st_size for _, f in files) / 2**20

        t0 = time.perf_counter()
        for _, f in files:
            pd.read_parquet(f).to_parquet(Path(tmp) / "baseline.parquet", index=False)
        baseline_s = time.perf_counter() - t0

        validate(pd.read_parquet(files[0][1]).head(50), "training")  # GX context + suites, once per process
        sanitize_s = validate_s = 0.0
        removed: dict[str, int] = {}
        rows_out, failures = 0, []
        for site, f in files:
            purpose, suite = PURPOSE[site]
            out = Path(tmp) / "out" / f"{site}-{f.name}"
            t0 = time.perf_counter()
            report = sanitize_file(f, out, site, purpose)
            sanitize_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            result = validate_file(out, suite, check=False)
            validate_s += time.perf_counter() - t0
            rows_out += report["rows_out"]
            failures += [f"{site}/{f.stem}: {result.message()}"] if not result.success else []
            for rule in report["rules"]:
                removed[rule["rule"]] = removed.get(rule["rule"], 0) + rule["count"]

    total = sanitize_s + validate_s
    figures = {
        "scale": args.scale,
        "records": rows,
        "records_out": rows_out,
        "files": len(files),
        "parquet_mb": round(size_mb, 1),
        "build_s": round(build_s, 1),
        "baseline_read_write_s": round(baseline_s, 2),
        "baseline_records_per_s": round(rows / baseline_s),
        "sanitize_s": round(sanitize_s, 2),
        "sanitize_records_per_s": round(rows / sanitize_s),
        "validate_s": round(validate_s, 2),
        "validate_records_per_s": round(rows_out / validate_s),
        "sanitize_plus_validate_records_per_s": round(rows / total),
        "time_ratio_to_baseline": round(total / baseline_s, 2),
        "removed": removed,
        "validation_failures": failures,
        "peak_rss_mb": round(peak_rss_mb()),
    }
    print(json.dumps(figures, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
