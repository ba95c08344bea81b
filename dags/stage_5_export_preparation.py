"""Stage 5 — export model preparation at the supplier: one run is one **export variant**.

Engineers trigger it with a destination, a variant name, the selector of the
export-authorized subset to train on, and optionally stricter release thresholds
(a run may raise a threshold, never lower it). The supplier trains **M5** on its
own data and the origin's export-authorized data, registers the variant, and
asks for two approvals: the origin's compliance officer and the supplier's
export-control officer (neither the requester). The `model_release` export gate
then checks lineage, licence, the policy data's thresholds and the model signature
before M5 is sealed for the destination.
"""

from airflow.sdk import Param, dag
from factory_plugin.flows import (
    DEFAULT_ARGS,
    approval_step,
    dataset_intake,
    export_threshold_schema,
    inbox_asset,
    site_enabled,
    tags,
    training_flow,
)
from factory_plugin.steps import step_task

SITE = "supplier"

PARAMS = {
    "destination": Param("destination", type="string", enum=["destination"],
                         description="The export destination (a site with an export licence)."),
    "variant": Param("default", type="string", pattern="^[a-z0-9][a-z0-9-]{0,31}$",
                     description="Name of this export variant: lower-case letters, digits and dashes."),
    "subset": Param({"labels": list(range(10))}, type="object",
                    properties={"labels": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "minItems": 1, "uniqueItems": True}},
                    required=["labels"], additionalProperties=False,
                    description="Which export-authorized records to train on (by label)."),
    "thresholds": Param({}, type="object", properties=export_threshold_schema(), additionalProperties=False,
                        description="Stricter release thresholds for this variant (never below policy)."),
}


@dag(dag_id="stage_5_export_preparation", doc_md=__doc__, schedule=[inbox_asset(SITE, "origin-export")],
     catchup=False, tags=tags(5, SITE), default_args=DEFAULT_ARGS, params=PARAMS,
     render_template_as_native_obj=True)
def stage_5_export_preparation():
    validated = dataset_intake(site=SITE, kind="origin-export", name="origin-export")
    registered = training_flow(site=SITE, stage="M5", profile="export", datasets=["train", "origin-export"],
                               variant="{{ params.variant }}", subset="{{ params.subset }}",
                               subset_datasets=["origin-export"], test_sets={"supplier_test": "test"},
                               parity_set="test", after=[validated])
    body = ("Export variant `{{ params.variant }}` of **M5** for **{{ params.destination }}**.\n\n"
            "- Model: `{{ ti.xcom_pull(task_ids='training_flow.register_model') }}`\n"
            "- Subset: `{{ params.subset }}`; stricter thresholds: `{{ params.thresholds }}`\n\n"
            "The `model_release` export gate needs every lineage source export-authorized and releasable to the "
            "destination, a valid export licence, metrics at or above the export thresholds of the policy data, "
            "a verified model signature, and both approvals (origin compliance officer, supplier export-control "
            "officer), neither by the requester.")
    origin_ok = approval_step(group="origin", gate_name="model_release", owner_site="origin",
                              required_role="compliance_officer", subject="Approve export of M5 (origin)?", body=body,
                              after=[registered])
    export_ok = approval_step(group="export_control", gate_name="model_release", owner_site=SITE,
                              required_role="export_control_officer",
                              subject="Approve export of M5 (export control)?", body=body, after=[registered])
    step_task("release_model", site=SITE, model=registered, recipient="{{ params.destination }}", purpose="export",
              kind="m5", variant="{{ params.variant }}", approvals=[origin_ok, export_ok],
              thresholds="{{ params.thresholds }}")


if site_enabled(SITE):
    stage_5_export_preparation()
