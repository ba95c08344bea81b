"""Watermarks on the default digits data: what a mark costs and what it survives.

Side by side, with the same seeds, profiles (conf/stages.yaml) and data (pipelines.data.builder,
the partitions `factory init` builds; no download), models trained without and with the marks the
training step embeds (pipelines.protection.watermark):

1. accuracy cost: M1 (supplier train, ownership mark) and M5 (supplier train + origin
   export-authorized, ownership + destination mark), on each site's test set, mean over seeds;
2. survival of the chain: M5 -> M6 (supplier, fine-tuned with destination shared data; the supplier
   re-embeds the marks its key made) -> M7 (destination, local-only: shared + private, no marks);
   also M6 fine-tuned without re-embedding, as another party would;
3. pruning: global magnitude pruning of M5's weights at 30/50/70 %;
4. extraction: ART KnockoffNets (random sampling) against M5 as a black box answering labels only,
   with the destination's own images as the attacker's pool; surrogate accuracy and its marks.

Run: `.venv/bin/python benchmarks/watermark.py [--seeds 5] [--queries 1500]`. The marks' size and
repeats are conf/protection.yaml's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipelines.config import load_config
from pipelines.data.builder import build_frames
from pipelines.data.spec import DIGITS
from pipelines.learning.train import logits_torch, train
from pipelines.protection import watermark as wm

KEY = wm.WatermarkKey.of(bytes(range(7, 39)))  # a fixed benchmark key: the figures are reproducible
FAMILY = "digits-cnn"
DEST = "recipient:destination"


def _xy(frame) -> tuple[np.ndarray, np.ndarray]:
    return DIGITS.features(frame), DIGITS.labels(frame)


def _data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts = {site: build_frames(site)[0] for site in ("supplier", "origin", "destination")}
    out = {f"{site}/{name}": _xy(frame) for site, frames in parts.items() for name, frame in frames.items()}
    return out


def _cat(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _accuracy(model, data: tuple[np.ndarray, np.ndarray]) -> float:
    return float((logits_torch(model, data[0]).argmax(1) == data[1]).mean())


def _train(x, y, profile: str, seed: int, marks: list[str], base=None):
    rows = wm.embedding_rows(KEY, marks, n_features=64, n_classes=10) if marks else None
    profiles = load_config().stages.training
    return train(x, y, profiles[profile], seed=seed, family=FAMILY, watermark=rows,
                 base_state=base.state_dict() if base is not None else None,
                 mode="fine_tune" if base is not None else "centralized").model


def _mark(model, mark: str) -> str:
    result = wm.verify(model, KEY, mark)
    return f"{result['trigger_accuracy']:.3f} (p {result['p_value']:.1e}, {'yes' if result['verified'] else 'no'})"


TESTS = ("supplier/test", "origin/test", "destination/test")


def accuracy_cost(data, seeds: list[int]) -> dict:
    rows = []
    models = {}
    for stage, parts, profile, marks in (
        ("M1", ("supplier/train",), "initial", [wm.OWNER]),
        ("M5", ("supplier/train", "origin/export_authorized"), "export", [wm.OWNER, DEST]),
    ):
        x, y = _cat(*(data[p] for p in parts))
        acc = {kind: {t: [] for t in TESTS} for kind in ("plain", "marked", "reseeded")}
        for seed in seeds:
            plain = _train(x, y, profile, seed, [])
            marked = _train(x, y, profile, seed, marks)
            reseeded = _train(x, y, profile, seed + 1000, [])  # the noise reference: another seed, no marks
            for t in TESTS:
                for kind, model in (("plain", plain), ("marked", marked), ("reseeded", reseeded)):
                    acc[kind][t].append(_accuracy(model, data[t]))
            models.setdefault(stage, (plain, marked))
        for t in TESTS:
            plain, marked, reseeded = (np.asarray(acc[k][t]) for k in ("plain", "marked", "reseeded"))
            rows.append((stage, t, plain.mean(), marked.mean(), 100 * (plain - marked).mean(),
                         100 * (plain - reseeded).mean(), 100 * plain.std()))
    print(f"\n1. Accuracy cost of the marks (mean over {len(seeds)} seeds, same seed with and without marks; "
          "points). Reference: the same difference between two unmarked runs whose seeds differ, and the "
          "seed-to-seed standard deviation")
    print(f"{'model':6} {'test set':18} {'unmarked':>9} {'marked':>9} {'cost (pts)':>11} {'reseed ref':>11} "
          f"{'seed std':>9}")
    for stage, t, a, b, d, ref, std in rows:
        print(f"{stage:6} {t:18} {a:9.4f} {b:9.4f} {d:11.2f} {ref:11.2f} {std:9.2f}")
    return models


def chain(data, m5_plain, m5_marked, seed: int) -> dict:
    x6, y6 = _cat(data["supplier/train"], data["origin/export_authorized"], data["destination/shared"])
    x7, y7 = _cat(data["destination/shared"], data["destination/private"])
    print("\n2. Survival through the chain (trigger accuracy, p-value, verified at 1e-6)")
    print(f"{'model':34} {'dest test':>9}  {'owner mark':34} {'destination mark':34} {'origin mark (control)'}")
    rows = [("M5 unmarked", m5_plain), ("M5 marked", m5_marked)]
    m6 = _train(x6, y6, "collaborative", seed, [wm.OWNER, DEST], base=m5_marked)  # the supplier re-embeds
    m7 = _train(x7, y7, "local", seed, [], base=m6)
    m6_other = _train(x6, y6, "collaborative", seed, [], base=m5_marked)
    m7_other = _train(x7, y7, "local", seed, [], base=m6_other)
    rows += [("M6 (supplier re-embeds)", m6), ("M7 <- M6 (destination, no marks)", m7),
             ("M6 without re-embedding", m6_other), ("M7 <- M6 without re-embedding", m7_other)]
    for name, model in rows:
        print(f"{name:34} {_accuracy(model, data['destination/test']):9.4f}  {_mark(model, wm.OWNER):34} "
              f"{_mark(model, DEST):34} {_mark(model, 'recipient:origin')}")
    m7_plain = _train(x7, y7, "local", seed, [], base=_train(x6, y6, "collaborative", seed, [], base=m5_plain))
    return {"M7 unmarked": m7_plain, "M7 marked": m7}


def pruning(data, m5_marked) -> None:
    import copy

    import torch
    from torch.nn.utils import prune

    print("\n3. Global magnitude pruning of M5 (conv and linear weights)")
    print(f"{'pruned':>7} {'supplier test':>13} {'dest test':>9}  {'owner mark':34} {'destination mark'}")
    for amount in (0.0, 0.3, 0.5, 0.7, 0.9):
        model = copy.deepcopy(m5_marked)
        params = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        if amount:
            prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
        print(f"{amount:7.0%} {_accuracy(model, data['supplier/test']):13.4f} "
              f"{_accuracy(model, data['destination/test']):9.4f}  {_mark(model, wm.OWNER):34} {_mark(model, DEST)}")


def extraction(data, victims: dict, queries: int, seed: int) -> None:
    import torch
    from art.attacks.extraction import KnockoffNets
    from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier

    from pipelines.learning.families import build_model

    pool = np.concatenate([data["origin/shared"][0], data["origin/private"][0], data["destination/shared"][0]])
    print(f"\n4. Extraction: KnockoffNets (random), {queries} label-only queries drawn from a pool of {len(pool)} "
          "images of other sensors (origin shared + private, destination shared), surrogate digits CNN; "
          "M5 is the export model, M7 what the destination serves")
    print(f"{'victim':12} {'victim dest':>11} {'surrogate dest':>14} {'surrogate sup':>13}  "
          f"{'surrogate owner mark':34} {'surrogate destination mark'}")
    for name, victim in victims.items():
        def labels_only(x, victim=victim):
            labels = logits_torch(victim, np.asarray(x, np.float32)).argmax(1)
            return np.eye(10, dtype=np.float32)[labels]

        torch.manual_seed(seed)
        np.random.seed(seed)
        surrogate = build_model(FAMILY, DIGITS)
        thief = PyTorchClassifier(model=surrogate, loss=torch.nn.CrossEntropyLoss(),
                                  optimizer=torch.optim.Adam(surrogate.parameters(), lr=0.003),
                                  input_shape=(64,), nb_classes=10, clip_values=(0.0, 1.0))
        black_box = BlackBoxClassifier(labels_only, input_shape=(64,), nb_classes=10, clip_values=(0.0, 1.0))
        attack = KnockoffNets(classifier=black_box, batch_size_fit=32, batch_size_query=64, nb_epochs=30,
                              nb_stolen=queries, sampling_strategy="random", verbose=False)
        attack.extract(pool, thieved_classifier=thief)
        surrogate.eval()
        print(f"{name:12} {_accuracy(victim, data['destination/test']):11.4f} "
              f"{_accuracy(surrogate, data['destination/test']):14.4f} {_accuracy(surrogate, data['supplier/test']):13.4f}"
              f"  {_mark(surrogate, wm.OWNER):34} {_mark(surrogate, DEST)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=1500)
    args = parser.parse_args()
    started = time.perf_counter()
    conf = wm.settings()
    seeds = [load_config().stages.seed + i for i in range(args.seeds)]
    print(f"watermark: {conf['trigger_set_size']} triggers per mark, repeated {conf['repeats']}x, "
          f"level {conf['level']:g}; key {KEY.key_id} (benchmark key)")
    data = _data()
    models = accuracy_cost(data, seeds)
    m5_plain, m5_marked = models["M5"]
    served = chain(data, m5_plain, m5_marked, seeds[0])
    pruning(data, m5_marked)
    extraction(data, {"M5 unmarked": m5_plain, "M5 marked": m5_marked, **served}, args.queries, seeds[0])
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
