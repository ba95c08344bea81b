"""Sealed-package throughput: seal and open, each beside `cp` + fsync of the same payload.

    .venv/bin/python benchmarks/package_throughput.py [--size 2G] [--payloads model,dataset,large]
                                                     [--dir /tmp] [--rounds 3]

Payloads: `model`, a model directory as a release holds it (ONNX file, safetensors weights, model
card, metadata and trust files; about 6 MB); `dataset`, a 100 MB file; `large`, one file of
`--size` (2 GiB by default). Seal and open run in a child process each, as `factory package`
would, and report the time of the call itself and the peak RSS. Every output is made durable:
seal and open fsync it themselves, `cp` is followed by `sync` of the copies. Every run reads its
input cold (dropped from the page cache first). Not run as a test.

On a shared virtual machine the disk goes through spells several times slower than others,
lasting tens of seconds. So each operation is paired with a `cp` + fsync of its own input (the
payload for seal, the package for open) run right before or after it, alternating by round, and
the ratio of the pair is taken; the figures are medians over the rounds. Target: seal and open
within 1.5x of `cp` + fsync. On a payload of a few MB the fixed costs (key unwrap, signatures,
the fsynced audit entry and state file) weigh more than the streaming; the seal and open of an
empty file are printed first, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
TARGET = 1.5

CHILD = r"""
import json, sys, time
from pathlib import Path
from pipelines.workspace import SitePaths
from pipelines.trust import packages
op, home, src, dst = sys.argv[1:5]
start = time.perf_counter()
if op == "seal":
    packages.seal(SitePaths.of("supplier", Path(home)), "origin", Path(src), Path(dst),
                  purpose="benchmark", content_type="dataset")
else:
    packages.open_package(SitePaths.of("origin", Path(home)), Path(src), Path(dst))
seconds = time.perf_counter() - start
# VmHWM: the peak of this program (ru_maxrss would include the parent's memory, copied by fork)
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024}))
"""


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in _files(path))


def _cold(path: Path) -> None:
    """Write back everything and drop `path` from the page cache, so the next run reads it from disk."""
    os.sync()
    for file in _files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cp_fsync(source: Path, scratch: Path) -> float:
    """Seconds of `cp` (`cp -r` for a directory) of a cold `source`, then `sync` of every copied file."""
    target = scratch / "copy"
    _cold(source)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    subprocess.run(["sync", *map(str, _files(target))], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return seconds


def _child(op: str, home: Path, src: Path, dst: Path) -> dict:
    _cold(src)
    result = subprocess.run([sys.executable, "-c", CHILD, op, str(home), str(src), str(dst)], cwd=ROOT,
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _random_file(path: Path, size: int) -> None:
    block = os.urandom(min(size, 16 * MiB)) or b""
    with path.open("wb") as handle:
        for _ in range(size // max(len(block), 1)):
            handle.write(block)
        handle.write(block[: size % max(len(block), 1)])
        handle.flush()
        os.fsync(handle.fileno())


def _model_dir(path: Path) -> None:
    """A release directory of a small ONNX model, its weights and the JSON files around it."""
    path.mkdir()
    _random_file(path / "model.onnx", 3 * MiB + 123_457)
    _random_file(path / "weights.safetensors", 3 * MiB + 7_001)
    card = {"intended_use": "benchmark", "metrics": {f"m{i}": i / 7 for i in range(50)}}
    (path / "model_card.json").write_text(json.dumps(card, indent=2))
    (path / "metadata.json").write_text(json.dumps({"lineage": [{"dataset": f"d{i}"} for i in range(20)]}))
    for name, size in (("model.sig", 3_000), ("provenance.dsse.json", 6_000), ("bom.cdx.json", 12_000)):
        _random_file(path / name, size)


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1:].upper() in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="size of the `large` payload: bytes, or with K, M or G")
    parser.add_argument("--payloads", default="model,dataset,large", help="comma-separated: model, dataset, large")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the files go")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per payload; figures are medians")
    args = parser.parse_args()
    makers = {"model": _model_dir, "dataset": lambda p: _random_file(p, 100 * 1000 * 1000),
              "large": lambda p: _random_file(p, _parse_size(args.size))}
    chosen = [name.strip() for name in args.payloads.split(",")]
    if unknown := set(chosen) - set(makers):
        parser.error(f"unknown payloads: {', '.join(sorted(unknown))}")

    sys.path.insert(0, str(ROOT))
    from pipelines.trust import keys
    from pipelines.workspace import SitePaths

    work = Path(tempfile.mkdtemp(prefix="pkg-bench-", dir=args.dir))
    rows = []
    try:
        home = work / "home"
        for site in ("supplier", "origin"):
            keys.ensure_site_keys(SitePaths.of(site, home))
        keys.exchange_trust(home)
        empty = work / "empty"
        empty.touch()
        fixed_seal = statistics.median(_child("seal", home, empty, work / f"empty{i}.pkg")["seconds"] for i in range(3))
        fixed_open = statistics.median(_child("open", home, work / f"empty{i}.pkg", work / f"empty{i}")["seconds"]
                                       for i in range(3))
        for name in chosen:
            payload, package, opened = work / name, work / f"{name}.pkg", work / "opened"
            makers[name](payload)
            seal_ratios, open_ratios, seal_s, open_s, cp_s, rss = [], [], [], [], [], []
            for round_index in range(args.rounds):
                # each operation beside a cp + fsync of its own input, before it or after it by turns
                for op, source, target, ratios, times in (("seal", payload, package, seal_ratios, seal_s),
                                                          ("open", package, opened, open_ratios, open_s)):
                    if round_index % 2 == 0:
                        baseline, report = _cp_fsync(source, work), _child(op, home, source, target)
                    else:
                        report, baseline = _child(op, home, source, target), _cp_fsync(source, work)
                    ratios.append(report["seconds"] / baseline)
                    times.append(report["seconds"])
                    rss.append(report["peak_rss_mib"])
                    if op == "seal":
                        cp_s.append(baseline)
                opened_payload = opened / name
                assert _size(opened_payload) == _size(payload), f"{name}: opened content differs in size"
                shutil.rmtree(opened)
                package.unlink()
            rows.append((name, _size(payload), statistics.median(cp_s), statistics.median(seal_s),
                         statistics.median(seal_ratios), statistics.median(open_s), statistics.median(open_ratios),
                         max(rss)))
            shutil.rmtree(payload) if payload.is_dir() else payload.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"under {args.dir}; {args.rounds} rounds, medians; inputs cold, outputs fsync'd; fixed costs (an empty "
          f"file): seal {fixed_seal * 1000:.0f} ms, open {fixed_open * 1000:.0f} ms\n")
    print(f"{'payload':<9}{'size':>11}{'cp+fsync s':>12}{'seal s':>9}{'seal/cp':>9}{'open s':>9}{'open/cp':>9}"
          f"{'peak RSS':>10}")
    for name, size, cp, seal_t, seal_r, open_t, open_r, peak in rows:
        print(f"{name:<9}{size / MiB:>7.1f} MiB{cp:>12.3f}{seal_t:>9.3f}{seal_r:>8.2f}x{open_t:>9.3f}{open_r:>8.2f}x"
              f"{peak:>6.0f} MiB")
    met = {name: seal_r <= TARGET and open_r <= TARGET for name, _, _, _, seal_r, _, open_r, _ in rows}
    print(f"\ntarget (seal and open within {TARGET}x of cp + fsync of their input): "
          + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in met.items()))


if __name__ == "__main__":
    main()
