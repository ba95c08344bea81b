"""Stage 1 — initial training at the supplier.

Validates the supplier's DVC-tracked training data, trains the base CNN **M1**,
evaluates it on the supplier test data, where it must meet the export release thresholds
of the policy data, exports it to ONNX (parity checked with ONNX Runtime), registers it
in the supplier's MLflow, and releases it to the origin as the initial system: through
the `model_release` gate, signed, sealed.
"""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, model_inputs, site_enabled, tags, training_flow
from factory_plugin.steps import step_task

from pipelines.policy import release_thresholds

SITE = "supplier"


@dag(dag_id="stage_1_initial_training", doc_md=__doc__, schedule=None, catchup=False,
     tags=tags(1, SITE), default_args=DEFAULT_ARGS)
def stage_1_initial_training():
    validated = [step_task("validate_dataset", task_id=f"validate_{name}", site=SITE, dataset=name, suite="training")
                 for name in model_inputs("M1").datasets]
    registered = training_flow(site=SITE, stage="M1", profile="initial", min_accuracy=release_thresholds("export"),
                               after=validated)
    step_task("release_model", site=SITE, model=registered, recipient="origin", purpose="collaboration",
              kind="m1")


if site_enabled(SITE):
    stage_1_initial_training()
