"""Three sovereign deployments on one machine, each site's processes running as a Unix user of its own.

`factory init` builds the three homes (as root, then each home is handed to its site's user with
mode 0700); `factory up --site S` starts each deployment as its user; `factory run --stages 1-2
--approve` drives them through their REST APIs. Stage 1 trains M1 at the supplier, whose outbox
pusher delivers it over mutual TLS to the origin's inbox service, whose asset event starts the
origin's intake DAG in the origin's own Airflow; the origin registers M1 in its own MLflow, which
starts stage 2 there, up to the origin officer's approval gate and the release to the supplier.

Prints (and writes to test-artifacts/three_deployments.json) the PSS memory of the three
deployments and the seconds from `factory up` to the first approval gate.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from pipelines.config import SITES, load_config
from pipelines.service.up import conf_with_free_ports, deployment_pids
from pipelines.workspace import SitePaths

from .conftest import chromium_driver

pytestmark = [pytest.mark.service, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
FACTORY = [sys.executable, "-m", "pipelines.cli"]
USERS = {site: f"factory-{site}" for site in SITES}
PYTHON = [sys.executable]  # the interpreter the sites' users run (`_site_python`)


def _site_account(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


def _site_python(folder: Path) -> str:
    """An interpreter the site users may run with this installation's packages: this one, or (when it
    lives where they cannot reach, e.g. under /root) the system's Python of the same version in a
    virtual environment that adds this installation's site-packages."""
    probe = ["runuser", "-u", USERS["supplier"], "--", sys.executable, "-c", "import pipelines"]
    if subprocess.run(probe, capture_output=True, cwd="/").returncode == 0:
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin")
    if not system:
        pytest.skip(f"the site users cannot run {sys.executable} and there is no system {version}")
    subprocess.run([system, "-m", "venv", "--without-pip", str(folder)], check=True, capture_output=True)
    site_packages = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (folder / "lib" / version / "site-packages" / "factory-installation.pth").write_text(
        f"import site; site.addsitedir({str(site_packages)!r})\n")
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return str(folder / "bin" / "python")


def _as(site: str, *command: str, env: dict[str, str], timeout: float = 120, home: Path | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run `command` as the site's Unix user (HOME inside the site's own home)."""
    site_home = SitePaths.of(site, home).root if home else None
    prefix = ["runuser", "-u", USERS[site], "--", "env", f"HOME={site_home or '/nonexistent'}"]
    if command[0] == sys.executable:
        command = (*PYTHON, *command[1:])
    result = subprocess.run([*prefix, *command], env=env, cwd="/", capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} as {USERS[site]}:\n{result.stdout}\n{result.stderr}"
    return result


def _test_conf(folder: Path) -> Path:
    """conf/ with free ports: any free Airflow and MLflow port, fixed free inbox ports the partners know."""
    conf_with_free_ports(folder)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def _records(home: Path) -> dict[str, dict]:
    return {site: json.loads((SitePaths.of(site, home).service_dir / "service.json").read_text()) for site in SITES}


def _pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass  # ended meanwhile
    return total


def _foreign_files(home: Path) -> dict[str, list[str]]:
    """Per site: paths in its home not owned by its own user (at most 20 named)."""
    found = {}
    for site in SITES:
        uid = pwd.getpwnam(USERS[site]).pw_uid
        root = SitePaths.of(site, home).root
        wrong = [str(path.relative_to(root)) for path in [root, *root.rglob("*")] if path.lstat().st_uid != uid]
        if wrong:
            found[site] = wrong[:20] + ([f"... {len(wrong) - 20} more"] if len(wrong) > 20 else [])
    return found


@pytest.fixture(scope="module")
def deployments():
    if os.geteuid() != 0 or not shutil.which("runuser") or not shutil.which("useradd"):
        pytest.skip("needs root with runuser and useradd (each site runs as a Unix user of its own)")
    accounts = {site: _site_account(name) for site, name in USERS.items()}
    base = Path(tempfile.mkdtemp(prefix="factory-3d-", dir="/tmp"))
    base.chmod(0o755)
    PYTHON[:] = [_site_python(base / "python")]
    home = base / "factory"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AIRFLOW__", "AIRFLOW_HOME", "FACTORY_"))}
    env.update({"FACTORY_HOME": str(home), "FACTORY_CONF": str(_test_conf(base / "conf")), "PYTHONPATH": str(ROOT)})
    figures: dict = {}
    started = time.monotonic()
    init = subprocess.run([*FACTORY, "init"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert init.returncode == 0, init.stdout + init.stderr
    figures["init_s"] = round(time.monotonic() - started, 1)
    home.chmod(0o755)
    for site, account in accounts.items():
        root = SitePaths.of(site, home).root
        for path in [root, *root.rglob("*")]:
            os.lchown(path, account.pw_uid, account.pw_gid)
        root.chmod(0o700)

    figures["up_started_at"] = time.time()
    ups = {site: subprocess.Popen(
        ["runuser", "-u", USERS[site], "--", "env", f"HOME={SitePaths.of(site, home).root}", *PYTHON,
         *FACTORY[1:], "up",
         "--site", site, "--detach", "--no-trigger", "--no-init"],
        env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for site in SITES}
    outputs = {site: process.communicate(timeout=600)[0] for site, process in ups.items()}
    figures["up_s"] = round(time.time() - figures["up_started_at"], 1)

    def stop() -> None:
        for site in SITES:
            _as(site, *FACTORY, "down", "--site", site, env=env, home=home)
        for site in SITES:  # anything `down` could not stop
            record = SitePaths.of(site, home).service_dir / "service.json"
            if record.exists():
                for pid in deployment_pids(json.loads(record.read_text())):
                    subprocess.run(["kill", "-9", str(pid)], check=False)
        if not os.environ.get("FACTORY_KEEP_TEST_HOME"):
            shutil.rmtree(base, ignore_errors=True)

    failed = {site: outputs[site] for site, process in ups.items() if process.returncode != 0}
    if failed:
        stop()
        pytest.fail("factory up failed:\n" + "\n".join(f"--- {site}\n{text}" for site, text in failed.items()))
    try:
        yield {"home": home, "env": env, "figures": figures}
    finally:
        stop()


def test_three_sovereign_deployments_carry_m1_to_the_origin_and_reach_its_approval(deployments):
    home, env, figures = deployments["home"], deployments["env"], deployments["figures"]
    records = _records(home)
    for site, record in records.items():
        assert record["uid"] == pwd.getpwnam(USERS[site]).pw_uid, f"{site}'s deployment does not run as {USERS[site]}"
        owners = {Path(f"/proc/{pid}").stat().st_uid for pid in deployment_pids(record)}
        assert owners == {record["uid"]}, f"{site}'s processes run as {owners}"
        passwords = Path(record["passwords_file"])
        assert passwords.stat().st_mode & 0o777 == 0o600
        config = load_config()
        assert set(json.loads(passwords.read_text())) == {user.id for user in config.site_users(site)} | {
            config.service_identities[site].id}

    # a process of one site cannot read another site's home, while the owner can
    for site in SITES:
        key = next(path for path in SitePaths.of(site, home).keys_dir.rglob("*") if path.is_file())
        _as(site, "cat", str(key), env=env, home=home, check=True)
        for other in SITES:
            if other != site:
                denied = _as(other, "cat", str(key), env=env, home=home)
                assert denied.returncode != 0 and "Permission denied" in denied.stderr, (other, key)
                assert _as(other, "ls", str(SitePaths.of(site, home).root), env=env, home=home).returncode != 0

    # the whole collaboration up to stage 2, driven through the three Airflow REST APIs
    started = time.monotonic()
    run = subprocess.run([*FACTORY, "run", "--stages", "1-2", "--approve", "--no-report", "--timeout", "400"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=540)
    figures["stages_1_2_s"] = round(time.monotonic() - started, 1)
    assert run.returncode == 0, f"factory run failed:\n{run.stdout}\n{run.stderr[-6000:]}"
    assert "following" in run.stderr or "triggered as supplier_engineer" in run.stderr, run.stderr

    with httpx.Client(timeout=30) as http:
        def login(site: str, user: str) -> dict[str, str]:
            password = json.loads(Path(records[site]["passwords_file"]).read_text())[user]
            answer = http.post(f"{records[site]['url']}/auth/token", json={"username": user, "password": password})
            answer.raise_for_status()
            return {"Authorization": f"Bearer {answer.json()['access_token']}"}

        # the origin's intake ran in the origin's Airflow, started by the asset event its inbox posted
        origin = login("origin", "origin_platform")
        runs = http.get(f"{records['origin']['url']}/api/v2/dags/stage_1_model_intake/dagRuns",
                        headers=origin).json()["dag_runs"]
        assert [(r["state"], r["run_type"]) for r in runs] == [("success", "asset_triggered")], runs
        events = http.get(f"{records['origin']['url']}/api/v2/assets/events", headers=origin,
                          params={"limit": 100}).json()["asset_events"]
        assert any(event["uri"] == "factory://origin/inbox/m1" for event in events), events
        # the supplier's Airflow knows nothing of the origin's DAGs, nor the origin of the supplier's people
        supplier = login("supplier", "supplier_platform")
        assert http.get(f"{records['supplier']['url']}/api/v2/dags/stage_1_model_intake",
                        headers=supplier).status_code == 404
        assert http.post(f"{records['origin']['url']}/auth/token",
                         json={"username": "supplier_engineer", "password": "x"}).status_code in (401, 403)

        # M1 is registered in the origin's own MLflow (its server, its store)
        model = http.get(f"{records['origin']['mlflow']}/api/2.0/mlflow/registered-models/get",
                         params={"name": "digits-cnn-m1"})
        assert model.status_code == 200, model.text
        assert model.json()["registered_model"]["latest_versions"], model.text

        # the first approval gate (stage 2, the origin officer) was answered in the origin's Airflow
        gates = http.get(f"{records['origin']['url']}/api/v2/dags/stage_2_sovereign_data_release/dagRuns/~/hitlDetails",
                         headers=origin).json()["hitl_details"]
        assert [(g["responded_by_user"] or {}).get("id") for g in gates] == ["origin_officer"], gates
        created = min(g["created_at"] for g in gates)
        from datetime import datetime

        gate_at = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        figures["up_to_first_gate_s"] = round(gate_at - figures["up_started_at"], 1)

    # the supplier's outbox shows M1 delivered over https, the origin's the dataset it released
    for site, kind in (("supplier", "m1"), ("origin", "origin-shared")):
        listed = _as(site, *FACTORY, "outbox", "list", "--site", site, "--json", env=env, home=home, check=True)
        records_out = [r for r in json.loads(listed.stdout) if r["kind"] == kind]
        assert records_out, listed.stdout
        if site == "supplier":
            assert [(r["state"], r["via"]) for r in records_out] == [("delivered", "https")], records_out
    # the supplier's release step pushed M1 itself (its deployment names the origin's inbox), not the pusher
    logs = SitePaths.of("supplier", home).airflow_home / "logs" / "dag_id=stage_1_initial_training"
    pushed = _as("supplier", "grep", "-rl", "pushed to origin: delivered", str(logs), env=env, home=home)
    assert pushed.returncode == 0 and "task_id=release_model" in pushed.stdout, pushed.stdout + pushed.stderr

    pss = {site: _pss_kib(deployment_pids(record)) for site, record in records.items()}
    figures["pss_mib"] = {site: round(kib / 1024) for site, kib in pss.items()}
    figures["pss_total_mib"] = round(sum(pss.values()) / 1024)
    figures["processes"] = {site: len(deployment_pids(record)) for site, record in records.items()}
    figures["seconds_to_ui"] = {site: record.get("seconds_to_ui") for site, record in _records(home).items()}

    # sovereignty: nothing in a site's home belongs to anyone but the site's own user
    assert _foreign_files(home) == {}

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "three_deployments.json").write_text(json.dumps(figures, indent=2) + "\n")
    print("\nthree deployments:", json.dumps(figures, indent=2))


@pytest.mark.browser
def test_origin_officer_reads_m5_on_its_test_data_at_the_export_review_gate_and_approves(deployments):
    """Stages 1-4 (3-4 when the test above ran 1-2) and stage 5's data release and export preparation
    are driven with their gates answered; the origin's review gate (M5 arrived from the supplier and
    was evaluated on the origin's own test data) waits for the origin officer, who logs in to the
    origin's Airflow, opens the Data Docs page the data-release gate links to, reads M5's metrics on
    the review gate's page (screenshot kept in test-artifacts/) and approves there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pipelines.service.collaboration import Collaboration, Deployment

    home, figures = deployments["home"], deployments["figures"]
    sites = {site: Deployment(site, record, home) for site, record in _records(home).items()}
    origin = sites["origin"]
    drive = Collaboration(sites, approve=True, timeout=600, say=print)
    started = time.monotonic()
    ran_1_2 = any(run["state"] == "success" for run in origin.runs("stage_2_sovereign_data_release"))
    drive.run_stages([3, 4] if ran_1_2 else [1, 2, 3, 4])
    before_review = ("stage_5_export_data_release", "stage_5_export_preparation")
    drive.gate_dags = set(before_review)  # the review's gate is left to the officer in the browser
    for dag_id in before_review:
        deployment, run = drive.start(dag_id, 5)
        drive.follow(deployment, dag_id, run)
    deployment, run_id = drive.start("stage_5_export_review", 5)
    assert deployment is origin
    dag, gate = "stage_5_export_review", "review_approval"
    deadline = time.monotonic() + 300
    while (state := {ti["task_id"]: ti["state"] for ti in origin.task_instances(dag, run_id)}).get(gate) != \
            "awaiting_input":
        assert "failed" not in state.values() and time.monotonic() < deadline, state
        time.sleep(1)
    origin.observe_scheduler()
    parked = origin.heartbeats[-1] if origin.heartbeats else None
    figures["stages_to_review_gate_s"] = round(time.monotonic() - started, 1)

    driver = chromium_driver()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        driver.get(origin.url)
        driver.find_element(By.NAME, "username").send_keys("origin_officer")
        driver.find_element(By.NAME, "password").send_keys(origin.password("origin_officer"))
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 60).until(lambda d: "/auth/login" not in d.current_url)

        # the data-release gate (answered by the drive) links to the validation's Data Docs page
        release_run = next(run["dag_run_id"] for run in origin.runs("stage_5_export_data_release")
                           if run["state"] == "success")
        driver.get(f"{origin.url}/dags/stage_5_export_data_release/runs/{release_run}/tasks/release_approval/"
                   "required_actions")
        docs = driver.find_element(By.PARTIAL_LINK_TEXT, "Data Docs page").get_attribute("href")
        driver.get(docs)
        assert "/factory/data-docs/origin/validations/release/" in driver.current_url, driver.current_url
        assert "export_authorized-sanitized" in driver.page_source and "Expectation" in driver.page_source

        driver.get(f"{origin.url}/dags/{dag}/runs/{run_id}/tasks/{gate}/required_actions")
        row = driver.find_element(By.XPATH, "//tr[td[contains(., 'M5 under review')]]").text
        header = driver.find_element(By.XPATH, "//tr[td[contains(., 'M5 under review')]]/ancestor::table//th"
                                     "[contains(., 'origin_test')]")
        assert header.is_displayed() and re.search(r"\b[01]\.\d{4}\b", row), row
        driver.execute_script("arguments[0].scrollIntoView()", driver.find_element(By.XPATH, "//table"))
        driver.save_screenshot(str(ARTIFACTS / "export_review_in_browser.png"))

        while not origin.settled(parked):  # answering before the scheduler took in the park fails the gate
            time.sleep(1)
            origin.observe_scheduler()
        driver.find_element(By.ID, "element_comment").send_keys("M5 holds up on our test data")
        approve = driver.find_element(By.XPATH, "//button[normalize-space()='Approve']")
        WebDriverWait(driver, 30).until(lambda d: approve.is_enabled())
        approve.click()
        deadline = time.monotonic() + 180
        while (state := {ti["task_id"]: ti["state"] for ti in origin.task_instances(dag, run_id)}).get(gate) != \
                "success":
            assert "failed" not in state.values() and time.monotonic() < deadline, state
            time.sleep(1)
    except Exception:
        driver.save_screenshot(str(ARTIFACTS / "export_review_in_browser_failure.png"))
        raise
    finally:
        driver.quit()
    answer = origin.get(f"/api/v2/dags/{dag}/dagRuns/{run_id}/taskInstances/{gate}/-1/hitlDetails")
    assert (answer["responded_by_user"] or {}).get("id") == "origin_officer", answer
    assert answer["params_input"].get("comment") == "M5 holds up on our test data"
    for deployment in sites.values():
        deployment.close()
    figures["export_review_s"] = round(time.monotonic() - started, 1)
    print("\nexport review in the browser:", json.dumps(figures, indent=2))
