"""`factory bundle`: a wheelhouse that installs into a fresh venv with pip's network disabled.

The install test bundles two light pins of the lock (`--only`), never torch, to stay cheap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines import __version__
from pipelines.runtime.bundle import BundleError, build_bundle, bundle_command, read_pins


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "factory-bundle"
    result = CliRunner().invoke(
        bundle_command,
        ["--out", str(out), "--only", "click", "--only", "PyYAML"],
    )
    assert result.exit_code == 0, result.output
    assert f"bundle written to {out}" in result.output
    return out


def test_bundle_holds_the_pinned_wheels_the_project_and_its_files(bundle):
    wheels = sorted(p.name for p in (bundle / "wheels").glob("*.whl"))
    assert [w.split("-")[0].lower() for w in wheels] == [
        "click",
        "pyyaml",
        "sovereign_ai_factory",
    ]
    assert f"sovereign_ai_factory-{__version__}-py3-none-any.whl" in wheels
    pins = read_pins(Path(__file__).parents[3] / "requirements.lock")
    assert (bundle / "requirements.txt").read_text().splitlines() == [
        str(pins[name]) for name in ("click", "pyyaml")
    ]
    assert (bundle / "project" / "conf" / "stages.yaml").is_file()
    assert (bundle / "chart" / "sovereign-factory" / "Chart.yaml").is_file()
    policies = bundle / "chart" / "sovereign-factory" / "files" / "policies"
    assert policies.is_dir() and not policies.is_symlink()  # the files themselves, not the repository's link
    assert (policies / "approval" / "approval.rego").is_file()
    assert not list(policies.rglob("*_test.rego"))
    assert os.access(bundle / "install.sh", os.X_OK)
    listed = {line.split("  ", 1)[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()}
    assert {f"wheels/{w}" for w in wheels} | {"install.sh", "requirements.txt"} <= listed


def _fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def _offline_env() -> dict[str, str]:
    # No route to an index: a proxy that does not exist, and none of this machine's pip settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    return env


def test_bundle_installs_into_a_fresh_venv_without_network(bundle, tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    result = subprocess.run(
        [str(bundle / "install.sh"), str(python)],
        capture_output=True,
        text=True,
        env=_offline_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--no-index" in (bundle / "install.sh").read_text()
    version = subprocess.run(
        [str(python.parent / "factory"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.stdout.strip() == f"factory, version {__version__}"
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, timeout=60
    ).stdout
    for pin in (
        "click==8",
        "PyYAML==",
        f"sovereign-ai-factory=={__version__}",
    ):
        assert pin in listed


def test_install_refuses_a_tampered_bundle(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    wheel = next((copy / "wheels").glob("click-*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    # a python that does not exist: the sums must stop the script before any pip runs
    result = subprocess.run(
        [str(copy / "install.sh"), str(tmp_path / "no-python")],
        capture_output=True,
        text=True,
        env=_offline_env(),
        timeout=60,
    )
    assert result.returncode != 0
    assert f"{wheel.relative_to(copy)}: FAILED" in result.stdout + result.stderr
    assert "no-python" not in result.stderr


def test_unknown_only_name_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(BundleError, match="not pinned in the lock: no-such-package"):
        build_bundle(out, only=["no-such-package"])
    assert list(tmp_path.iterdir()) == []


def test_unpinned_requirement_is_refused(tmp_path):
    reqs = tmp_path / "reqs.txt"
    reqs.write_text("click==8.5.1\nrequests>=2\n")
    with pytest.raises(BundleError, match=r"reqs.txt:2: 'requests>=2' is not pinned as name==version"):
        build_bundle(tmp_path / "b", requirements=reqs)


def test_existing_nonempty_out_is_refused(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(bundle_command, ["--out", str(out), "--only", "click"])
    assert result.exit_code != 0 and "not an empty folder" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
