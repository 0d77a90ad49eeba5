"""A throwaway PostgreSQL server for tests: Debian's server binaries, a temp cluster, a local port.

The server refuses to run as root, so as root every server command runs as the ``postgres`` system user
(``runuser``); as anyone else it runs directly. Nothing here needs the network or a system service.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "install Debian's server with `apt-get install -y postgresql` (or `make browser`)"
SUPERUSER = "sdsweep"  # the cluster's superuser (initdb -U), trusted on 127.0.0.1 only


def server_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb and pg_ctl, or None."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bin_dir = Path(initdb).parent
        version = bin_dir.parent.name
        if (bin_dir / "pg_ctl").exists():
            found.append((int(version) if version.isdigit() else 0, bin_dir))
    return max(found)[1] if found else None


def missing_reason() -> str | None:
    """Why a PostgreSQL test cannot run here (with the fix), or None when it can."""
    if server_bin_dir() is None:
        return f"PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: {INSTALL_HINT}"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and `runuser` is missing, so the server cannot run as the postgres user"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the Python driver is missing: pip install 'psycopg[binary]' (extra: sdsweep[postgres])"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    """One running cluster; ``url(db)`` is the SQLAlchemy URL Optuna's RDBStorage takes."""

    bin_dir: Path
    root: Path
    port: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _command(self, argv: list[str]) -> list[str]:
        # The server refuses root; the Debian package creates an unprivileged `postgres` user.
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def _run(self, argv: list[str], timeout: float = 120) -> None:
        proc = subprocess.run(self._command(argv), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log_tail = ""
            server_log = self.root / "server.log"
            if server_log.exists():
                log_tail = "\n" + server_log.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}{log_tail}"
            )

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = server_bin_dir()
        if bin_dir is None:
            raise RuntimeError(INSTALL_HINT)
        # Our own temp dir (pytest's are 0700 root-only): the postgres user must own the cluster.
        root = Path(tempfile.mkdtemp(prefix="sdsweep-pg-"))
        if os.geteuid() == 0:
            shutil.chown(root, user="postgres")
        server = cls(bin_dir=bin_dir, root=root, port=free_port())
        try:
            server._run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(server.data_dir),
                    "-A",
                    "trust",
                    "-U",
                    SUPERUSER,
                    "-E",
                    "UTF8",
                ]
            )
            # Unix socket in our temp dir (not /var/run/postgresql), TCP on loopback only.
            options = f"-k {root} -p {server.port} -h 127.0.0.1 -c max_connections=200 -c fsync=off"
            server._run(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(server.data_dir),
                    "-o",
                    options,
                    "-l",
                    str(root / "server.log"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            )
        except BaseException:
            server.remove()
            raise
        return server

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=database, autocommit=True
        )

    def create_database(self, name: str) -> str:
        """A fresh empty database; returns its URL."""
        with self._connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self._connect() as conn:
            # Leftover connections of killed test processes would block the drop.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.data_dir.exists():
            try:
                self._run(
                    [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                    timeout=60,
                )
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # already stopped; the directory goes anyway
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
