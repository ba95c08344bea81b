"""Sealed-package throughput: seal and open a large file, side by side with cp, age and raw AES-GCM.

    .venv/bin/python benchmarks/package_throughput.py [--size-gib 2] [--dir /tmp] [--rounds 3]

Seal and open run in child processes (as `factory package` would), each reporting its own time,
the part of it spent in fsync, and its peak RSS. Every tool's output is made durable: seal and open
fsync it themselves, so `cp` and `age` are timed both plain and followed by `sync FILE`. Every run
reads its input from disk (the input is dropped from the page cache first). Needs `age` (Debian
package `age`) for those rows. Not run as a test.

On a shared virtual machine, disk reads and writes go through spells several times slower than
others, lasting tens of seconds. So each operation runs in several rounds, each time paired with a
`cp` of its own input (the plain file for seal and age encrypt, the package or age file for open
and age decrypt) right before or after it (alternating); a pair's runs share the spell of the
moment, and the ratios compare them. All tools run interleaved, round after round, so their
medians are compared with each other (seal and open vs age).
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
from collections import defaultdict
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


def _cold(path: Path) -> None:
    """Write back everything and drop `path` from the page cache: every run reads its input from disk.
    (Left alone, whether an input is still cached depends on how long ago it was written: this kind
    of virtual machine pages out cold page cache, as `kdamond` does here.)"""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed(command: list[str], source: Path, sync_target: Path | None = None) -> tuple[float, float]:
    """Run `command` on a cold `source`; return (seconds, seconds including `sync FILE` of its output)."""
    _cold(source)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    plain = time.perf_counter() - start
    if sync_target is not None:
        subprocess.run(["sync", str(sync_target)], check=True)
    return plain, time.perf_counter() - start


def _child(op: str, home: Path, src: Path, dst: Path) -> dict:
    _cold(src)
    result = subprocess.run([sys.executable, "-c", CHILD, op, str(home), str(src), str(dst)], cwd=ROOT,
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    args = parser.parse_args()
    size = int(args.size_gib * (1 << 30))

    sys.path.insert(0, str(ROOT))
    from pipelines.trust import keys
    from pipelines.workspace import SitePaths

    work = Path(tempfile.mkdtemp(prefix="pkg-bench-", dir=args.dir))
    times: dict[str, list[float]] = defaultdict(list)
    rss: dict[str, list[float]] = defaultdict(list)
    op_times: dict[str, list[float]] = defaultdict(list)
    cp_times: dict[str, list[float]] = defaultdict(list)  # the cp run paired with each of those
    age = shutil.which("age")
    try:
        home = work / "home"
        for site in ("supplier", "origin"):
            keys.ensure_site_keys(SitePaths.of(site, home))
        keys.exchange_trust(home)
        src = work / "input.bin"
        _make_input(src, size)
        if age:
            subprocess.run(["age-keygen", "-o", str(work / "age.key")], check=True, capture_output=True)
            recipient = subprocess.run(["age-keygen", "-y", str(work / "age.key")], check=True,
                                       capture_output=True, text=True).stdout.strip()

        def run_cp(source: Path) -> float:
            plain, synced = _timed(["cp", str(source), str(work / "copy.bin")], source, work / "copy.bin")
            times["cp (plain)"].append(plain)
            times["cp + fsync"].append(synced)
            (work / "copy.bin").unlink()
            return synced

        def run_seal() -> float:
            return run_child("seal", src, work / "input.pkg")

        def run_open() -> float:
            seconds = run_child("open", work / "input.pkg", work / "opened")
            assert (work / "opened" / "input.bin").stat().st_size == size
            shutil.rmtree(work / "opened")
            return seconds

        def run_child(op: str, source: Path, target: Path) -> float:
            report = _child(op, home, source, target)
            times[f"{op} (incl. fsync)"].append(report["seconds"])
            times[f"  {op}: of which fsync"].append(report["fsync"])
            rss[op].append(report["peak_rss_mib"])
            return report["seconds"]

        def run_age(op: str, command: list[str], source: Path, target: Path) -> float:
            plain, synced = _timed(command, source, target)
            times[f"{op} (plain)"].append(plain)
            times[f"{op} + fsync"].append(synced)
            return synced

        measured = [("seal", run_seal, src), ("open", run_open, work / "input.pkg")]
        if age:
            measured += [
                ("age encrypt", lambda: run_age("age encrypt", [age, "-r", recipient, "-o", str(work / "input.age"),
                                                                str(src)], src, work / "input.age"), src),
                ("age decrypt", lambda: run_age("age decrypt", [age, "-d", "-i", str(work / "age.key"), "-o",
                                                                str(work / "age.out"), str(work / "input.age")],
                                                work / "input.age", work / "age.out"), work / "input.age"),
            ]
        for round_index in range(args.rounds):
            # each operation is paired with a cp of the same input right before or after it (alternating
            # by round), and compared with that one: the pair shares the machine's state of the moment
            for name, operation, source in measured:
                if round_index % 2 == 0:
                    baseline, seconds = run_cp(source), operation()
                else:
                    seconds, baseline = operation(), run_cp(source)
                op_times[name].append(seconds)
                cp_times[name].append(baseline)
            (work / "input.pkg").unlink()
            (work / "age.out").unlink(missing_ok=True)
            (work / "input.age").unlink(missing_ok=True)
        times["raw AES-256-GCM (memory)"] = [_raw_aes(size) for _ in range(args.rounds)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {name: statistics.median(values) for name, values in times.items()}
    gib = size / (1 << 30)
    print(f"file: {gib:.2f} GiB under {args.dir}; {args.rounds} rounds, medians (min..max); "
          "inputs read from disk (cold cache), outputs fsync'd unless marked plain\n")
    print(f"{'operation':<26}{'seconds':>9}{'range':>14}{'MiB/s':>8}")
    order = ["cp (plain)", "cp + fsync", "age encrypt (plain)", "age encrypt + fsync", "age decrypt (plain)",
             "age decrypt + fsync", "raw AES-256-GCM (memory)", "seal (incl. fsync)", "  seal: of which fsync",
             "open (incl. fsync)", "  open: of which fsync"]
    for name in (n for n in order if n in med):
        values = times[name]
        print(f"{name:<26}{med[name]:>9.2f}{f'{min(values):.2f}..{max(values):.2f}':>14}"
              f"{size / MiB / med[name]:>8.0f}")
    print()
    seal_s, open_s = med["seal (incl. fsync)"], med["open (incl. fsync)"]
    ratios = {name: [op / cp for op, cp in zip(op_times[name], cp_times[name], strict=True)] for name in op_times}
    ratio = {name: statistics.median(values) for name, values in ratios.items()}
    print("each against the cp + fsync of its input run beside it (median of the rounds' ratios):")
    for name, values in ratios.items():
        print(f"  {name:<13}{ratio[name]:>6.2f}x   rounds: {', '.join(f'{v:.2f}' for v in values)}")
    if age:  # all tools ran interleaved, round after round: their medians saw the same spells
        print(f"  medians: seal / age encrypt = {seal_s / med['age encrypt + fsync']:.2f}x, "
              f"open / age decrypt = {open_s / med['age decrypt + fsync']:.2f}x")
    print("  best runs (the quiet machine), each against the best cp of its input: " + ", ".join(
        f"{name} {min(op_times[name]) / min(cp_times[name]):.2f}x" for name in ratios))
    peak = max(max(rss["seal"]), max(rss["open"]))
    print(f"peak RSS: seal {max(rss['seal']):.0f} MiB, open {max(rss['open']):.0f} MiB")
    met = ratio["seal"] <= 1.25 and ratio["open"] <= 1.25 and peak < 150
    if age:
        met = met and seal_s < med["age encrypt + fsync"] and open_s < med["age decrypt + fsync"]
    print(f"targets (paired ratios <= 1.25x cp + fsync, medians faster than age, RSS < 150 MiB): "
          f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
