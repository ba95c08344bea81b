"""Cost of `factory serve`'s revocation check on every request.

The service checks on each /predict whether the site's revocation list (`state/revoked-models.json`)
names the served version (`pipelines.learning.revocations.RevocationWatch`: one `os.stat` while the
list is unchanged, a re-read when it changed). This benchmark serves a freshly trained, signed model
in-process (FastAPI TestClient, no network, so the check's share is as large as it can be) and
alternates, request by request on the same rows, the service as it is with the same service whose
watch is switched off (its `check` returns None without touching the file): the difference is the
check. The list holds 1000 revoked versions of other models (a long-lived site). It also times the
check alone, unchanged list and just-changed list (a re-read).

    .venv/bin/python benchmarks/revocation_check.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()

    from fastapi.testclient import TestClient
    from serving import _site

    from pipelines.learning import revocations
    from pipelines.serving.app import create_app

    home = Path(tempfile.mkdtemp(prefix="bench-revocation-"))
    paths, ref = _site(home)
    for i in range(1000):
        revocations.record_revoked(paths, name="digits-cnn-m3", version=str(i), run_key=f"{i:016x}",
                                   revocation={"revocation_id": f"rev-{i:024x}", "dataset": "origin/shared@ab12",
                                               "owner": "origin"})
    checked = TestClient(create_app(paths, ref, auth=False))
    original = revocations.RevocationWatch.check
    revocations.RevocationWatch.check = lambda self: None  # the baseline's watch: off
    try:
        baseline = TestClient(create_app(paths, ref, auth=False))
    finally:
        revocations.RevocationWatch.check = original
    rows = np.random.default_rng(0).random((args.requests, 64)).round(4).tolist()
    times = {"baseline": [], "checked": []}
    for i, row in enumerate(rows):
        for name, client in (("baseline", baseline), ("checked", checked))[:: 1 if i % 2 else -1]:
            started = time.perf_counter()
            response = client.post("/predict", json={"inputs": [row]})
            times[name].append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    watch = revocations.RevocationWatch(paths, ref.name, str(ref.version))
    watch.check()
    n = 100_000
    started = time.perf_counter()
    for _ in range(n):
        watch.check()
    unchanged_us = (time.perf_counter() - started) / n * 1e6
    rereads = []
    for i in range(50):
        revocations.record_revoked(paths, name="digits-cnn-m8", version=str(i), run_key=None,
                                   revocation={"revocation_id": f"rev-{i:024x}"})
        started = time.perf_counter()
        watch.check()
        rereads.append(time.perf_counter() - started)
    base_ms, checked_ms = (float(np.median(times[k])) * 1000 for k in ("baseline", "checked"))
    print(f"requests of one row, in-process, {args.requests} each, alternating; revocation list of 1000 entries")
    print(f"{'':<28}{'p50 ms':>10}{'p95 ms':>10}")
    for name in ("baseline", "checked"):
        ms = np.asarray(times[name]) * 1000
        print(f"{name + (' (watch off)' if name == 'baseline' else ' (watch on)'):<28}"
              f"{np.percentile(ms, 50):>10.3f}{np.percentile(ms, 95):>10.3f}")
    print(f"p50 ratio checked / baseline: {checked_ms / base_ms:.3f}")
    print(f"check alone, list unchanged: {unchanged_us:.2f} us = {unchanged_us / 1000 / base_ms:.4%} of a baseline "
          "request")
    print(f"check alone, list just changed (re-read of 1000+ entries): {np.median(rereads) * 1e6:.0f} us p50")


if __name__ == "__main__":
    main()
