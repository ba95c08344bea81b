"""`python -m pipelines.service.preload scheduler`: `airflow scheduler`, with what steps import loaded first.

The LocalExecutor forks its workers from the scheduler and each task process is forked from a worker
(Airflow's default `fork` start method), so every module the scheduler imported before it started is
already loaded in every task. Without this a task spends 2-5 s importing PyTorch, MLflow and Great
Expectations before its step begins, which for most tasks is longer than the step. The pages are shared
copy-on-write between the scheduler, its workers and the tasks (benchmarks/collaboration_overhead.py
reports the deployments' PSS).

Only modules are imported here: no configuration is read and no state is built, so a task still reads
the site's conf, keys and stores when it runs. One SQL rule is set for the scheduler: on SQLite, `now()`
with milliseconds (pipelines.service.airflow_env.sqlite_now_in_milliseconds).
"""

from __future__ import annotations

import importlib
import sys

# The libraries steps import lazily (at module level only where a step module needs them), then the
# step modules themselves, then the DAG files' helpers.
# `torch._dynamo` is what the first optimizer pulls in (1-2 s), `torch.onnx` what the ONNX export does.
LIBRARIES = ("torch", "torch._dynamo", "torch.onnx", "mlflow", "great_expectations", "onnxruntime", "onnx",
             "sklearn", "scipy.ndimage", "model_signing", "dvc.repo", "cyclonedx.model.bom")


# What the DAG files import (the plugins folder is on PYTHONPATH in a site's Airflow processes): every task
# parses its DAG file first, ~20 ms less each with these loaded.
DAG_HELPERS = ("factory_plugin.flows", "factory_plugin.federated_flows", "factory_plugin.revocation_flows",
               "factory_plugin.approvals")


def preload() -> None:
    for name in LIBRARIES:
        importlib.import_module(name)
    from pipelines.steps import STEP_MODULES

    for name in (*STEP_MODULES, *DAG_HELPERS):
        importlib.import_module(name)


def main() -> None:
    preload()
    from airflow.__main__ import main as airflow_main

    from pipelines.service.airflow_env import sqlite_now_in_milliseconds

    sqlite_now_in_milliseconds()  # runs start when due, not at the next whole second (a no-op on Postgres)

    sys.exit(airflow_main())


if __name__ == "__main__":
    main()
