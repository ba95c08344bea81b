"""`factory bundle`: an offline installation bundle for air-gapped sites.

    factory bundle --out DIR [--only NAME ...] [--requirements FILE]

DIR receives `wheels/` (a wheel of every pin of requirements.lock, sdists built into wheels,
plus the project wheel), `requirements.txt` (the pins bundled), `SHA256SUMS`, `project/` (the
`conf/`, `policies/`, `dags/` and `plugins/` folders the package reads at run time) and
`chart/sovereign-factory` (the site's Helm chart, its policies copied in), and
`install.sh`, which checks the sums and installs with `pip --no-index`, ignoring any pip
configuration of the target machine. The bundle is built for the interpreter and platform
that runs this command: run it on (or in an image of) the site's OS, architecture and Python.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import click
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from pipelines import __version__
from pipelines.config import PROJECT_ROOT

PROJECT_NAME = "sovereign-ai-factory"
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"
# Folders of the repository the package reads at run time (FACTORY_CONF, policies) or Airflow loads.
PROJECT_FILES = ("conf", "policies", "dags", "plugins")

INSTALL_SH = """#!/bin/sh
# Install the Sovereign AI Factory {version} from this bundle, with no network access.
# Usage: ./install.sh [PYTHON]   (default python3; pass a virtual environment's python to install there)
# Afterwards: export FACTORY_CONF=<bundle>/project/conf FACTORY_POLICIES=<bundle>/project/policies.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${{1:-python3}}
cd "$HERE"
sha256sum -c --quiet SHA256SUMS
# Only this bundle counts: no index, no pip configuration or find-links of this machine.
unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIREMENT
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m pip install --no-index --find-links "$HERE/wheels" --requirement "$HERE/requirements.txt"
"$PYTHON" -m pip install --no-index --find-links "$HERE/wheels" --no-deps "{project}=={version}"
echo "installed {project} {version}; set FACTORY_CONF=$HERE/project/conf FACTORY_POLICIES=$HERE/project/policies"
"""


class BundleError(click.ClickException):
    """The bundle cannot be built; the message names the requirement or path at fault."""


def read_pins(path: Path) -> dict[str, Requirement]:
    """The `name==version` pins of a lock file, keyed by canonical name; anything else is an error."""
    pins: dict[str, Requirement] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise BundleError(f"{path}:{number}: not a requirement: {line!r} ({exc})") from None
        specs = list(req.specifier)
        if req.url or len(specs) != 1 or specs[0].operator != "==":
            raise BundleError(f"{path}:{number}: {line!r} is not pinned as name==version")
        pins[canonicalize_name(req.name)] = req
    return pins


def select_pins(pins: dict[str, Requirement], only: Iterable[str]) -> dict[str, Requirement]:
    wanted = {canonicalize_name(name) for name in only}
    if not wanted:
        return pins
    unknown = sorted(wanted - pins.keys())
    if unknown:
        raise BundleError(f"not pinned in the lock: {', '.join(unknown)}")
    return {name: req for name, req in pins.items() if name in wanted}


def _pip_wheel(args: Sequence[str], total: int, label: str) -> None:
    """Run `pip wheel`, advancing a progress bar on each requirement pip collects."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--progress-bar", "off", *args]
    tail: list[str] = []
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as progress:
        task = progress.add_task(label, total=total)
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail = (tail + [line.rstrip()])[-20:]
                match = re.match(r"(?:Collecting|Processing) (\S+)", line)
                if match:
                    progress.update(task, advance=1, description=f"{label}: {match.group(1)}")
            code = proc.wait()
        progress.update(task, completed=total, description=label)
    if code != 0:
        raise BundleError(f"pip wheel failed (exit {code}):\n" + "\n".join(tail))


def _check_wheelhouse(wheels: Path, pins: dict[str, Requirement]) -> None:
    found: dict[str, str] = {}
    for wheel in wheels.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        found[name] = str(version)
    missing = [
        str(req)
        for name, req in pins.items()
        if name not in found or not next(iter(req.specifier)).contains(found[name], prereleases=True)
    ]
    if missing:
        raise BundleError(f"the wheelhouse lacks {', '.join(sorted(missing))}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_bundle(
    out: Path,
    *,
    requirements: Path | None = None,
    only: Iterable[str] = (),
    torch_index_url: str = TORCH_INDEX_URL,
    project_root: Path = PROJECT_ROOT,
) -> Path:
    """Write the offline bundle to `out` (which must not exist or be empty); returns `out`.

    The bundle is assembled in a temporary sibling folder and moved into place at the end, so a
    failure leaves nothing behind.
    """
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} exists and is not an empty folder; remove it or choose another --out")
    lock = Path(requirements or project_root / "requirements.lock")
    if not lock.is_file():
        raise BundleError(f"no requirements file at {lock}")
    pins = select_pins(read_pins(lock), only)
    pins.pop(canonicalize_name(PROJECT_NAME), None)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        wheels = staging / "wheels"
        wheels.mkdir()
        reqs = staging / "requirements.txt"
        reqs.write_text("".join(f"{req}\n" for _, req in sorted(pins.items())))
        if pins:
            extra = (
                ["--extra-index-url", torch_index_url] if any("+" in str(r) for r in pins.values()) else []
            )
            _pip_wheel(["--wheel-dir", str(wheels), "--requirement", str(reqs), *extra], len(pins), "wheels")
            _check_wheelhouse(wheels, pins)
        _build_project_wheel(project_root, wheels)
        for name in PROJECT_FILES:
            source = project_root / name
            if source.is_dir():
                shutil.copytree(
                    source, staging / "project" / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
        chart = project_root / "charts" / "sovereign-factory"
        if chart.is_dir():
            # files/policies links to policies/: the copy holds the files themselves, without their tests
            shutil.copytree(chart, staging / "chart" / "sovereign-factory",
                            ignore=shutil.ignore_patterns("*_test.rego", "__pycache__"))
        install = staging / "install.sh"
        install.write_text(INSTALL_SH.format(project=PROJECT_NAME, version=__version__))
        install.chmod(0o755)
        sums = [
            f"{_sha256(path)}  {path.relative_to(staging).as_posix()}\n"
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        ]
        (staging / "SHA256SUMS").write_text("".join(sums))
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _build_project_wheel(project_root: Path, wheels: Path) -> None:
    """Build the project wheel from a copy of its sources, leaving no build/ or egg-info in the repo."""
    with tempfile.TemporaryDirectory(prefix="factory-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (project_root / name).is_file():
                shutil.copy2(project_root / name, src / name)
        shutil.copytree(
            project_root / "pipelines",
            src / "pipelines",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        _pip_wheel(["--no-build-isolation", "--wheel-dir", str(wheels), str(src)], 1, "project wheel")


@click.command("bundle")
@click.option(
    "--out", "out", required=True, type=click.Path(path_type=Path), help="Folder to create (must not exist)."
)
@click.option(
    "--requirements",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Pinned requirements to bundle instead of requirements.lock.",
)
@click.option(
    "--only", multiple=True, metavar="NAME", help="Bundle only these pins of the lock (repeatable)."
)
@click.option(
    "--torch-index-url", default=TORCH_INDEX_URL, show_default=True, help="Where CPU torch comes from."
)
def bundle_command(out: Path, requirements: Path | None, only: tuple[str, ...], torch_index_url: str) -> None:
    """Write an offline bundle (wheelhouse + install.sh) for an air-gapped site."""
    path = build_bundle(out, requirements=requirements, only=only, torch_index_url=torch_index_url)
    count = len(list((path / "wheels").glob("*.whl")))
    click.echo(f"bundle written to {path} ({count} wheels); install with {path / 'install.sh'} [PYTHON]")
