"""How a step runs: in-process in the Airflow worker (`local`, the default) or as a Kubernetes pod.

`FACTORY_RUNTIME` selects the runtime for Airflow step tasks. The Kubernetes runtime
(`pipelines.runtime.kubernetes.pod_operator_for_step`) builds a KubernetesPodOperator whose
container runs `factory step NAME --site SITE --params-json JSON` in the step image; the
offline bundle for air-gapped sites is `factory bundle` (`pipelines.runtime.bundle`).
Nothing here imports Airflow or Kubernetes at import time.
"""

from __future__ import annotations

import os

RUNTIMES = ("local", "kubernetes")


def current_runtime() -> str:
    """The runtime named by `FACTORY_RUNTIME` (default `local`); an unknown name is an error."""
    name = os.environ.get("FACTORY_RUNTIME", "local").strip() or "local"
    if name not in RUNTIMES:
        raise ValueError(f"FACTORY_RUNTIME={name!r} is not a runtime; choose one of {', '.join(RUNTIMES)}")
    return name
