"""PolicyGateOperator: a DAG task that evaluates a policy gate between steps.

It builds the gate input from the upstream steps' results (a callable given the task
context, or a dict that may hold XComArgs and Jinja templates), evaluates it with
`pipelines.policy.evaluate`, records the decision in the site's audit log, and fails
the task with the reasons when the gate denies, so the DAG run shows them in the task
log and the UI. Its XCom is the decision record. Importing this module does nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.sdk import BaseOperator

InputBuilder = Callable[[dict[str, Any]], dict[str, Any]] | dict[str, Any]


class PolicyGateOperator(BaseOperator):
    """Evaluate `gate` for the built input at `site`; deny -> task failure naming the reasons.

    A denial by the policy fails without retries (AirflowFailException): the same input
    gets the same answer. A gate that could not decide (OPA server unreachable, audit log
    not writable, ...) raises AirflowException, so the task's retries apply.
    """

    template_fields = ("input_builder", "site")
    ui_color = "#f3e3c3"

    def __init__(self, *, gate: str, input_builder: InputBuilder, site: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (callable(input_builder) or isinstance(input_builder, dict)):
            raise TypeError("input_builder must be a callable(context) -> dict or a (templated) dict")
        self.gate = gate
        self.input_builder = input_builder
        self.site = site

    def build_input(self, context: dict[str, Any]) -> Any:
        return self.input_builder(context) if callable(self.input_builder) else self.input_builder

    def execute(self, context: dict[str, Any]) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        from pipelines.policy import evaluate

        dag_run = context.get("dag_run")
        actor = getattr(dag_run, "triggering_user_name", None) if dag_run is not None else None
        decision = evaluate(self.gate, self.build_input(context), site=self.site, actor=actor)
        record = decision.record()
        outcome = "allowed" if decision.allow else "denied"
        self.log.info("policy gate %s %s (input %s, bundle %s, engine %s)", self.gate, outcome,
                      decision.input_digest, decision.bundle_digest, decision.engine)
        for reason in decision.reasons:
            self.log.warning("  reason: %s", reason)
        if not decision.allow:
            message = f"policy gate {self.gate} denied: " + "; ".join(decision.reasons)
            raise (AirflowException if decision.failed else AirflowFailException)(message)
        return record
