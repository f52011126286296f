"""Fixtures for the reliability tests: a private PostgreSQL cluster and a throwaway database on the shared one."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import _asyncpg_url, _create_database, _drop_database, _in_ci
from tests.fakes.base import free_port

PG_BIN = Path(os.environ.get("NOTIFIER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster of this test alone (restarting the machine's shared one would break other suites)."""

    directory: Path
    port: int

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str, timeout: float = 60) -> None:
        # initdb refuses to run as root: run the server tools as the postgres user then.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=timeout)

    def pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-k {self.directory} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.run(
            str(PG_BIN / "pg_ctl"),
            action,
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "log"),
            "-w",
            "-t",
            "30",
            "-o",
            options,
            *extra,
        )


@pytest.fixture
def private_postgres() -> Iterator[PrivateCluster]:
    """initdb + start a cluster on a free loopback port in a temporary directory; stopped and removed after."""
    if not (PG_BIN / "initdb").exists():
        if _in_ci():
            pytest.fail(f"PostgreSQL server binaries are required under CI=true but missing in {PG_BIN}")
        pytest.skip(f"no PostgreSQL server binaries in {PG_BIN} (set NOTIFIER_TEST_PG_BIN)")
    directory = Path(tempfile.mkdtemp(prefix="notifier-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    cluster = PrivateCluster(directory, free_port())
    try:
        cluster.run(
            str(PG_BIN / "initdb"), "-D", str(cluster.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"
        )
        cluster.pg_ctl("start")
        yield cluster
    finally:
        if (cluster.data / "postmaster.pid").exists():
            cluster.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def scratch_postgres(postgres_database: str | None) -> Iterator[str]:
    """An empty (unmigrated) database on the shared cluster for this test alone; dropped after."""
    if postgres_database is None:
        pytest.skip("PostgreSQL unreachable (set CI=true to make this an error)")
    name = f"notifier_scratch_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_database(name))
    try:
        yield _asyncpg_url(name)
    finally:
        asyncio.run(_drop_database(name))
