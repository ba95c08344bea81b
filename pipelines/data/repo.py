"""A site's git + DVC repository: datasets and models are DVC-tracked, pushed to the site's remote.

All writes go through `commit_tracked` under the site lock, so two runs at one
site never interleave a `dvc add` and a `git commit`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from pipelines.config import parse_yaml
from pipelines.workspace import SitePaths

_LOCKS: dict[str, FileLock] = {}
_LOCKS_GUARD = threading.Lock()


class RepoError(RuntimeError):
    """A git or DVC operation on a site repo failed; the message carries its output."""


@contextlib.contextmanager
def site_lock(paths: SitePaths, timeout: float = 600) -> Iterator[None]:
    """Exclusive lock on the site's repo, across processes; re-entrant within one process."""
    paths.root.mkdir(parents=True, exist_ok=True)
    key = str(paths.root)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, FileLock(paths.root / ".repo.lock", thread_local=False))
    with lock.acquire(timeout=timeout):
        yield


def git(paths: SitePaths, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=paths.repo, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RepoError(f"git {' '.join(args)} failed in {paths.repo}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def _dvc_repo(paths: SitePaths):
    from dvc.repo import Repo

    return Repo(str(paths.repo))


def init_site_repo(paths: SitePaths) -> bool:
    """Create the git + DVC repo with its local remote. Returns False when it already existed."""
    with site_lock(paths):
        paths.repo.mkdir(parents=True, exist_ok=True)
        paths.dvc_remote.mkdir(parents=True, exist_ok=True)
        created = False
        if not (paths.repo / ".git").is_dir():
            subprocess.run(["git", "init", "-q", "-b", "main", str(paths.repo)], check=True)
            created = True
        git(paths, "config", "user.name", f"factory {paths.site}")
        git(paths, "config", "user.email", f"{paths.site}@factory.local")
        git(paths, "config", "commit.gpgsign", "false")
        if not (paths.repo / ".dvc" / "config").exists():
            from dvc.repo import Repo

            Repo.init(str(paths.repo))
            created = True
        config = paths.repo / ".dvc" / "config"
        wanted = {"core": {"remote": "site", "autostage": True, "analytics": False},
                  "remote": {"site": {"url": str(paths.dvc_remote)}}}
        text = config.read_text() if config.exists() else ""
        if "['remote \"site\"']" not in text:
            with _dvc_repo(paths).config.edit() as conf:
                conf["core"].update(wanted["core"])
                conf["remote"]["site"] = wanted["remote"]["site"]
            created = True
        # Only DVC's own files: anything else lying in the folder (say, data written by a run that
        # died before `dvc add`) must reach git as a .dvc file, never as content.
        dvc_files = [f for f in (".dvc/config", ".dvc/.gitignore", ".dvcignore") if (paths.repo / f).exists()]
        git(paths, "add", "--", *dvc_files)
        if git(paths, "rev-parse", "--verify", "-q", "HEAD", check=False) == "" or git(
            paths, "diff", "--cached", "--name-only"
        ):
            git(paths, "commit", "-q", "--allow-empty", "-m", f"Initialise {paths.site} site repository")
            created = True
        return created


def dvc_md5(path: Path) -> str:
    """The md5 DVC recorded for a tracked file (from its .dvc file)."""
    meta = Path(f"{path}.dvc")
    if not meta.exists():
        raise RepoError(f"{path} is not tracked by DVC (no {meta.name})")
    outs = parse_yaml(meta.read_text())["outs"]
    return outs[0]["md5"]


def git_head(paths: SitePaths) -> str:
    return git(paths, "rev-parse", "HEAD")


def commit_tracked(paths: SitePaths, files: list[Path], message: str) -> dict[Path, str]:
    """`dvc add` the files, commit their .dvc files in git and push the data to the site remote.

    Files must lie inside the site repo. Unchanged files cost nothing and make no commit.
    Returns each file's DVC md5.
    """
    files = [Path(f).resolve() for f in files]
    for file in files:
        if paths.repo not in file.parents:
            raise RepoError(f"{file} is outside the {paths.site} site repo {paths.repo}")
        if not file.exists():
            raise RepoError(f"cannot track {file}: it does not exist")
    with site_lock(paths):
        repo = _dvc_repo(paths)
        try:
            repo.add([str(f) for f in files])
            repo.push()
        finally:
            repo.close()
        tracked = [f"{f.relative_to(paths.repo)}.dvc" for f in files]
        gitignores = sorted({str((f.parent / ".gitignore").relative_to(paths.repo)) for f in files})
        git(paths, "add", "--", *tracked, *[g for g in gitignores if (paths.repo / g).exists()])
        if git(paths, "diff", "--cached", "--name-only"):
            git(paths, "commit", "-q", "-m", message)
        return {f: dvc_md5(f) for f in files}


def commit_files(paths: SitePaths, files: list[Path], message: str) -> bool:
    """Commit small text records (catalog entries, reports) in git directly. True when a commit was made."""
    with site_lock(paths):
        rel = [str(Path(f).resolve().relative_to(paths.repo)) for f in files]
        git(paths, "add", "--", *rel)
        if git(paths, "diff", "--cached", "--name-only"):
            git(paths, "commit", "-q", "-m", message)
            return True
        return False


def dvc_status_clean(paths: SitePaths) -> bool:
    """True when the workspace matches the .dvc files and the remote holds every object."""
    repo = _dvc_repo(paths)
    try:
        return not repo.status() and not repo.status(cloud=True)
    finally:
        repo.close()


os.environ.setdefault("DVC_NO_ANALYTICS", "1")
