"""The workspace layout of design section 4: one folder per site under FACTORY_HOME."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import SITES


class WorkspaceError(RuntimeError):
    """The workspace is missing or unusable; the message says what to do."""


def factory_home() -> Path:
    return Path(os.environ.get("FACTORY_HOME", ".factory")).resolve()


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class UnsafeName(ValueError):
    """A name that would not stay one path component (from another party, or mistyped)."""


def safe_name(value: object, what: str = "name") -> str:
    """`value` if it is a plain name (letters, digits, '.', '_', '-'; no '..', no '/'), else UnsafeName.

    Every name that becomes part of a path and did not come from this site's own code passes here."""
    if not isinstance(value, str) or not SAFE_NAME.match(value) or ".." in value:
        raise UnsafeName(f"{what} {str(value)[:60]!r} is not a plain name (letters, digits, '.', '_', '-')")
    return value


def check_site(site: str) -> str:
    if site not in SITES:
        raise WorkspaceError(f"unknown site {site!r}; sites are {', '.join(SITES)}")
    return site


@dataclass(frozen=True)
class SitePaths:
    """Every path a site owns. Steps receive these explicitly, never guess them."""

    site: str
    home: Path

    @classmethod
    def of(cls, site: str, home: Path | None = None) -> SitePaths:
        return cls(check_site(site), (home or factory_home()).resolve())

    @property
    def root(self) -> Path:
        return self.home / self.site

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def data_dir(self) -> Path:
        return self.repo / "data"

    @property
    def models_dir(self) -> Path:
        return self.repo / "models"

    @property
    def dvc_remote(self) -> Path:
        return self.root / "dvc-remote"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_uri(self) -> str:
        override = os.environ.get(f"FACTORY_MLFLOW_URI_{self.site.upper()}")
        return override or f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def secret_file(self) -> Path:
        return self.keys_dir / "secret"

    @property
    def trust_dir(self) -> Path:
        return self.root / "trust"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        """Sealed packages this site sends and their delivery state (pipelines.carrier.outbox)."""
        return self.root / "outbox"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    @property
    def state_dir(self) -> Path:
        """Site-local bookkeeping that is not versioned data (consumed packages, locks, reports)."""
        return self.root / "state"

    @property
    def airflow_home(self) -> Path:
        """The site's own AIRFLOW_HOME (`factory up --site`): its metadata DB, config, logs and the
        passwords of its users (`passwords.json`, 0600)."""
        return self.root / "airflow"

    @property
    def service_dir(self) -> Path:
        """What `factory up --site` started for this site: its service record and process logs."""
        return self.root / "service"

    def require(self) -> SitePaths:
        if not (self.repo / ".dvc").is_dir():
            raise WorkspaceError(
                f"site {self.site!r} is not initialised under {self.home}; run `factory init` first"
            )
        return self


def airflow_home(home: Path | None = None) -> Path:
    """The AIRFLOW_HOME of the embedded development mode (`factory run --embedded`), where one
    in-process Airflow plays all three sites; a site's own deployment uses `SitePaths.airflow_home`."""
    return (home or factory_home()) / "airflow"
