"""How a step runs: in-process in the Airflow worker (`local`, the default) or as a Kubernetes pod.

`FACTORY_RUNTIME` selects the runtime for Airflow step tasks (`factory_plugin.steps.step_task`).
The Kubernetes runtime (`pipelines.runtime.kubernetes.pod_operator_for_step`) builds a
KubernetesPodOperator whose container runs `factory step NAME --site SITE --params-json JSON`
in the step image; the offline bundle for air-gapped sites is `factory bundle`
(`pipelines.runtime.bundle`). Nothing here imports Airflow or Kubernetes at import time.
"""
