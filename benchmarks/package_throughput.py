"""Sealed-package throughput: seal and open a large file, side by side with cp, age and raw AES-GCM.

    .venv/bin/python benchmarks/package_throughput.py [--size-gib 2] [--dir /tmp]

Seal and open run in child processes (as `factory package` would), each reporting its own time,
the part of it spent in fsync, and its peak RSS. Every tool's output is fsync'd once: seal and open do
it themselves, so `cp` and `age` are timed both plain and followed by `sync FILE` (the durable
equivalent). Needs `age` (Debian package `age`) for that column. Not run as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
from pipelines.workspace import SitePaths
from pipelines.trust import packages
fsync_time = 0.0
_fsync = os.fsync
def timed_fsync(fd):
    global fsync_time
    t = time.perf_counter(); _fsync(fd); fsync_time += time.perf_counter() - t
os.fsync = timed_fsync
op, home, src, dst = sys.argv[1:5]
start = time.perf_counter()
if op == "seal":
    packages.seal(SitePaths.of("supplier", Path(home)), "origin", Path(src), Path(dst),
                  purpose="benchmark", content_type="dataset")
else:
    packages.open_package(SitePaths.of("origin", Path(home)), Path(src), Path(dst))
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "fsync": fsync_time,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _timed(command: list[str], sync_target: Path | None = None) -> tuple[float, float]:
    """Run `command`; return (seconds, seconds including `sync FILE` of its output)."""
    os.sync()  # start from a clean page cache state: no earlier writeback competing
    start = time.perf_counter()
    subprocess.run(command, check=True)
    plain = time.perf_counter() - start
    if sync_target is not None:
        subprocess.run(["sync", str(sync_target)], check=True)
    return plain, time.perf_counter() - start


def _child(op: str, home: Path, src: Path, dst: Path) -> dict:
    os.sync()
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, op, str(home), str(src), str(dst)], cwd=ROOT,
                            check=True, capture_output=True, text=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["wall"] = time.perf_counter() - start
    return report


def _raw_aes(size: int) -> float:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, chunk = AESGCM(AESGCM.generate_key(256)), 4 * MiB
    data, out = os.urandom(chunk), bytearray(chunk + 16)
    start = time.perf_counter()
    for index in range(size // chunk):
        aead.encrypt_into(index.to_bytes(12, "big"), data, None, out)
    return time.perf_counter() - start


def _make_input(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with path.open("wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
        handle.write(block[: size % len(block)])
        handle.flush()
        os.fsync(handle.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    size = int(args.size_gib * (1 << 30))

    sys.path.insert(0, str(ROOT))
    from pipelines.trust import keys
    from pipelines.workspace import SitePaths

    work = Path(tempfile.mkdtemp(prefix="pkg-bench-", dir=args.dir))
    try:
        home = work / "home"
        for site in ("supplier", "origin"):
            keys.ensure_site_keys(SitePaths.of(site, home))
        keys.exchange_trust(home)
        src = work / "input.bin"
        _make_input(src, size)
        rows: dict[str, tuple[float, float]] = {}

        rows["cp"] = _timed(["cp", str(src), str(work / "copy.bin")], work / "copy.bin")
        (work / "copy.bin").unlink()

        seal = _child("seal", home, src, work / "input.pkg")
        opened = _child("open", home, work / "input.pkg", work / "opened")
        assert (work / "opened" / "input.bin").stat().st_size == size
        shutil.rmtree(work / "opened")
        (work / "input.pkg").unlink()

        age = shutil.which("age")
        if age:
            subprocess.run(["age-keygen", "-o", str(work / "age.key")], check=True, capture_output=True)
            recipient = subprocess.run(["age-keygen", "-y", str(work / "age.key")], check=True,
                                       capture_output=True, text=True).stdout.strip()
            rows["age encrypt"] = _timed([age, "-r", recipient, "-o", str(work / "input.age"), str(src)],
                                         work / "input.age")
            rows["age decrypt"] = _timed([age, "-d", "-i", str(work / "age.key"), "-o", str(work / "age.out"),
                                          str(work / "input.age")], work / "age.out")
        aes = _raw_aes(size)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gib = size / (1 << 30)
    mbps = lambda seconds: size / MiB / seconds  # noqa: E731
    print(f"file: {gib:.2f} GiB under {args.dir}; outputs fsync'd unless marked plain\n")
    print(f"{'operation':<26}{'seconds':>9}{'MiB/s':>9}")
    lines = [("cp (plain)", rows["cp"][0]), ("cp + fsync", rows["cp"][1])]
    if "age encrypt" in rows:
        lines += [("age encrypt (plain)", rows["age encrypt"][0]), ("age encrypt + fsync", rows["age encrypt"][1]),
                  ("age decrypt (plain)", rows["age decrypt"][0]), ("age decrypt + fsync", rows["age decrypt"][1])]
    lines += [("raw AES-256-GCM (memory)", aes),
              ("seal (incl. fsync)", seal["seconds"]), ("  of which fsync", seal["fsync"]),
              ("open (incl. fsync)", opened["seconds"]), ("  of which fsync", opened["fsync"])]
    for name, seconds in lines:
        print(f"{name:<26}{seconds:>9.2f}{mbps(seconds):>9.0f}")
    print()
    cp_plain, cp_sync = rows["cp"]
    print(f"seal / (cp + fsync) = {seal['seconds'] / cp_sync:.2f}x   seal / cp plain = {seal['seconds'] / cp_plain:.2f}x"
          f"   seal before fsync / cp plain = {(seal['seconds'] - seal['fsync']) / cp_plain:.2f}x")
    print(f"open / (cp + fsync) = {opened['seconds'] / cp_sync:.2f}x   open / cp plain = {opened['seconds'] / cp_plain:.2f}x"
          f"   open before fsync / cp plain = {(opened['seconds'] - opened['fsync']) / cp_plain:.2f}x")
    if "age encrypt" in rows:
        print(f"seal / age encrypt (+fsync) = {seal['seconds'] / rows['age encrypt'][1]:.2f}x   "
              f"open / age decrypt (+fsync) = {opened['seconds'] / rows['age decrypt'][1]:.2f}x")
    print(f"peak RSS: seal {seal['peak_rss_mib']:.0f} MiB, open {opened['peak_rss_mib']:.0f} MiB "
          f"(child wall incl. interpreter start: seal {seal['wall']:.2f}s, open {opened['wall']:.2f}s)")
    targets = seal["seconds"] <= 1.25 * cp_sync and opened["seconds"] <= 1.25 * cp_sync
    print(f"targets (<= 1.25x cp+fsync, RSS < 150 MiB): "
          f"{'met' if targets and max(seal['peak_rss_mib'], opened['peak_rss_mib']) < 150 else 'NOT met'}")


if __name__ == "__main__":
    main()
