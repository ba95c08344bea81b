"""A run killed in the middle of a stage completes when run again, without duplicate versions or a
corrupted repo; two runs of the same stage at once corrupt nothing (per-site repo lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.data.repo import dvc_status_clean, git
from pipelines.init import init_workspace
from pipelines.workspace import SitePaths

pytestmark = pytest.mark.slow

STAGE_1_STEPS = """
import sys
from pipelines.steps import StepContext, run_step
from pipelines.workspace import SitePaths
ctx = StepContext(site="supplier", paths=SitePaths.of("supplier"), run_id=sys.argv[1])
t = run_step("train_model", ctx, stage="M1", profile="initial", datasets=["train"])
t = run_step("evaluate_model", ctx, trained=t, test_sets={"supplier_test": "test"})
t = run_step("export_model", ctx, trained=t, parity_set="test")
print(run_step("register_model", ctx, trained=t))
"""


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "FACTORY_HOME": str(home)}


def _m1_versions(home: Path) -> list:
    from pipelines.learning.registry import client

    return client(SitePaths.of("supplier", home)).search_model_versions("name='digits-cnn-m1'")


def _repo_is_sound(paths: SitePaths) -> None:
    git(paths, "fsck", "--no-progress")
    assert git(paths, "status", "--porcelain") == ""
    assert dvc_status_clean(paths)


def test_killed_stage_run_completes_on_rerun_without_duplicates(tmp_path: Path):
    home = tmp_path / "factory"
    init_workspace(home)
    supplier = SitePaths.of("supplier", home)
    command = [sys.executable, "-m", "pipelines.cli", "run", "--stages", "1"]
    first = subprocess.Popen(command, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    staging = supplier.state_dir / "staging"
    deadline = time.monotonic() + 300
    while not any(staging.glob("*/model/metadata.json")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert any(staging.glob("*/model/metadata.json")), "training never started"
    os.killpg(first.pid, signal.SIGKILL)  # mid-stage: the model is staged, not registered
    first.wait()
    assert _m1_versions(home) == []
    rerun = subprocess.run(command, env=_env(home), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(_m1_versions(home)) == 1
    _repo_is_sound(supplier)
    again = subprocess.run(command, env=_env(home), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and len(_m1_versions(home)) == 1


def test_two_concurrent_runs_of_a_stage_corrupt_nothing(tmp_path: Path):
    home = tmp_path / "factory"
    init_workspace(home)
    runs = [subprocess.Popen([sys.executable, "-c", STAGE_1_STEPS, f"run-{i}"], env=_env(home),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-1500:] for _, err in outputs]
    assert len(_m1_versions(home)) == 1  # same inputs: one registration, the other run reuses it
    assert sum("'skipped': True" in out for out, _ in outputs) == 1
    _repo_is_sound(SitePaths.of("supplier", home))
