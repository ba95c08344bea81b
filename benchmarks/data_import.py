"""`factory data import` beside a plain read of the same files: throughput and peak RSS.

Generates (not timed) `--images N` PNG images of 64x64 RGB in ten class folders and a CSV of
`--rows` rows (7 numeric features, 4 classes, one metadata column) in a temp folder, then times:
- the plain read: PIL open + load of every image; the CSV read whole by pandas and by pyarrow;
- the import (in-process API, a fresh site repo): read, check, write Parquet, derive the suite,
  DVC add + push, commit the record.
Each run is a child process of its own, so each peak RSS is that side's alone; the RSS a child had
before its timed work (interpreter and imports) is shown too. Neither side times importing its
libraries (PIL, pandas, pyarrow; the importer's and DVC's modules): a cold `factory data import`
process pays about 0.5-1 s more for DVC's. Plain read and import alternate
`--repeat` times (each import into a fresh site repo) and the fastest of each is kept, which
damps the noise of a shared machine. The bound check imports the whole source and a quarter of it
with the same chunk (a sixteenth of the whole): peak RSS that does not grow with the data is
bounded by the chunk.

Run: `.venv/bin/python benchmarks/data_import.py` (100k images, 1M rows), or smaller with
`--images 25000`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [f"class{i}" for i in range(10)]
LABELS = ["alpha", "bravo", "charlie", "delta"]

CHILD = r'''
import json, resource, sys, time
from pathlib import Path
side, source, home = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
chunk = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "0" else None
def rss():  # this program's high-water mark (ru_maxrss would carry the forking parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if side == "read-images":
    from PIL import Image
    files = sorted(p for p in source.rglob("*.png"))
    before = rss(); t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as img:
            img.load()
    seconds, rows = time.perf_counter() - t0, len(files)
elif side == "read-csv-pandas":
    import pandas as pd
    before = rss(); t0 = time.perf_counter()
    rows = len(pd.read_csv(source)); seconds = time.perf_counter() - t0
elif side == "read-csv-pyarrow":
    import pyarrow.csv
    before = rss(); t0 = time.perf_counter()
    rows = pyarrow.csv.read_csv(source).num_rows; seconds = time.perf_counter() - t0
else:
    import os
    os.environ["FACTORY_HOME"] = home
    from pipelines.data.importer import import_dataset
    from pipelines.workspace import SitePaths
    import PIL.PngImagePlugin, dvc.repo, dvc.repo.add, dvc.repo.push, networkx, rich.console  # noqa: F401
    paths = SitePaths.of("origin", Path(home))
    before = rss(); t0 = time.perf_counter()
    result = import_dataset(paths, side, source, chunk_rows=chunk, progress=False)
    seconds, rows = time.perf_counter() - t0, result.rows
print(json.dumps({"seconds": seconds, "rows": rows, "rss_before_mb": before, "peak_rss_mb": rss()}))
'''


def generate_images(folder: Path, n: int) -> None:
    """Images that compress like photographs do: a smooth 8x8 pattern scaled up, plus sensor noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in CLASSES:
        (folder / c).mkdir(parents=True)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BILINEAR)
        noisy = np.clip(np.asarray(base, np.int16) + rng.integers(-6, 7, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / CLASSES[i % len(CLASSES)] / f"img{i:07d}.png")


def generate_csv(path: Path, rows: int) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.normal(0, 1, (rows, 7)).round(5), columns=[f"x{i}" for i in range(7)])
    frame["label"] = np.array(LABELS)[rng.integers(0, len(LABELS), rows)]
    frame["operator"] = np.array([f"op-{k:02d}" for k in range(20)])[rng.integers(0, 20, rows)]
    frame.to_csv(path, index=False)


def quarter_images(folder: Path, out: Path) -> None:
    for c in CLASSES:
        (out / c).mkdir(parents=True)
        files = sorted((folder / c).iterdir())
        for f in files[: len(files) // 4]:
            os.link(f, out / c / f.name)


def quarter_csv(path: Path, out: Path) -> None:
    with path.open() as src, out.open("w") as dst:
        lines = sum(1 for _ in src) - 1
        src.seek(0)
        for i, line in enumerate(src):
            if i > lines // 4:
                break
            dst.write(line)


def child(side: str, source: Path, home: Path, chunk: int | None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, side, str(source), str(home), str(chunk or 0)],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_site(tmp: Path) -> Path:
    """A new FACTORY_HOME with origin's repo and keys (not timed)."""
    from pipelines.data.repo import init_site_repo
    from pipelines.trust.keys import ensure_site_keys
    from pipelines.workspace import SitePaths

    home = Path(tempfile.mkdtemp(prefix="home-", dir=tmp))
    os.environ["FACTORY_HOME"] = str(home)
    paths = SitePaths.of("origin", home)
    init_site_repo(paths)
    ensure_site_keys(paths)
    return home


def fastest(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "all_seconds": [r["seconds"] for r in runs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=None, help="chunk of the import (default: its own)")
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs of each side; the fastest is kept")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    from pipelines.workspace import SitePaths

    with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        generate_images(tmp / "images", args.images)
        quarter_images(tmp / "images", tmp / "images-quarter")
        generate_csv(tmp / "rows.csv", args.rows)
        quarter_csv(tmp / "rows.csv", tmp / "rows-quarter.csv")
        generated_s = time.perf_counter() - t0
        images_mb = sum(f.stat().st_size for f in (tmp / "images").rglob("*.png")) / 2**20
        csv_mb = (tmp / "rows.csv").stat().st_size / 2**20

        sides = {  # name: (child side, source, imports?)
            "images: plain read (PIL open + load)": ("read-images", tmp / "images", False),
            "images: factory data import": ("images", tmp / "images", True),
            "csv: plain read (pandas.read_csv)": ("read-csv-pandas", tmp / "rows.csv", False),
            "csv: plain read (pyarrow.csv.read_csv)": ("read-csv-pyarrow", tmp / "rows.csv", False),
            "csv: factory data import": ("rows", tmp / "rows.csv", True),
        }
        found: dict[str, list[dict]] = {name: [] for name in sides}
        stored: dict[str, float] = {}
        for _ in range(args.repeat):
            for name, (side, source, imports) in sides.items():
                home = fresh_site(tmp) if imports else tmp
                found[name].append(child(side, source, home, args.chunk_rows if imports else None))
                if imports:
                    out = SitePaths.of("origin", home).data_dir / "imported" / f"{side}.parquet"
                    stored[side] = out.stat().st_size / 2**20
        runs = {name: fastest(items) for name, items in found.items()}
        bound = {"images": max(1, args.images // 16), "csv": max(1, args.rows // 16)}
        for kind, side, whole, quarter in (("images", "images", tmp / "images", tmp / "images-quarter"),
                                           ("csv", "rows", tmp / "rows.csv", tmp / "rows-quarter.csv")):
            runs[f"{kind}: import, chunk {bound[kind]}"] = child(side, whole, fresh_site(tmp), bound[kind])
            runs[f"{kind}: import of a quarter, chunk {bound[kind]}"] = child(side, quarter, fresh_site(tmp),
                                                                            bound[kind])

    print(f"sources: {args.images} PNG 64x64 RGB ({images_mb:.0f} MiB), CSV of {args.rows} rows ({csv_mb:.0f} MiB); "
          f"generated in {generated_s:.0f} s (not timed); stored Parquet: images {stored['images']:.0f} MiB, "
          f"csv {stored['rows']:.0f} MiB")
    print(f"{'':44} {'rows':>9} {'seconds':>8} {'rows/s':>10} {'peak RSS MiB':>13} {'RSS before':>11}  all runs (s)")
    for name, run in runs.items():
        tries = ", ".join(f"{s:.2f}" for s in run.get("all_seconds", [run["seconds"]]))
        print(f"{name:44} {run['rows']:>9} {run['seconds']:>8.2f} {run['rows'] / run['seconds']:>10.0f} "
              f"{run['peak_rss_mb']:>13.0f} {run['rss_before_mb']:>11.0f}  {tries}")
    ratio = {
        "images": runs["images: factory data import"]["seconds"] / runs["images: plain read (PIL open + load)"]["seconds"],
        "csv_vs_pandas": runs["csv: factory data import"]["seconds"] / runs["csv: plain read (pandas.read_csv)"]["seconds"],
        "csv_vs_pyarrow": runs["csv: factory data import"]["seconds"]
        / runs["csv: plain read (pyarrow.csv.read_csv)"]["seconds"],
    }
    growth = {
        kind: runs[f"{kind}: import, chunk {bound[kind]}"]["peak_rss_mb"]
        - runs[f"{kind}: import of a quarter, chunk {bound[kind]}"]["peak_rss_mb"]
        for kind in ("images", "csv")
    }
    print(f"import / plain read: images {ratio['images']:.2f}x; csv {ratio['csv_vs_pandas']:.2f}x of pandas, "
          f"{ratio['csv_vs_pyarrow']:.2f}x of pyarrow (target: within 2x)")
    print(f"peak RSS at one chunk size, whole minus quarter source: images {growth['images']:+.0f} MiB, "
          f"csv {growth['csv']:+.0f} MiB (bounded by the chunk when it does not grow with the data)")
    print(json.dumps({"images": args.images, "rows": args.rows, "repeat": args.repeat, "runs": runs, "ratio": ratio,
                      "rss_growth_mb": growth}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
