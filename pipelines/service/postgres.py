"""A local PostgreSQL 15 cluster under FACTORY_HOME for `FACTORY_DB=postgres`: each site's
deployment gets databases of its own (`airflow_<site>`, `mlflow_<site>`), owned by a login role of
its own (`factory_<site>`, password generated into the site's home, 0600) that no other site's role
may connect to.

The cluster lives in `FACTORY_HOME/postgres/data`, listens on 127.0.0.1 only, and its
superuser `factory` has a generated password (scram-sha-256, kept 0600 beside the cluster); only
`factory up` uses it, to create the sites' roles and databases.
Run as root, the server runs as the `postgres` system user (PostgreSQL refuses root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipelines.fileio import file_lock
from pipelines.workspace import SitePaths

PG_BIN = Path(os.environ.get("FACTORY_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "factory"


class PostgresError(RuntimeError):
    """The cluster could not be created, started or stopped; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Cluster:
    home: Path

    @property
    def root(self) -> Path:
        return self.home / "postgres"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.root / "superuser.password"

    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url(self, port: int, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{SUPERUSER}:{self.password()}@127.0.0.1:{port}/{database}"

    # --- running the binaries as a user PostgreSQL accepts -------------------------------------

    def _owner(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresError("running as root needs the `postgres` system user (apt-get install postgresql-15)") from None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        binary = PG_BIN / args[0]
        if not binary.exists():
            raise PostgresError(f"{binary} not found; install PostgreSQL 15 or set FACTORY_PG_BIN")
        command = [str(binary), *args[1:]]
        if self._owner() is not None:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd="/")
        if check and result.returncode != 0:
            raise PostgresError(f"{args[0]} failed: {(result.stderr or result.stdout).strip()[-800:]}")
        return result

    def _give(self, path: Path) -> None:
        owner = self._owner()
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)

    # --- lifecycle -------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the cluster on first use (initdb); a second call changes nothing."""
        if (self.data / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        owner = self._owner()
        if owner is not None:
            probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(self.root)],
                                   capture_output=True)
            if probe.returncode != 0:
                raise PostgresError(
                    f"the postgres user cannot reach {self.root}; make FACTORY_HOME and its parents "
                    "traversable (chmod o+x) or put FACTORY_HOME elsewhere"
                )
        if not self.password_file.exists():
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(18))
        staging = self.root / "data.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        self._give(staging)
        pwfile = self.root / ".initdb-pw"
        pwfile.write_text(self.password())
        os.chmod(pwfile, 0o600)
        self._give(pwfile)
        try:
            self._run("initdb", "-D", str(staging), "-U", SUPERUSER, f"--pwfile={pwfile}",
                      "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        finally:
            pwfile.unlink(missing_ok=True)
        staging.rename(self.data)  # a half-made cluster is never mistaken for a usable one

    def running_port(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return None
        lines = pidfile.read_text().splitlines()
        if self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode != 0:
            return None
        return int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None

    def start(self, port: int | None = None) -> int:
        """Start the server (if it is not running) and return its port."""
        self.ensure()
        current = self.running_port()
        if current:
            return current
        port = port or free_port()
        self.socket_dir.mkdir(exist_ok=True)
        self._give(self.socket_dir)
        if not self.log.exists():
            self.log.touch()
        self._give(self.log)
        options = f"-p {port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options)
        return port

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", check=False)


def database_names(site: str) -> list[str]:
    return [f"airflow_{site}", f"mlflow_{site}"]


def site_role(site: str) -> str:
    return f"factory_{site}"


def _site_password(paths: SitePaths) -> str:
    """The site's database password, generated once into its Airflow home (0600)."""
    file = paths.airflow_home / "postgres.password"
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(18))
    return file.read_text().strip()


def ensure_site_databases(cluster: Cluster, port: int, site: str, password: str) -> None:
    """The site's role (login, this password) and its databases, owned by it, closed to everyone else."""
    import psycopg2
    from psycopg2 import sql

    role = site_role(site)
    connection = psycopg2.connect(host="127.0.0.1", port=port, user=SUPERUSER, password=cluster.password(),
                                  dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            verb = "ALTER" if cursor.fetchone() else "CREATE"
            cursor.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)), (password,))
            cursor.execute("SELECT datname FROM pg_database")
            existing = {row[0] for row in cursor.fetchall()}
            for name in database_names(site):
                if name not in existing:
                    cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                                 sql.Identifier(role)))
                cursor.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
    finally:
        connection.close()


def start_cluster(home: Path, site: str, port: int | None = None) -> tuple[Cluster, int, dict[str, str]]:
    """Start the cluster (if it is not running), create `site`'s role and databases; return the cluster,
    its port and the environment the site's processes get (URLs with the site's own role only)."""
    cluster = Cluster(home)
    with file_lock(home / "postgres.lock"):  # sites starting at once start one cluster
        port = cluster.start(port)
    paths = SitePaths.of(site, home)
    password = _site_password(paths)
    ensure_site_databases(cluster, port, site, password)
    role = site_role(site)

    def url(database: str, driver: str) -> str:
        return f"{driver}://{role}:{password}@127.0.0.1:{port}/{database}"

    # psycopg2 named for both: SQLAlchemy 2.1 takes psycopg (3), not installed, for a bare postgresql://
    env = {"FACTORY_AIRFLOW_DB_URL": url(f"airflow_{site}", "postgresql+psycopg2"),
           f"FACTORY_MLFLOW_URI_{site.upper()}": url(f"mlflow_{site}", "postgresql+psycopg2")}
    return cluster, port, env
