"""Fixtures of the manager tests: every test that takes ``db_url`` runs on SQLite and PostgreSQL."""
from __future__ import annotations

import pytest
from manager_util import ManagerProcess, PrivatePostgres


@pytest.fixture(scope="session")
def postgres():
    pg = PrivatePostgres().start()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/manager.db"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def manager_factory(db_url, tmp_path):
    started = []

    def start(**kw) -> ManagerProcess:
        m = ManagerProcess(db_url, tmp_path, **kw)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def manager(manager_factory) -> ManagerProcess:
    return manager_factory()
