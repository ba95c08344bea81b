"""Cost of the inference service and its ODD policy, and of the drift check.

Serves a freshly trained, signed model over real HTTP (uvicorn on 127.0.0.1, in this process) with
client authentication (a bearer token), the body limit, ODD checks, input storage and the extraction
monitor (query budget and PRADA detector, conf/protection.yaml; the budget is raised to this run's
volume; `det p50`: the detector's own time on the same batches), and compares
its latency and throughput on the same batches (batch sizes 1, 32, 256) with the peer a team would
otherwise write — a minimal FastAPI + ONNX Runtime endpoint over uvicorn (pydantic body, argmax), the
two called in turn request by request, by the same HTTP client — and with a bare ONNX Runtime
session. The rows are natural in-distribution traffic (the bundled digits through the origin's
sensor, fresh noise), so the detector computes real distances and its test on every request. Then
times the drift check (store read + KS + MMD) on windows of 10k and 100k samples.

    .venv/bin/python benchmarks/serving.py [--requests 200] [--no-drift]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class PeerRequest(BaseModel):
    inputs: list[list[float]]


def peer_app(onnx_path: Path):
    """The minimal FastAPI + ONNX Runtime endpoint: no auth, no ODD, no store."""
    import onnxruntime as ort
    from fastapi import FastAPI

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/predict")
    def predict(body: PeerRequest) -> dict:
        logits = session.run(["logits"], {"input": np.asarray(body.inputs, dtype=np.float32)})[0]
        return {"predictions": logits.argmax(axis=1).tolist()}

    return app


def _site(home: Path):
    import pandas as pd

    from pipelines.config import TrainingProfile
    from pipelines.data.builder import build_site_data
    from pipelines.data.schema import FEATURE_COLUMNS, LABEL_COLUMN
    from pipelines.learning.onnx_export import export_onnx
    from pipelines.learning.train import train
    from pipelines.serving.app import ServedModel
    from pipelines.trust import keys
    from pipelines.trust.signing import sign_model_dir
    from pipelines.workspace import SitePaths

    paths = SitePaths.of("origin", home)
    build_site_data(paths)
    keys.ensure_site_keys(paths)
    frame = pd.read_parquet(paths.data_dir / "private.parquet")
    x, y = frame[list(FEATURE_COLUMNS)].to_numpy(np.float32), frame[LABEL_COLUMN].to_numpy(np.int64)
    model = train(x, y, TrainingProfile(epochs=2, lr=0.003, batch_size=64, weight_decay=0.0), seed=1).model
    model_dir = paths.models_dir / "bench" / "model"
    model_dir.mkdir(parents=True)
    export_onnx(model, model_dir / "model.onnx")
    metadata = {"name": "digits-cnn-m4", "stage": "M4", "site": "origin", "reference_data": ["data/private.parquet"]}
    (model_dir / "metadata.json").write_text(json.dumps(metadata))
    sign_model_dir(paths, model_dir)
    return paths, ServedModel("digits-cnn-m4", "bench", "M4", model_dir, metadata)


def _stats(seconds: list[float], batch: int) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)),
            "samples_per_s": batch * len(ms) / float(np.sum(ms) / 1000)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(app):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def bench_service(paths, ref, requests: int, extraction_on: bool = True) -> list[dict]:
    import httpx
    import onnxruntime as ort

    from pipelines.data.builder import digits, origin_sensor
    from pipelines.protection import settings
    from pipelines.protection.extraction import ExtractionMonitor
    from pipelines.serving.app import create_app
    from pipelines.serving.clients import add_client

    token = add_client(paths, "benchmark")
    extraction = settings("extraction")
    extraction["budget"] = {**extraction.get("budget", {}), "per_window": 10 * requests * 256}
    extraction["enabled"] = extraction_on
    app = create_app(paths, ref, extraction=extraction)
    servers = [_start(app), _start(peer_app(ref.model_dir / "model.onnx"))]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(ref.model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    images, _ = digits()
    out = []
    try:
        with httpx.Client(base_url=servers[0][2], timeout=30, headers={"Authorization": f"Bearer {token}"}) as svc, \
                httpx.Client(base_url=servers[1][2], timeout=30) as peer:
            for batch in (1, 32, 256):
                n = max(20, requests // (1 + batch // 32))
                batches = [origin_sensor(images[rng.choice(len(images), batch)], rng) for _ in range(n + 5)]
                payloads = [{"inputs": b.tolist(), "context": {"sensor_id": "ORG-SN-0001"}} for b in batches]
                for p, b in zip(payloads[:5], batches[:5], strict=True):  # warm-up
                    svc.post("/predict", json=p)
                    peer.post("/predict", json={"inputs": p["inputs"]})
                    session.run(["logits"], {"input": b})
                payloads, batches = payloads[5:], batches[5:]
                service, minimal, bare, detector = [], [], [], []
                for p in payloads:  # the two endpoints in turn, so load changes hit both alike
                    t = time.perf_counter()
                    response = svc.post("/predict", json=p)
                    service.append(time.perf_counter() - t)
                    assert response.status_code == 200 and response.json()["odd"]["allow"], response.text
                    t = time.perf_counter()
                    response = peer.post("/predict", json={"inputs": p["inputs"]})
                    minimal.append(time.perf_counter() - t)
                    assert response.status_code == 200, response.text
                probe = ExtractionMonitor(app.state.extraction.conf, b.shape[1])  # its share of the service's time
                for b in batches:
                    t = time.perf_counter()
                    labels = session.run(["logits"], {"input": b})[0].argmax(axis=1)
                    bare.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    probe.observe("probe", b, labels)
                    detector.append(time.perf_counter() - t)
                s, m, o = _stats(service, batch), _stats(minimal, batch), _stats(bare, batch)
                out.append({"batch": batch, "requests": n, "service": s, "peer": m, "bare_onnx": o,
                            "detector_p50_ms": float(np.percentile(np.asarray(detector) * 1000, 50)),
                            "p50_ratio_peer": s["p50_ms"] / m["p50_ms"],
                            "throughput_ratio_peer": m["samples_per_s"] / s["samples_per_s"],
                            "p50_ratio_bare": s["p50_ms"] / o["p50_ms"]})
        detector = app.state.extraction._clients.get("benchmark")
        print("(extraction monitor off)" if detector is None else
              f"(extraction monitor: {detector.n_distances} distances seen from the benchmark client, the latest "
              f"{min(detector.n_distances, app.state.extraction.conf.window)} tested; "
              f"clients throttled: {sorted(app.state.extraction.throttled()) or 'none'})")
    finally:
        for server, thread, _ in servers:
            server.should_exit = True
            thread.join(timeout=10)
    return out


def bench_drift(paths, ref) -> list[dict]:
    import alibi_detect.cd  # noqa: F401  (its import, ~15 s here, is not part of a check)

    from pipelines.data.builder import build_frames
    from pipelines.data.schema import FEATURE_COLUMNS
    from pipelines.serving.drift import detect, make_detectors
    from pipelines.serving.store import InputStore

    out = []
    for n in (10_000, 100_000):
        frames, _ = build_frames("origin", scale=int(n * 1797 / 150))  # the test partition grows to ~n rows
        window = frames["test"][list(FEATURE_COLUMNS)].to_numpy(np.float32)[:n]
        reference = frames["private"][list(FEATURE_COLUMNS)].to_numpy(np.float32)[:n]
        store = InputStore(Path(tempfile.mkdtemp(dir=paths.state_dir)), max_samples=n, segment_samples=2000)
        for start in range(0, len(window), 256):
            store.append(window[start : start + 256])
        t = time.perf_counter()
        recent = store.recent(n)
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        result = detect(reference, recent, make_detectors())
        detect_s = time.perf_counter() - t
        out.append({"samples": len(recent), "reference": len(reference), "store_read_s": read_s,
                    "detect_s": detect_s, "drift": result["drift"],
                    **{f"{k}_s": v["seconds"] for k, v in result["detectors"].items()}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--no-drift", action="store_true", help="time the service only")
    parser.add_argument("--no-extraction", action="store_true",
                        help="the service without its extraction monitor (to see what the monitor adds)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="factory-bench-") as home:
        os.environ["FACTORY_HOME"] = home
        paths, ref = _site(Path(home))
        monitor = "extraction monitor OFF" if args.no_extraction else "extraction monitor"
        print(f"service (uvicorn over HTTP: token, body limit, ODD, store, {monitor}) vs minimal FastAPI + "
              "ONNX Runtime peer (uvicorn over HTTP) vs bare ONNX Runtime, same batches, same HTTP client; ms")
        print(f"{'batch':>5} {'svc p50':>8} {'svc p95':>8} {'peer p50':>8} {'peer p95':>8} {'ort p50':>8} "
              f"{'det p50':>8} {'svc samp/s':>11} {'peer samp/s':>11} {'p50 x peer':>10} {'tput x peer':>11} "
              f"{'p50 x ort':>9}")
        results = bench_service(paths, ref, args.requests, extraction_on=not args.no_extraction)
        for r in results:
            s, m, o = r["service"], r["peer"], r["bare_onnx"]
            print(f"{r['batch']:>5} {s['p50_ms']:>8.3f} {s['p95_ms']:>8.3f} {m['p50_ms']:>8.3f} {m['p95_ms']:>8.3f} "
                  f"{o['p50_ms']:>8.3f} {r['detector_p50_ms']:>8.3f} {s['samples_per_s']:>11.0f} {m['samples_per_s']:>11.0f} "
                  f"{r['p50_ratio_peer']:>10.2f} {r['throughput_ratio_peer']:>11.2f} {r['p50_ratio_bare']:>9.1f}")
        worst = max(r["p50_ratio_peer"] for r in results)
        print(f"worst p50 ratio to the peer: {worst:.2f}x (target: within 1.5x)")
        if args.no_drift:
            return
        print("\ndrift check (store read + KS on all rows + MMD on a 500-row subsample each side)")
        for r in bench_drift(paths, ref):
            print(f"{r['samples']:>7} samples vs {r['reference']:>6} reference: read {r['store_read_s']:.3f}s, "
                  f"ks {r['ks_s']:.2f}s, mmd {r['mmd_s']:.2f}s, total {r['store_read_s'] + r['detect_s']:.2f}s "
                  f"(drift={r['drift']})")


if __name__ == "__main__":
    main()
