"""Session fixtures that start real services: an Apache Kafka broker and a PostgreSQL server.

Nothing is mocked and nothing is skipped: if a service cannot start, the tests fail with the reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import pytest

from kdwatch.devkafka import DevKafka, free_port
from kdwatch.storage.sql import SqlStore


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevKafka]:
    """A real single-node KRaft broker started for this session (restartable by reliability tests)."""
    broker = DevKafka(tmp_path_factory.mktemp("kafka"))
    started = time.monotonic()
    info = broker.start(tls=True)
    print(f"\nkafka broker ready in {time.monotonic() - started:.1f}s at {info.bootstrap} (TLS {info.tls_bootstrap})")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kafka(kafka_broker: DevKafka) -> str:
    """The broker's bootstrap address."""
    info = kafka_broker.info()
    assert info is not None, "the session's broker is not running"
    return info.bootstrap


@pytest.fixture(scope="session")
def kafka_tls(kafka_broker: DevKafka) -> tuple[str, str]:
    """The broker's SSL listener: (bootstrap, CA certificate file)."""
    info = kafka_broker.info()
    assert info is not None and info.tls_bootstrap is not None and info.ca_file is not None
    return info.tls_bootstrap, info.ca_file


def _pg_bin() -> Path:
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: run `make setup` (installs Debian's postgresql)")
    return Path(found[-1]).parent


@dataclass
class PostgresCluster:
    """A private PostgreSQL cluster the tests started (and may stop and start again)."""

    bindir: Path
    data: Path
    sock: Path
    port: int
    run_as: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://kdwatch@127.0.0.1:{self.port}"

    def running(self) -> bool:
        return subprocess.run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
                              capture_output=True).returncode == 0

    def start(self) -> None:
        if self.running():
            return
        log = self.data.parent / "postgres.log"
        subprocess.run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", "-t", "60",
                        "start", "-o", f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                        "-c max_connections=200"], check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                       check=False, capture_output=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    bindir = _pg_bin()
    # Not under pytest's 0700 temp root: the postgres user must be able to reach its directory.
    base = Path(tempfile.mkdtemp(prefix="kdwatch-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: use the postgres system user
        user = pwd.getpwnam("postgres")
        for path in (base, sock):
            os.chown(path, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "kdwatch", "--no-sync"],
                   check=True, capture_output=True)
    cluster = PostgresCluster(bindir, data, sock, free_port(), run_as)
    cluster.start()
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(postgres_cluster: PostgresCluster) -> str:
    """The private cluster's URL, without a database."""
    return postgres_cluster.url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kdwatch.db'}"
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    """A migrated store on a fresh database of each kind."""
    sql_store = SqlStore.from_url(database_url)
    sql_store.migrate()
    yield sql_store
    sql_store.close()
