"""Membership-inference audits on the default digits data: what the origin measures of M3 and M5.

The steps run as the stages run them (pipelines.steps, no Airflow), in a fresh workspace with the
test workspace's fixed watermark key: M1 (supplier), the origin's stage 2 release, M3 (fine-tuned
from M1 on the supplier's data and the origin's shared data) received at the origin (`receive_model`
audits it), the origin's stage 5 release, M5 (supplier data + the origin's export-authorized data)
sent to the origin for review (`receive_review` audits it). Each audit: loss-threshold attack,
members = the rows the origin released that the model trained on, non-members = the origin's test
set, equal counts (pipelines.protection.membership). Beside each, the baseline: M1, which never saw
any origin record, audited on the same members and non-members (what "no leak" measures), and the
spread of the figures over other seeds of the member/non-member draw.

Run: `.venv/bin/python benchmarks/membership_audit.py [--draws 5] [--no-m3]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ANSWERED_AT = "2026-12-04T10:00:00+00:00"


def _ctx(home: Path, site: str, run_id: str, dag_id: str):
    from pipelines.steps import StepContext
    from pipelines.workspace import SitePaths

    return StepContext(site=site, paths=SitePaths.of(site, home), run_id=run_id, dag_id=dag_id)


def _answer(ctx, *, user: str, role: str, gate: str) -> dict:
    from pipelines.approvals import sign_answer

    return sign_answer(ctx.paths, {
        "gate": gate, "owner_site": ctx.site, "required_role": role, "dag_id": ctx.dag_id, "run_id": ctx.run_id,
        "task_id": "approval", "chosen_options": ["Approve"], "comment": "benchmark", "responded_by": user,
        "responded_at": ANSWERED_AT})


def _carry(home: Path, sender: str, recipient: str) -> None:
    from pipelines.carrier.media import hand_over
    from pipelines.workspace import SitePaths

    hand_over(SitePaths.of(sender, home), SitePaths.of(recipient, home))


def _release_data(home: Path, *, partition: str, purpose: str, kind: str, name: str) -> None:
    from pipelines.steps import run_step

    origin = _ctx(home, "origin", f"release-{kind}", "data_release")
    sanitized = run_step("sanitize_dataset", origin, dataset=partition, purpose=purpose)
    validated = run_step("validate_dataset", origin, dataset=sanitized, suite="release")
    run_step("release_dataset", origin, dataset=sanitized, recipient="supplier", purpose=purpose, kind=kind,
             approvals=[_answer(origin, user="origin_officer", role="compliance_officer", gate="data_release")],
             validation=validated)
    _carry(home, "origin", "supplier")
    supplier = _ctx(home, "supplier", f"intake-{kind}", "intake")
    received = run_step("receive_dataset", supplier, kind=kind, name=name)
    run_step("validate_dataset", supplier, dataset=received, suite="training")


def _train(home: Path, stage: str, profile: str, datasets: list[str], **options) -> dict:
    from pipelines.steps import run_step

    supplier = _ctx(home, "supplier", f"train-{stage}", f"train-{stage}")
    trained = run_step("train_model", supplier, stage=stage, profile=profile, datasets=datasets, **options)
    evaluated = run_step("evaluate_model", supplier, trained=trained, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", supplier, trained=evaluated, parity_set="test")
    return run_step("register_model", supplier, trained=exported)


def _spread(home: Path, model_dir: Path, audit: dict, draws: int) -> str:
    from pipelines.protection.membership import audit_model
    from pipelines.workspace import SitePaths

    origin = SitePaths.of("origin", home)
    aucs = [audit_model(origin, model_dir, audit["member_datasets"], audit["non_member_datasets"],
                        labels=audit.get("labels"), seed=seed)["auc"] for seed in range(1, draws + 1)]
    return f"{np.mean(aucs):.3f} +- {np.std(aucs):.3f}"


def _row(name: str, audit: dict, spread: str) -> None:
    print(f"{name:34} {audit['auc']:7.3f} {audit['tpr_at_1pct_fpr']:9.3f} {audit['advantage']:9.3f} "
          f"{audit['members']:>5}/{audit['non_members']:<5} {spread}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=5, help="other seeds of the member/non-member draw")
    parser.add_argument("--no-m3", action="store_true", help="skip M3 (stage 2 and 3)")
    args = parser.parse_args()

    from pipelines.fileio import write_atomic
    from pipelines.init import init_workspace
    from pipelines.learning import registry
    from pipelines.protection.membership import audit_model
    from pipelines.protection.watermark import KEY_BYTES, key_path
    from pipelines.steps import run_step
    from pipelines.workspace import SitePaths

    home = Path(tempfile.mkdtemp(prefix="membership-bench-"))
    init_workspace(home)
    key = key_path(SitePaths.of("supplier", home))
    key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(key, bytes(range(KEY_BYTES)), mode=0o600)
    started = time.perf_counter()
    m1 = _train(home, "M1", "initial", ["train"])
    m1_dir = registry.resolve_model(SitePaths.of("supplier", home), f"{m1['name']}/{m1['version']}").model_dir
    origin = SitePaths.of("origin", home)
    rows = []
    if not args.no_m3:
        _release_data(home, partition="shared", purpose="collaboration", kind="origin-shared", name="origin-shared")
        m3 = _train(home, "M3", "collaborative", ["train", "origin-shared"], base_model="M1")
        supplier = _ctx(home, "supplier", "release-m3", "stage_3_collaborative_optimization")
        run_step("release_model", supplier, model=m3, recipient="origin", purpose="collaboration", kind="m3")
        _carry(home, "supplier", "origin")
        intake = run_step("receive_model", _ctx(home, "origin", "intake-m3", "stage_3_model_intake"), kind="m3",
                          test_sets={"origin_test": "test"})
        audit = intake["membership"]
        here = registry.resolve_model(origin, f"{intake['name']}/{intake['version']}").model_dir
        rows.append(("M3 (origin intake)", audit, _spread(home, here, audit, args.draws)))
        rows.append(("  M1 baseline, same records", audit_model(origin, m1_dir, audit["member_datasets"],
                                                                 audit["non_member_datasets"]), ""))
    _release_data(home, partition="export_authorized", purpose="export", kind="origin-export", name="origin-export")
    m5 = _train(home, "M5", "export", ["train", "origin-export"], variant="default", recipient="destination")
    supplier = _ctx(home, "supplier", "prepare-m5", "stage_5_export_preparation")
    run_step("request_review", supplier, model=m5, recipient="origin", kind="m5-review", destination="destination",
             variant="default")
    _carry(home, "supplier", "origin")
    review = run_step("receive_review", _ctx(home, "origin", "review-m5", "stage_5_export_review"), kind="m5-review",
                      test_sets={"origin_test": "test"})
    audit = review["membership"]
    here = registry.resolve_model(origin, review["here"]).model_dir
    rows.append(("M5 (origin review)", audit, _spread(home, here, audit, args.draws)))
    rows.append(("  M1 baseline, same records", audit_model(origin, m1_dir, audit["member_datasets"],
                                                             audit["non_member_datasets"]), ""))
    print(f"\nMembership-inference audits at the origin (loss-threshold attack; {time.perf_counter() - started:.0f} s "
          "of steps)")
    print(f"{'model':34} {'AUC':>7} {'TPR@1%':>9} {'advantage':>9} {'mem/non':11} AUC over {args.draws} other draws")
    for name, audit, spread in rows:
        _row(name, audit, spread)


if __name__ == "__main__":
    main()
