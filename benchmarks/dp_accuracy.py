"""Differential privacy on the default digits data: accuracy against epsilon for M3 and M5.

Side by side, with the same seeds and data (pipelines.data.builder, the partitions `factory init`
builds; the origin's shared data without the defects its sanitization removes), each model trained
as its stage trains it, without DP (the reference) and with DP-SGD (pipelines.learning.privacy,
Opacus, RDP accountant, delta 1e-5, clipping norm 1.0) at several target epsilons:

- M3: M1 (supplier train, profile `initial`, no DP: the supplier's own data) fine-tuned on supplier
  train + origin shared (profile `collaborative`); DP covers every row of that fine-tune. M1 is
  printed too: what the supplier has without the origin's data.
- M5: a new model on supplier train + origin export-authorized (profile `export`).

Each DP point uses the stage's profile with `privacy: {target_epsilon: e}` added (the knob of
conf/stages.yaml) and, with `--tuned`, also a DP-friendly variant (batch 128, lr 0.02, 40 epochs:
larger batches average more samples against the same noise). A third block trains M5 as M3 is
trained: a DP fine-tune of M1 (the supplier's own data trained without DP, so only the fine-tune
touches the origin's rows), against the same fine-tune without DP. No watermarks
(benchmarks/watermark.py measures their cost).
Accuracy on each site's test set that the design lets hold the model, mean over seeds.

Run: `.venv/bin/python benchmarks/dp_accuracy.py [--seeds 3] [--epsilons 1 3 8] [--tuned]`.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from pipelines.config import TrainingProfile, load_config
from pipelines.data.builder import build_frames
from pipelines.data.spec import DIGITS
from pipelines.learning.train import logits_torch, train

FAMILY = "digits-cnn"


def _xy(frame) -> tuple[np.ndarray, np.ndarray]:
    return DIGITS.features(frame), DIGITS.labels(frame)


def _data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    supplier, _ = build_frames("supplier")
    origin, defects = build_frames("origin")
    destination, _ = build_frames("destination")
    injected = {i for key in ("outliers", "contradictory_duplicates", "exact_duplicates") for i in defects[key]}
    shared = origin["shared"][~origin["shared"]["record_id"].isin(injected)]  # as the origin's sanitization sends it
    return {"supplier/train": _xy(supplier["train"]), "supplier/test": _xy(supplier["test"]),
            "origin/shared": _xy(shared), "origin/export_authorized": _xy(origin["export_authorized"]),
            "origin/test": _xy(origin["test"]), "destination/test": _xy(destination["test"])}


def _cat(*parts):
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _accuracy(model, data) -> float:
    return float((logits_torch(model, data[0]).argmax(1) == data[1]).mean())


def _private(profile: TrainingProfile, epsilon: float | None, tuned: bool) -> TrainingProfile:
    values = profile.model_dump()
    if tuned:
        values.update(batch_size=128, lr=0.02, epochs=40)
    if epsilon is not None:
        values["privacy"] = {"target_epsilon": epsilon, "max_grad_norm": 1.0, "delta": 1e-5}
    return TrainingProfile(**values)


STAGES = {
    # model: (base profile or None, profile, datasets, test sets)
    "M3": ("initial", "collaborative", ("supplier/train", "origin/shared"), ("supplier/test", "origin/test")),
    "M5": (None, "export", ("supplier/train", "origin/export_authorized"), ("supplier/test", "destination/test")),
    "M5 as a fine-tune of M1": ("initial", "export", ("supplier/train", "origin/export_authorized"),
                                ("supplier/test", "destination/test")),
}


def run(data, seeds: list[int], epsilons: list[float], tuned: bool) -> None:
    profiles = load_config().stages.training
    variants: list[tuple[str, float | None, bool]] = [("no DP (reference)", None, False)]
    variants += [(f"DP eps {e:g}", e, False) for e in epsilons]
    if tuned:
        variants += [(f"DP eps {e:g}, batch 128 lr .02 40 ep", e, True) for e in epsilons]
    for stage, (base_profile, profile, parts, tests) in STAGES.items():
        x, y = _cat(*(data[p] for p in parts))
        rows = []
        bases = {}
        if base_profile:
            bx, by = data["supplier/train"]
            for seed in seeds:
                bases[seed] = train(bx, by, profiles[base_profile], seed=seed, family=FAMILY).model
            rows.append(("M1 (base: supplier data only)", None,
                         {t: np.mean([_accuracy(bases[s], data[t]) for s in seeds]) for t in tests}, 0.0, None))
        for name, epsilon, tune in variants:
            acc = {t: [] for t in tests}
            spent, noise, seconds = [], [], 0.0
            for seed in seeds:
                started = time.perf_counter()
                result = train(x, y, _private(profiles[profile], epsilon, tune), seed=seed, family=FAMILY,
                               base_state=bases[seed].state_dict() if base_profile else None,
                               mode="fine_tune" if base_profile else "centralized")
                seconds += time.perf_counter() - started
                for t in tests:
                    acc[t].append(_accuracy(result.model, data[t]))
                if result.privacy:
                    spent.append(result.privacy["epsilon"])
                    noise.append(result.privacy["noise_multiplier"])
            rows.append((name, np.mean(spent) if spent else None, {t: np.mean(v) for t, v in acc.items()},
                         seconds / len(seeds), np.mean(noise) if noise else None))
        print(f"\n{stage}: {profile} profile on {' + '.join(parts)} ({len(x)} rows), {FAMILY}, "
              f"mean over {len(seeds)} seed(s); delta 1e-5, clipping 1.0, RDP accountant")
        reference = rows[1 if base_profile else 0][2]
        header = "".join(f" {t:>17} {'vs ref':>7}" for t in tests)
        print(f"{'variant':34} {'eps spent':>9} {'noise':>6}{header} {'s/run':>6}")
        for name, eps, acc, seconds, noise in rows:
            cells = "".join(f" {acc[t]:17.4f} {acc[t] - reference[t]:+7.4f}" for t in tests)
            print(f"{name:34} {(f'{eps:.2f}' if eps is not None else '-'):>9} "
                  f"{(f'{noise:.2f}' if noise is not None else '-'):>6}{cells} {seconds:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--tuned", action="store_true", help="also DP with batch 128, lr 0.02, 40 epochs")
    args = parser.parse_args()
    if len(args.epsilons) < 1:
        parser.error("give at least one epsilon")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    started = time.perf_counter()
    seeds = [load_config().stages.seed + i for i in range(args.seeds)]
    run(_data(), seeds, sorted(args.epsilons), args.tuned)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
