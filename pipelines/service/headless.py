"""Answering approval gates for the headless runner (`factory run --approve`).

Gates are answered through Airflow's REST API, served in-process by the API app,
as the officer the gate is assigned to (from conf/users.yaml through the
`approval` policy): the same path a person in the UI takes, never a skip or a
force-mark.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pipelines.service.airflow_env import passwords_file

ADMIN = "admin"


@functools.lru_cache(maxsize=1)
def _api_client():
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    return TestClient(create_app(), base_url="http://localhost")


def _passwords(home: Path) -> dict[str, str]:
    return json.loads(passwords_file(home).read_text())


def waiting_gates(dag_id: str, home: Path) -> list[dict]:
    from pipelines.service.approvals import pending_gates

    return [g for g in pending_gates(_api_client(), ADMIN, _passwords(home)[ADMIN]) if g["dag_id"] == dag_id]


def answer_pending_as_configured(dag_id: str, home: Path, console=None) -> list[dict]:
    """Approve every gate of `dag_id` waiting for an answer, each as its first assigned officer."""
    from pipelines.service.approvals import answer_gate

    answered = []
    passwords = _passwords(home)
    for gate in waiting_gates(dag_id, home):
        if not gate["assigned_users"]:
            raise RuntimeError(f"gate {gate['task_id']} has no assigned approver; refusing to answer it")
        officer = gate["assigned_users"][0]
        answer_gate(_api_client(), officer, passwords[officer], gate["dag_id"], gate["run_id"], gate["task_id"],
                    approve=True, comment="approved by factory run --approve")
        if console:
            console.print(f"  approved [bold]{gate['task_id']}[/] as {officer}")
        answered.append({**gate, "answered_by": officer})
    return answered


def print_pending_hint(dag_id: str, home: Path, console, *, wait: float = 5.0) -> None:
    """Tell the user how to answer gates this run waits at (runs beside `dag.test()`)."""
    import time

    told: set[str] = set()
    while True:
        time.sleep(wait)
        try:
            gates = waiting_gates(dag_id, home)
        except Exception:
            return
        for gate in gates:
            if gate["task_id"] in told:
                continue
            told.add(gate["task_id"])
            officer = (gate["assigned_users"] or ["OFFICER"])[0]
            console.print(
                f"waiting for approval: {gate['subject']}\n  answer with: factory approve --as {officer} "
                f"--dag {gate['dag_id']} --run {gate['run_id']} --task {gate['task_id']}  (or in the Airflow UI "
                "under Browse → Required Actions, after `make run`)"
            )
