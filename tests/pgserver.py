"""A throwaway PostgreSQL server for integration tests, started from the local binaries.

initdb refuses to run as root, so as root the data directory is handed to an unprivileged
user (Debian's `postgres`, else `nobody`) and the server runs as that user via runuser. It
listens on 127.0.0.1 on a free port with trust authentication, and everything is deleted
on stop. Missing binaries are an error, never a silent skip.
"""

from __future__ import annotations

import glob
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


def _binaries() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        path = shutil.which("initdb")
        if path is None:
            raise PostgresUnavailable(
                "PostgreSQL binaries not found (install Debian's postgresql package; .ci/run "
                "does this as root)")
        return os.path.dirname(path)
    return os.path.dirname(found[-1])


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


def start_postgres() -> PgServer:
    bindir = _binaries()
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
