"""A site's Great Expectations Data Docs, served by its own Airflow to its compliance officers only.

`pipelines.data.validate` renders every validation into `<site root>/data-docs` (an index, one page
per validation under `validations/<suite>/<run>/<time>/`, and the static assets they link to). The
plugin mounts this app at `/factory/data-docs`:

- `GET /factory/data-docs/{site}/validation?dataset=ID&suite=SUITE` redirects to the newest page of
  that dataset's validation (what a data-release gate links to);
- `GET /factory/data-docs/{site}/{path}` serves one file of the site's data-docs folder.

Airflow does not authenticate plugin apps: every request here must carry the Airflow user's token
(the UI's session cookie or a bearer token), and that user must be a compliance officer of `site`
(conf/users.yaml). A site's deployment (FACTORY_SITE) serves its own site only. A requested path is
never joined unchecked: absolute paths, `..`, `.`, empty parts and backslashes are refused, and the
resolved file (symlinks followed) must lie inside the resolved data-docs folder.
"""

import os
from pathlib import Path, PurePosixPath
from urllib.parse import quote

URL_PREFIX = "/factory/data-docs"
READER_ROLE = "compliance_officer"
DOCS_FOLDER = "data-docs"


class PathRefused(ValueError):
    """A requested path that does not name a file inside the data-docs folder."""


def docs_root(site: str, home: Path | None = None) -> Path:
    """The site's data-docs folder (where `pipelines.data.validate` renders them)."""
    from pipelines.workspace import SitePaths

    return SitePaths.of(site, home).root / DOCS_FOLDER


def resolve_inside(root: Path, requested: str) -> Path:
    """The file `requested` (a relative POSIX path) names inside `root`, or PathRefused.

    Refused: an absolute path, a `..`, `.` or empty part, a backslash or NUL, a path that resolves
    (through symlinks) outside `root`, and anything that is not an existing regular file."""
    if not requested:
        requested = "index.html"
    if "\\" in requested or "\x00" in requested:
        raise PathRefused("a path with a backslash or NUL is refused")
    if requested.startswith("/"):
        raise PathRefused("an absolute path is refused")
    parts = requested.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise PathRefused("a path with an empty, '.' or '..' part is refused")
    base = root.resolve(strict=True)
    try:
        target = base.joinpath(*PurePosixPath(requested).parts).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise PathRefused(f"no file {requested!r} in the data docs") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise PathRefused(f"{requested!r} cannot be resolved ({type(exc).__name__})") from None
    if not target.is_relative_to(base):
        raise PathRefused(f"{requested!r} leads outside the data docs")
    if not target.is_file():
        raise PathRefused(f"{requested!r} is not a file")
    return target


def newest_validation_page(root: Path, dataset_id: str, suite: str) -> str | None:
    """The path (relative to `root`) of the newest page of `dataset_id`'s validation against `suite`.

    The names given are only compared with the folder's entries, never joined into a path."""
    run_name = dataset_id.replace("/", "_")  # how pipelines.data.validate names the run
    validations = root / "validations"
    if not validations.is_dir():
        return None
    pages = []
    for suite_dir in validations.iterdir():
        if suite_dir.name != suite or not suite_dir.is_dir() or suite_dir.is_symlink():
            continue
        for run_dir in suite_dir.iterdir():
            if run_dir.name != run_name or not run_dir.is_dir() or run_dir.is_symlink():
                continue
            for time_dir in run_dir.iterdir():
                if time_dir.is_dir() and not time_dir.is_symlink():
                    pages += [(time_dir.name, page.name) for page in time_dir.glob("*.html") if page.is_file()]
            if pages:
                when, page = max(pages)
                return "/".join(("validations", suite_dir.name, run_dir.name, when, page))
    return None


def officer_problem(user_name: str, site: str) -> str | None:
    """Why `user_name` may not read `site`'s Data Docs (None: a compliance officer of that site)."""
    from pipelines.config import load_config

    try:
        user = load_config().user(user_name)
    except KeyError:
        return f"{user_name!r} is not a configured user"
    if user.site != site:
        return f"{user_name} is a user of site {user.site}, not {site}"
    if READER_ROLE not in user.roles:
        return f"{user_name} does not hold the {READER_ROLE} role of site {site}"
    return None


def served_site(site: str) -> str:
    """`site` when this Airflow serves it (a deployment serves its FACTORY_SITE only); else 404."""
    from fastapi import HTTPException

    from pipelines.config import SITES

    wanted = os.environ.get("FACTORY_SITE")
    if site not in SITES or (wanted and site != wanted):
        raise HTTPException(status_code=404, detail=f"this Airflow serves no data docs of site {site!r}")
    return site


def create_app(home: Path | None = None):
    """The FastAPI app; `home` defaults to FACTORY_HOME at each request.

    (No `from __future__ import annotations` in this module: FastAPI reads the local `Annotated`
    dependencies below at runtime.)"""
    from typing import Annotated

    from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi import Depends, FastAPI, HTTPException, Query
    from fastapi.responses import FileResponse, RedirectResponse

    app = FastAPI(title="Factory Data Docs", docs_url=None, redoc_url=None, openapi_url=None)

    def reader(site: str, user: Annotated[BaseUser, Depends(get_user)]) -> str:
        site = served_site(site)
        if problem := officer_problem(user.get_name(), site):
            raise HTTPException(status_code=403, detail=f"only compliance officers of {site} read its data docs: "
                                f"{problem}")
        return site

    Reader = Annotated[str, Depends(reader)]
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    @app.get("/{site}/validation")
    def validation(site: Reader, dataset: Annotated[str, Query(max_length=300)],
                   suite: Annotated[str, Query(max_length=200)] = "release"):
        page = newest_validation_page(docs_root(site, home), dataset, suite)
        if page is None:
            raise HTTPException(status_code=404, detail=f"no data docs page of {dataset!r} (suite {suite!r}) "
                                f"at {site}")
        # relative to .../{site}/validation, so it holds behind a proxy's path prefix too
        return RedirectResponse(quote(page), status_code=303, headers=headers)

    @app.get("/{site}/{path:path}")
    def page(site: Reader, path: str):
        try:
            target = resolve_inside(docs_root(site, home), path)
        except FileNotFoundError:
            raise HTTPException(status_code=404, detail=f"site {site} has no data docs yet") from None
        except PathRefused as refused:
            raise HTTPException(status_code=404, detail=str(refused)) from None
        return FileResponse(target, headers=headers)

    return app


class LazyApp:
    """An ASGI app that builds `create_app()` on its first request: Airflow loads the plugin in every
    process, and only the API server serves requests."""

    def __init__(self) -> None:
        self._app = None

    async def __call__(self, scope, receive, send):
        if self._app is None:
            self._app = create_app()
        await self._app(scope, receive, send)
