"""Pytest fixtures: a real PostgreSQL server on loopback, for the bot's SQL stores.

- `postgres_server`: PostgreSQL 16 (the server binaries that the `pgserver` wheel from PyPI bundles, so
  nothing comes from apt) initialised in a temporary directory and listening on 127.0.0.1, once per
  session; run as `nobody` when the tests run as root (CI does), since postgres refuses to run as root;
- `postgres_url`: a fresh database on it for one test, as a SQLAlchemy URL (`postgresql+psycopg://...`),
  which is what the chart's `bot.databaseSecret` holds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.vllm_fixtures import free_port

_databases = itertools.count(1)


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"


def _binaries() -> Path:
    spec = importlib.util.find_spec("pgserver")  # found, not imported: its import sets up lock files
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the PostgreSQL tests need the pgserver wheel (in the test extra)", pytrace=False)
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    import psycopg

    bin_dir = _binaries()
    root = Path(tempfile.mkdtemp(prefix="doppel-pg-"))
    as_user: dict[str, Any] = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    data = root / "data"
    subprocess.run(
        [bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "-N"],
        check=True,
        capture_output=True,
        **as_user,
    )
    port = free_port()
    server = subprocess.Popen(
        [bin_dir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", root, "-F"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **as_user,
    )
    found = Postgres("127.0.0.1", port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"PostgreSQL did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.1)
        yield found
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(10)
        if server.poll() is None:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> str:
    import psycopg

    name = f"doppel_test_{next(_databases)}"
    with psycopg.connect(
        f"postgresql://postgres@{postgres_server.host}:{postgres_server.port}/postgres", autocommit=True
    ) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server.url(name)
