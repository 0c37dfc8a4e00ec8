"""A PostgreSQL cluster of the test run's own, started from Debian's server
binaries (``initdb``, ``pg_ctl``) into a temporary directory on a free port,
so a test can stop and restart it without touching any other database."""

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import free_port


def server_binaries():
    """The directory of ``initdb`` and ``pg_ctl`` (the newest installed), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """``initdb`` into a new directory, then ``pg_ctl start``; trust auth for
    the ``postgres`` user on 127.0.0.1. As root, the server runs as the
    ``postgres`` system user (PostgreSQL refuses to run as root)."""

    def __init__(self, database="queue_engine"):
        self.bindir = server_binaries()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL's server binaries are not installed; `make test` installs them "
                               "(apt-get install postgresql)")
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="qe-postgres-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.directory, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", database)
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program, *args):
        return subprocess.run([*self._as, str(self.bindir / program), *args], check=True, capture_output=True,
                              text=True, timeout=120)

    def start(self):
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode="fast"):
        """``fast`` closes every connection at once (what a restart does to clients)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self):
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.directory, ignore_errors=True)
