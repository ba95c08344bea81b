"""Stage 1 through Airflow (`dag.test()`, in-process) versus the same step functions called directly.

Both run in this process on fresh workspaces built the same way. Prints both wall times and the ratio.
    .venv/bin/python benchmarks/stage1_overhead.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import fresh_home, warm_imports  # noqa: E402


def direct(home: Path) -> float:
    from pipelines.steps import StepContext, run_step
    from pipelines.workspace import SitePaths

    ctx = StepContext(site="supplier", paths=SitePaths.of("supplier", home), run_id="bench", dag_id="direct")
    start = time.perf_counter()
    run_step("validate_dataset", ctx, dataset="train", suite="training")
    trained = run_step("train_model", ctx, stage="M1", profile="initial", datasets=["train"])
    trained = run_step("evaluate_model", ctx, trained=trained, test_sets={"supplier_test": "test"})
    trained = run_step("export_model", ctx, trained=trained, parity_set="test")
    registered = run_step("register_model", ctx, trained=trained)
    run_step("release_model", ctx, model=registered, recipient="origin", purpose="collaboration", kind="m1")
    return time.perf_counter() - start


def through_airflow(home: Path) -> float:
    from pipelines.orchestration import load_dags, prepare_airflow, run_dag

    prepare_airflow(home)
    dag = load_dags()["stage_1_initial_training"]
    start = time.perf_counter()
    run_dag(dag, approve=False, home=home)
    return time.perf_counter() - start


def main() -> None:
    airflow_home, direct_home = fresh_home("bench-af-"), fresh_home("bench-direct-")
    import os

    os.environ["FACTORY_HOME"] = str(airflow_home)
    warm_imports()
    t_airflow = through_airflow(airflow_home)
    t_direct = direct(direct_home)
    print(f"stage 1 direct step calls : {t_direct:8.2f} s")
    print(f"stage 1 through Airflow   : {t_airflow:8.2f} s")
    print(f"ratio Airflow / direct    : {t_airflow / t_direct:8.2f}x")


if __name__ == "__main__":
    main()
