"""The full eight-stage collaboration headless through Airflow (approvals answered through the
REST API) versus the same training and evaluation steps called directly in one process.

Prints both wall times, the ratio, and the share of the Airflow run per kind of work.
    .venv/bin/python benchmarks/collaboration_overhead.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import fresh_home, shares, step_timer, warm_imports  # noqa: E402

# (site, stage, profile, datasets, test sets): the seven trained models, each on the data its site
# holds before any exchange (so slightly fewer records than the collaborative runs see).
PLAN = (
    ("supplier", "M1", "initial", ["train"], {"supplier_test": "test"}),
    ("supplier", "M3", "collaborative", ["train"], {"supplier_test": "test"}),
    ("supplier", "M5", "export", ["train"], {"supplier_test": "test"}),
    ("supplier", "M6", "collaborative", ["train"], {"supplier_test": "test"}),
    ("supplier", "M8", "collaborative", ["train"], {"supplier_test": "test"}),
    ("origin", "M4", "local", ["shared", "private", "export_authorized"], {"origin_test": "test"}),
    ("destination", "M7", "local", ["shared", "private"], {"destination_test": "test"}),
)


def direct(home: Path) -> float:
    """Only training + evaluation: the work the collaboration exists for, with no exchange around it."""
    from pipelines.steps import StepContext, run_step
    from pipelines.workspace import SitePaths

    start = time.perf_counter()
    for site, stage, profile, datasets, test_sets in PLAN:
        ctx = StepContext(site=site, paths=SitePaths.of(site, home), run_id="bench", dag_id="direct")
        trained = run_step("train_model", ctx, stage=stage, profile=profile, datasets=datasets)
        run_step("evaluate_model", ctx, trained=trained, test_sets=test_sets)
    return time.perf_counter() - start


def main() -> None:
    from pipelines.orchestration import run_stages

    airflow_home, direct_home = fresh_home("bench-collab-af-"), fresh_home("bench-collab-direct-")
    os.environ["FACTORY_HOME"] = str(airflow_home)
    warm_imports()
    with step_timer() as totals:
        start = time.perf_counter()
        run_stages(list(range(1, 9)), approve=True, home=airflow_home)
        t_airflow = time.perf_counter() - start
    t_direct = direct(direct_home)
    print(f"training + evaluation called directly : {t_direct:8.2f} s")
    print(f"eight stages through Airflow          : {t_airflow:8.2f} s")
    print(f"ratio                                 : {t_airflow / t_direct:8.2f}x")
    print("share of the Airflow run:")
    for kind, seconds in sorted(shares(totals, t_airflow).items(), key=lambda kv: -kv[1]):
        print(f"  {kind:32s} {seconds:8.2f} s  {100 * seconds / t_airflow:5.1f} %")


if __name__ == "__main__":
    main()
