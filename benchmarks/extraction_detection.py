"""What the extraction detector of `factory serve` catches, how early, and what the thief holds then.

Trains a watermarked victim (the supplier's ownership mark, pipelines.protection.watermark) on the
origin's data, serves it over real HTTP (uvicorn on 127.0.0.1, token, ODD, store, extraction
monitor with conf/protection.yaml's settings) and runs ART KnockoffNets against it
(`pipelines.protection.extraction_attack.run_extraction`) from attackers with different query pools:

- `seeds-N/noise-s`: the attacker holds N in-domain images and expands them with N(0, s) noise;
- `natural`: the attacker holds natural in-domain images (no expansion): PRADA's blind spot.

For each: the queries answered until the service refused the attacker, the surrogate's accuracy then
(trained on what it got), the surrogate's accuracy had the attack run to completion (the same
KnockoffNets against the victim's ONNX session, no detector), and whether either surrogate carries
the watermark (`watermark.verify`). Then benign clients (fresh in-distribution rows) at the same
volume: flagged or not, and their final W.

    .venv/bin/python benchmarks/extraction_detection.py [--queries 1500] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONTEXT = {"sensor_id": "ORG-SN-0002"}


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from pipelines.data.builder import digits, origin_sensor

    rng = np.random.default_rng(seed)
    x, y = digits()
    pick = rng.choice(len(x), n, replace=n > len(x))
    return origin_sensor(x[pick], rng), y[pick]


def _victim(home: Path):
    import pandas as pd

    from pipelines.config import TrainingProfile
    from pipelines.data.builder import build_site_data
    from pipelines.data.schema import FEATURE_COLUMNS, LABEL_COLUMN
    from pipelines.learning.onnx_export import export_onnx
    from pipelines.learning.train import train
    from pipelines.protection import watermark
    from pipelines.serving.app import ServedModel
    from pipelines.trust import keys
    from pipelines.trust.signing import sign_model_dir
    from pipelines.workspace import SitePaths

    paths = SitePaths.of("origin", home)
    build_site_data(paths)
    keys.ensure_site_keys(paths)
    key = watermark.ensure_key(paths)
    frame = pd.concat([pd.read_parquet(paths.data_dir / f"{p}.parquet") for p in ("private", "shared")])
    x, y = frame[list(FEATURE_COLUMNS)].to_numpy(np.float32), frame[LABEL_COLUMN].to_numpy(np.int64)
    marks = watermark.embedding_rows(key, [watermark.OWNER], n_features=64, n_classes=10)
    model = train(x, y, TrainingProfile(epochs=25, lr=0.003, batch_size=32, weight_decay=0.0), seed=3,
                  watermark=marks).model
    target = paths.models_dir / "victim" / "model"
    target.mkdir(parents=True)
    export_onnx(model, target / "model.onnx")
    metadata = {"name": "digits-cnn-m4", "stage": "M4", "site": "origin", "reference_data": ["data/private.parquet"],
                "watermark": {"key_id": key.key_id, "marks": [watermark.OWNER]}}
    (target / "metadata.json").write_text(json.dumps(metadata))
    sign_model_dir(paths, target)
    return paths, key, ServedModel("digits-cnn-m4", "victim", "M4", target, metadata)


def _unhindered(onnx_path: Path, pool: np.ndarray, n: int, batch: int, test: tuple[np.ndarray, np.ndarray], key):
    """The same KnockoffNets run to completion against the victim itself (no service, no detector)."""
    import torch
    from art.attacks.extraction import KnockoffNets
    from art.estimators.classification import BlackBoxClassifier

    from pipelines.learning.model import ConvNet
    from pipelines.learning.onnx_export import logits_onnx
    from pipelines.protection import watermark
    from pipelines.protection.extraction_attack import thief_classifier

    torch.manual_seed(0)
    np.random.seed(0)

    def predict(x):
        return np.eye(10, dtype=np.float32)[logits_onnx(onnx_path, x).argmax(axis=1)]

    victim = BlackBoxClassifier(predict, input_shape=(64,), nb_classes=10, clip_values=(0.0, 1.0))
    surrogate = ConvNet((1, 8, 8), 10)
    thief = KnockoffNets(victim, batch_size_fit=32, batch_size_query=batch, nb_epochs=20, nb_stolen=n,
                         verbose=False).extract(pool, thieved_classifier=thief_classifier(surrogate, (64,), 10, 0.003))
    accuracy = float((thief.predict(test[0]).argmax(axis=1) == test[1]).mean())
    return accuracy, watermark.verify(surrogate.eval(), key)


def _mark(result: dict) -> str:
    return f"{result['verified']} ({result['p_value']:.0e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="factory-bench-") as home:
        os.environ["FACTORY_HOME"] = home
        from serving import _start

        from pipelines.learning.onnx_export import logits_onnx
        from pipelines.protection import watermark
        from pipelines.protection.extraction_attack import run_extraction, seed_expansion_pool
        from pipelines.serving.app import create_app
        from pipelines.serving.clients import add_client

        paths, key, ref = _victim(Path(home))
        onnx_path = ref.model_dir / "model.onnx"
        test = _digits(400, seed=11)
        victim_accuracy = float((logits_onnx(onnx_path, test[0]).argmax(axis=1) == test[1]).mean())
        mark = watermark.verify(ref.model_dir, key)
        print(f"victim: accuracy {victim_accuracy:.3f} on 400 fresh origin-sensor digits; ownership mark "
              f"verified={mark['verified']} (trigger accuracy {mark['trigger_accuracy']}, p={mark['p_value']:.1e})")
        tokens = {name: add_client(paths, name) for name in [f"thief-{i}" for i in range(5)]
                  + [f"sensor-{i}" for i in range(20)]}
        app = create_app(paths, ref)
        conf = app.state.extraction.conf
        print(f"detector: PRADA, threshold W < {conf.threshold}, min {conf.min_queries} distances, window "
              f"{conf.window}, history {conf.history}, test every {conf.test_every}; budget {conf.per_window} rows "
              f"per {conf.window_s:.0f} s")
        server, thread, url = _start(app)
        try:
            scenarios = [("seeds-50/noise-0.05", 50, 0.05), ("seeds-200/noise-0.05", 200, 0.05),
                         ("seeds-500/noise-0.05", 500, 0.05), ("seeds-500/noise-0.1", 500, 0.1),
                         ("natural", None, None)]
            print(f"\nKnockoffNets (random sampling, {args.queries} queries planned in batches of {args.batch}; "
                  "labels only)")
            print(f"{'attacker pool':<22} {'flagged after':>13} {'surrogate acc':>13} {'mark (p)':>14} "
                  f"{'unhindered acc':>14} {'mark (p)':>14}")
            for i, (name, n_seeds, noise) in enumerate(scenarios):
                if n_seeds is None:
                    pool, _ = _digits(args.queries, seed=40 + i)
                else:
                    seeds, _ = _digits(n_seeds, seed=20 + i)
                    pool = seed_expansion_pool(seeds, args.queries, noise=noise, seed=30 + i)
                token = tokens[f"thief-{i}"]
                surrogate, stats = run_extraction(url, token, pool, n_queries=args.queries, query_batch=args.batch,
                                                  context=CONTEXT, x_test=test[0], y_test=test[1], epochs=20)
                caught = watermark.verify(surrogate, key)
                full_acc, full_mark = _unhindered(onnx_path, pool, args.queries, args.batch, test, key)
                flagged = "not flagged" if stats["completed"] else f"{stats['queries_until_refused']} q"
                print(f"{name:<22} {flagged:>13} {stats['surrogate_accuracy']:>13.3f} {_mark(caught):>14} "
                      f"{full_acc:>14.3f} {_mark(full_mark):>14}")
            import httpx

            from pipelines.protection.extraction import shapiro_w

            print(f"\nbenign clients: fresh in-distribution rows, {args.queries} queries each, batches of {args.batch}")

            monitor = app.state.extraction
            lowest, flagged, refused = [], 0, 0
            for seed in range(20):
                name = f"sensor-{seed}"
                rows, _ = _digits(args.queries, seed=100 + seed)
                low = 1.0
                with httpx.Client(base_url=url, timeout=30,
                                  headers={"Authorization": f"Bearer {tokens[name]}"}) as http:
                    for start in range(0, args.queries, args.batch):
                        r = http.post("/predict", json={"inputs": rows[start:start + args.batch].tolist(),
                                                        "context": CONTEXT})
                        refused += r.status_code == 429
                        state = monitor._clients[name]  # the W the detector would see after this request
                        if state.n_distances >= conf.min_queries:
                            low = min(low, shapiro_w(state.distances[: min(state.n_distances, conf.window)]))
                lowest.append(low)
                flagged += name in monitor.throttled()
            print(f"  20 clients: flagged {flagged}, requests refused {refused}; lowest W per client: min "
                  f"{min(lowest):.3f}, 10th percentile {np.percentile(lowest, 10):.3f}, median {np.median(lowest):.3f} "
                  f"(threshold {conf.threshold})")
        finally:
            server.should_exit = True
            thread.join(timeout=10)


if __name__ == "__main__":
    main()
