"""Withdrawal of a contribution on the default digits data: what slicing costs, what it saves, and
whether the withdrawn records are forgotten.

1. accuracy effect of sliced training (pipelines.learning.slices, conf/stages.yaml unlearning):
   the M1 -> M3 -> M8 chain of the collaboration trained unsliced and sliced side by side, same
   seeds, profiles and data (the partitions `factory init` builds, as benchmarks/watermark.py),
   accuracy on each test set, mean over seeds;
2. time: in two fresh workspaces built alike, through the real steps (MLflow, DVC, signing, ONNX),
   the supplier trains M1, M3 (its train + the origin's shared data) and M8 (+ the origin's export
   data and the destination's contribution); one workspace then loses its slice checkpoints.
   `retrain_without` withdraws the origin's shared data from M3 (resumes before slice 1) and the
   destination's contribution from M8 (resumes before slice 3) in both, side by side: the time in
   training and end to end, and whether the resumed model equals the one trained from the start;
3. proof: the loss-threshold membership attack (pipelines.protection.membership.audit_logits) on
   the withdrawn records as members against the owner's records no model saw, before and after,
   with the model's own training data as a control; and the new versions' lineage.

Received data is registered as receive_dataset registers a package's content (owner, upstream
lineage) after the owner's real sanitization step; the package transport is not timed.
Run: `.venv/bin/python benchmarks/unlearning.py [--seeds 3] [--skip-accuracy | --skip-withdrawal] [--scale N]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.config import load_config
from pipelines.data.builder import build_frames
from pipelines.data.spec import DIGITS
from pipelines.learning.slices import plan_slices, train_sliced
from pipelines.learning.train import logits_torch, train

sys.path.insert(0, str(Path(__file__).resolve().parent))

FAMILY = "digits-cnn"


def _xy(frame) -> tuple[np.ndarray, np.ndarray]:
    return DIGITS.features(frame), DIGITS.labels(frame)


def _cat(parts) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _accuracy(model, data) -> float:
    return float((logits_torch(model, data[0]).argmax(1) == data[1]).mean())


def _split(data, seed: int):
    from sklearn.model_selection import train_test_split

    x_train, x_hold, y_train, y_hold = train_test_split(*data, test_size=1 / 3, random_state=seed, stratify=data[1])
    return (x_train, y_train), (x_hold, y_hold)


def accuracy_effect(seeds: list[int]) -> None:
    conf = load_config().stages
    frames = {site: build_frames(site)[0] for site in ("supplier", "origin", "destination")}
    data = {f"{site}/{name}": _xy(frame) for site, parts in frames.items() for name, frame in parts.items()}
    data["dc-train"], data["dc-holdout"] = _split(data["destination/contribution"], conf.seed)
    tests = {"supplier_test": "supplier/test", "origin_test": "origin/test", "destination_test": "destination/test",
             "dc_holdout": "dc-holdout"}
    chain = {"M3": ["supplier/train", "origin/shared"],
             "M8": ["supplier/train", "origin/shared", "origin/export_authorized", "dc-train"]}
    profile = conf.training["collaborative"]
    share = conf.unlearning.own_share
    acc = {(stage, kind): {t: [] for t in tests} for stage in chain for kind in ("unsliced", "sliced")}
    for seed in seeds:
        m1 = train(*data["supplier/train"], conf.training["initial"], seed=seed, family=FAMILY).model
        base = {"unsliced": m1.state_dict(), "sliced": m1.state_dict()}
        for stage, names in chain.items():
            plan = plan_slices(names, own=1, epochs=profile.epochs, own_share=share)
            plain = train(*_cat([data[n] for n in names]), profile, seed=seed, family=FAMILY,
                          base_state=base["unsliced"], mode="fine_tune").model
            sliced = train_sliced({n: data[n] for n in names}, plan, profile, seed=seed, material={}, family=FAMILY,
                                  base_state=base["sliced"]).model
            for kind, model in (("unsliced", plain), ("sliced", sliced)):
                base[kind] = model.state_dict()
                for key, test in tests.items():
                    acc[(stage, kind)][key].append(_accuracy(model, data[test]))
    print(f"\n1. accuracy effect of slicing (own_share {share}; collaborative profile, {profile.epochs} epochs; "
          f"mean over seeds {seeds})")
    print(f"{'model':6} {'plan':22} " + " ".join(f"{k:>16}" for k in tests))
    for stage, names in chain.items():
        plan = plan_slices(names, own=1, epochs=profile.epochs, own_share=share)
        for kind in ("unsliced", "sliced"):
            label = ("+".join(f"{s.epochs}" + (f"(x{s.times(s.datasets[-1])})" if s.times(s.datasets[-1]) > 1 else "")
                              for s in plan) if kind == "sliced" else f"{profile.epochs}")
            print(f"{stage:6} {kind + ' ' + label:22} "
                  + " ".join(f"{np.mean(acc[(stage, kind)][k]):16.4f}" for k in tests))
        print(f"{'':6} {'difference':22} " + " ".join(
            f"{np.mean(acc[(stage, 'sliced')][k]) - np.mean(acc[(stage, 'unsliced')][k]):+16.4f}" for k in tests))


# ------------------------------------------------------------------------------------------ 2 and 3


def _receive(home: Path, site: str, partition: str, name: str, purpose: str) -> tuple[str, str]:
    """The owner's sanitized `partition` registered at the supplier as a received package's content;
    returns (received id, the owner's raw dataset id)."""
    from pipelines.data.catalog import get, latest, register_dataset
    from pipelines.data.lineage import lineage_entries
    from pipelines.steps import StepContext, run_step
    from pipelines.workspace import SitePaths

    owner = SitePaths.of(site, home)
    sanitized = run_step("sanitize_dataset", StepContext(site=site, paths=owner, run_id="bench", dag_id="bench"),
                         dataset=partition, purpose=purpose)
    source = get(owner, sanitized["dataset_id"])
    supplier = SitePaths.of("supplier", home)
    target = supplier.data_dir / "received" / f"{name}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.path, target)
    version = register_dataset(supplier, name, target, parents=[source.id], kind="received",
                               flags={**source.flags, "releasable_to": ["supplier"]}, owner=site,
                               upstream=lineage_entries(owner, [source.id]))
    return version.id, latest(owner, partition).id


def _register_chain(ctx, stage: str, profile: str, datasets: list[str], base: str | None) -> str:
    from pipelines.steps import run_step

    inputs = load_config().stages.inputs.model(stage)
    trained = run_step("train_model", ctx, stage=stage, profile=profile, datasets=datasets, base_model=base)
    evaluated = run_step("evaluate_model", ctx, trained=trained, test_sets=dict(inputs.test_sets))
    exported = run_step("export_model", ctx, trained=evaluated, parity_set=inputs.parity_set)
    registered = run_step("register_model", ctx, trained=exported)
    return f"{registered['name']}/{registered['version']}"


class _TrainingClock:
    """Seconds spent in sliced training (pipelines.learning.slices.train_sliced, as train_model calls
    it), so the training itself is timed apart from the steps around it."""

    def __init__(self) -> None:
        from pipelines.learning import slices

        self.seconds, self._module, self._real = 0.0, slices, slices.train_sliced

    def __enter__(self):
        def timed(*args, **kwargs):
            started = time.monotonic()
            try:
                return self._real(*args, **kwargs)
            finally:
                self.seconds += time.monotonic() - started

        self._module.train_sliced = timed
        return self

    def __exit__(self, *exc) -> None:
        self._module.train_sliced = self._real


def _audit(model_dir: Path, members, non_members) -> dict:
    from pipelines.learning.artifacts import load_model
    from pipelines.protection.membership import audit_logits

    model = load_model(model_dir)
    return audit_logits((logits_torch(model, members[0]), members[1]),
                        (logits_torch(model, non_members[0]), non_members[1]))


def _build(home: Path) -> dict:
    """The supplier's M1, M3 and M8 on its data and what it received (fixed watermark key, so two
    workspaces built alike hold the same models)."""
    from pipelines.fileio import write_atomic
    from pipelines.protection.watermark import KEY_BYTES, key_path
    from pipelines.steps import StepContext, run_step
    from pipelines.workspace import SitePaths

    ctx = StepContext(site="supplier", paths=SitePaths.of("supplier", home), run_id="bench", dag_id="bench")
    key = key_path(ctx.paths)
    key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(key, bytes(range(KEY_BYTES)), mode=0o600)
    shared, shared_raw = _receive(home, "origin", "shared", "origin-shared", "collaboration")
    _receive(home, "origin", "export_authorized", "origin-export", "export")
    contribution, contribution_raw = _receive(home, "destination", "contribution", "destination-contribution",
                                              "collaboration")
    split = run_step("split_holdout", ctx, dataset=contribution)
    m1 = _register_chain(ctx, "M1", "initial", ["train"], None)
    m3 = _register_chain(ctx, "M3", "collaborative", ["train", "origin-shared"], m1)
    m8 = _register_chain(ctx, "M8", "collaborative", ["train", "origin-shared", "origin-export",
                                                      "destination-contribution-train"], m3)
    return {"ctx": ctx, "shared": shared, "shared_raw": shared_raw, "split": split,
            "contribution_raw": contribution_raw, "M3": m3, "M8": m8}


def unlearning(scale: int | None) -> None:
    from _timing import fresh_home

    from pipelines.data.catalog import load_dataset
    from pipelines.learning import registry
    from pipelines.learning.artifacts import model_digest
    from pipelines.learning.slices import checkpoint_dir
    from pipelines.steps.unlearning import reaches, retrain_without
    from pipelines.workspace import SitePaths

    sites = {kind: _build(fresh_home(f"unlearning-{kind}-", scale)) for kind in ("resumed", "full")}
    shutil.rmtree(checkpoint_dir(sites["full"]["ctx"].paths.state_dir))  # a trainer that kept no slices
    built = sites["resumed"]
    ctx = built["ctx"]
    home = ctx.paths.home
    print(f"\n2. time to withdraw a contribution (seconds; supplier, {'default data' if not scale else f'scale {scale}'};"
          " side by side: a workspace with the slice checkpoints, an identical one without)")
    print(f"{'model':6} {'withdrawn':40} {'train':>7} {'full':>7} {'ratio':>6} {'e2e':>7} {'full':>7} {'ratio':>6}"
          f"  resumed from  same weights")
    proofs = []
    for stage, dataset in (("M3", built["shared_raw"]), ("M8", built["contribution_raw"])):
        figures = {}
        for kind, site in sites.items():
            with _TrainingClock() as clock:
                result = retrain_without(site["ctx"], model=site[stage], dataset_id=dataset)
            new = registry.resolve_model(site["ctx"].paths, result["model"])
            figures[kind] = {"train": clock.seconds, "e2e": result["seconds"], "result": result,
                             "digest": model_digest(new.model_dir)}
        resumed, full = figures["resumed"], figures["full"]
        print(f"{stage:6} {dataset:40} {resumed['train']:7.2f} {full['train']:7.2f} {resumed['train'] / full['train']:6.2f} "
              f"{resumed['e2e']:7.2f} {full['e2e']:7.2f} {resumed['e2e'] / full['e2e']:6.2f}  "
              f"slice {resumed['result']['resumed_from_slice']!s:7} {str(resumed['digest'] == full['digest']):>5}")
        assert full["result"]["full_retrain"] and not resumed["result"]["full_retrain"]
        old, new = (registry.resolve_model(ctx.paths, ref) for ref in (built[stage], resumed["result"]["model"]))
        proofs.append((stage, dataset, old, new))
    print("   train: time in sliced training; e2e: retrain_without end to end (train, evaluate with robustness, "
          "export, register);\n   same weights: the resumed model is the one trained from the start without the dataset")

    origin, destination = SitePaths.of("origin", home), SitePaths.of("destination", home)
    members = {"M3": _xy(load_dataset(ctx.paths, built["shared"])[0]),
               "M8": _xy(load_dataset(ctx.paths, built["split"]["train"])[0])}
    never_seen = {"M3": _cat([_xy(load_dataset(origin, p)[0]) for p in ("test", "private")]),
                  "M8": _cat([_xy(load_dataset(ctx.paths, built["split"]["holdout"])[0]),
                              _xy(load_dataset(destination, "test")[0])])}
    own, own_unseen = _xy(load_dataset(ctx.paths, "train")[0]), _xy(load_dataset(ctx.paths, "test")[0])
    print("\n3. membership attack (loss threshold): the withdrawn records as members vs the owner's records no "
          "model saw")
    print(f"{'model':6} {'version':22} {'AUC':>7} {'TPR@1%':>7} {'adv':>7} {'control AUC':>12} {'lineage reaches':>16}")
    for stage, dataset, old, new in proofs:
        for label, ref in (("before", old), ("after", new)):
            figures = _audit(ref.model_dir, members[stage], never_seen[stage])
            control = _audit(ref.model_dir, own, own_unseen)  # its own training rows vs the supplier's test rows
            print(f"{stage:6} {label + ' ' + ref.uri:22} {figures['auc']:7.3f} {figures['tpr_at_1pct_fpr']:7.3f} "
                  f"{figures['advantage']:7.3f} {control['auc']:12.3f} {str(reaches(ref.metadata, dataset)):>16}")
    print("   members: the withdrawn records; control: the supplier's own training rows vs its test rows, "
          "which every version still trained on")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-withdrawal", action="store_true", help="only part 1")
    parser.add_argument("--scale", type=int, default=None, help="as `factory init --scale` (default data: none)")
    args = parser.parse_args()
    if not args.skip_accuracy:
        accuracy_effect([load_config().stages.seed + i for i in range(args.seeds)])
    if args.skip_withdrawal:
        return
    from _timing import warm_imports

    warm_imports()
    unlearning(args.scale)


if __name__ == "__main__":
    main()
