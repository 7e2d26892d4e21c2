"""A private PostgreSQL server from Debian's ``postgresql`` package: a new cluster in its own folder,
listening on 127.0.0.1 on a free port, password authentication (scram-sha-256) for TCP, and a
database ``erc``. Used by the tests (a throwaway cluster per session) and by ``erc stack`` (the
job store of the native stack), the way :mod:`service.torchserve` starts TorchServe.

PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres`` user that the
Debian package creates, and its commands run through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from service.launch import free_port
from training.errors import ErcError


class PostgresUnavailable(ErcError):
    """PostgreSQL's server programs are missing, or the cluster did not start."""


def bindir() -> Path:
    """The newest installed ``/usr/lib/postgresql/N/bin`` holding ``initdb`` and ``pg_ctl``."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if (Path(p) / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise PostgresUnavailable(
            "PostgreSQL's server programs are not installed (initdb, pg_ctl): apt-get install postgresql"
        )
    return found[-1]


@dataclass
class Postgres:
    """A running cluster; ``url`` is the SQLAlchemy/``ERC_AUDIT_DB`` URL of its ``erc`` database."""

    datadir: Path
    port: int
    password: str
    bindir: Path
    user: str | None  # the OS user the server runs as (None: this process's)
    log: Path

    @property
    def url(self) -> str:
        return f"postgresql://erc:{self.password}@127.0.0.1:{self.port}/erc"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    def pg_ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        """Start the server (again, after :meth:`stop`); returns once it accepts connections."""
        res = self.pg_ctl("-l", str(self.log), "-w", "-t", "60", "start")
        if res.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise PostgresUnavailable(f"PostgreSQL did not start: {res.stderr.strip()}\n{tail}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: like a crash; the data stays)."""
        self.pg_ctl("-m", mode, "-w", "stop")

    def running(self) -> bool:
        return self.pg_ctl("status").returncode == 0

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        res = subprocess.run(
            self._cmd(
                str(self.bindir / "createdb"),
                "-h",
                str(self.datadir.parent),
                "-p",
                str(self.port),
                "-U",
                "erc",
                name,
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if res.returncode != 0:
            raise PostgresUnavailable(f"createdb {name} failed: {res.stderr.strip()}")
        return self.url.rsplit("/", 1)[0] + "/" + name

    def destroy(self) -> None:
        """Stop it and delete the cluster."""
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres(root: Path | None = None, *, durable: bool = True) -> Postgres:
    """A new cluster under ``root`` (default: a new temporary folder), started, with database
    ``erc`` owned by role ``erc``. ``durable=False`` turns fsync off (tests: faster, and a crash of
    the machine may lose the cluster, which is thrown away anyway)."""
    bins = bindir()
    user = "postgres" if os.geteuid() == 0 else None
    # Its own folder directly under /tmp (or root): the server's user must reach it, and pytest's
    # temporary folders are private to root.
    base = Path(tempfile.mkdtemp(prefix="erc-pg-", dir=root))
    datadir, log, pwfile = base / "data", base / "postgres.log", base / "pw"
    password = secrets.token_hex(16)
    pwfile.write_text(password + "\n")
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    pg = Postgres(datadir, free_port(), password, bins, user, log)
    res = subprocess.run(
        pg._cmd(
            str(bins / "initdb"),
            "-D",
            str(datadir),
            "-U",
            "erc",
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            *([] if durable else ["--no-sync"]),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    pwfile.unlink()
    if res.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise PostgresUnavailable(f"initdb failed: {res.stderr.strip()[-2000:]}")
    settings = [
        "listen_addresses = '127.0.0.1'",
        f"port = {pg.port}",
        f"unix_socket_directories = '{base}'",
        "max_connections = 200",
        "shared_buffers = 32MB",
    ]
    if not durable:
        settings += ["fsync = off"]  # commits survive a server crash, not an OS crash
    with (datadir / "postgresql.conf").open("a") as f:
        f.write("\n# erc\n" + "\n".join(settings) + "\n")
    try:
        pg.start()
        pg.create_database("erc")
    except BaseException:
        pg.destroy()
        raise
    return pg
