"""Poisoning screen: detection rate, false positives and cost beside the stage's training.

The factory's real data (`factory init`'s build): stage 3 screens the origin's shared data (without
the defects the builder injects, which the origin's sanitization removes before release) with M1,
stage 8 the destination's contribution (its train part, as split_holdout makes it) with M3. Each
trial plants a bright trigger patch (2x2 or 3x3, in a corner) in 3-5 % of the rows, relabelled to a
target class. Printed per stage, side by side:

- `pipelines.protection.poisoning.screen` (the factory's screen),
- ART 1.20's ActivationDefence (k-means on the current model's last layer, `smaller` analysis: ART's
  layer list for these models ends at the output, so it clusters the logits) and SpectralSignatureDefense
  (expected 5 % poison, eps multiplier 1.5), each with the current model as an ART PyTorchClassifier;

recall of the planted rows, false-positive rate on the clean rows of the poisoned contributions and
on the clean contribution, and contributions flagged. Cost: the screen of the clean contribution
against the training the stage runs on the same data (conf/stages.yaml profile, fine-tuning the base
model on the stage's datasets), as a ratio.

Run: `.venv/bin/python benchmarks/poisoning_screen.py [--trials 8] [--family resnet-small --no-art]`.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

TRIGGERS = [(3, "bottom-right", 0.04), (2, "top-left", 0.03), (3, "top-left", 0.05), (3, "bottom-right", 0.03),
            (2, "bottom-right", 0.03), (3, "top-right", 0.04), (2, "bottom-left", 0.05), (3, "bottom-left", 0.04)]


def _data():
    from sklearn.model_selection import train_test_split

    from pipelines.config import load_config
    from pipelines.data.builder import build_frames
    from pipelines.data.spec import DIGITS

    supplier, _ = build_frames("supplier")
    origin, defects = build_frames("origin")
    injected = {i for key in ("outliers", "contradictory_duplicates", "exact_duplicates") for i in defects[key]}
    shared = origin["shared"][~origin["shared"]["record_id"].isin(injected)]  # as the origin's sanitization sends it
    destination, _ = build_frames("destination")
    contribution = destination["contribution"]
    contribution_train, _ = train_test_split(contribution, test_size=1 / 3, random_state=load_config().stages.seed,
                                             stratify=contribution["label"])

    def xy(frame):
        return DIGITS.features(frame), DIGITS.labels(frame)

    return {"train": xy(supplier["train"]), "origin-shared": xy(shared),
            "origin-export": xy(origin["export_authorized"]), "destination-contribution-train": xy(contribution_train)}


def _train(data, names, profile_name, base=None, family=None):
    from pipelines.config import load_config
    from pipelines.data.spec import DIGITS
    from pipelines.learning import families
    from pipelines.learning.train import train

    conf = load_config().stages
    x = np.vstack([data[n][0] for n in names])
    y = np.concatenate([data[n][1] for n in names])
    started = time.perf_counter()
    model = train(x, y, conf.training[profile_name], seed=conf.seed, spec=DIGITS,
                  architecture=families.architecture_record(family or conf.model_family),
                  base_state=base.state_dict() if base is not None else None,
                  mode="fine_tune" if base is not None else "centralized").model
    return model, time.perf_counter() - started


def _art(model, x, y, which):
    import torch
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(x.shape[1],),
                                   nb_classes=10, clip_values=(0.0, 1.0))
    onehot = np.eye(10)[y]
    try:
        return _art_detect(classifier, x, onehot, which)
    except ValueError as exc:  # e.g. k-means on a class with a single row (the small stage 8 data)
        print(f"  ART {which} failed: {exc}")
        return None


def _art_detect(classifier, x, onehot, which):
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense

    if which == "activation":
        np.random.seed(0)
        _, clean = ActivationDefence(classifier, x, onehot).detect_poison(nb_clusters=2, reduce="PCA", nb_dims=10,
                                                                          cluster_analysis="smaller")
    else:
        _, clean = SpectralSignatureDefense(classifier, x, onehot, batch_size=128, eps_multiplier=1.5,
                                            expected_pp_poison=0.05).detect_poison()
    return set(np.flatnonzero(np.asarray(clean) == 0).tolist())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=len(TRIGGERS))
    parser.add_argument("--family", default=None,
                        help="conf/models.yaml family of M1 and M3 (default: conf/stages.yaml model_family)")
    parser.add_argument("--no-art", action="store_true", help="the factory screen only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from pipelines.data.spec import DIGITS
    from pipelines.protection import settings
    from pipelines.protection.poisoning import ScreenSettings, plant_trigger, screen

    torch.set_num_threads(1)
    conf = ScreenSettings.of(settings("screening"))
    data = _data()
    m1, _ = _train(data, ["train"], "initial", family=args.family)
    m3, _ = _train(data, ["train", "origin-shared"], "collaborative", m1, family=args.family)
    print(f"family {args.family or 'of conf/stages.yaml'}: {type(m1).__name__}")
    stages = [("stage 3 (M3)", "origin-shared", m1, ["train", "origin-shared"]),
              ("stage 8 (M8)", "destination-contribution-train", m3,
               ["train", "origin-shared", "origin-export", "destination-contribution-train"])]
    methods = ("factory screen",) if args.no_art else ("factory screen", "ART ActivationDefence",
                                                        "ART SpectralSignature")
    print(f"{'stage':14} {'method':22} {'recall':>7} {'FP poisoned':>12} {'FP clean':>9} {'flagged':>8} "
          f"{'clean flagged':>13}")
    for stage, name, current, training_sets in stages:
        x, y = data[name]
        counts = {m: {"hit": 0, "planted": 0, "fp": 0, "clean_rows": 0, "flagged": 0, "errors": 0} for m in methods}
        for trial, (size, corner, fraction) in enumerate(TRIGGERS[:args.trials]):
            target = trial % 10
            px, py, planted = plant_trigger(x, y, input_shape=DIGITS.input_shape, target=target, fraction=fraction,
                                            size=size, corner=corner, seed=trial)
            found = {"factory screen": set(screen(current, px, py, n_classes=10, settings=conf).suspicious_rows)}
            if not args.no_art:
                found |= {"ART ActivationDefence": _art(current, px, py, "activation"),
                          "ART SpectralSignature": _art(current, px, py, "spectral")}
            for method, named in found.items():
                c = counts[method]
                if named is None:
                    c["errors"] += 1
                    continue
                c["hit"] += len(named & set(planted.tolist()))
                c["planted"] += len(planted)
                c["fp"] += len(named - set(planted.tolist()))
                c["clean_rows"] += len(x) - len(planted)
                c["flagged"] += bool(named)
        started = time.perf_counter()
        clean_result = screen(current, x, y, n_classes=10, settings=conf)
        screen_seconds = time.perf_counter() - started
        clean = {"factory screen": set(clean_result.suspicious_rows)}
        if not args.no_art:
            clean |= {"ART ActivationDefence": _art(current, x, y, "activation"),
                      "ART SpectralSignature": _art(current, x, y, "spectral")}
        for method in methods:
            c, named = counts[method], clean[method]
            if not c["planted"]:
                print(f"{stage:14} {method:22} failed on every trial")
                continue
            print(f"{stage:14} {method:22} {c['hit'] / c['planted']:7.1%} {c['fp'] / c['clean_rows']:12.2%} "
                  f"{'failed' if named is None else f'{len(named) / len(x):.2%}':>9} "
                  f"{c['flagged']:>4}/{args.trials - c['errors']:<3} "
                  f"{'failed' if named is None else 'yes' if named else 'no':>13}")
        _, training_seconds = _train(data, training_sets, "collaborative", current, family=args.family)
        print(f"{stage:14} cost: screen of {len(x)} rows {screen_seconds:.2f} s, the stage's training on "
              f"{sum(len(data[n][1]) for n in training_sets)} rows {training_seconds:.2f} s, "
              f"ratio {screen_seconds / training_seconds:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
