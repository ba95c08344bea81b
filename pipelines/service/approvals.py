"""Answering approval gates through Airflow's REST API: `factory approve` and `factory approvals`.

The same calls serve a running api-server (a URL) and the headless runner's in-process API
app (a FastAPI `TestClient` is an `httpx.Client`): pass either as `client_or_url`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx

from pipelines.approvals import APPROVE, REJECT
from pipelines.config import load_config
from pipelines.service.airflow_env import passwords_file
from pipelines.service.processes import read_state
from pipelines.workspace import factory_home


class ApprovalError(RuntimeError):
    """An answer or listing that Airflow refused; the message says why in one line."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def user_site(user: str) -> str | None:
    """The site whose Airflow knows `user` (conf/users.yaml), None for a name not configured there."""
    try:
        return load_config().user(user).site
    except KeyError:
        return None


def default_url(user: str | None = None, home: Path | None = None) -> str:
    """The Airflow API of `user`'s site: its running deployment (the site's service record), else
    FACTORY_AIRFLOW_URL, else the site's port in conf/sites.yaml."""
    site = user_site(user) if user else None
    state = read_state(home, site) if site else None
    if state and state.get("url"):
        return state["url"]
    if os.environ.get("FACTORY_AIRFLOW_URL"):
        return os.environ["FACTORY_AIRFLOW_URL"]
    port = load_config().sites[site].deployment.airflow_port if site else 8080
    return f"http://localhost:{port}"


def read_password(user: str, password_file: Path | None = None, home: Path | None = None) -> str:
    """A user's password from `--password-file` (a JSON map or one bare password), else the file
    generated in the home of the user's site (the embedded mode's file when that site has none)."""
    if password_file:
        path = Path(password_file)
    else:
        home = home or factory_home()
        site = user_site(user)
        path = passwords_file(home, site) if site else passwords_file(home)
        if site and not path.exists() and passwords_file(home).exists():
            path = passwords_file(home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ApprovalError(f"no password file at {path}; start the site with `factory up` first") from None
    except PermissionError:
        raise ApprovalError(f"cannot read {path}: it belongs to the site's own account") from None
    try:
        table = json.loads(text)
    except ValueError:
        table = None
    if isinstance(table, dict):
        if user not in table:
            raise ApprovalError(f"user {user!r} has no password in {path}")
        return str(table[user])
    if password_file and text.strip():
        return text.strip()
    raise ApprovalError(f"{path} holds neither a JSON user→password map nor a password")


@contextlib.contextmanager
def _http(client_or_url: httpx.Client | str) -> Iterator[httpx.Client]:
    if isinstance(client_or_url, httpx.Client):
        yield client_or_url
        return
    with httpx.Client(base_url=str(client_or_url).rstrip("/"), timeout=90.0) as client:
        yield client


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail or response.text or response.reason_phrase).strip()


def token(client: httpx.Client, user: str, password: str) -> str:
    try:
        response = client.post("/auth/token", json={"username": user, "password": password})
    except httpx.TransportError as error:
        raise ApprovalError(f"cannot reach Airflow at {client.base_url}: {error}") from None
    if response.status_code in (400, 401, 403):
        raise ApprovalError(f"login as {user} refused: wrong user name or password", response.status_code)
    if response.status_code >= 300:
        raise ApprovalError(f"login as {user} failed: HTTP {response.status_code} {_detail(response)}",
                            response.status_code)
    return response.json()["access_token"]


def _headers(client: httpx.Client, user: str, password: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(client, user, password)}"}


def pending_gates(
    client_or_url: httpx.Client | str, user: str, password: str, *, only_mine: bool = False,
    access_token: str | None = None,
) -> list[dict[str, Any]]:
    """Gates waiting for an answer, as `user` sees them; `may_answer` says whether `user` is assigned.

    `only_mine` keeps the gates `user` may answer (assigned to them, or open to any user).
    `access_token`: `user`'s token from an earlier login (a caller that polls), instead of logging in.
    """
    with _http(client_or_url) as client:
        headers = {"Authorization": f"Bearer {access_token}"} if access_token else _headers(client, user, password)
        response = client.get(
            "/api/v2/dags/~/dagRuns/~/hitlDetails",
            params={"response_received": "false", "limit": 1000},
            headers=headers,
        )
        if response.status_code >= 300:
            raise ApprovalError(f"listing approvals failed: HTTP {response.status_code} {_detail(response)}",
                                response.status_code)
        waiting = []
        for detail in response.json().get("hitl_details", []):
            assigned = {entry.get("id") for entry in detail.get("assigned_users") or []}
            may_answer = not assigned or user in assigned
            if only_mine and not may_answer:
                continue
            ti = detail.get("task_instance") or {}
            waiting.append({
                "dag_id": ti.get("dag_id"),
                "run_id": ti.get("dag_run_id"),
                "task_id": ti.get("task_id"),
                "map_index": ti.get("map_index", -1),
                "state": ti.get("state"),
                "try_number": ti.get("try_number"),
                "subject": detail.get("subject"),
                "created_at": detail.get("created_at"),
                "started_at": ti.get("start_date"),  # of the task's current try
                "assigned_users": sorted(assigned),
                "may_answer": may_answer,
            })
        return waiting


def _recorded_by(client: httpx.Client, path: str, headers: dict[str, str]) -> str | None:
    response = client.get(path, headers=headers)
    if response.status_code != 200:
        return None
    responder = response.json().get("responded_by_user") or {}
    return responder.get("id") if isinstance(responder, dict) else None


def answer_gate(
    client_or_url: httpx.Client | str,
    user: str,
    password: str,
    dag_id: str,
    run_id: str,
    task_id: str,
    approve: bool,
    comment: str | None = None,
    map_index: int = -1,
) -> dict[str, Any]:
    """Approve or reject one waiting gate as `user`; returns Airflow's recorded response."""
    path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails"
    body = {"chosen_options": [APPROVE if approve else REJECT], "params_input": {"comment": comment or ""}}
    what = f"gate {task_id} of {dag_id} run {run_id}"
    with _http(client_or_url) as client:
        headers = _headers(client, user, password)
        response = client.patch(path, json=body, headers=headers)
        for attempt in range(3):  # a busy SQLite metadata database answers 500; the answer was not stored
            if response.status_code != 500:
                break
            time.sleep(2 * (attempt + 1))
            response = client.patch(path, json=body, headers=headers)
            if response.status_code == 409 and _recorded_by(client, path, headers) == user:
                return client.get(path, headers=headers).json()  # the earlier try did store it
    if response.status_code == 403:
        raise ApprovalError(f"{user} may not answer {what}: not an assigned approver", 403)
    if response.status_code == 409:
        raise ApprovalError(f"{what} was answered already; an answer cannot be changed", 409)
    if response.status_code == 404:
        raise ApprovalError(f"no {what} found waiting for an answer ({_detail(response)})", 404)
    if response.status_code >= 300:
        raise ApprovalError(f"answering {what} failed: HTTP {response.status_code} {_detail(response)}",
                            response.status_code)
    return response.json()


_common = [
    click.option("--as", "user", required=True, help="the user answering (see conf/users.yaml)"),
    click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
                 help="JSON user→password map or a file holding the password (default: the generated one)"),
    click.option("--url", help="Airflow API base URL (default: the running deployment of the user's site)"),
]


def _with_common(function):
    for option in reversed(_common):
        function = option(function)
    return function


@click.command("approve")
@_with_common
@click.option("--dag", "dag_id", required=True)
@click.option("--run", "run_id", required=True)
@click.option("--task", "task_id", required=True)
@click.option("--reject", is_flag=True, help="reject instead of approving")
@click.option("--comment", default="", help="why (kept in the audit log)")
def approve_command(user, password_file, url, dag_id, run_id, task_id, reject, comment) -> None:
    """Approve (or --reject) an approval gate waiting in Airflow."""
    try:
        result = answer_gate(url or default_url(user), user, read_password(user, password_file), dag_id, run_id,
                             task_id, approve=not reject, comment=comment)
    except ApprovalError as error:
        raise click.ClickException(str(error)) from None
    decision = (result.get("chosen_options") or ["?"])[0]
    click.echo(f"{decision} recorded for {task_id} of {dag_id} run {run_id} by {user}")


@click.command("approvals")
@_with_common
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def approvals_command(user, password_file, url, as_json) -> None:
    """List the approval gates waiting for a user."""
    try:
        waiting = pending_gates(url or default_url(user), user, read_password(user, password_file), only_mine=True)
    except ApprovalError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(waiting, indent=2))
        return
    if not waiting:
        click.echo(f"nothing waits for {user}")
        return
    for gate in waiting:
        click.echo(f"{gate['dag_id']}  {gate['run_id']}  {gate['task_id']}  {gate['subject']}")
    click.echo(f"answer with: factory approve --as {user} --dag DAG --run RUN --task TASK [--reject] [--comment ...]")
