"""Stage 5 — export model preparation at the supplier: one run is one **export variant** and one export request.

Engineers trigger it with a destination, a variant name, the selector of the
export-authorized subset to train on, optionally stricter release thresholds
(a run may raise a threshold, never lower it) and the end use (default: the one
the destination's export licence names in the policy data; the `model_release`
export gate denies an end use the licence does not cover) and the variant's capability
restrictions (`{"abstain_classes": [3, 7], "max_confidence": 0.9}`, both optional: classes the
served model abstains on, a cap on the confidence it returns; they become part of the signed
model, `model_release` checks them against what the destination's licence requires and
`factory serve` enforces them). The supplier trains **M5** on its
own data and the origin's export-authorized data, with the supplier's ownership watermark
and the destination's own mark (the export release verifies that mark), and registers the variant. It
then records the export request (this run's id, the model and its digest, the
destination, variant and thresholds) and sends M5 to the origin for review
through the `model_release` gate (purpose `review`: only to a data owner in the
model's lineage, signed model, no local-only source). The origin evaluates M5 on
its own test data and its compliance officer decides (`stage_5_export_review`);
the release to the destination follows at the supplier (`stage_5_export_release`)
and takes its parameters from the recorded request.
"""

from airflow.sdk import Param, dag
from factory_plugin.flows import (
    DEFAULT_ARGS,
    dataset_intake,
    export_threshold_schema,
    inbox_asset,
    site_enabled,
    tags,
    training_flow,
)
from factory_plugin.steps import step_task

from pipelines.policy import default_end_use

SITE = "supplier"

PARAMS = {
    "destination": Param("destination", type="string", enum=["destination"],
                         description="The export destination (a site with an export licence)."),
    "variant": Param("default", type="string", pattern="^[a-z0-9][a-z0-9-]{0,31}$",
                     description="Name of this export variant: lower-case letters, digits and dashes."),
    "subset": Param({}, type="object",
                    properties={"labels": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                           "minItems": 1, "uniqueItems": True}},
                    additionalProperties=False,
                    description="Which export-authorized records to train on, by class index "
                                "(e.g. {\"labels\": [0, 1, 2]}); empty: all of them."),
    "thresholds": Param({}, type="object", properties=export_threshold_schema(), additionalProperties=False,
                        description="Stricter release thresholds for this variant (never below policy)."),
    "restrictions": Param({}, type="object",
                          properties={"abstain_classes": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                                          "minItems": 1, "uniqueItems": True},
                                      "max_confidence": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
                          additionalProperties=False,
                          description="Capability restrictions of this variant: classes the served model abstains "
                                      "on (by class index) and the largest confidence it returns, e.g. "
                                      "{\"abstain_classes\": [3, 7], \"max_confidence\": 0.9}; empty: none. "
                                      "Class indices are checked against the data when training starts."),
    "end_use": Param(default_end_use("destination") or "", type="string", pattern="^([a-z0-9][a-z0-9_-]{0,63})?$",
                     description="What the destination will use the model for; the model_release export gate "
                                 "checks it against the destination's export licence (policy data "
                                 "export_licences). Empty: the licence's default."),
}


@dag(dag_id="stage_5_export_preparation", doc_md=__doc__, schedule=[inbox_asset(SITE, "origin-export")],
     catchup=False, tags=tags(5, SITE), default_args=DEFAULT_ARGS, params=PARAMS,
     render_template_as_native_obj=True)
def stage_5_export_preparation():
    validated = dataset_intake(site=SITE, kind="origin-export", name="origin-export")
    registered = training_flow(site=SITE, stage="M5", profile="export", variant="{{ params.variant }}",
                               subset="{{ params.subset }}", restrictions="{{ params.restrictions }}",
                               recipient="{{ params.destination }}", after=[validated])
    step_task("request_review", site=SITE, model=registered, recipient="origin", kind="m5-review",
              destination="{{ params.destination }}", variant="{{ params.variant }}",
              thresholds="{{ params.thresholds }}", end_use="{{ params.end_use }}",
              restrictions="{{ params.restrictions }}")


if site_enabled(SITE):
    stage_5_export_preparation()
